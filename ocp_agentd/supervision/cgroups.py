"""Each program's cgroup: what the host offers, creation, limits, kill, emptiness, usage.

The layouts (SPEC section 9; kernel Documentation/admin-guide/cgroup-v2.rst and
cgroup-v1/*.rst):

- ``v2-delegated``: a pure cgroup v2 host where systemd delegated the unit's cgroup
  (``Delegate=yes``). The daemon moves itself into ``<unit>/daemon`` (v2's rule: no
  processes in a cgroup that hands controllers to children) and puts program NAME in
  ``<unit>/programs/NAME``.
- ``v2``: a pure v2 host without delegation: ``/sys/fs/cgroup/ocp_agentd/<instance>/NAME``.
- ``hybrid``: v1 controllers (memory, cpu, pids) under ``<controller>/ocp_agentd/<instance>/
  NAME``, membership (the kill, the empty event, CPU time) in the v2 unified tree at the
  same relative path.
- ``v1``: v1 controllers only; membership in the freezer hierarchy (else pids, memory, cpu).
- ``none``: nothing writable; the caller falls back to the process table (SPEC section 3).

``<instance>`` is a hash of the state directory, so two daemons never share a cgroup.
Everything here is synchronous file I/O on cgroupfs (microseconds) except EmptyWatch,
which waits on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ocp_agentd import linux
from ocp_agentd.supervision.inotify_reader import InotifyReader

log = logging.getLogger("ocp_agentd.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
LIMIT_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")


class Layout(StrEnum):
    """How this host's cgroups are used (see the module docstring)."""

    V2_DELEGATED = "v2-delegated"
    V2 = "v2"
    HYBRID = "hybrid"
    V1 = "v1"
    NONE = "none"


class CgroupError(OSError):
    """A cgroup file could not be created, written or read; the message names the file."""


@dataclass(frozen=True)
class Limits:
    """What a program asks for (SPEC section 9). None/0 = no limit.

    cpu_quota in CPUs (0.5 = half a core), memory_max and memory_high in bytes, pids_max
    a count.
    """

    cpu_quota: float = 0.0
    memory_max: int | None = None
    memory_high: int | None = None
    pids_max: int = 0

    def asked(self) -> dict[str, str]:
        """The limits that are set, by config key, as people read them."""
        out: dict[str, str] = {}
        if self.cpu_quota:
            out["cpu_quota"] = f"{self.cpu_quota:g} CPU"
        if self.memory_max is not None:
            out["memory_max"] = format_bytes(self.memory_max)
        if self.memory_high is not None:
            out["memory_high"] = format_bytes(self.memory_high)
        if self.pids_max:
            out["pids_max"] = str(self.pids_max)
        return out


