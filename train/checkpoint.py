"""Checkpoints: atomic, verified DeepSpeed saves with every rank's train state; resume; export.

    run_dir/checkpoints/
      latest                     # the tag of the newest published checkpoint ("step_00000100"), written last
      step_00000100/
        mp_rank_00_model_states.pt, *_optim_states.pt   # DeepSpeed's own files (any ZeRO stage)
        data_rank00000.pt ...    # per rank: the train state (data-loader and RNG states)
        config.json, tokenizer/  # the model config and tokenizer, so export needs nothing else
        trainer_state.json       # step, tokens, world size, seq_len, tokenizer fingerprint
        manifest.json            # size and sha256 of every other file, written last: the save is complete
      .tmp-step_00000200/        # a save in progress (or one a crash interrupted: removed on the next start)

A save goes: every rank takes part in DeepSpeed's `save_checkpoint` into `.tmp-<tag>` (no
`latest` from DeepSpeed), each rank writes its own train state (DeepSpeed's client_state is kept by
rank 0 only under ZeRO 0/1/2), rank 0 writes the config, tokenizer and trainer_state.json, the
ranks checksum the files between them, rank 0 writes manifest.json, renames the folder to
`<tag>`, then replaces `latest` (os.replace, atomic) and prunes to the last K. A crash anywhere
before the `latest` replace leaves the previous checkpoint and `latest` as they were; re-saving
the step `latest` names goes to a new folder (`step_N-1`), so `latest` never names a missing one.

Resuming verifies the checkpoint against its manifest (the ranks share the reading). With
`resume=auto`, a damaged latest checkpoint is reported in one line and the newest intact one is
used instead. The checkpoints folder must be one every rank sees (a shared filesystem).

`recur export CHECKPOINT OUT` writes a transformers folder (safetensors, config with the model's
code, tokenizer, generation config) from a run dir, a checkpoints folder or one checkpoint,
through DeepSpeed's zero_to_fp32 (which rebuilds full float32 weights from any ZeRO stage's shards).
A LoRA run's checkpoint holds the peft-wrapped model; trainer_state.json records `lora`, and
`load_model` rebuilds the wrapper, loads the weights and merges the LoRA into them (peft's
merge_and_unload), so the export is a plain model folder. Frozen parameters that zero_to_fp32 does
not rebuild (ZeRO-1 keeps no record of them) come from the module state DeepSpeed saved.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..config import UserError
from ..files import atomic_folder

TAG = "step_{:08d}"
TAG_PATTERN = re.compile(r"step_(\d+)(?:-(\d+))?")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


class CheckpointError(UserError):
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


def tag_order(tag: str) -> tuple[int, int]:
    match = TAG_PATTERN.fullmatch(tag)
    return int(match.group(1)), int(match.group(2) or 0)


# ----------------------------------------------------------------------------------------- manifest

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under a checkpoint folder but the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entries(folder: Path, names: list[str]) -> dict:
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in names}


def problems_with(folder: Path, names=None) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest ([] when intact); `names` limits the
    checksums to a share of the files (ranks verify a checkpoint between them)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{folder.name} has no {MANIFEST} (its save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder.name}/{MANIFEST} is unreadable ({type(e).__name__})"]
    problems = []
    for name, entry in files.items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def manifest_names(folder: Path) -> list[str]:
    try:
        return sorted(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ----------------------------------------------------------------------------------------- listing

def published_tags(root: Path) -> list[str]:
    """Tags of checkpoint folders whose save finished (they have a manifest), oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_PATTERN.fullmatch(p.name) and (p / MANIFEST).exists()]
    return sorted(tags, key=tag_order)


def read_latest(root: Path) -> str | None:
    """The tag `latest` names, or None when it is missing, empty or not a tag."""
    try:
        tag = (root / "latest").read_text().strip()
    except OSError:
        return None
    return tag if TAG_PATTERN.fullmatch(tag) else None


def read_state(root: Path, tag: str) -> dict:
    return json.loads((root / tag / STATE_FILE).read_text())


def clean_partial(root: Path) -> None:
    """Remove saves a crash interrupted (rank 0, before training starts, holding the run-dir lock)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run dir, a checkpoints folder (its `latest`) or one checkpoint folder."""
    path = Path(path).expanduser()
    if TAG_PATTERN.fullmatch(path.name) and path.is_dir():
        return path.parent, path.name
    for root in (path, path / "checkpoints"):
        if (root / "latest").exists():
            tag = read_latest(root)
            if tag is None:
                raise CheckpointError(f"{root}/latest does not name a checkpoint (it is empty or damaged); "
                                      f"checkpoints there: {', '.join(published_tags(root)) or 'none'}")
            return root, tag
    raise CheckpointError(f"{path}: not a checkpoint, a checkpoints folder or a run dir with checkpoints")


