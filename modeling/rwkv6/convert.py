"""Public RWKV-6 checkpoints to recur's layout: a rename plus squeezing BlinkDL's [1, 1, C] vectors.

    from_blinkdl(state_dict)          BlinkDL's `.pth` (RWKV-x060-World-*.pth, RWKV-LM training output)
    from_hf(config_dict, state_dict)  `RWKV/v6-Finch-*-HF` (transformers remote code)

Both return (RWKV6Config, state dict for RWKV6ForCausalLM). Sizes come from the tensors; any
missing, unexpected or misshapen tensor raises ValueError naming the tensors; a state dict of
another family, one naming the family it looks like. Weights are stored unscaled in both layouts (the fp16 "rescale every 6
layers" trick is applied at run time by those codebases), so no rescaling is undone here.
"""
from __future__ import annotations

import re

from ..checkpoint import check_tensors, require_family
from .configuration_rwkv6 import RWKV6Config

# The names of each part of the model in a layout; {i} is the layer.
BLINKDL = dict(emb="emb.weight", block="blocks.{i}.", ln0="ln0", att="att", ffn="ffn", ln_out="ln_out",
               head="head.weight")
HF = dict(emb="rwkv.embeddings.weight", block="rwkv.blocks.{i}.", ln0="pre_ln", att="attention",
          ffn="feed_forward", ln_out="rwkv.ln_out", head="head.weight")

TIME_MIX_VECTORS = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g")


def from_blinkdl(state_dict: dict) -> tuple[RWKV6Config, dict]:
    """BlinkDL's `.pth` state dict (emb, blocks.{i}.att/ffn, ln_out, head) -> (config, recur state dict)."""
    return _convert(state_dict, BLINKDL, "BlinkDL RWKV-6", {})


def from_hf(config_dict: dict, state_dict: dict) -> tuple[RWKV6Config, dict]:
    """`RWKV/v6-Finch-*-HF`'s config.json as a dict and its state dict -> (config, recur state dict)."""
    model_type = config_dict.get("model_type", "rwkv6")
    if model_type != "rwkv6":
        raise ValueError(f"config model_type is {model_type!r}, not 'rwkv6'")
    settings = {k: config_dict[k] for k in ("layer_norm_epsilon", "head_size_divisor", "bos_token_id", "eos_token_id")
                if config_dict.get(k) is not None}
    config, converted = _convert(state_dict, HF, "RWKV/v6-Finch-*-HF", settings)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "attention_hidden_size",
                  "intermediate_size"):
        stated = config_dict.get(field)
        if stated is not None and stated != getattr(config, field):
            raise ValueError(f"config {field} = {stated} but the tensors give {getattr(config, field)}")
    return config, converted


def _convert(state_dict: dict, names: dict, layout: str, settings: dict) -> tuple[RWKV6Config, dict]:
    require_family(state_dict, "time_maa", "RWKV-6")
    _refuse_the_other_layout(state_dict, names, layout)
    config = RWKV6Config(**_sizes(state_dict, names, layout), **settings)
    plan = _plan(config, names)  # source key -> (target key, target shape)
    check_tensors(plan, state_dict, layout)
    converted = {}
    for key, (target, shape) in plan.items():
        tensor = state_dict[key]
        if _squeezed(tensor.shape) != _squeezed(shape):
            raise ValueError(f"{key} has shape {list(tensor.shape)}, expected {list(shape)}")
        converted[target] = tensor.reshape(shape)
    return config, converted


def _refuse_the_other_layout(state_dict, names, layout):
    other = HF if names is BLINKDL else BLINKDL
    if names["emb"] not in state_dict and other["emb"] in state_dict:
        hint = "from_hf" if other is HF else "from_blinkdl"
        raise ValueError(f"{other['emb']} is in the other RWKV-6 layout, not {layout}'s: use {hint}")


def _sizes(state_dict, names, layout) -> dict:
    """Every size of the model, read off the tensors."""
    att = names["block"].format(i=0) + names["att"] + "."
    ffn = names["block"].format(i=0) + names["ffn"] + "."

    def shape(key):
        if key not in state_dict:
            raise ValueError(f"{layout} checkpoint does not match the architecture: missing {key}")
        return tuple(state_dict[key].shape)

    vocab, hidden = shape(names["emb"])
    bonus = shape(att + "time_faaaa")
    if len(bonus) != 2:
        raise ValueError(f"{att}time_faaaa has shape {list(bonus)}, expected [heads, head_size]")
    block = re.compile(re.escape(names["block"]).replace(r"\{i\}", r"(\d+)"))
    layers = 1 + max((int(m.group(1)) for k in state_dict if (m := block.match(k))), default=-1)
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                attention_hidden_size=shape(att + "key.weight")[0], head_size=bonus[1],
                intermediate_size=shape(ffn + "key.weight")[0], time_mix_low_rank_dim=shape(att + "time_maa_w2")[1],
                time_decay_low_rank_dim=shape(att + "time_decay_w1")[1])


def _plan(config: RWKV6Config, names: dict) -> dict:
    """source key -> (recur key, recur shape) for every tensor of a model of this config."""
    C, A, V = config.hidden_size, config.attention_hidden_size, config.vocab_size
    R, D, F_ = config.time_mix_low_rank_dim, config.time_decay_low_rank_dim, config.intermediate_size
    plan = {names["emb"]: ("model.embeddings.weight", (V, C)), names["head"]: ("lm_head.weight", (V, C))}
    for p in ("weight", "bias"):
        plan[f"{names['ln_out']}.{p}"] = (f"model.norm.{p}", (C,))
    for i in range(config.num_hidden_layers):
        src, dst = names["block"].format(i=i), f"model.layers.{i}."
        norms = (("ln0", names["ln0"]),) if i == 0 else ()
        for ours, theirs in norms + (("ln1", "ln1"), ("ln2", "ln2")):
            for p in ("weight", "bias"):
                plan[f"{src}{theirs}.{p}"] = (f"{dst}{ours}.{p}", (C,))
        att, attn = f"{src}{names['att']}.", f"{dst}attn."
        shapes = {**dict.fromkeys(TIME_MIX_VECTORS, (C,)), "time_maa_w1": (C, 5 * R), "time_maa_w2": (5, R, C),
                  "time_decay": (A,), "time_decay_w1": (C, D), "time_decay_w2": (D, A),
                  "time_faaaa": (config.num_heads, config.head_size),
                  **{f"{n}.weight": (A, C) for n in ("receptance", "key", "value", "gate")}, "output.weight": (C, A),
                  "ln_x.weight": (A,), "ln_x.bias": (A,)}
        plan.update({att + n: (attn + n, s) for n, s in shapes.items()})
        ffn, ours = f"{src}{names['ffn']}.", f"{dst}ffn."
        shapes = {"time_maa_k": (C,), "time_maa_r": (C,), "key.weight": (F_, C), "receptance.weight": (C, C),
                  "value.weight": (C, F_)}
        plan.update({ffn + n: (ours + n, s) for n, s in shapes.items()})
    return plan


def _squeezed(shape) -> tuple:
    """The shape without its 1-dims: BlinkDL stores vectors as [1, 1, C], recur as [C]."""
    return tuple(d for d in shape if d != 1)
