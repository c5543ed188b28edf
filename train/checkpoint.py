"""Checkpoints: atomic DeepSpeed saves with every rank's data-loader state, resume, and export.

    run_dir/checkpoints/
      latest                     # the tag of the newest complete checkpoint ("step_00000100"), written last
      step_00000100/
        mp_rank_00_model_states.pt, *_optim_states.pt   # DeepSpeed's own files (any ZeRO stage)
        data_rank00000.pt ...    # per rank: data-loader state and RNG states
        config.json, tokenizer/  # the model config and tokenizer, so export needs nothing else
        trainer_state.json       # step, tokens, world size; its presence marks a complete save
      .tmp-step_00000200/        # a save in progress (or one a crash interrupted: removed on the next start)

A save goes: every rank takes part in DeepSpeed's `save_checkpoint` into `.tmp-<tag>` (no
`latest` from DeepSpeed), each rank writes its own data state (DeepSpeed's client_state is kept by
rank 0 only under ZeRO 0/1/2), rank 0 writes trainer_state.json, renames the folder to `<tag>`,
then replaces `latest` (os.replace, atomic) and prunes to the last K. A crash anywhere before the
`latest` replace leaves the previous checkpoint and `latest` as they were. The checkpoints folder
must be one every rank sees (a shared filesystem across nodes), as DeepSpeed's own `latest` needs.

`recur export CHECKPOINT OUT` writes a transformers folder (safetensors, config with the model's
code, tokenizer, generation config) from a run dir, a checkpoints folder or one checkpoint,
through DeepSpeed's zero_to_fp32 (which rebuilds full float32 weights from any ZeRO stage's shards).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

import torch

from ..files import atomic_folder

TAG = "step_{:08d}"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


def data_file(rank: int) -> str:
    return f"data_rank{rank:05d}.pt"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np
        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _fault_injection(point: str, step: int) -> None:
    """Tests simulate a crash at a point of the save: RECUR_TEST_CRASH=<point>:<step> kills the process."""
    if os.environ.get("RECUR_TEST_CRASH") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save(engine, root: Path, step: int, tokens: int, loader, env, keep: int, model, tokenizer, extra: dict) -> str:
    """Every rank calls this. Returns the tag written."""
    import torch.distributed as dist

    tag = TAG.format(step)
    tmp_tag = TMP_PREFIX + tag
    tmp = root / tmp_tag
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    path = tmp / data_file(env.rank)
    torch.save({"loader": loader.state_dict(), "rng": rng_states(), "rank": env.rank,
                "world_size": env.world_size}, path)
    _fsync_file(path)
    dist.barrier()
    _fault_injection("save", step)
    if env.is_main:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp / "tokenizer")
        missing = [r for r in range(env.world_size) if not (tmp / data_file(r)).exists()]
        if missing:
            raise CheckpointError(f"ranks {missing} wrote no data state into {tmp} (is {root} shared by every node?)")
        write_atomic(tmp / STATE_FILE, json.dumps({"step": step, "tokens": tokens, "world_size": env.world_size,
                                                   **extra}, indent=1))
        final = root / tag
        if final.exists():  # the same step saved before (a resumed run that stopped again at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _fault_injection("before_latest", step)
        write_atomic(root / "latest", tag)
        prune(root, keep)
    dist.barrier()
    return tag


def complete_tags(root: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(tags, key=lambda t: int(t.split("_")[1]))


def prune(root: Path, keep: int) -> None:
    latest = (root / "latest").read_text().strip()
    tags = complete_tags(root)
    for tag in tags[:-keep]:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def clean_partial(root: Path) -> None:
    """Remove saves a crash interrupted (rank 0, before training starts)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run dir, a checkpoints folder (its `latest`) or one checkpoint folder."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists():
        return path.parent, path.name
    for root in (path, path / "checkpoints"):
        if (root / "latest").exists():
            tag = (root / "latest").read_text().strip()
            if not (root / tag / STATE_FILE).exists():
                raise CheckpointError(f"{root}/latest names {tag!r}, which is not a complete checkpoint")
            return root, tag
    raise CheckpointError(f"{path}: not a checkpoint, a checkpoints folder or a run dir with checkpoints")


def find_resume(resume: str | None, run_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: None for a fresh start. resume=auto: the run's latest, if any."""
    root = run_dir / "checkpoints"
    if resume is None:
        if complete_tags(root):
            raise CheckpointError(f"{root} already holds checkpoints: set resume=auto to continue the run, "
                                  "or choose another run_dir")
        return None
    if resume == "auto":
        return resolve(root) if (root / "latest").exists() else None
    return resolve(resume)


def read_state(root: Path, tag: str) -> dict:
    return json.loads((root / tag / STATE_FILE).read_text())


def load(engine, root: Path, tag: str, loader, env) -> dict:
    """Restore model, optimizer, this rank's data-loader and RNG states; returns trainer_state.json."""
    state = read_state(root, tag)
    if state["world_size"] != env.world_size:
        raise CheckpointError(f"{root / tag} was written by {state['world_size']} ranks, this run has "
                              f"{env.world_size}: the data-loader states are per rank (resume with the same world size)")
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    data = torch.load(root / tag / data_file(env.rank), weights_only=False)
    loader.load_state_dict(data["loader"])
    set_rng_states(data["rng"])
    return state


# ----------------------------------------------------------------------------------------- export

def export(checkpoint: str | Path, out: str | Path) -> Path:
    """A transformers folder from a checkpoint, any ZeRO stage; written atomically."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import recur  # noqa: F401  registers the families

    root, tag = resolve(checkpoint)
    folder = root / tag
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output folder {out} exists and is not empty")
    config = AutoConfig.from_pretrained(folder)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match {config.model_type}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        (tmp / "recur_checkpoint.json").write_text(json.dumps({"checkpoint": str(folder.resolve()),
                                                               **read_state(root, tag)}, indent=1))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur export", description="Write a transformers-loadable folder "
                                     "(safetensors, config, tokenizer, generation config) from a recur checkpoint.")
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ folder, or one checkpoint folder")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0