def verified(root: Path, tag: str) -> None:
    """Raise a one-line CheckpointError when the checkpoint is damaged, naming the newest intact one."""
    problems = problems_with(root / tag)
    if problems:
        intact = next((t for t in reversed(published_tags(root)) if t != tag and not problems_with(root / t)), None)
        hint = f"; the newest intact checkpoint is {root / intact}" if intact else "; no intact checkpoint is left"
        raise CheckpointError(f"checkpoint {root / tag} is damaged: {'; '.join(problems[:3])}{hint}")


# ----------------------------------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Saves and restores the engine and the train state of every rank under `root`."""

    def __init__(self, root: Path, env, keep: int):
        self.root, self.env, self.keep = Path(root), env, keep

    # --- saving (every rank calls save)

    def save(self, engine, state, config, tokenizer, extra: dict) -> str:
        import torch.distributed as dist

        env, tmp = self.env, self.root / (TMP_PREFIX + TAG.format(state.step))
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"step": state.step}, save_latest=False)
        path = tmp / data_file(env.rank)
        torch.save({**state.state_dict(), "rank": env.rank, "world_size": env.world_size}, path)
        _fsync_file(path)
        dist.barrier()
        if env.is_main:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp / "tokenizer")
            missing = [r for r in range(env.world_size) if not (tmp / data_file(r)).exists()]
            if missing:
                raise CheckpointError(f"ranks {missing} wrote no train state into {tmp} "
                                      f"(is {self.root} shared by every node?)")
            write_atomic(tmp / STATE_FILE, json.dumps({"step": state.step, "tokens": state.tokens,
                                                       "world_size": env.world_size, **extra}, indent=1))
        dist.barrier()
        entries = self._checksum_share(tmp)
        if env.is_main:
            write_atomic(tmp / MANIFEST, json.dumps({"step": state.step, "files": entries}, indent=1))
            tag = self._publish(tmp, state.step)
        else:
            tag = None
        dist.barrier()
        return tag

    def _checksum_share(self, folder: Path) -> dict:
        """Size and sha256 of every file in the folder, each rank hashing its share."""
        import torch.distributed as dist

        names = [folder_files(folder) if self.env.is_main else None]
        dist.broadcast_object_list(names, src=0)
        mine = names[0][self.env.rank::self.env.world_size]
        shares = [None] * self.env.world_size
        dist.all_gather_object(shares, file_entries(folder, mine))
        return {name: entry for share in shares for name, entry in share.items()}

    def _publish(self, tmp: Path, step: int) -> str:
        """Rename the finished save into place, then point `latest` at it (rank 0)."""
        latest = read_latest(self.root)
        tag, k = TAG.format(step), 0
        while tag == latest or (k and (self.root / tag).exists()):  # never replace what `latest` names
            k += 1
            tag = f"{TAG.format(step)}-{k}"
        if (self.root / tag).exists():  # an unpublished save of this step (a crash before `latest` moved)
            shutil.rmtree(self.root / tag)
        os.replace(tmp, self.root / tag)
        _fsync_dir(self.root)
        self._point_latest(tag)
        for other in published_tags(self.root):  # earlier saves of the same step are superseded
            if other != tag and tag_order(other)[0] == step:
                shutil.rmtree(self.root / other, ignore_errors=True)
        self._prune(tag)
        return tag

    def _point_latest(self, tag: str) -> None:
        write_atomic(self.root / "latest", tag)

    def _prune(self, latest: str) -> None:
        for tag in published_tags(self.root)[:-self.keep]:
            if tag != latest:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # --- resuming (every rank calls these, in the same order)

    def problems(self, tag: str) -> list[str]:
        """The ranks verify a checkpoint between them; every rank gets every problem."""
        import torch.distributed as dist

        folder = self.root / tag
        names = manifest_names(folder)
        mine = set(names[self.env.rank::self.env.world_size]) if names else None
        found = problems_with(folder, mine) if mine is not None or self.env.is_main else []
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, found)
        return [p for rank_problems in gathered for p in rank_problems]

    def resume_point(self, resume: str | None, run_dir: Path) -> tuple[tuple[Path, str] | None, dict | None]:
        """((checkpoints folder, tag) to resume from or None for a fresh start, fallback record or None).

        resume=None refuses a run dir that holds checkpoints; resume=auto takes `latest`, or the
        newest intact checkpoint when `latest` is damaged (said in the returned record); a path must
        be intact."""
        if resume is None:
            if published_tags(self.root):
                raise CheckpointError(f"{self.root} already holds checkpoints: set resume=auto to continue the run, "
                                      "or choose another run_dir")
            return None, None
        if resume != "auto":
            root, tag = resolve(resume)
            problems = Checkpointer(root, self.env, self.keep).problems(tag)
            if problems:
                raise CheckpointError(f"resume: checkpoint {root / tag} is damaged: {'; '.join(problems[:3])}")
            return (root, tag), None
        tags = published_tags(self.root)
        latest = read_latest(self.root)
        if latest is None and not (self.root / "latest").exists() and not tags:
            return None, None  # nothing saved yet: a fresh start
        problems = self.problems(latest) if latest else [f"{self.root}/latest does not name a checkpoint"]
        if not problems:
            return (self.root, latest), None
        newest = tag_order(latest)[0] if latest else float("inf")
        for tag in reversed(tags):
            if tag != latest and tag_order(tag)[0] <= newest and not self.problems(tag):
                return (self.root, tag), {"event": "resume_fallback", "damaged": latest,
                                          "problems": problems[:3], "resumed_from": tag}
        what = f"checkpoint {self.root / latest} is damaged" if latest else f"{self.root}/latest is empty or damaged"
        raise CheckpointError(f"{what} ({'; '.join(problems[:3])}) and no intact checkpoint is left in {self.root}")

    def load(self, engine, root: Path, tag: str, state) -> dict:
        """Restore model, optimizer and this rank's train state; returns trainer_state.json."""
        saved = read_state(root, tag)
        if saved["world_size"] != self.env.world_size:
            raise CheckpointError(f"{root / tag} was written by {saved['world_size']} ranks, this run has "
                                  f"{self.env.world_size}: the data-loader states are per rank (resume with the same "
                                  "world size)")
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {root / tag}")
        state.load_state_dict(torch.load(root / tag / data_file(self.env.rank), weights_only=False))
        return saved


