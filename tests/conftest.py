"""Shared fixtures; the machinery lives in tests/harness.py (read its docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import DaemonPool, DaemonRunner, remove_cgroups
from test_supervision import World, kill_marked
from unixuser import UnixUser, reachable_dir, unix_user


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def daemon_factory(request, tmp_path) -> Iterator[Callable[..., DaemonRunner]]:
    """make(extra_programs=None, overrides=None, *, start=True, host_id=2, env=None,
    wait_running=False, timeout=20.0, nofile=None) -> DaemonRunner; every daemon it made,
    and every process of their trees, is killed after the test (which then fails if a
    daemon's log reports a task exception that was never retrieved)."""
    pool = DaemonPool(tmp_path)
    yield pool.make
    failed = any(
        getattr(request.node, f"rep_{when}", None) is not None
        and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )
    if failed:
        for runner in pool.runners:
            print(f"--- daemon log {runner.log_path} (last 4000 characters)")
            print(runner.log()[-4000:])
    pool.cleanup()


@pytest.fixture
def demo_daemon(daemon_factory) -> DaemonRunner:
    """The demo config (pos_proxy, ocp_exporter, ob_logtailer), every program RUNNING."""
    return daemon_factory(wait_running=True)


@pytest.fixture
def user() -> Iterator[UnixUser]:
    """A fresh unprivileged user (unixuser.unix_user), removed after the test."""
    with unix_user() as made:
        yield made


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory any user can traverse (unixuser.reachable_dir)."""
    with reachable_dir() as made:
        yield made


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A supervision World (test_supervision.py) under tmp_path; afterwards every process
    it marked is killed and its cgroups removed, whatever the test left."""
    w = World(tmp_path)
    yield w
    kill_marked(w.state)
    remove_cgroups(w.state)
