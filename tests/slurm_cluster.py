"""A real one-node SLURM cluster for the tests: recur's own slurm/local_cluster.py (which a user runs to try
`recur submit` on a laptop), started once per test process.

- `cluster` (session): Debian's slurm-wlm and munge, installed with apt-get when they are missing and this
  process may (root, apt-get), else the test is skipped with the reason; munged as the munge user,
  slurmctld and slurmd from a config in a temporary folder (node `localhost`, 2 CPUs,
  proctrack/linuxproc, task/none), stopped at the end by process id.
- `slurm` (per test): `cluster`, with an exclusive lock held for the test, so that the tests of two
  pytest-xdist workers (each with its own cluster) never run jobs at the same time on the 2 cores.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time

import pytest

import recur

LOCK = os.path.join(tempfile.gettempdir(), "recur-slurm-tests.lock")


def local_cluster():
    spec = importlib.util.spec_from_file_location("recur_local_cluster", recur.SLURM_DIR / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cluster():
    lc = local_cluster()
    missing = lc.missing_packages()
    if missing:
        why = lc.can_install()
        if why:
            pytest.skip(f"SLURM is not installed (Debian packages {', '.join(missing)}) and cannot be here: {why}")
        try:
            lc.install()
        except RuntimeError as e:
            pytest.skip(f"SLURM could not be installed: {e}")
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons start as root (slurmd starts jobs as their user), and this is not root")
    root = tempfile.mkdtemp(prefix="recur-slurm-")
    instance = lc.LocalCluster(root, cpus=2, kill_wait=60)
    instance.start()
    try:
        yield instance
    finally:
        subprocess.run(["scancel", "--user", "root"], env={**os.environ, **instance.env}, capture_output=True)
        time.sleep(1)
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(cluster):
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cluster
