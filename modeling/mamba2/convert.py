"""Mamba-2 weights from transformers' Mamba2ForCausalLM (or a mamba_ssm checkpoint) in recur's names.

    config, state_dict = from_transformers(hf_model.config, hf_model.state_dict())
    model = Mamba2ForCausalLM(config); model.load_state_dict(state_dict)

The tensors are the same (conv1d keeps nn.Conv1d's layout); only names move:
backbone.* -> model.*, mixer.conv1d.* -> mixer.conv1d.conv.*; mamba_ssm's `backbone.embedding`
is transformers' `backbone.embeddings`. The config may be transformers' Mamba2Config (object or
dict) or mamba_ssm's config.json dict (d_model, n_layer, ssm_cfg).
"""
from __future__ import annotations

import torch

from ..checkpoint import guess_family_and_keys
from .configuration_mamba2 import Mamba2Config

def _names(keys, limit=6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _require(c: dict, name: str):
    if name not in c:
        raise ValueError(f"the config lacks {name!r} (transformers' defaults are Codestral's: set every field)")
    return c[name]


def _from_hf_config(c: dict) -> dict:
    if c.get("model_type", "mamba2") != "mamba2":
        raise ValueError(f"config has model_type {c['model_type']!r}, not transformers' 'mamba2'")
    if c.get("hidden_act", "silu") != "silu" or not c.get("rms_norm", True) or c.get("norm_before_gate", False):
        raise ValueError("only Mamba-2 with silu, RMSNorm and the gate before the norm (norm_before_gate=False)")
    hidden, expand, heads, head_dim = (_require(c, n) for n in ("hidden_size", "expand", "num_heads", "head_dim"))
    if expand * hidden != heads * head_dim:
        raise ValueError(f"num_heads·head_dim = {heads * head_dim} must equal expand·hidden_size = {expand * hidden}")
    return dict(
        vocab_size=_require(c, "vocab_size"), pad_vocab_size_multiple=1,  # the checkpoint's vocabulary, as it is
        hidden_size=hidden, num_hidden_layers=_require(c, "num_hidden_layers"), d_state=_require(c, "state_size"),
        d_conv=_require(c, "conv_kernel"), expand=expand, headdim=head_dim, ngroups=_require(c, "n_groups"),
        chunk_size=c.get("chunk_size", 256), conv_bias=c.get("use_conv_bias", True), bias=c.get("use_bias", False),
        norm_eps=c.get("layer_norm_epsilon", 1e-5), residual_in_fp32=c.get("residual_in_fp32", True),
        dt_min=c.get("time_step_min", 1e-3), dt_max=c.get("time_step_max", 0.1),
        dt_init_floor=c.get("time_step_floor", 1e-4), dt_limit=tuple(c.get("time_step_limit", (0.0, float("inf")))),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), pad_token_id=c.get("pad_token_id"))


def _from_mamba_ssm_config(c: dict) -> dict:
    ssm = dict(c.get("ssm_cfg") or {})
    if ssm.pop("layer", "Mamba1") != "Mamba2":
        raise ValueError("mamba_ssm config whose ssm_cfg.layer is not 'Mamba2': a Mamba-1 model, not Mamba-2")
    if c.get("d_intermediate", 0) or c.get("attn_layer_idx"):
        raise ValueError("mamba_ssm config with an MLP (d_intermediate) or attention layers: a hybrid, not Mamba-2")
    if (not c.get("rms_norm", True) or not ssm.pop("rmsnorm", True) or ssm.pop("norm_before_gate", False)
            or ssm.pop("D_has_hdim", False) or ssm.pop("d_ssm", None) is not None):
        raise ValueError("only Mamba-2 with RMSNorm, norm_before_gate=False, D per head and d_ssm = d_inner")
    known = {"d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "conv_bias", "bias", "dt_min",
             "dt_max", "dt_init_floor", "dt_limit", "A_init_range"}
    if ssm.keys() - known:
        raise ValueError(f"unsupported ssm_cfg fields: {_names(ssm.keys() - known)}")
    return dict(ssm, vocab_size=c["vocab_size"], pad_vocab_size_multiple=c.get("pad_vocab_size_multiple", 8),
                hidden_size=c["d_model"], num_hidden_layers=c["n_layer"],
                residual_in_fp32=c.get("residual_in_fp32", True), tie_word_embeddings=c.get("tie_embeddings", True))