# ----------------------------------------------------------------------------------------- export

def load_model(root: Path, tag: str):
    """(model in float32 and eval mode, tokenizer) from a verified checkpoint of any ZeRO stage, in memory."""
    verified(root, tag)
    folder = root / tag

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import recur  # noqa: F401  registers the families

    from .engine import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = AutoConfig.from_pretrained(folder)
    lora = read_state(root, tag).get("lora")
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    if lora:
        from .engine import apply_lora

        model = apply_lora(model, lora)
        tied = {PEFT_PREFIX + k for k in tied}
    frozen = _frozen_parameters(folder, set(dict(model.named_parameters())) - set(state_dict))
    missing, unexpected = model.load_state_dict({**frozen, **state_dict}, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match {config.model_type}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if lora:
        model = model.merge_and_unload()
    return model.eval(), AutoTokenizer.from_pretrained(folder / "tokenizer")


PEFT_PREFIX = "base_model.model."  # what peft's wrapper puts before the model's parameter names


def _frozen_parameters(folder: Path, names: set[str]) -> dict:
    """Parameters zero_to_fp32 did not rebuild (frozen ones under ZeRO-1), from DeepSpeed's saved module state."""
    if not names:
        return {}
    found = {}
    for path in sorted(folder.glob("*mp_rank_00_model_states.pt")):
        module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
        found.update({k: v.float() for k, v in module.items() if k in names and v.numel() > 0})
    return found


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """A transformers folder from a checkpoint, any ZeRO stage; verified first, written atomically."""
    from transformers import GenerationConfig

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file: choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output folder {out} exists and is not empty")
    root, tag = resolve(checkpoint)
    model, tokenizer = load_model(root, tag)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        (tmp / "recur_checkpoint.json").write_text(json.dumps({"checkpoint": str((root / tag).resolve()),
                                                               **read_state(root, tag)}, indent=1))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur export", description="Write a transformers-loadable folder "
                                     "(safetensors, config, tokenizer, generation config) from a recur checkpoint.")
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ folder, or one checkpoint folder")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out)  # CheckpointError: one line, exit 2 (the command line)
    print(f"exported {args.checkpoint} to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0