@dataclass
class Host:
    """Where program cgroups go on this host.

    membership: the base directory (in the v2 tree, or a v1 hierarchy) under which each
    program's membership cgroup NAME is made; v2: whether that tree is cgroup v2.
    controllers: limit controller -> base directory carrying it (v2: the membership base).
    daemon_leaf: v2-delegated only, where the daemon moves itself. why: for NONE, the
    reason; otherwise notes for --check.
    """

    layout: Layout
    membership: Path | None = None
    v2: bool = False
    controllers: dict[str, Path] = field(default_factory=dict)
    daemon_leaf: Path | None = None
    limits_v2: bool = False  # the limit controllers are v2 ones (hybrid: v1)
    freezer: bool = False  # v1: membership is the freezer hierarchy
    enable_from: Path | None = None  # v2: topmost cgroup whose subtree_control we may set
    why: str = ""

    @property
    def usable(self) -> bool:
        return self.layout != Layout.NONE

    def describe(self) -> list[str]:
        """Lines for `ocp-agentd --check`: the layout, the membership tree, the controllers."""
        if not self.usable:
            return [f"cgroups: none ({self.why}); process trees from the process table"]
        kind = "cgroup v2" if self.v2 else "cgroup v1"
        lines = [
            f"cgroups: {self.layout} (programs in {self.membership}/<name>, membership "
            f"in {kind})"
        ]
        for name in LIMIT_CONTROLLERS:
            base = self.controllers.get(name)
            lines.append(f"  {name}: {base}/<name>" if base else f"  {name}: not available")
        if self.daemon_leaf is not None:
            lines.append(f"  the daemon itself runs in {self.daemon_leaf}")
        if self.why:
            lines.append(f"  note: {self.why}")
        return lines

    def enforcement(self, limits: Limits) -> dict[str, str]:
        """For each limit that is set: "enforced (<file>)" or "not enforced: <why>"."""
        out: dict[str, str] = {}
        files = {
            "cpu_quota": ("cpu", "cpu.max" if self.limits_v2 else "cpu.cfs_quota_us"),
            "memory_max": (
                "memory",
                "memory.max" if self.limits_v2 else "memory.limit_in_bytes",
            ),
            "memory_high": ("memory", "memory.high"),
            "pids_max": ("pids", "pids.max"),
        }
        for key, text in limits.asked().items():
            controller, filename = files[key]
            if not self.usable:
                out[key] = f"not enforced: no cgroup ({self.why})"
            elif controller not in self.controllers:
                out[key] = f"not enforced: the {controller} controller is not available here" + (
                    f" ({self.why})" if self.why else ""
                )
            elif key == "memory_high" and not self.limits_v2:
                out[key] = "not enforced: memory_high needs the cgroup v2 memory controller"
            else:
                out[key] = f"{text} ({filename})"
        return out

    def open(self, name: str) -> ProgramCgroup:
        """The cgroup of program `name` (not created: see ProgramCgroup.create)."""
        assert self.membership is not None, "no cgroup on this host"
        membership = self.membership / name
        dirs = {c: base / name for c, base in self.controllers.items()}
        return ProgramCgroup(
            name,
            membership,
            self.v2,
            dirs,
            limits_v2=self.limits_v2,
            freezer=membership if self.freezer else None,
        )

    def prepare(self) -> None:
        """Checks that the tree can be used. On v2 makes the base directory and enables
        the controllers for its children (v2-delegated: after moving the daemon into its
        leaf); v1 directories are made with each program's cgroup. Raises CgroupError."""
        assert self.membership is not None
        if self.daemon_leaf is not None:
            _mkdir(self.daemon_leaf)
            _write(self.daemon_leaf / "cgroup.procs", "0")
        if self.v2 and self.controllers and self.enable_from is not None:
            _mkdir(self.membership)
            _enable_down_to(self.enable_from, self.membership, sorted(self.controllers))

    def remove(self) -> None:
        """Removes the (empty) base directories and, if no other daemon uses it, the
        shared ocp_agentd parent; the daemon's own leaf is left to systemd."""
        assert self.membership is not None
        bases = {self.membership, *self.controllers.values()}
        parents = {b.parent for b in bases if self.layout != Layout.V2_DELEGATED}
        for path in [*bases, *parents]:
            with contextlib.suppress(OSError):
                path.rmdir()


@dataclass(frozen=True)
class OomReading:
    """One look at a memory cgroup's OOM figures.

    kills: the kernel's count of OOM kills in the cgroup (v2 memory.events oom_kill, v1
    memory.oom_control oom_kill), None where the kernel keeps none (v1 before Linux 4.13,
    or no memory controller). failcnt (v1 memory.failcnt): how often the usage reached the
    limit (memory.failcnt plus memory.memsw.failcnt where swap is accounted); under_oom
    (v1 memory.oom_control): the cgroup is out of memory right now.
    """

    kills: int | None
    failcnt: int | None = None
    under_oom: bool = False


@dataclass(frozen=True)
class OomNews:
    """OOM kills between two readings. exact: from the kernel's counter; else inferred
    (count 0 or 1) and evidence says from what."""

    count: int
    exact: bool = True
    evidence: str = ""


