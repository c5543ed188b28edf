#!/usr/bin/env python3
"""A real one-node SLURM cluster on this machine, to try `recur submit` on a laptop (and for the tests).

    sudo python3 local_cluster.py start /tmp/recur-cluster      # prints: export SLURM_CONF=...
    export SLURM_CONF=/tmp/recur-cluster/slurm.conf
    recur submit gla-tiny --nodes 1 --gpus-per-node 0 --tasks-per-node 2 run_dir=runs/slurm-try
    sudo python3 local_cluster.py stop /tmp/recur-cluster

Debian's (and Ubuntu's) `slurm-wlm` and `munge` packages; `start --install` installs them with apt-get
when they are missing (root). It writes a munge key and a slurm.conf into the folder (node
`localhost` with this machine's CPUs or --cpus, proctrack/linuxproc, task/none, no accounting,
state, spool and logs in the folder, free ports), runs `munged` as the munge user with its own
socket, then `slurmctld` and `slurmd` in the foreground of child processes, waits until the node
is idle, and records their process ids in pids.json; `stop` ends exactly those processes. Nothing
outside the folder is changed (the system's own munge and slurm services, if any, are left alone).

Jobs run as the user who submits them, with slurmd's scheduling priority (start it under `nice`
to keep jobs from competing with other work). Standard library only: it also runs without recur.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = {"munged": "munge", "mungekey": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
            "sbatch": "slurm-wlm", "squeue": "slurm-wlm", "scontrol": "slurm-wlm", "srun": "slurm-wlm"}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")

SLURM_CONF = """\
# written by recur's slurm/local_cluster.py: a one-node cluster for trying and testing recur submit
ClusterName=recur-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# time for a job to save a checkpoint between SIGTERM and SIGKILL (scancel, scontrol requeue, the time limit)
KillWait={kill_wait}
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=300
MessageTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_packages() -> list[str]:
    """The Debian packages whose programs are not installed."""
    return sorted({package for program, package in PROGRAMS.items() if which(program) is None})


