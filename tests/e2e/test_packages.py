"""The .deb and .rpm as files: metadata, scripts, binaries that load on the targets, what
the distributions' validators say, and whether a second build gives the same bytes.

The .rpm is inspected with rpm itself (rpm -qpl / -qpR / -qp --scripts); it cannot be
installed on this Debian machine. Compiled extension modules must load on the oldest
target: RHEL 9 (glibc 2.34, systemd 252) for the .rpm, Debian 12 (glibc 2.36) for the
.deb, so every ELF file in the packages is checked with objdump. lintian and rpmlint
(Debian's packages, installed by the e2e bootstrap) must report nothing beyond the
overrides and filters in packaging/, each of which gives its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

# glibc and libsystemd symbol versions of the targets.
MAX_GLIBC = {"rpm": (2, 34), "deb": (2, 36)}
MAX_LIBSYSTEMD = 252  # RHEL 9 and Debian 12 both ship systemd 252
ALLOWED_NEEDED = re.compile(
    r"^(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|libsystemd|libz)\.so\.[0-9]+$"
    r"|^ld-linux-x86-64\.so\.2$"
)


# lintian (Debian 12's 2.116) and rpmlint (2.4) after the overrides and filters in
# packaging/: nothing.
EXPECTED_LINTIAN: list[str] = []
LINTIAN_OVERRIDDEN = {
    "dir-or-file-in-opt", "package-installs-python-pycache-dir",
    "missing-intermediate-directory", "unusual-interpreter", "initial-upload-closes-no-bugs",
}
EXPECTED_RPMLINT: list[str] = []
# Man pages and completion, made by python -m ocp_agentd.cli.docs at build time.
DOCS = ("/usr/share/man/man8/ocp-agentd.8.gz", "/usr/share/man/man1/ocp-agentctl.1.gz",
        "/usr/share/bash-completion/completions/ocp-agentctl")
# The Debian package of each library the compiled modules may link.
DEB_OF_SONAME = {
    "libc.so.6": "libc6", "libm.so.6": "libc6", "libpthread.so.0": "libc6",
    "libdl.so.2": "libc6", "librt.so.1": "libc6", "ld-linux-x86-64.so.2": "libc6",
    "libgcc_s.so.1": "libgcc-s1", "libstdc++.so.6": "libstdc++6",
    "libsystemd.so.0": "libsystemd0", "libz.so.1": "zlib1g",
}


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
    assert set(DOCS) <= files
    assert any(re.search(r"/systemd/_daemon\.cpython-311-x86_64-linux-gnu\.so$", f) for f in files)
    assert not [f for f in files if f.startswith(("/var/", "/run/", "/tmp/", "/work/"))]


def test_rpm_requires_and_config(packages, rpm_tree):
    requires = run("rpm", "-qp", "--qf", "[%{REQUIREFLAGS:deptype} %{REQUIRES}\n]",
                   str(packages.rpm))
    kinds: dict[str, set[str]] = {}
    for line in requires.splitlines():
        kind, name = line.split(" ", 1)
        kinds.setdefault(name.split()[0], set()).add(kind)
    assert {"python3.11", "systemd", "util-linux"} <= set(kinds)  # util-linux: setpriv
    assert "post" in kinds["systemd"], kinds  # Requires(post): systemctl preset in %post
    # Library requirements by soname, as rpmbuild writes them: every library that an ELF
    # file of the package links and does not bring itself.
    declared = {name for name in kinds if name.endswith("()(64bit)")}
    assert declared == {f"{soname}()(64bit)" for soname in _needed(rpm_tree)}
    flags = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(packages.rpm))
    config = dict(line.split(" ", 1) for line in flags.splitlines() if " " in line)
    assert set(config["/etc/ocp_agentd/config.toml"]) >= {"c", "n"}, config
    assert "l" in config["/usr/share/licenses/ocp-agentd/LICENSE"]  # %license
    assert "d" in config["/usr/share/doc/ocp-agentd/README.md"]  # %doc
    assert "/opt" not in config
    info = run("rpm", "-qpi", str(packages.rpm))
    assert re.search(rf"^Version\s*:\s*{re.escape(packages.version)}$", info, re.M)
    assert re.search(rf"^Release\s*:\s*{packages.release}$", info, re.M)
    assert re.search(r"^Architecture\s*:\s*x86_64$", info, re.M)
    assert packages.rpm.name == f"ocp-agentd-{packages.full_version}.x86_64.rpm"
    changelog = run("rpm", "-qp", "--changelog", str(packages.rpm))
    assert re.match(rf"\* \w{{3}} \w{{3}} \d\d \d{{4}} .+ - {re.escape(packages.full_version)}\n",
                    changelog), changelog


def test_rpm_scripts_follow_the_systemd_macros(packages):
    scripts = run("rpm", "-qp", "--scripts", str(packages.rpm))
    sections = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                               scripts, re.M | re.S))
    assert {"postinstall", "preuninstall", "postuninstall", "posttrans"} <= set(sections)
    for name, body in sections.items():
        assert subprocess.run(["sh", "-n"], input=body, text=True).returncode == 0, name
    # %systemd_post: presets on the first install, never `enable`; %systemd_preun:
    # disable --now on erase; try-restart semantics: a running daemon hands over.
    assert "preset \"$unit\"" in sections["postinstall"]
    assert not re.search(r"systemctl\s+(--\S+\s+)*enable\b", scripts)
    assert "disable --now" in sections["preuninstall"]
    assert "kill -USR2" in sections["posttrans"]
    preset = run("rpm", "-qpl", str(packages.rpm))
    assert "/usr/lib/systemd/system-preset/50-ocp-agentd.preset" in preset.split()


def test_deb_metadata_and_scripts(packages, tmp_path, deb_tree):
    fields = run("dpkg-deb", "-f", str(packages.deb), "Package", "Version", "Architecture",
                 "Depends")
    assert f"Version: {packages.full_version}" in fields
    assert "Architecture: amd64" in fields
    depends = {d.strip().split()[0] for d in re.search(r"^Depends: (.*)$", fields, re.M)
               .group(1).split(",")}
    assert {"python3.11", "systemd", "init-system-helpers"} <= depends
    # Every library the ELF files link, by the Debian package that ships it.
    assert {DEB_OF_SONAME[s] for s in _needed(deb_tree)} <= depends
    control = tmp_path / "control"
    run("dpkg-deb", "-e", str(packages.deb), str(control))
    assert (control / "conffiles").read_text().split() == ["/etc/ocp_agentd/config.toml"]
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(control / script)], check=True)
        text = (control / script).read_text()
        assert not re.search(r"^\s*systemctl\s+(--\S+\s+)*(enable|start|stop|restart)\b",
                             text, re.M), script  # deb-systemd-helper / -invoke only
    postinst = (control / "postinst").read_text()
    assert "kill -USR2" in postinst and "deb-systemd-invoke start" in postinst
    assert "deb-systemd-helper --quiet was-enabled" in postinst
    # The package does not own /opt (purge would try to remove it).
    listing = run("dpkg-deb", "-c", str(packages.deb))
    assert not re.search(r" \./opt/$", listing, re.M), listing[:500]
    assert re.search(r" \./opt/ocp_agentd/$", listing, re.M)
    for path in DOCS:
        assert (deb_tree / path.lstrip("/")).is_file(), path
    page = subprocess.run(["zcat", str(deb_tree / DOCS[1].lstrip("/"))], check=True,
                          capture_output=True, text=True).stdout
    assert page.startswith(".TH OCP\\-AGENTCTL")
    assert "COMMAND \\fI\\,'ocp-agentctl status'" in page.replace("\\-", "-")
    doc = deb_tree / "usr/share/doc/ocp-agentd"
    copyright_text = (doc / "copyright").read_text()
    assert copyright_text.startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    assert "License: Apache-2.0" in copyright_text and "systemd-python" in copyright_text
    changelog = subprocess.run(["zcat", str(doc / "changelog.Debian.gz")], check=True,
                               capture_output=True, text=True).stdout
    assert changelog.startswith(f"ocp-agentd ({packages.full_version}) ")


def test_lintian_reports_only_the_overridden_tags(packages):
    """lintian's whole output is expected: a new error or warning fails here. The
    overrides (packaging/lintian-overrides, shipped in the package) list each deliberate
    tag with its reason; `--show-overrides` proves they are still needed."""
    result = subprocess.run(
        ["lintian", "--tag-display-limit", "0", "--show-overrides", str(packages.deb)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if re.match(r"^[EWO]: ", line)]
    reported = sorted(line for line in lines if not line.startswith("O: "))
    overridden = {line.split()[2] for line in lines if line.startswith("O: ")}
    assert reported == EXPECTED_LINTIAN, result.stdout + result.stderr
    assert overridden == LINTIAN_OVERRIDDEN, overridden


def test_rpmlint_reports_only_the_filtered_tags(packages):
    """rpmlint with packaging/rpmlint.toml (each filter with its reason): no error, and
    no warning but the expected ones."""
    result = subprocess.run(
        ["rpmlint", "-c", str(ROOT / "packaging/rpmlint.toml"), str(packages.rpm)],
        capture_output=True, text=True, timeout=600,
    )
    reported = sorted(re.sub(r"^\S+: ", "", line) for line in result.stdout.splitlines()
                      if re.match(r"^\S+: [EW]: ", line))
    assert reported == EXPECTED_RPMLINT, result.stdout + result.stderr
    assert re.search(r" 0 errors, ", result.stdout), result.stdout


@pytest.mark.parametrize("kind", ["rpm", "deb"])
def test_no_runpath_leaves_the_environment(kind, request):
    tree: Path = request.getfixturevalue(f"{kind}_tree")
    leaks = run(sys.executable, str(ROOT / "packaging/runpaths.py"),
                str(tree / "opt/ocp_agentd"), "/opt/ocp_agentd")
    assert leaks == "", leaks
    for elf in _elf_files(tree / "opt/ocp_agentd"):
        sections = run("objdump", "-h", str(elf))
        assert ".debug_info" not in sections and " .symtab" not in sections, f"{elf} not stripped"


def test_build_is_reproducible(packages, tmp_path):
    """A second build from scratch, in another folder, gives the same bytes."""
    out = tmp_path / "dist"
    subprocess.run(
        ["bash", str(ROOT / "packaging/build.sh"), "--out", str(out), "--version",
         packages.version],
        check=True, cwd=ROOT, timeout=900,
        env={**os.environ, "PACKAGE_WORK": str(tmp_path / "work"),
             "VENV": str(Path(sys.prefix))},
    )
    again = {p.name: p for p in out.iterdir()}
    assert set(again) == {packages.deb.name, packages.rpm.name}
    for first in (packages.deb, packages.rpm):
        if first.read_bytes() != again[first.name].read_bytes():
            pytest.fail(f"{first.name} differs:\n" + _differences(first, again[first.name]))


def _differences(first: Path, second: Path) -> str:
    """Which listed files differ between two builds of one package."""
    listing = ("dpkg-deb", "-c") if first.suffix == ".deb" else ("rpm", "-qp", "--dump")
    one, two = (set(run(*listing, str(p)).splitlines()) for p in (first, second))
    return "\n".join(sorted(one ^ two)[:40])


def _elf_files(tree: Path) -> list[Path]:
    found = []
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _needed(tree: Path) -> set[str]:
    """The sonames the package's ELF files link and the package does not bring itself."""
    elves = _elf_files(tree / "opt/ocp_agentd")
    bundled = {p.name for p in elves}
    needed = set()
    for elf in elves:
        needed.update(re.findall(r"NEEDED\s+(\S+)", run("objdump", "-p", str(elf))))
    return needed - bundled


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
    assert (venv / "bin/ocp-agentd").read_text().startswith("#!/opt/ocp_agentd/bin/python\n")
    # ocp-agentctl is packaging/ocp-agentctl.in: isolated, without site, naming the venv.
    launcher = (venv / "bin/ocp-agentctl").read_text()
    assert launcher.startswith("#!/opt/ocp_agentd/bin/python -IS\n")
    assert 'sys.path.append("/opt/ocp_agentd/lib/python3.11/site-packages")' in launcher
    assert "@" not in launcher
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
