"""Prints every RUNPATH/RPATH entry of the ELF files under a tree that points outside the
package's prefix, one `file: entry` per line; prints nothing when all stay inside.

    python3 packaging/runpaths.py TREE PREFIX

TREE is the directory that will be installed as PREFIX (a staged root or an unpacked
package's PREFIX). An entry stays inside when it is PREFIX or below, or starts with
$ORIGIN and resolves below PREFIX (manylinux wheels use `$ORIGIN/../<name>.libs`).
The dynamic section is read with objdump -p (binutils), as ld.so(8) would read it.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ENTRY = re.compile(r"^\s*(RUNPATH|RPATH)\s+(\S+)\s*$", re.M)


def elf_files(tree: Path) -> Iterator[Path]:
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    yield path


def runpaths(elf: Path) -> list[str]:
    """Every RUNPATH/RPATH directory of one ELF file, in order."""
    headers = subprocess.run(["objdump", "-p", str(elf)], capture_output=True, text=True,
                             check=True).stdout
    return [d for _, value in ENTRY.findall(headers) for d in value.split(":") if d]


def outside(tree: Path, prefix: str) -> list[str]:
    """`file: entry` for each entry that leaves prefix (file paths as installed)."""
    found = []
    for elf in elf_files(tree):
        installed = posixpath.join(prefix, elf.relative_to(tree).as_posix())
        for entry in runpaths(elf):
            resolved = entry
            if entry.startswith(("$ORIGIN", "${ORIGIN}")):
                rest = entry.split("}", 1)[1] if entry.startswith("${") else entry[7:]
                resolved = posixpath.normpath(posixpath.dirname(installed) + rest)
            resolved = posixpath.normpath(resolved)
            if os.path.commonpath([resolved, prefix]) != prefix:
                found.append(f"{installed}: {entry}")
    return found


if __name__ == "__main__":
    for line in outside(Path(sys.argv[1]), sys.argv[2].rstrip("/")):
        print(line)
