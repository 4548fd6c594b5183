"""The .deb and .rpm as files: metadata, scripts, and binaries that load on the targets.

The .rpm is inspected with rpm itself (rpm -qpl / -qpR / -qp --scripts); it cannot be
installed on this Debian machine. Compiled extension modules must load on the oldest
target: RHEL 9 (glibc 2.34, systemd 252) for the .rpm, Debian 12 (glibc 2.36) for the
.deb, so every ELF file in the packages is checked with objdump.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# glibc and libsystemd symbol versions of the targets.
MAX_GLIBC = {"rpm": (2, 34), "deb": (2, 36)}
MAX_LIBSYSTEMD = 252  # RHEL 9 and Debian 12 both ship systemd 252
ALLOWED_NEEDED = re.compile(
    r"^(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|libsystemd|libz)\.so\.[0-9]+$"
    r"|^ld-linux-x86-64\.so\.2$"
)


def run(*command: str, cwd: Path | None = None) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=cwd).stdout


@pytest.fixture(scope="module")
def rpm_tree(packages, tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("rpm-tree")
    subprocess.run(f"rpm2cpio {packages.rpm} | cpio -idm --quiet", shell=True, check=True,
                   cwd=tree)
    return tree


@pytest.fixture(scope="module")
def deb_tree(packages, tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("deb-tree")
    run("dpkg-deb", "-x", str(packages.deb), str(tree))
    return tree


def test_rpm_file_list(packages):
    files = set(run("rpm", "-qpl", str(packages.rpm)).split())
    for expected in (
        "/opt/ocp_agentd/bin/ocp-agentd",
        "/opt/ocp_agentd/bin/ocp-agentctl",
        "/opt/ocp_agentd/bin/python3.11",
        "/opt/ocp_agentd/pyvenv.cfg",
        "/usr/bin/ocp-agentd",
        "/usr/bin/ocp-agentctl",
        "/usr/lib/systemd/system/ocp-agentd.service",
        "/etc/ocp_agentd/config.toml",
        "/etc/ocp_agentd",
    ):
        assert expected in files, expected
    assert any(f.endswith("/ocp_agentd/daemon.py") for f in files)
    assert any(re.search(r"/systemd/_daemon\.cpython-311-x86_64-linux-gnu\.so$", f) for f in files)
    assert not [f for f in files if f.startswith(("/var/", "/run/", "/tmp/", "/work/"))]


def test_rpm_requires_and_config(packages):
    requires = {line.split()[0] for line in run("rpm", "-qpR", str(packages.rpm)).splitlines()}
    assert {"python3.11", "systemd", "systemd-libs"} <= requires
    flags = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(packages.rpm))
    config = dict(line.split(" ", 1) for line in flags.splitlines() if " " in line)
    assert set(config["/etc/ocp_agentd/config.toml"]) >= {"c", "n"}, config
    info = run("rpm", "-qpi", str(packages.rpm))
    assert re.search(rf"^Version\s*:\s*{re.escape(packages.version)}$", info, re.M)
    assert re.search(r"^Architecture\s*:\s*x86_64$", info, re.M)


def test_rpm_scripts(packages):
    scripts = run("rpm", "-qp", "--scripts", str(packages.rpm))
    sections = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                               scripts, re.M | re.S))
    assert {"postinstall", "preuninstall", "postuninstall", "posttrans"} <= set(sections)
    for name, body in sections.items():
        assert subprocess.run(["sh", "-n"], input=body, text=True).returncode == 0, name
    # install: enable + start; upgrade: hand over in %posttrans; erase: stop first.
    assert 'install_or_upgrade ""' in sections["postinstall"]
    assert "install_or_upgrade upgrade" in sections["posttrans"]
    assert 'if [ "$1" -eq 0 ]' in sections["preuninstall"] and "stop_for_removal" in sections[
        "preuninstall"]
    assert "kill -USR2" in sections["posttrans"]
    assert 'systemctl stop "$unit"' in sections["preuninstall"]


def test_deb_metadata_and_scripts(packages, tmp_path):
    fields = run("dpkg-deb", "-f", str(packages.deb), "Package", "Version", "Architecture",
                 "Depends")
    assert f"Version: {packages.version}" in fields
    assert "Architecture: amd64" in fields
    assert re.search(r"Depends: .*python3\.11", fields)
    control = tmp_path / "control"
    run("dpkg-deb", "-e", str(packages.deb), str(control))
    assert (control / "conffiles").read_text().split() == ["/etc/ocp_agentd/config.toml"]
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(control / script)], check=True)
    assert "kill -USR2" in (control / "postinst").read_text()


def _elf_files(tree: Path) -> list[Path]:
    found = []
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _versions(text: str, prefix: str) -> list[tuple[int, ...]]:
    return sorted({tuple(int(p) for p in v.split(".")) for v in re.findall(
        rf"\b{prefix}_([0-9][0-9.]*[0-9])\b", text)})


@pytest.mark.parametrize("kind", ["rpm", "deb"])
def test_compiled_extensions_load_on_the_target(kind, request):
    tree: Path = request.getfixturevalue(f"{kind}_tree")
    elves = _elf_files(tree / "opt/ocp_agentd")
    names = {p.name for p in elves}
    assert any(n.startswith("_daemon.cpython-311") for n in names), "systemd-python missing"
    too_new = []
    for elf in elves:
        symbols = run("objdump", "-T", str(elf))
        glibc = _versions(symbols, "GLIBC")
        if glibc and glibc[-1] > MAX_GLIBC[kind]:
            too_new.append(f"{elf.relative_to(tree)} needs GLIBC_{'.'.join(map(str, glibc[-1]))}")
        libsystemd = _versions(symbols, "LIBSYSTEMD")
        if libsystemd and libsystemd[-1][0] > MAX_LIBSYSTEMD:
            too_new.append(f"{elf.relative_to(tree)} needs LIBSYSTEMD_{libsystemd[-1][0]}")
        if elf.suffix == ".so" and ".cpython-" in elf.name:
            assert "cpython-311-x86_64-linux-gnu" in elf.name, elf
        headers = run("objdump", "-p", str(elf))
        for needed in re.findall(r"NEEDED\s+(\S+)", headers):
            bundled = any(p.name == needed for p in elves)
            assert bundled or ALLOWED_NEEDED.match(needed), f"{elf.name} needs {needed}"
    assert not too_new, "\n".join(too_new)


def test_venv_is_made_for_opt_and_precompiled(deb_tree, packages):
    venv = deb_tree / "opt/ocp_agentd"
    assert (venv / "bin/python3.11").readlink() == Path("/usr/bin/python3.11")
    config = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in config
    for script in ("ocp-agentd", "ocp-agentctl"):
        assert (venv / "bin" / script).read_text().startswith("#!/opt/ocp_agentd/bin/python\n")
    assert (deb_tree / "usr/bin/ocp-agentd").readlink() == Path("/opt/ocp_agentd/bin/ocp-agentd")
    leaked = subprocess.run(["grep", "-rlI", "-F", str(packages.stage), str(venv)],
                            capture_output=True, text=True).stdout
    assert not leaked, f"build paths in: {leaked}"
    # Every module has its byte code in the package: Python never writes __pycache__.
    missing = []
    for source in venv.rglob("*.py"):
        cached = source.parent / "__pycache__" / f"{source.stem}.cpython-311.pyc"
        if not cached.exists():
            missing.append(str(source.relative_to(venv)))
    assert not missing, missing[:20]
