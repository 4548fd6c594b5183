"""Fixtures of the end-to-end suite (make e2e): the packages, built once per run, and the
cached Debian 12 tree. Root only; every module here is marked `e2e`.

Tests of a module marked `steps` run as one scenario: after a failed step the rest of
that module is reported as not run (xfail) instead of failing for the same reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nspawn
import pytest

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "1"  # packaging/build.sh's default --release


def pytest_runtest_makereport(item, call):
    if "steps" in item.keywords and call.excinfo is not None and call.when == "call":
        item.parent._failed_step = item.name


def pytest_runtest_setup(item):
    if "steps" in item.keywords:
        failed = getattr(item.parent, "_failed_step", None)
        if failed is not None:
            pytest.xfail(f"not run: step {failed} failed")


def pytest_configure(config):
    config.addinivalue_line("markers", "steps: the module's tests are steps of one scenario")


@dataclass
class Packages:
    version: str  # upstream, as in pyproject.toml
    next_version: str
    deb: Path
    next_deb: Path
    rpm: Path
    next_rpm: Path
    stage: Path  # the staged root the packages were made from
    work: Path  # build.sh's work folder (PACKAGE_WORK)
    release: str = RELEASE

    @property
    def full_version(self) -> str:
        """The packages' version-release, as dpkg and rpm -q show it."""
        return f"{self.version}-{self.release}"

    @property
    def next_full_version(self) -> str:
        return f"{self.next_version}-{self.release}"


@pytest.fixture(scope="session")
def e2e_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("the e2e suite needs root (dpkg, systemd-nspawn, cgroups)")
    nspawn.ensure_host_packages()
    nspawn.clean_stale()


@pytest.fixture(scope="session")
def packages(e2e_host, tmp_path_factory) -> Iterator[Packages]:
    """Version N and N+1, each as .deb and .rpm, built by packaging/build.sh."""
    base = tmp_path_factory.mktemp("packages")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    next_version = f"{version}+e2e.1"
    env = {**os.environ, "PACKAGE_WORK": str(base / "work"), "VENV": str(Path(sys.prefix))}
    started = time.monotonic()
    for extra, args in (
        ({}, ["--version", version, "--formats", "deb rpm"]),
        ({"REUSE_STAGE": "1"}, ["--version", next_version, "--formats", "deb rpm"]),
    ):
        subprocess.run(
            ["bash", str(ROOT / "packaging/build.sh"), "--out", str(base / "dist"), *args],
            check=True, env={**env, **extra}, cwd=ROOT, timeout=900,
        )
    nspawn.log(f"packages built in {time.monotonic() - started:.0f} s")
    dist = base / "dist"
    yield Packages(
        version=version,
        next_version=next_version,
        deb=dist / f"ocp-agentd_{version}-{RELEASE}_amd64.deb",
        next_deb=dist / f"ocp-agentd_{next_version}-{RELEASE}_amd64.deb",
        rpm=dist / f"ocp-agentd-{version}-{RELEASE}.x86_64.rpm",
        next_rpm=dist / f"ocp-agentd-{next_version}-{RELEASE}.x86_64.rpm",
        stage=base / "work" / "root",
        work=base / "work",
    )
    shutil.rmtree(base, ignore_errors=True)  # the staged venv and packages: ~200 MB


@pytest.fixture(scope="session")
def debian_tree(e2e_host) -> Path:
    return nspawn.debian_tree()