def _check_family(keys) -> None:
    family, hits = guess_family_and_keys(keys)
    if hits and family != "Mamba-2":
        raise ValueError(f"not a Mamba-2 state dict: it looks like {family} (keys such as {_names(hits, 3)})")
    if not any(k.endswith(".mixer.dt_bias") for k in keys):
        raise ValueError(f"not a Mamba-2 state dict: no 'backbone.layers.{{i}}.mixer.dt_bias' (has {_names(keys, 4)})")


def _expected_shapes(c: Mamba2Config) -> dict:
    """Every tensor of transformers' layout for this config, with its shape."""
    D, E, H, V, X = c.hidden_size, c.d_inner, c.num_heads, c.padded_vocab_size, c.conv_dim
    shapes = {"backbone.embeddings.weight": (V, D), "backbone.norm_f.weight": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(c.num_hidden_layers):
        m = f"backbone.layers.{i}.mixer."
        shapes.update({f"backbone.layers.{i}.norm.weight": (D,), m + "in_proj.weight": (E + X + H, D),
                       m + "conv1d.weight": (X, 1, c.d_conv), m + "dt_bias": (H,), m + "A_log": (H,), m + "D": (H,),
                       m + "norm.weight": (E,), m + "out_proj.weight": (D, E)})
        if c.conv_bias:
            shapes[m + "conv1d.bias"] = (X,)
        if c.bias:
            shapes.update({m + "in_proj.bias": (E + X + H,), m + "out_proj.bias": (D,)})
    return shapes


def _our_name(name: str) -> str:
    if name.startswith("backbone."):
        name = "model." + name[len("backbone."):]
    return name.replace(".mixer.conv1d.", ".mixer.conv1d.conv.")


def from_transformers(config, state_dict: dict) -> tuple[Mamba2Config, dict]:
    """(Mamba2Config, state dict in recur's names) from a transformers or mamba_ssm Mamba-2 checkpoint.

    Refuses (ValueError) another family, missing or extra tensors and shapes that disagree with the config.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    ours = Mamba2Config(**(_from_mamba_ssm_config(c) if "d_model" in c else _from_hf_config(c)))
    tensors = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state_dict.items()}
    _check_family(tensors.keys())

    expected = _expected_shapes(ours)
    optional = {"lm_head.weight"} if ours.tie_word_embeddings else set()  # often saved although tied
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys() - optional
    if missing or extra:
        parts = ([f"missing {len(missing)} tensor(s): {_names(missing)}"] if missing else []) + \
                ([f"unexpected {len(extra)} tensor(s): {_names(extra)}"] if extra else [])
        raise ValueError("state dict does not match the Mamba-2 config: " + "; ".join(parts))
    wrong = [f"{k} {list(tensors[k].shape)} != {list(s)}" for k, s in expected.items() if tuple(tensors[k].shape) != s]
    if wrong:
        raise ValueError(f"tensor shapes disagree with the config: {_names(wrong, 4)}")
    embeddings, head = tensors["backbone.embeddings.weight"], tensors.get("lm_head.weight")
    if ours.tie_word_embeddings and head is not None and not torch.equal(head, embeddings):
        raise ValueError("the config ties lm_head.weight to the embeddings, but lm_head.weight differs from them")

    converted = {_our_name(k): tensors[k] for k in expected}
    if ours.tie_word_embeddings:
        converted["lm_head.weight"] = embeddings
    return ours, converted
