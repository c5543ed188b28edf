"""The model and its DeepSpeed engine, built from a recipe.

On GPU the engine computes in bf16 through DeepSpeed's `torch_autocast`, not its `bf16` section,
which would cast every parameter, the recurrent decays included, to bf16: every parameter,
gradient and optimizer state stays float32. Which parameters are rounding-sensitive each family
declares (`_keep_in_fp32_modules_strict`); `check_fp32_parameters` holds the engine to it.

Fine-tuning: `model.from` starts from a saved model folder's config and weights; `train.lora` wraps
the model in peft's LoRA (the base frozen) and `train.trainable` names the parameters that train
besides (or, without LoRA, instead of everything): `select_trainable`, before DeepSpeed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from recur.config import RecipeError, first_line

from .recipe import Recipe, deep_merge

EXTENSIONS_DIR = "~/.cache/recur/torch_extensions"


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, weights not finite); not a bad input."""


def import_deepspeed():
    """deepspeed, imported quietly: its CPU op is JIT-built once into a cache (a minute on 2 cores),
    and without a GPU the accelerator is named so it does not warn before every message."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(EXTENSIONS_DIR))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def model_config(recipe: Recipe, tokenizer):
    """The family's config from the recipe; vocab and special tokens default to the tokenizer's. With
    model.from, the saved folder's config."""
    from transformers import AutoConfig

    from recur.data import DataError, check_vocab

    source = recipe.model.get("from")
    if source is not None:
        try:
            config = AutoConfig.from_pretrained(Path(source).expanduser())
        except (OSError, ValueError, KeyError) as e:
            raise RecipeError(f"model.from: transformers cannot read the config in {source} "
                              f"({first_line(e)})") from None
        try:
            check_vocab(tokenizer, config.vocab_size)
        except DataError as e:
            raise RecipeError(f"model.from: {source}: {e} (data.tokenizer must be the model's)") from None
        return config
    kwargs = {k: v for k, v in recipe.model.items() if k != "type"}
    kwargs.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(recipe.model["type"], **kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"model: {recipe.model['type']} refuses these settings: {e}") from None
    try:
        check_vocab(tokenizer, config.vocab_size)
    except DataError as e:
        raise RecipeError(f"model.vocab_size: {e}") from None
    return config


def build_model(recipe: Recipe, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    source = recipe.model.get("from")
    if source is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(Path(source).expanduser(), config=config,
                                                           dtype=torch.float32, output_loading_info=True)
        missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
        if missing:
            raise RecipeError(f"model.from: {source} lacks weights of {config.model_type}: "
                              f"{', '.join(map(str, missing[:4]))}{' ...' if len(missing) > 4 else ''}")
    if recipe.train.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model, lora: dict):
    """The model wrapped in peft's LoRA from train.lora's settings (peft freezes every other parameter)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), bias="none")
    return get_peft_model(model, config)


def select_trainable(model, recipe: Recipe):
    """train.lora and train.trainable applied: the model (peft-wrapped with LoRA) with requires_grad set.
    Neither set: the model as it is, every parameter trains."""
    t = recipe.train
    if not t.lora and not t.trainable:
        return model
    if t.lora:
        modules = [name for name, _ in model.named_modules()]
        for target in t.lora["target_modules"]:
            if not any(name == target or name.endswith("." + target) for name in modules):
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear)})
                raise RecipeError(f"train.lora.target_modules: {model.config.model_type} has no module {target!r} "
                                  f"(its linear layers: {', '.join(linear)})")
        model = apply_lora(model, t.lora)
    else:
        model.requires_grad_(False)
    named = list(model.named_parameters())
    for pattern in t.trainable:
        matched = [p for n, p in named if re.search(pattern, n)]
        if not matched:
            raise RecipeError(f"train.trainable: {pattern!r} matches no parameter of {model.config.model_type} "
                              f"(e.g. {', '.join(n for n, _ in named[:3])})")
        for p in matched:
            p.requires_grad_(True)
    return model


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    if recipe.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return recipe.train.precision


def deepspeed_config(recipe: Recipe, world_size: int, precision: str) -> dict:
    t = recipe.train
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e5), stage3_max_live_parameters=int(1e9),
                    stage3_max_reuse_distance=int(1e9))
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": recipe.accumulation_steps(world_size),
        "gradient_clipping": t.grad_clip,  # explicit: DeepSpeed's default changed from 0 (off) to 1.0 in 0.19.3
        "zero_optimization": zero,
        "steps_per_print": 2**62,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                    "lower_precision_safe_modules": ["torch.nn.Linear"]}
    return deep_merge(config, t.deepspeed)


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, decays and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_fp32_parameters(model) -> list[str]:
    """Names of the parameters the family keeps in float32; raises if any is not float32."""
    from recur.modeling.family import fp32_parameter_names

    if callable(getattr(type(model), "get_base_model", None)):  # peft: names without its base_model.model. prefix
        model = model.get_base_model()
    names = fp32_parameter_names(model)
    dtypes = dict(model.named_parameters())
    wrong = [f"{n} ({dtypes[n].dtype})" for n in names if dtypes[n].dtype != torch.float32]
    if wrong:
        raise TrainingError(f"recurrent parameters must stay float32, got {', '.join(wrong[:4])}")
    return names


def build_engine(recipe: Recipe, config, device: torch.device, world_size: int):
    """(DeepSpeed engine, precision): the model, AdamW (torch's, so nothing is JIT-built on CPU, unless
    train.deepspeed names an optimizer) and ZeRO from the recipe."""
    deepspeed = import_deepspeed()
    t = recipe.train
    model = select_trainable(build_model(recipe, config), recipe)
    precision = resolve_precision(recipe, device)
    ds_config = deepspeed_config(recipe, world_size, precision)
    optimizer = parameters = None
    if "optimizer" in ds_config:
        parameters = optimizer_groups(model, t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                      eps=t.eps, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=parameters,
                                           config=ds_config)
    check_fp32_parameters(engine.module)
    if t.compile:
        engine.compile()
    return engine, precision