def can_install() -> str | None:
    """None when `apt-get install` can run here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if which("apt-get") is None:
        return "no apt-get (not Debian or Ubuntu)"
    return None


def install(quiet: bool = True) -> None:
    """apt-get install the missing packages (root); raises RuntimeError with apt's last line."""
    missing = missing_packages()
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.DEVNULL if quiet else None
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:  # the package lists may never have been read on this machine
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=out, stderr=subprocess.DEVNULL)
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0 or missing_packages():
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Start and stop the daemons of a one-node cluster whose files all live in `root`."""

    def __init__(self, root: str | Path, cpus: int | None = None, kill_wait: int = 60):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.pids: dict[str, int] = {}

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        """What a client (sbatch, squeue, recur submit) needs in its environment."""
        return {"SLURM_CONF": str(self.conf)}

    def _log(self, name: str) -> Path:
        return self.root / "log" / name

    def start(self, timeout: float = 120) -> "LocalCluster":
        if os.geteuid() != 0:
            raise RuntimeError("the daemons must start as root (slurmd starts jobs as their user; munged runs as "
                               "the munge user): run this with sudo")
        missing = missing_packages()
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install {' '.join(PACKAGES)}, or "
                               "start --install)")
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the munge user reaches its own folder through this one
        self._start_munged()
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=host, root=self.root, cpus=self.cpus, kill_wait=self.kill_wait,
                                               ctld_port=free_port(), slurmd_port=free_port()))
        env = {**os.environ, **self.env}
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._spawn("slurmd", [which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], env)
        self._save_pids()
        try:
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = self.root / "munge"
        folder.mkdir(exist_ok=True)
        os.chown(folder, munge.pw_uid, munge.pw_gid)
        os.chmod(folder, 0o755)  # (munged: clients must reach the socket; the key itself is 0600)
        key = folder / "munge.key"
        if not key.exists():
            subprocess.run([which("mungekey"), "--create", "--keyfile", str(key)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        command = [which("munged"), "--foreground", f"--socket={folder}/munge.socket", f"--key-file={key}",
                   f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                   f"--seed-file={folder}/munged.seed"]

        def as_munge():
            os.setgid(munge.pw_gid)
            os.initgroups("munge", munge.pw_gid)
            os.setuid(munge.pw_uid)

        self._spawn("munged", command, dict(os.environ), preexec_fn=as_munge)
        deadline = time.time() + 30
        while not (folder / "munge.socket").exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged did not open its socket in 30 s (see {folder}/munged.log)")
            time.sleep(0.1)

    def _spawn(self, name: str, command: list[str], env: dict, preexec_fn=None) -> None:
        log = open(self._log(f"{name}.out"), "ab")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=preexec_fn, start_new_session=True)
        log.close()
        self.pids[name] = process.pid
        self._processes = getattr(self, "_processes", {})
        self._processes[name] = process

    def _check_alive(self) -> None:
        for name, process in getattr(self, "_processes", {}).items():
            if process.poll() is not None:
                tail = self._tail(name)
                raise RuntimeError(f"{name} exited with {process.returncode} at start-up: {tail}")

    def _tail(self, name: str) -> str:
        for path in (self._log(f"{name}.log"), self.root / "munge" / f"{name}.log", self._log(f"{name}.out")):
            if path.exists() and path.read_text(errors="replace").strip():
                return path.read_text(errors="replace").strip().splitlines()[-1]
        return "no log"

    def _wait_idle(self, timeout: float) -> None:
        env = {**os.environ, **self.env}
        deadline, state = time.time() + timeout, ""
        while time.time() < deadline:
            self._check_alive()
            result = subprocess.run([which("sinfo") or which("scontrol"), "-h", "-N", "-o", "%T"]
                                    if which("sinfo") else [which("scontrol"), "show", "node", "localhost"],
                                    env=env, capture_output=True, text=True)
            state = result.stdout.strip().lower()
            if result.returncode == 0 and ("idle" in state or "state=idle" in state):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node is not idle after {timeout:.0f} s (state {state or 'unknown'!r}; see "
                           f"{self._log('slurmctld.log')} and {self._log('slurmd.log')})")

    def _save_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps(self.pids))

    def stop(self, timeout: float = 30) -> None:
        """End the daemons this cluster started, by process id (slurmd and slurmctld first, munged last)."""
        pids = self.pids or (json.loads((self.root / "pids.json").read_text()) if (self.root / "pids.json").exists()
                             else {})
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + timeout
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for process in getattr(self, "_processes", {}).values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pids = {}
        (self.root / "pids.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of another parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="write the config and start munged, slurmctld and slurmd")
    start.add_argument("folder", nargs="?", default=None, help="for the config, state and logs (default: a new "
                                                                "folder in /tmp)")
    start.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: this machine's)")
    start.add_argument("--kill-wait", type=int, default=60, help="seconds between SIGTERM and SIGKILL")
    start.add_argument("--install", action="store_true", help="apt-get install slurm-wlm and munge if missing")
    stop = sub.add_parser("stop", help="stop the daemons started in FOLDER")
    stop.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "stop":
        LocalCluster(args.folder).stop()
        print(f"stopped the cluster in {args.folder}")
        return 0
    if args.install and missing_packages():
        why = can_install()
        if why:
            print(f"error: cannot install {' '.join(PACKAGES)}: {why}", file=sys.stderr)
            return 2
        install(quiet=False)
    folder = args.folder or tempfile.mkdtemp(prefix="recur-cluster-")
    try:
        cluster = LocalCluster(folder, args.cpus, args.kill_wait).start()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"a one-node SLURM cluster runs from {cluster.root} (pids {cluster.pids}); use it with\n"
          f"  export SLURM_CONF={cluster.conf}\nand stop it with\n  python3 {Path(__file__).resolve()} stop "
          f"{cluster.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
