"""Who am I in the job: rank, world size, local rank and the master address, from whatever launched us.

Launchers and what they set:
- `torchrun` and the `deepspeed` launcher: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT (read as they are).
- `srun` (one task per process): SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS inside a step),
  SLURM_LOCALID, SLURM_NTASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE, SLURM_JOB_NODELIST. DeepSpeed
  does not read these (it would try MPI discovery), so they are mapped to the torchrun names: the
  master is the first host of the node list, the port 20000 + job id mod 20000 (unique per job,
  so two jobs sharing a node do not collide) unless MASTER_PORT is set.
- nothing: one process, rank 0 of 1, on 127.0.0.1 with a free port.

The environment is then written back (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which
is all `deepspeed.init_distributed` needs. The backend is nccl on GPU and gloo on CPU.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun (also the deepspeed launcher) | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    def export(self) -> None:
        """Write the torchrun-style variables DeepSpeed and torch.distributed read."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def launched_env(environ=None) -> DistEnv | None:
    """The launcher's view of this process, or None when no launcher started it."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
                       launcher="torchrun")
    # Inside an srun step (not the batch script itself, where SLURM_NTASKS counts tasks not yet started).
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        if world <= 1:
            return None
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", str(world)))
        nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000)
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
                       local_world_size=_first_count(per_node), master_addr=env.get("MASTER_ADDR") or first_host(nodes),
                       master_port=int(port), launcher="slurm")
    return None


def single_process_env() -> DistEnv:
    return DistEnv(master_port=free_port())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'.

    Parsed here (no scontrol needed); `scontrol show hostnames` is the fallback for forms this
    does not know."""
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return _scontrol_first(nodelist)
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _scontrol_first(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _first_count(tasks_per_node: str) -> int:
    """'4(x2),3' -> 4: SLURM's compressed tasks-per-node list; the local world size of the first node."""
    match = re.match(r"^(\d+)", tasks_per_node.strip())
    return int(match.group(1)) if match else 1


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Reduce a few numbers over every rank (one small collective; the result is on the host)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()
