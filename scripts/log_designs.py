"""Measures two ways of bounding a program's log at a high output rate.

(a) pipe: the program writes into a pipe; a reader (the daemon's log keeper) moves bytes
    with splice into the file and rotates by rename exactly at the limit.
(b) file: the program appends to the file itself; an inotify watcher rotates when the
    size passes the limit: copy_file_range of the block-aligned size seen into <log>.1,
    then FALLOC_FL_COLLAPSE_RANGE of that prefix out of the live file (no truncate).

For each: the writer's throughput, the largest disk use seen (live + backups), and the
bytes lost (written minus kept; "nan" once rotation deleted a copy: give more --backups
than rotations to count it). Usage:

    python scripts/log_designs.py [--seconds 3] [--rate-mb 200] [--max-mib 8] [--backups 2]
        [--dir DIR]        (a) is ocp_agentd.logkeeper itself, (b) a prototype here
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import tempfile
import threading
import time
from pathlib import Path

from ocp_agentd import linux
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output

MAX_BYTES = 8 * 1024 * 1024
BACKUPS = 2  # --backups; with more backups than rotations, (b) can count its loss
CHUNK = 64 * 1024


def writer(fd: int, seconds: float, rate: float) -> tuple[int, float]:
    """Writes CHUNK blocks paced to ``rate`` bytes/s (0 = flat out); (bytes, seconds)."""
    block = (b"x" * 63 + b"\n") * (CHUNK // 64)
    start = time.monotonic()
    written = 0
    while (now := time.monotonic()) - start < seconds:
        if rate and written > rate * (now - start):
            time.sleep(0.0005)
            continue
        written += os.write(fd, block)
    return written, time.monotonic() - start


class Backups:
    """<log>.1 .. <log>.BACKUPS; counts the bytes rotation deletes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.deleted = 0

    def shift(self) -> None:
        oldest = Path(f"{self.path}.{BACKUPS}")
        if oldest.exists():
            self.deleted += oldest.stat().st_size
            oldest.unlink()
        for index in range(BACKUPS - 1, 0, -1):
            older = Path(f"{self.path}.{index}")
            if older.exists():
                older.rename(f"{self.path}.{index + 1}")

    def on_disk(self) -> int:
        total = 0
        for index in range(0, BACKUPS + 1):
            name = self.path if index == 0 else Path(f"{self.path}.{index}")
            with contextlib.suppress(FileNotFoundError):
                total += name.stat().st_blocks * 512
        return total


def sampler(backups: Backups, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], backups.on_disk())
        time.sleep(0.001)


def design_pipe(directory: Path, seconds: float, rate: float) -> dict[str, float]:
    """(a) as the daemon does it: the writer fills a pipe, ocp_agentd.logkeeper drains it."""
    path = directory / "pipe.log"
    backups = Backups(path)
    spec = ProgramSpec(name="w", command=["/bin/true"], stdout_log=path, stderr_log=path,
                       log_max_bytes=MAX_BYTES, log_backups=BACKUPS)
    read_end, write_end = os.pipe()
    file = output.open_log(path, append=False)
    keeper = output.start_keeper(spec, None, [{
        "pipe": read_end, "file": file, "path": str(path), "max_bytes": MAX_BYTES,
        "backups": BACKUPS}], os.getuid(), os.getgid())
    os.close(read_end)
    os.close(file)
    stop = threading.Event()
    peak = [0]
    watcher = threading.Thread(target=sampler, args=(backups, stop, peak))
    watcher.start()
    written, took = writer(write_end, seconds, rate)
    os.close(write_end)
    keeper.wait(timeout=60)
    stop.set()
    watcher.join()
    return {"MB/s": written / took / 1e6, "max disk MiB": peak[0] / 2**20,
            "lost bytes": _lost(directory, "pipe.log", written)}


def _lost(directory: Path, name: str, written: int) -> float:
    """Bytes written but not in any file; NaN once rotation deleted the oldest copy."""
    copies = list(directory.glob(f"{name}.*"))
    if len(copies) >= BACKUPS:
        return float("nan")
    return written - sum(p.stat().st_size for p in directory.glob(f"{name}*"))


def design_file(directory: Path, seconds: float, rate: float) -> dict[str, float]:
    path = directory / "file.log"
    backups = Backups(path)
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    live = os.open(path, os.O_RDWR)
    block = os.fstatvfs(live).f_bsize
    notify = linux.inotify_init()
    linux.inotify_add_watch(notify, f"/proc/self/fd/{live}", linux.IN_MODIFY)
    stop = threading.Event()
    peak = [0]
    at_rotation = [0]

    def rotator() -> None:
        while not stop.is_set():
            select.select([notify], [], [], 0.1)
            linux.inotify_read(notify)
            size = os.fstat(live).st_size
            if size < MAX_BYTES:
                continue
            seen = size - size % block
            backups.shift()
            copy = os.open(f"{path}.1", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            done = 0
            while done < seen:
                done += os.copy_file_range(live, copy, seen - done, done, done)
            os.close(copy)
            at_rotation[0] = max(at_rotation[0], backups.on_disk())
            linux.collapse_range(live, 0, seen)

    threads = [threading.Thread(target=rotator), threading.Thread(
        target=sampler, args=(backups, stop, peak))]
    for thread in threads:
        thread.start()
    written, took = writer(out, seconds, rate)
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    for fd in (out, live, notify):
        os.close(fd)
    return {"MB/s": written / took / 1e6,
            "max disk MiB": max(peak[0], at_rotation[0]) / 2**20,
            "lost bytes": _lost(directory, "file.log", written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate-mb", type=float, default=200.0, help="0 = as fast as possible")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--max-mib", type=int, default=8, help="log_max_bytes in MiB")
    parser.add_argument("--backups", type=int, default=2, help="log_backups")
    args = parser.parse_args()
    global MAX_BYTES, BACKUPS
    MAX_BYTES, BACKUPS = args.max_mib * 2**20, args.backups
    bound = ((BACKUPS + 1) * MAX_BYTES + 16 * 2**20) / 2**20
    print(f"{args.rate_mb or 'unlimited'} MB/s for {args.seconds:g} s, "
          f"log_max_bytes {MAX_BYTES // 2**20} MiB, log_backups {BACKUPS}: "
          f"bound {bound:.0f} MiB per stream")
    for name, design in (("(a) pipe + splice", design_pipe), ("(b) file + inotify", design_file)):
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            result = design(Path(directory), args.seconds, args.rate_mb * 1e6)
        figures = ", ".join(f"{key} {value:,.1f}" for key, value in result.items())
        print(f"{name}: {figures}")


if __name__ == "__main__":
    main()