def oom_news(before: OomReading, after: OomReading, sigkilled: bool) -> OomNews:
    """The OOM kills between two readings of one cgroup.

    With the kernel's counter: its difference. Without it (cgroup v1 before Linux 4.13,
    whose memory.oom_control has no oom_kill line): one inferred kill when the process
    looked at was ended by SIGKILL and the cgroup hit its limit meanwhile (memory.failcnt
    rose) or is out of memory now (under_oom 1); the OOM killer's signal is SIGKILL
    (mm/oom_kill.c). That is an inference, not a count: a SIGKILL from elsewhere while
    the program also hit its limit reads the same, and evidence says so.
    """
    if after.kills is not None:
        return OomNews(max(0, after.kills - (before.kills or 0)))
    if not sigkilled:
        return OomNews(0, exact=False)
    rose = (
        after.failcnt - before.failcnt
        if after.failcnt is not None and before.failcnt is not None
        else 0
    )
    if rose <= 0 and not after.under_oom:
        return OomNews(0, exact=False)
    seen = f"memory.failcnt rose by {rose}" if rose > 0 else "memory.oom_control under_oom 1"
    return OomNews(1, exact=False, evidence=f"no oom_kill counter on this kernel; {seen}")


@dataclass
class Usage:
    """cpu_seconds: CPU time used by the cgroup since it was made (user + system);
    memory_bytes: memory charged to it now (None when no controller reports it)."""

    cpu_seconds: float | None
    memory_bytes: int | None


