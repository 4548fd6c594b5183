"""Removes directory entries from a .deb's data archive, in place:

    python3 packaging/deb_drop_dirs.py PACKAGE.deb ./opt/ [...]

nfpm lists every parent directory of the packaged files, so the .deb would own `/opt`.
No Debian package owns `/opt` (the base system makes it), and dpkg removes a directory
it thinks is the package's when the last owner goes: `dpkg --purge` would try to delete
`/opt`. Without the entry dpkg leaves `/opt` alone (dpkg needs it to exist, which it does
on every Debian system).

The .deb format is deb(5): an ar(5) archive of debian-binary, control.tar.*, data.tar.*.
The archive is written again with the same member order and timestamps, so the result
is as reproducible as nfpm's own output. Only gzip-compressed data (nfpm's default) is
handled; anything else raises ValueError.
"""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
from pathlib import Path

AR_MAGIC = b"!<arch>\n"


def read_ar(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """[(name, 60-byte header, content), ...] in archive order."""
    if not data.startswith(AR_MAGIC):
        raise ValueError("not an ar archive")
    members = []
    offset = len(AR_MAGIC)
    while offset < len(data):
        header = data[offset:offset + 60]
        name = header[:16].rstrip(b" ")
        size = int(header[48:58])
        content = data[offset + 60:offset + 60 + size]
        members.append((name, header, content))
        offset += 60 + size + (size % 2)
    return members


def ar_header(template: bytes, size: int) -> bytes:
    return template[:48] + str(size).encode().ljust(10) + template[58:60]


def drop(tar_gz: bytes, names: set[str]) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(tar_gz)) as compressed:
        raw = compressed.read()
    out = io.BytesIO()
    with (tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as source,
          # GNU format, as dpkg reads it (it refuses PAX extended headers).
          tarfile.open(fileobj=out, mode="w:", format=tarfile.GNU_FORMAT) as target):
        for member in source.getmembers():
            if member.name in names or member.name.rstrip("/") + "/" in names:
                continue
            target.addfile(member, source.extractfile(member) if member.isfile() else None)
        mtime = max((m.mtime for m in source.getmembers()), default=0)
    compressed_out = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed_out, mode="wb", mtime=mtime) as writer:
        writer.write(out.getvalue())
    return compressed_out.getvalue()


def main(package: Path, names: list[str]) -> None:
    members = read_ar(package.read_bytes())
    rebuilt = bytearray(AR_MAGIC)
    for name, header, content in members:
        if name.startswith(b"data.tar"):
            if not name.startswith(b"data.tar.gz"):
                raise ValueError(f"{package}: {name.decode()} is not gzip")
            content = drop(content, set(names))
        rebuilt += ar_header(header, len(content)) + content
        if len(content) % 2:
            rebuilt += b"\n"
    package.write_bytes(bytes(rebuilt))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
