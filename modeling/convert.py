"""`recur convert SRC DST`: official checkpoint layouts to recur checkpoints.

SRC is a HuggingFace-style folder (config.json + safetensors or .bin weights) or a single-file
checkpoint (BlinkDL RWKV `.pth`). Its layout is found among the converters the families declare
(`FAMILY.converters`, matched on config.json's model_type or the file suffix), converted, loaded
into the recur model with every tensor accounted for, and written to DST in one step (a temporary
folder renamed into place, so DST is never left half-written). Any failure is one line, exit 2.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import UserError, first_line
from ..files import atomic_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


class ConvertError(UserError):
    """A checkpoint recur cannot convert; one line naming why."""


def converters():
    from . import FAMILIES

    return [c for family in FAMILIES.values() for c in family.converters]


def load_folder(src: Path) -> tuple[dict, dict]:
    """config.json and every weight tensor of a HuggingFace-style folder."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{src} has no config.json: not a HuggingFace-style checkpoint folder")
    from transformers import PretrainedConfig

    # transformers' reader, which decodes what its writer encodes (e.g. infinity as {"__float__": ...})
    try:
        config, _ = PretrainedConfig.get_config_dict(str(src))
    except Exception as e:  # transformers raises OSError or EnvironmentError subclasses for a bad JSON
        raise ConvertError(f"{config_file}: not a readable config ({first_line(e)})") from None
    files = sorted(src.glob("*.safetensors"))
    if files:
        return config, {k: v for f in files for k, v in _load_safetensors(f).items()}
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConvertError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)")
    return config, {k: v for f in bins for k, v in _load_torch(f).items()}


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # a truncated or foreign file: SafetensorError, OSError, ...
        raise ConvertError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _load_torch(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


def detect(src: Path):
    """The converter for SRC and its (config dict, state dict)."""
    if not src.exists():
        raise ConvertError(f"{src} does not exist")
    if src.is_file():
        for converter in converters():
            if src.suffix in converter.file_suffixes:
                return converter, ({}, _load_torch(src))
        suffixes = sorted({s for c in converters() for s in c.file_suffixes})
        raise ConvertError(f"{src}: expected a checkpoint folder or a single-file checkpoint ({', '.join(suffixes)})")
    config, state = load_folder(src)
    for converter in converters():
        if converter.reads_folder(config):
            return converter, (config, state)
    known = ", ".join(sorted({c.model_type for c in converters() if c.model_type}))
    raise ConvertError(f"{src}: model_type {config.get('model_type')!r} is not a layout recur converts (known: {known})")


def load_converted(model, state: dict, source: str) -> None:
    """Every tensor of the model from `state`: only tied copies may be absent (transformers does not
    save a tied head), nothing unexpected, every shape right."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set((getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConvertError(f"{source}: converted weights do not fit {model.config.model_type}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Converts SRC into a recur checkpoint at DST; returns the recur model type."""
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst} is a file: choose a new folder for the converted checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty: choose a new destination")
    converter, (config_dict, state_dict) = detect(src)
    try:
        config, state = converter.convert(config_dict, state_dict)
    except (ValueError, KeyError, TypeError) as e:  # converters name the tensor or option; KeyError: a missing field
        what = f"missing config field {e}" if isinstance(e, KeyError) else first_line(e)
        raise ConvertError(f"{src} ({converter.name}): {what}") from None
    model = AutoModelForCausalLM.from_config(config)
    try:
        load_converted(model, state, f"{src} ({converter.name})")
    except RuntimeError as e:  # a shape the converter did not check
        raise ConvertError(f"{src} ({converter.name}): {first_line(e)}") from None
    with atomic_folder(dst) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES if src.is_dir() else ():
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return config.model_type



def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="recur convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint folder (config.json + weights) or BlinkDL RWKV .pth file")
    parser.add_argument("dst", help="new folder for the recur checkpoint")
    args = parser.parse_args(argv)
    model_type = convert(args.src, args.dst)  # ConvertError: the command line prints one line, exit 2
    print(f"wrote {model_type} checkpoint to {args.dst}")
    return 0
