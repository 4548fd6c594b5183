"""A Debian 12 machine booted with systemd-nspawn, for the end-to-end tests.

    base = debian_tree()              # debootstrap once, cached under CACHE
    with Container(base) as box:      # copy of the tree, booted, systemd running
        box.run("systemctl", "is-system-running")
        box.sh("dpkg -i /root/e2e/x.deb")
    # left: nothing (powered off, cgroups removed, copy deleted)

Booting on this kind of machine: systemd-nspawn runs with `--register=no --keep-unit`
(no systemd/machined on the host) inside cgroups this module creates and removes, and
commands reach the container with `nsenter -t <its pid 1> -a`. `--private-network`
gives the container its own loopback, so its programs' ports never meet the host's.
Everything is torn down even when a test fails; stale leftovers of a killed run are
removed by `clean_stale()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

CACHE = Path(os.environ.get("OCP_E2E_CACHE", "/var/cache/ocp-agentd-e2e"))
WORK = Path(os.environ.get("OCP_E2E_WORK", "/var/tmp"))
SUITE = "bookworm"
# The target: systemd as init, the distribution's Python 3.11, ps/pgrep.
# rpm: the .rpm's scriptlets run for real too (rpm --nodeps: its rpmdb knows no Debian package).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3.11", "procps", "rpm")
HOST_PACKAGES = ("systemd-container", "debootstrap", "rpm", "rpm2cpio", "cpio", "binutils",
                 "lintian", "rpmlint")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PREFIX = "ocp-e2e-"
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_host_packages() -> None:
    missing = [
        pkg for pkg in HOST_PACKAGES
        if "install ok installed" not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        ).stdout
    ]
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)


def apt_mirror() -> str:
    """The Debian mirror this machine's apt sources use for SUITE."""
    sources = Path("/etc/apt")
    texts = []
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        # deb822: a stanza with URIs: and Suites: naming SUITE
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1).rstrip("/")
        # one-line: deb [opts] URI SUITE components
        for line in text.splitlines():
            match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match and match.group(2) == SUITE:
                return match.group(1).rstrip("/")
    return DEFAULT_MIRROR


