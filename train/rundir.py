"""The run directory: one owner at a time, and nothing in it changed before the run is known to fit.

- `RunDirLock`: an exclusive OS lock (flock) on `run_dir/.lock`, held by rank 0 for the run's whole
  life. The OS releases it on any exit, a crash or SIGKILL included, so it is never stale; the file
  holds the owner's pid and host, which a second run names when it is refused. A `recur` command
  that starts `recur train` itself (the torchrun spawner, quickstart) takes the lock first and
  hands it down through RECUR_RUN_DIR_LOCK, so its own children do not refuse themselves.
- `check_fits`: before a resumed run writes anything, the recipe must build the model the
  checkpoint holds (type and every config field that shapes it), with the same tokenizer, seq_len,
  world size, train.lora and train.trainable (what the optimizer state is of); a mismatch is one
  line naming the differing keys.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..config import RecipeError, UserError

LOCK_FILE = ".lock"
HANDED_DOWN = "RECUR_RUN_DIR_LOCK"  # the resolved run dir whose lock an ancestor process holds

# config.json keys that describe the saved file, not the model
_NOT_THE_MODEL = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype",
                  "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


class RunDirBusy(UserError):
    pass


def make_run_dir(run_dir: Path) -> Path:
    """Create the run dir (and parents), or one line saying why it cannot be."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run_dir: {run_dir} exists and is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"run_dir: cannot create or write {run_dir} ({e.strerror or e})") from None
    return run_dir


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.fd = None

    def handed_down(self) -> bool:
        return os.environ.get(HANDED_DOWN) == str(self.run_dir)

    def acquire(self) -> "RunDirLock":
        if self.handed_down():
            return self
        make_run_dir(self.run_dir)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"run_dir {self.run_dir} is in use by another run ({holder}): wait for it to end "
                                 "or choose another run_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        os.environ[HANDED_DOWN] = str(self.run_dir)  # for the processes this one starts
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            os.environ.pop(HANDED_DOWN, None)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "its pid and host are not recorded"


def check_fits(checkpoint: Path, config, tokenizer_fingerprint: str, seq_len: int, world_size: int,
               lora: dict | None = None, trainable: list = ()) -> None:
    """One RecipeError naming every key in which this run differs from the checkpoint it resumes."""
    from .checkpoint import STATE_FILE

    from transformers import AutoConfig

    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        saved_config = _fields(AutoConfig.from_pretrained(checkpoint))
    except (OSError, ValueError) as e:
        raise RecipeError(f"resume: cannot read {checkpoint} ({e})") from None
    ours = _fields(config)
    differ = []
    if saved_config.get("model_type") != ours.get("model_type"):
        differ.append(f"model.type ({ours.get('model_type')} here, {saved_config.get('model_type')} saved)")
    else:
        for key in sorted((set(saved_config) | set(ours)) - _NOT_THE_MODEL - {"model_type"}):
            if saved_config.get(key) != ours.get(key):
                differ.append(f"model.{key} ({ours.get(key)!r} here, {saved_config.get(key)!r} saved)")
    if saved.get("tokenizer") not in (None, tokenizer_fingerprint):
        differ.append("data.tokenizer (another vocabulary or special tokens than the saved tokenizer)")
    if saved.get("seq_len") not in (None, seq_len):
        differ.append(f"data.seq_len ({seq_len} here, {saved['seq_len']} saved)")
    if saved.get("world_size") not in (None, world_size):
        differ.append(f"world size ({world_size} processes here, {saved['world_size']} saved: the data-loader "
                      "states are per rank)")
    if saved.get("lora") != lora:  # the checkpoint holds the LoRA weights (or none) and their optimizer state
        differ.append(f"train.lora ({lora!r} here, {saved.get('lora')!r} saved)")
    if list(saved.get("trainable") or []) != list(trainable):
        differ.append(f"train.trainable ({list(trainable)!r} here, {saved.get('trainable')!r} saved)")
    if differ:
        shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise RecipeError(f"resume: the recipe does not fit checkpoint {checkpoint}: {shown}")


def _fields(config) -> dict:
    """Every field of a config, defaults included, as JSON values (tuples as lists)."""
    return json.loads(config.to_json_string(use_diff=False))
