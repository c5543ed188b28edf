"""`recur convert SRC DST`: official checkpoint layouts to recur checkpoints.

SRC is a HuggingFace-style folder (config.json + safetensors or .bin weights) or a BlinkDL RWKV
`.pth` file; its layout is detected from the config's model_type (or the file), converted by the
family's own converter, loaded strictly into the recur model and written to DST in one step
(a temporary folder renamed into place, so DST is never left half-written).
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import torch

from ..files import atomic_folder

# model_type in the source config.json -> (recur family module, converter function)
LAYOUTS = {
    "gla": ("gla", "from_fla"),
    "hgrn2": ("hgrn2", "from_fla"),
    "mamba2": ("mamba2", "from_transformers"),  # transformers' Mamba2ForCausalLM (state-spaces/mamba2-*)
    "rwkv6": ("rwkv6", "from_hf"),  # RWKV/v6-Finch-*-HF
    "recurrent_gemma": ("griffin", "from_transformers"),  # transformers' RecurrentGemma (google/recurrentgemma-*)
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def load_folder(src: Path) -> tuple[dict, dict]:
    """config.json and every weight tensor of a HuggingFace-style folder."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{src} has no config.json: not a HuggingFace-style checkpoint folder")
    from transformers import PretrainedConfig

    # transformers' reader, which decodes what its writer encodes (e.g. infinity as {"__float__": ...})
    config, _ = PretrainedConfig.get_config_dict(str(src))
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if files:
        state = {k: v for f in files for k, v in load_file(f).items()}
    else:
        bins = sorted(src.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)")
        state = {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    return config, state


def detect(src: Path):
    """The converter for SRC and its arguments."""
    if not src.exists():
        raise ValueError(f"{src} does not exist")
    if src.is_file():
        if src.suffix not in (".pth", ".pt"):
            raise ValueError(f"{src}: expected a checkpoint folder or a BlinkDL RWKV .pth file")
        return _converter("rwkv6", "from_blinkdl"), (torch.load(src, map_location="cpu", weights_only=True),)
    config, state = load_folder(src)
    model_type = config.get("model_type")
    if model_type is None and "ssm_cfg" in config:  # mamba_ssm's own config.json (state-spaces/mamba2-*)
        model_type = "mamba2"
    if model_type not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"{src}: model_type {model_type!r} is not a layout recur converts (known: {known})")
    return _converter(*LAYOUTS[model_type]), (config, state)


def _converter(family: str, name: str):
    return getattr(importlib.import_module(f"recur.modeling.{family}.convert"), name)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Converts SRC into a recur checkpoint at DST; returns the recur model type."""
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty: choose a new destination")
    converter, args = detect(src)
    config, state = converter(*args)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    with atomic_folder(dst) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES if src.is_dir() else ():
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return config.model_type


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="recur convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint folder (config.json + weights) or BlinkDL RWKV .pth file")
    parser.add_argument("dst", help="new folder for the recur checkpoint")
    args = parser.parse_args(argv)
    try:
        model_type = convert(args.src, args.dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model_type} checkpoint to {args.dst}")
    return 0