def debian_tree() -> Path:
    """The cached Debian 12 tree (debootstrap on first use; a few minutes)."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {mirror} {' '.join(INCLUDE)}".encode()).hexdigest()[:12]
    tree = CACHE / f"{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (tree / ".complete").exists():
            return tree
        partial = CACHE / f".partial-{uuid.uuid4().hex[:8]}"
        log(f"debootstrap {SUITE} from {mirror} into {tree} (cached for later runs)")
        started = time.monotonic()
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                 SUITE, str(partial), mirror],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1200,
            )
            for leftover in (partial / "var/cache/apt/archives").glob("*.deb"):
                leftover.unlink()
            # A machine-id is made at first boot of every copy.
            (partial / "etc/machine-id").write_text("")
            (partial / ".complete").write_text(f"{SUITE} {mirror} {' '.join(INCLUDE)}\n")
            shutil.rmtree(tree, ignore_errors=True)
            partial.rename(tree)
            for old in CACHE.glob(f"{SUITE}-*"):  # trees made for another package list
                if old != tree:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log(f"debootstrap took {time.monotonic() - started:.0f} s")
        return tree


# ---- cgroups -------------------------------------------------------------------------------------

def _cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # unified (v2 only)
        return [base]
    roots = [base / "systemd"] if (base / "systemd" / "cgroup.procs").exists() else []
    if (base / "unified" / "cgroup.procs").exists():
        roots.append(base / "unified")
    if not roots:
        raise RuntimeError("no name=systemd or cgroup2 hierarchy under /sys/fs/cgroup")
    return roots


def _cgroup_pids(group: Path) -> set[int]:
    pids: set[int] = set()
    if not group.exists():
        return pids
    for procs in group.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def _remove_cgroup(group: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while group.exists():
        for pid in _cgroup_pids(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()
        if not group.exists():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot remove cgroup {group}: {_cgroup_pids(group)} remain")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_systemd(pid: int | str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _stale(path: Path) -> bool:
    """Made by an e2e run whose pid is gone."""
    match = re.match(rf"{PREFIX}(\d+)-", path.name)
    return match is not None and not _alive(int(match.group(1)))


def clean_stale() -> None:
    """Removes what an e2e run that was killed left behind (its pid is gone)."""
    for root in _cgroup_roots():
        for group in filter(_stale, root.glob(PREFIX + "*")):
            log(f"removing stale cgroup {group}")
            _remove_cgroup(group)
    for tree in filter(_stale, WORK.glob(PREFIX + "*")):
        log(f"removing stale container tree {tree}")
        shutil.rmtree(tree, ignore_errors=True)


# ---- the trees ---------------------------------------------------------------------------------

class _Tree:
    """A copy of the base tree under WORK, and running things in it: `_enter()` is the
    command that puts its arguments inside, `where` names the place in errors."""

    where = ""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.dir = WORK / self.name
        self.root = self.dir / "root"

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def destroy(self) -> None:
        raise NotImplementedError

    def _copy_base(self) -> None:
        self.dir.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.root)],
                       check=True)

    def _enter(self) -> list[str]:
        raise NotImplementedError

    def run(self, *command: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self._enter(), "env", "-i",
             *(f"{k}={v}" for k, v in CONTAINER_ENV.items()), *command],
            capture_output=True, text=True, timeout=timeout,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the {self.where}: {shlex.join(command)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
            )
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)

    def path(self, inside: str) -> Path:
        """The host path of a path inside the tree (for files, not /run or /tmp)."""
        return self.root / inside.lstrip("/")

    def put(self, inside: str, content: str | bytes | Path, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        target.chmod(mode)


class Container(_Tree):
    where = "container"

    def __init__(self, base: Path, boot_timeout: float = 90.0) -> None:
        super().__init__(base)
        self.machine = "ocpe2e" + self.name.rsplit("-", 1)[-1]
        self.propagate = Path("/run/systemd/nspawn/propagate") / self.machine
        self.console_log = self.dir / "console.log"
        self.cgroups = [root / self.name for root in _cgroup_roots()]
        self.boot_timeout = boot_timeout
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    # lifecycle

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def boot(self) -> None:
        started = time.monotonic()
        self._copy_base()
        for group in self.cgroups:
            group.mkdir()
        enter = " ".join(f"echo $$ > {shlex.quote(str(g / 'cgroup.procs'))};" for g in self.cgroups)
        command = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
            "--console=read-only", "-D", str(self.root), "-M", self.machine, "--boot",
        ]
        with self.console_log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", f"{enter} exec {shlex.join(command)}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.boot_timeout
        while self.pid1 is None:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}:\n"
                                   + self.console())
            self.pid1 = self._find_init()
            if time.monotonic() > deadline:
                raise RuntimeError("the container's systemd did not appear:\n" + self.console())
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            result = self.run("systemctl", "is-system-running", "--wait", check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the container did not finish booting ({state}):\n"
                               + self.console())
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            log(f"container booted degraded: {failed.strip()}")
        log(f"container {self.machine} booted in {time.monotonic() - started:.1f} s "
            f"(pid 1 = {self.pid1} on the host)")

    def _find_init(self) -> int | None:
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if _is_systemd(pid):
                    return int(pid)
        return None

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return self.console_log.read_text(errors="replace")[-4000:]
        return ""

    def poweroff(self, timeout: float = 60.0) -> int:
        """systemctl poweroff and wait for systemd-nspawn to exit; its exit status."""
        assert self.nspawn is not None
        if self.nspawn.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                log("container did not power off in time; killing it")
                self.nspawn.kill()
                self.nspawn.wait(10)
        return self.nspawn.returncode

    def destroy(self) -> None:
        """Whatever happened: power off, kill leftovers, remove cgroups and the copy."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            with contextlib.suppress(Exception):
                self.poweroff(30)
        for group in self.cgroups:
            _remove_cgroup(group)
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.kill()
            self.nspawn.wait(10)
        shutil.rmtree(self.propagate, ignore_errors=True)
        lock = Path("/run/systemd/nspawn/locks")
        for path in lock.glob(f"*{self.machine}*") if lock.exists() else []:
            with contextlib.suppress(OSError):
                path.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What this container left on the host (empty once destroyed)."""
        found = [str(g) for g in self.cgroups if g.exists()]
        if self.dir.exists():
            found.append(str(self.dir))
        if self.propagate.exists():
            found.append(str(self.propagate))
        if self.nspawn is not None and self.nspawn.poll() is None:
            found.append(f"systemd-nspawn pid {self.nspawn.pid}")
        if self.pid1 is not None and _is_systemd(self.pid1):
            found.append(f"container init pid {self.pid1}")
        return found

    def _enter(self) -> list[str]:
        assert self.pid1 is not None, "container not booted"
        return ["nsenter", "-t", str(self.pid1), "-a"]


class Chroot(_Tree):
    """A copy of the tree entered with chroot, no systemd running: what a package sees
    when it is installed while building an image (the scripts must not start anything)."""

    where = "chroot"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self._copy_base()

    def __enter__(self) -> Chroot:
        return self

    def destroy(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _enter(self) -> list[str]:
        return ["chroot", str(self.root)]