@dataclass
class ProgramCgroup:
    """One program's cgroup: the membership directory plus one per v1 limit controller.

    Every method reads or writes cgroupfs directly; none blocks for long.
    """

    name: str
    membership: Path
    v2: bool
    dirs: dict[str, Path]
    limits_v2: bool = False
    freezer: Path | None = None
    # v1: whether processes join the cpu hierarchy. Only with a cpu_quota: a move into a
    # v1 cpu cgroup costs about 1.2 ms of kernel time here (against 0.01 ms for memory or
    # pids), and start-all spawns every program at once.
    cpu_in_use: bool = False
    # The limits apply() last wrote here (None: none yet), so that making the cgroup again
    # for each standby does not rewrite the same values into every file.
    applied: Limits | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> str:
        """The membership cgroup as a path below its mount (what /proc/PID/cgroup says)."""
        return str(self.membership)

    def all_dirs(self) -> list[Path]:
        """Membership first, then each controller directory that is not the same."""
        out = [self.membership]
        for path in self.dirs.values():
            if path not in out:
                out.append(path)
        if self.freezer is not None and self.freezer not in out:
            out.append(self.freezer)
        return out

    def procs_files(self) -> list[Path]:
        """Every cgroup.procs a new main process must be written into, membership first."""
        skip = self.dirs.get("cpu") if not self.limits_v2 and not self.cpu_in_use else None
        return [d / "cgroup.procs" for d in self.all_dirs() if d != skip]

    def place(self, pid: int) -> None:
        """Moves pid (all its threads) into every directory of this cgroup. Raises
        CgroupError (ESRCH when pid is gone)."""
        for procs in self.procs_files():
            _write(procs, str(pid))

    def create(self, limits: Limits) -> None:
        """Makes the directories (if missing) and writes the limits; the writes are left
        out when this object wrote these limits last and every directory still exists (a
        directory made anew has the kernel's defaults). Raises CgroupError."""
        dirs = self.all_dirs()
        if limits == self.applied and all(path.is_dir() for path in dirs):
            return
        for path in dirs:
            _mkdir(path)
        self.apply(limits)

    def apply(self, limits: Limits) -> None:
        """Writes every limit, "no limit" included, so a reload can lift one."""
        self.applied = None  # unknown until every write is done
        if self.limits_v2:
            self._apply_v2(limits)
        else:
            self._apply_v1(limits)
        pids = self.dirs.get("pids")
        if pids is not None:
            _write(pids / "pids.max", str(limits.pids_max) if limits.pids_max else "max")
        self.applied = limits

    def _apply_v2(self, limits: Limits) -> None:
        memory = self.dirs.get("memory")
        cpu = self.dirs.get("cpu")
        if memory is not None:
            _write(memory / "memory.max", _v2_value(limits.memory_max))
            _write(memory / "memory.high", _v2_value(limits.memory_high))
        if cpu is not None:
            quota = _cfs_quota_us(limits.cpu_quota)
            _write(cpu / "cpu.max", f"{quota if quota is not None else 'max'} {CFS_PERIOD_US}")

    def _apply_v1(self, limits: Limits) -> None:
        memory = self.dirs.get("memory")
        cpu = self.dirs.get("cpu")
        if memory is not None:
            _write_v1_memory(memory, limits.memory_max)
        if cpu is not None:
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            quota = _cfs_quota_us(limits.cpu_quota)
            _write(cpu / "cpu.cfs_quota_us", str(quota if quota is not None else -1))
            if limits.cpu_quota and not self.cpu_in_use:
                self.cpu_in_use = True
                self._join(cpu)

    def _join(self, directory: Path) -> None:
        """Moves every member into directory (a quota set while the program runs); again
        while a member forked during the move is still outside (bounded)."""
        for _ in range(5):
            try:
                inside = set(_read(directory / "cgroup.procs").split())
            except OSError:
                return
            outside = [pid for pid in self.members() if str(pid) not in inside]
            if not outside:
                return
            for pid in outside:
                with contextlib.suppress(CgroupError):  # gone meanwhile
                    _write(directory / "cgroup.procs", str(pid))

    def members(self) -> list[int]:
        """The pids in the membership cgroup now (an empty list if it is gone)."""
        try:
            raw = _read(self.membership / "cgroup.procs")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CgroupError(exc.errno, f"cannot read {self.membership}/cgroup.procs") from exc
        return [int(line) for line in raw.split()]

    def contains(self, pid: int) -> bool:
        """Whether pid is in this cgroup now: v2 from /proc/PID/cgroup (one small file),
        v1 from the cgroup's member list."""
        return pid in self.members() if not self.v2 else _in_v2_cgroup(pid, self.membership)

    def populated(self) -> bool:
        """v2: cgroup.events says populated 1; v1: cgroup.procs lists a process."""
        if self.v2:
            try:
                text = _read(self.membership / "cgroup.events")
            except FileNotFoundError:
                return False
            return "populated 1" in text
        return bool(self.members())

    def signal_all(self, signum: int, *then: int, skip: int | None = None) -> list[int]:
        """Sends signum, then each of `then`, to every member but `skip` (a pid signalled
        already), each pinned by a pidfd and checked still to be a member after pinning
        (so a pid reused in between is never hit). Returns the pids signalled."""
        sent = []
        for pid in self.members():
            if pid == skip:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if self.contains(pid):
                    for signo in (signum, *then):
                        signal.pidfd_send_signal(pidfd, signo)
                    sent.append(pid)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        return sent

    def kill(self) -> None:
        """SIGKILLs every member, including ones forked while this runs.

        v2: cgroup.kill (kernel 5.14+), one write that the kernel applies atomically to
        the whole subtree. Else the cgroup is frozen (v2 cgroup.freeze, v1 freezer), every
        member SIGKILLed, then thawed so the kills are delivered (cgroup-v1/freezer-subsystem
        .rst); with no freezer at all, members are killed until none is left (bounded).
        """
        if self.v2 and (self.membership / "cgroup.kill").exists():
            with contextlib.suppress(FileNotFoundError):
                _write(self.membership / "cgroup.kill", "1")
            return
        frozen = self._freeze(True)
        try:
            for _ in range(100):
                pids = self.members()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if frozen:
                    break
        finally:
            if frozen:
                self._freeze(False)

    def _freeze(self, on: bool) -> bool:
        if self.v2:
            target = self.membership / "cgroup.freeze"
            if not target.exists():
                return False
            _write(target, "1" if on else "0")
            return True
        if self.freezer is None:
            return False
        _write(self.freezer / "freezer.state", "FROZEN" if on else "THAWED")
        if on:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                state = (self.freezer / "freezer.state").read_text().strip()
                if state == "FROZEN":
                    break
                time.sleep(0.005)
        return True

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in this cgroup since it was made, by
        the kernel's counter (oom_reading); 0 when there is no counter or no memory
        controller."""
        return self.oom_reading().kills or 0

    def oom_reading(self) -> OomReading:
        """What the memory controller says about the OOM killer now (see OomReading).

        v2: memory.events "oom_kill". v1: memory.oom_control "oom_kill" (kernel 4.13+),
        and for kernels without that line, memory.failcnt and memory.oom_control
        "under_oom" (cgroup-v1/memory.rst, sections 5.4 and 10). No memory controller:
        OomReading(None).
        """
        memory = self.dirs.get("memory")
        if memory is None:
            return OomReading(None)
        if self.limits_v2:
            try:
                events = _keyed(_read(memory / "memory.events"))
            except OSError:
                return OomReading(None)
            return OomReading(events.get("oom_kill"))
        try:
            control = _keyed(_read(memory / "memory.oom_control"))
        except OSError:
            control = {}
        if "oom_kill" in control:  # Linux 4.13+: the count itself, the rest is not needed
            return OomReading(control["oom_kill"], None, control.get("under_oom", 0) == 1)
        failcnt: int | None = None
        # Both counters: with memsw limited too (_write_v1_memory) a charge may fail on it.
        for filename in ("memory.failcnt", "memory.memsw.failcnt"):
            with contextlib.suppress(OSError, ValueError):
                failcnt = (failcnt or 0) + int(_read(memory / filename))
        return OomReading(control.get("oom_kill"), failcnt, control.get("under_oom", 0) == 1)

    def usage(self) -> Usage:
        """CPU seconds used and memory bytes charged, from the cgroup's own counters.

        CPU: v2 cpu.stat usage_usec (present in every non-root v2 cgroup, also without the
        cpu controller), else v1 cpuacct.usage (ns) when that hierarchy is used. Memory:
        v2 memory.current, v1 memory.usage_in_bytes.
        """
        cpu: float | None = None
        memory_bytes: int | None = None
        if self.v2:
            with contextlib.suppress(OSError):
                usec = _keyed(_read(self.membership / "cpu.stat")).get("usage_usec")
                cpu = usec / 1e6 if usec is not None else None
        elif "cpuacct" in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                cpu = int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9
        memory = self.dirs.get("memory")
        if memory is not None:
            filename = "memory.current" if self.limits_v2 else "memory.usage_in_bytes"
            with contextlib.suppress(OSError, ValueError):
                memory_bytes = int(_read(memory / filename))
        return Usage(cpu, memory_bytes)

    def remove(self) -> None:
        """Removes every directory of this cgroup that is empty; a busy or missing one is
        left as it is (rmdir(2) refuses a cgroup with members: EBUSY)."""
        for path in self.all_dirs():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", path, exc.strerror)


# ---- detection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem mount: its directory, v2 or not, and (v1) its controllers."""

    path: Path
    v2: bool
    controllers: frozenset[str]


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """cgroup and cgroup2 mounts, from proc(5) mountinfo (superblock options carry the
    v1 controllers)."""
    mounts = []
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _source, superopts = [*right.split(" "), "", ""][:3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        path = Path(left.split(" ")[4].replace("\\040", " "))
        opts = frozenset(superopts.split(",")) if fstype == "cgroup" else frozenset()
        mounts.append(Mount(path, fstype == "cgroup2", opts))
    return mounts


def own_cgroups(path: str = "/proc/self/cgroup") -> dict[str, str]:
    """This process's cgroup per hierarchy: "" for v2, else each v1 controller name."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _hid, controllers, cgpath = line.split(":", 2)
        if not controllers:
            out[""] = cgpath
        for name in controllers.split(","):
            if name:
                out[name] = cgpath
    return out


def instance_name(state_dir: Path) -> str:
    """A short stable name for one daemon, from its state directory."""
    return hashlib.sha256(str(Path(state_dir).absolute()).encode()).hexdigest()[:12]


def detect(
    state_dir: Path,
    mounts: list[Mount] | None = None,
    own: dict[str, str] | None = None,
    environ: dict[str, str] | None = None,
) -> Host:
    """Chooses the layout for this host (module docstring). Never raises; checks only
    that the chosen directories are writable, it creates nothing (see Host.prepare)."""
    mounts = read_mounts() if mounts is None else mounts
    own = own_cgroups() if own is None else own
    environ = dict(os.environ) if environ is None else environ
    instance = Path("ocp_agentd") / instance_name(state_dir)
    v2_mounts = [m for m in mounts if m.v2]
    v1_mounts = {c: m for m in mounts if not m.v2 for c in m.controllers}
    unified = v2_mounts[0] if v2_mounts else None
    if unified is not None and not v1_mounts:
        return _detect_v2(unified, own.get("", "/"), instance, environ)
    if v1_mounts:
        return _detect_v1(v1_mounts, unified, instance)
    return Host(Layout.NONE, why="no cgroup filesystem is mounted")


def choose(mode: str, state_dir: Path) -> Host:
    """The host for [agent] cgroup = mode (SPEC section 9), prepared for use.

    "off": no cgroup. "auto": the detected layout, or none (logged) when it cannot be
    used. "required": the detected layout; raises CgroupError when there is none or it
    cannot be prepared.
    """
    if mode == "off":
        return Host(Layout.NONE, why='cgroup = "off"')
    host = detect(state_dir)
    try:
        if not host.usable:
            raise CgroupError(errno.ENOTSUP, host.why)
        host.prepare()
    except CgroupError as exc:
        if mode == "required":
            raise CgroupError(exc.errno, f'cgroup = "required" but {exc.strerror}') from exc
        log.warning("no cgroups, process trees from the process table: %s", exc.strerror)
        return Host(Layout.NONE, why=str(exc.strerror))
    log.info("%s", "; ".join(host.describe()))
    return host


def check_report(
    mode: str, state_dir: Path, programs: dict[str, Limits]
) -> tuple[bool, list[str]]:
    """What `ocp-agentd --check` says about cgroups: (whether the daemon could start,
    lines). Names the layout it would use and each limit it could not enforce; creates
    and moves nothing."""
    host = Host(Layout.NONE, why='cgroup = "off"') if mode == "off" else detect(state_dir)
    lines = [f'cgroup = "{mode}"', *("  " + line for line in host.describe())]
    ok = host.usable or mode != "required"
    if not ok:
        lines.append(f'  the daemon would refuse to start: cgroup = "required" but {host.why}')
    for name, limits in programs.items():
        for key, how in host.enforcement(limits).items():
            if how.startswith("not enforced"):
                lines.append(f"  {name}: {key} {limits.asked()[key]} {how}")
    return ok, lines


def _detect_v2(unified: Mount, own: str, instance: Path, environ: dict[str, str]) -> Host:
    try:
        offered = set((unified.path / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return Host(Layout.NONE, why=f"cannot read {unified.path}/cgroup.controllers: {exc}")
    unit = own.rstrip("/")
    in_leaf = unit.endswith("/daemon")  # started there by DelegateSubgroup=daemon
    unit = unit.removesuffix("/daemon")
    unit_dir = unified.path / unit.lstrip("/")
    delegated = bool(unit) and bool(environ.get("INVOCATION_ID")) and _delegated(unit_dir)
    root_writable = os.access(unified.path, os.W_OK)
    note = ""
    if delegated and (in_leaf or not root_writable):
        try:
            offered = set((unit_dir / "cgroup.controllers").read_text().split())
        except OSError:
            offered = set()
        base = unit_dir / "programs"
        controllers = {c: base for c in LIMIT_CONTROLLERS if c in offered} if in_leaf else {}
        if not in_leaf:
            note = (
                "limits need DelegateSubgroup=daemon in the unit (systemd 254+): systemd "
                "starts the daemon in the unit's own cgroup, which may not hold a process "
                "once controllers are enabled below it"
            )
        return Host(
            Layout.V2_DELEGATED,
            base,
            True,
            controllers,
            limits_v2=True,
            daemon_leaf=unit_dir / "daemon",
            enable_from=unit_dir,
            why=note,
        )
    if not root_writable:
        return Host(Layout.NONE, why=f"{unified.path} is not writable and not delegated to us")
    if delegated:
        # With controllers enabled in the unit's cgroup, systemd before 254 could not start
        # the next daemon there while programs run below it (EBUSY, status 219/CGROUP), and
        # the daemon restarts with its programs running (handover, crash): so the programs
        # go to the shared tree instead (systemd/systemd#24064, #41278).
        note = (
            "the unit's cgroup is delegated but the daemon was started in it (no "
            "DelegateSubgroup=daemon): programs use the shared tree so that systemd can "
            "restart the daemon while they run"
        )
    base = unified.path / instance
    controllers = {c: base for c in LIMIT_CONTROLLERS if c in offered}
    return Host(
        Layout.V2, base, True, controllers, limits_v2=True, enable_from=unified.path, why=note
    )


def _detect_v1(v1: dict[str, Mount], unified: Mount | None, instance: Path) -> Host:
    controllers = {
        c: v1[c].path / instance
        for c in LIMIT_CONTROLLERS
        if c in v1 and os.access(v1[c].path, os.W_OK)
    }
    if unified is not None and os.access(unified.path, os.W_OK) and _kernel_at_least(5, 2):
        # CPU time comes from the unified tree's cpu.stat, so no cpuacct cgroup is needed.
        return Host(Layout.HYBRID, unified.path / instance, True, controllers)
    if "cpuacct" in v1 and os.access(v1["cpuacct"].path, os.W_OK):
        controllers["cpuacct"] = v1["cpuacct"].path / instance
    for name in ("freezer", "pids", "memory", "cpu"):
        if name in v1 and os.access(v1[name].path, os.W_OK):
            why = "" if name == "freezer" else "no freezer: the final kill repeats until empty"
            return Host(
                Layout.V1,
                v1[name].path / instance,
                False,
                controllers,
                freezer=name == "freezer",
                why=why,
            )
    return Host(Layout.NONE, why="no cgroup hierarchy is writable")


def _kernel_at_least(major: int, minor: int) -> bool:
    # A unified tree serves membership when it can end a cgroup at once: cgroup.kill from
    # 5.14, cgroup.freeze (the fallback) from 5.2. Older unified trees are not used.
    try:
        have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def _delegated(unit_dir: Path) -> bool:
    """systemd marks a delegated cgroup with the trusted.delegate xattr (v251+); older
    systemd leaves the unit's cgroup owned by us and writable, which we accept too."""
    for name in DELEGATE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(unit_dir, name) == b"1":
                return True
    return os.access(unit_dir / "cgroup.subtree_control", os.W_OK) and os.access(
        unit_dir / "cgroup.procs", os.W_OK
    )


def _enable_down_to(top: Path, base: Path, controllers: list[str]) -> None:
    """Enables controllers in cgroup.subtree_control of top, of every cgroup between top
    and base, and of base, so base's children get them (cgroup-v2.rst, "Top-down
    Constraint")."""
    chain = [top, *reversed([p for p in base.parents if top in p.parents]), base]
    wanted = " ".join(f"+{c}" for c in controllers)
    for path in chain:
        _write(path / "cgroup.subtree_control", wanted)


# ---- the empty event ------------------------------------------------------------------------




class EmptyWatch(InotifyReader):
    """Waits for cgroups to become empty.

    v2: an inotify watch on cgroup.events, which the kernel modifies when "populated"
    changes (cgroup-v2.rst, "cgroup.events"); one inotify descriptor serves every cgroup.
    v1 has no such event for us (release_agent is host-wide), so v1 cgroups are polled,
    and only while someone waits (a stop in progress).
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiters: dict[int, tuple[Path, list[asyncio.Future[None]]]] = {}

    async def wait_empty(self, cgroup: ProgramCgroup, timeout: float) -> bool:
        """True once the cgroup has no member (at once if it has none), False after
        timeout seconds."""
        if not cgroup.populated():
            return True
        if not cgroup.v2:
            return await _poll_empty(cgroup, timeout)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        wd = self._add(cgroup.membership / "cgroup.events", fut)
        try:
            if not cgroup.populated():  # emptied between the first check and the watch
                return True
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                return not cgroup.populated()
            return True
        finally:
            self._discard(wd, fut)

    def close(self) -> None:
        """Drops every watch and the inotify descriptor."""
        self._close_fd()
        for _path, futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    def _add(self, path: Path, fut: asyncio.Future[None]) -> int:
        fd = self._open()
        try:
            wd = linux.inotify_add_watch(fd, path, linux.IN_MODIFY)
        except OSError as exc:
            raise CgroupError(exc.errno or 0, f"inotify_add_watch {path}: {exc.strerror}") from None
        self._waiters.setdefault(wd, (path, []))[1].append(fut)
        return wd

    def _discard(self, wd: int, fut: asyncio.Future[None]) -> None:
        entry = self._waiters.get(wd)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            entry[1].remove(fut)
        # The watch itself stays (until the cgroup is removed: IN_IGNORED): removing one
        # waits for an SRCU grace period in the kernel (fsnotify), about 0.3 ms a stop.

    def _forget(self, wd: int) -> None:
        """Drops a watch the kernel removed; its waiters see the cgroup gone (empty)."""
        entry = self._waiters.pop(wd, None)
        for fut in entry[1] if entry is not None else []:
            if not fut.done():
                fut.set_result(None)

    def _on_events(self) -> None:
        touched = set()
        for wd, mask in linux.inotify_read(self._fd):
            touched.add(wd)
            if mask & linux.IN_IGNORED:  # the cgroup was removed: the kernel dropped the watch
                self._forget(wd)
        for wd in touched:
            entry = self._waiters.get(wd)
            if entry is None or not entry[1]:
                continue
            path, futures = entry
            try:
                empty = "populated 0" in _read(path)
            except FileNotFoundError:
                empty = True
            if empty:
                for fut in futures:
                    if not fut.done():
                        fut.set_result(None)


async def _poll_empty(cgroup: ProgramCgroup, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while cgroup.members():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)
    return True


# ---- small helpers ----------------------------------------------------------------------------


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot create cgroup {path}: {exc.strerror}") from exc


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(exc.errno, f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise CgroupError(exc.errno, f"{path}: no such process") from exc
        raise CgroupError(exc.errno, f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _cfs_quota_us(cpu_quota: float) -> int | None:
    """The CFS quota per CFS_PERIOD_US for ``cpu_quota`` CPUs (at least 1000 µs, the
    kernel's minimum), or None for no limit."""
    return max(1000, round(cpu_quota * CFS_PERIOD_US)) if cpu_quota else None


def _write_v1_memory(memory: Path, memory_max: int | None) -> None:
    """memory.limit_in_bytes of a v1 memory cgroup, and memsw where the kernel has it."""
    value = str(memory_max) if memory_max is not None else "-1"
    # Where the kernel accounts swap, bound memory plus swap too: else a host with swap
    # pages the program out instead of holding it to memory_max. The kernel wants
    # memsw >= memory at every moment, so memsw is lifted first.
    memsw = memory / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        _write(memsw, "-1")
    _write(memory / "memory.limit_in_bytes", value)
    if memsw.exists():
        _write(memsw, value)


def _v2_value(value: int | None) -> str:
    return "max" if value is None else str(value)


def _read(path: Path) -> str:
    """A cgroup file's text, read with os.read: without io.open's fstat, ioctl and seek,
    which cost more than the read itself on the restart path. Raises OSError
    (FileNotFoundError when the cgroup is gone)."""
    return _read_open(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)


def _read_open(fd: int, path: Path) -> str:
    """The rest of the text of ``fd``, a cgroup file opened at ``path``; closes ``fd``.

    A cgroup removed after its file was opened reads ENODEV (kernfs); that is the cgroup
    gone, as ENOENT is for a file opened after: both raise FileNotFoundError."""
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise FileNotFoundError(errno.ENOENT, "the cgroup was removed", str(path)) from None
        raise
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _in_v2_cgroup(pid: int, membership: Path) -> bool:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("0::"):
            return str(membership).endswith(line[3:]) and line[3:] != "/"
    return False


def format_bytes(value: int) -> str:
    """512 MiB, 1.5 GiB, 64 KiB, 100 B (binary units, as the kernel counts)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value} B"


__all__ = [
    "CgroupError",
    "EmptyWatch",
    "Host",
    "Layout",
    "Limits",
    "OomNews",
    "OomReading",
    "ProgramCgroup",
    "Usage",
    "check_report",
    "choose",
    "detect",
    "format_bytes",
    "instance_name",
    "oom_news",
]
