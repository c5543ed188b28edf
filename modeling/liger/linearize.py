"""`recur linearize TEACHER OUT --to liger-gla|liger-hgrn2|gated-deltanet|window-only`: a pretrained
Llama-family transformer as a gated recurrent model (`recur_liger`), every teacher weight reused.

TEACHER is a transformers folder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) or a GGUF file
(dequantized to float32 by transformers); nothing is downloaded. OUT is written in one step: the
student (safetensors, config with `auto_map` and the code, so it loads without recur), the
teacher's tokenizer and generation config. Fine-tune it with `recur train` (recipes/linearize/).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ...config import UserError, first_line
from ...files import atomic_folder
from .configuration_liger import METHODS, TEACHER_TYPES, LigerConfig


class LinearizeError(UserError):
    pass


def teacher_source(path: str, gguf_file: str | None = None):
    """(folder, kwargs for from_pretrained, its config): one line when it is not a Llama-family LM."""
    from transformers import AutoConfig

    path = Path(path).expanduser()
    if gguf_file is None and path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    where = path / gguf_file if gguf_file else path
    if not where.exists():
        raise LinearizeError(f"teacher {where}: no such file or folder")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # transformers raises many kinds for a folder or GGUF it cannot read
        what = "GGUF file transformers cannot read or dequantize" if gguf_file else "model folder transformers can read"
        raise LinearizeError(f"teacher {where}: not a {what} ({type(e).__name__}: {first_line(e)})") from None
    if config.model_type not in TEACHER_TYPES:
        raise LinearizeError(f"teacher {where} is a {config.model_type!r} model; recur linearize reads Llama-family "
                             f"transformers ({', '.join(TEACHER_TYPES)})")
    return path, kwargs, config


def load_teacher(path: str, gguf_file: str | None = None):
    """(model in float32, tokenizer) from a folder or a GGUF file (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs, _ = teacher_source(path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:
        raise LinearizeError(f"teacher {folder / kwargs.get('gguf_file', '')}: cannot load its weights or tokenizer "
                             f"({type(e).__name__}: {first_line(e)})") from None
    return model.eval(), tokenizer


def linearize(teacher: str, out: str, method: str = "liger-gla", window: int = 64, sinks: int = 0,
              keep_attention_layers: list[int] = (), gguf_file: str | None = None, window_weight: float | None = None,
              normalize: bool = False, learn_window_weight: bool = False):
    """Convert and save; returns the student."""
    from transformers import GenerationConfig

    from .convert import from_teacher

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LinearizeError(f"{out} exists and is not an empty folder: choose a new destination")
    options = dict(method=method, window=window, sinks=sinks, keep_attention_layers=list(keep_attention_layers),
                   teacher={"path": str(Path(teacher).expanduser().resolve() / (gguf_file or ""))})
    if window_weight is not None:
        options["window_weight"] = window_weight
    if normalize:
        options["normalize"] = True
    if learn_window_weight:
        options["learn_window_weight"] = True
    _, _, config = teacher_source(teacher, gguf_file)
    try:  # the student config's own checks (window, sinks, layers in range), before any weight loads
        LigerConfig.from_teacher(config, **options)
    except ValueError as e:
        raise LinearizeError(f"{e}") from None
    model, tokenizer = load_teacher(teacher, gguf_file)
    student, _ = from_teacher(model, **options)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    with atomic_folder(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
    return student



def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LinearizeError(f"--keep-attention-layers {text!r}: comma-separated layer indices, e.g. 0,15") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur linearize", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("teacher", help="a Llama-family transformers folder, or a .gguf file")
    parser.add_argument("out", help="a new folder for the recur_liger student")
    parser.add_argument("--to", dest="method", choices=METHODS, default="liger-gla")
    parser.add_argument("--window", type=int, default=64, help="sliding-window attention size (tokens)")
    parser.add_argument("--sinks", type=int, default=0, help="first tokens kept visible to the window")
    parser.add_argument("--keep-attention-layers", default="", help="layers left as softmax attention, e.g. 0,15")
    parser.add_argument("--window-weight", type=float, default=None,
                        help="output = w·window + (1 − w)·recurrence (default 0.5, Liger's)")
    parser.add_argument("--learn-window-weight", action="store_true",
                        help="w becomes a parameter per head, starting at --window-weight (not in Liger)")
    parser.add_argument("--normalize", action="store_true",
                        help="divide the GLA/HGRN2 recurrence by its normalizer (not in Liger)")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside TEACHER (a folder)")
    args = parser.parse_args(argv)
    if args.window < 1:
        raise LinearizeError(f"--window {args.window}: must be at least 1")
    student = linearize(args.teacher, args.out, args.method, args.window, args.sinks, _layers(args.keep_attention_layers),
                        args.gguf_file, args.window_weight, args.normalize,
                        args.learn_window_weight)
    kinds = [student.config.layer_kind(i) for i in range(student.config.num_hidden_layers)]
    n = sum(p.numel() for p in student.parameters())
    print(f"wrote {args.out}: recur_liger, {len(kinds)} layers ({kinds.count('attention')} kept as attention, "
          f"{len(kinds) - kinds.count('attention')} {args.method}), window {args.window}, sinks {args.sinks}, "
          f"{n / 1e6:.1f}M parameters")
    return 0
