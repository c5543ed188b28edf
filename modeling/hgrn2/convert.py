"""fla's HGRN2 checkpoints (`fla-hub/hgrn2-*`, model_type "hgrn2") to recur_hgrn2."""
from __future__ import annotations

from ..checkpoint import check_tensors, require_family
from .configuration_hgrn2 import HGRN2Config


def from_fla(config: dict, state_dict: dict) -> tuple[HGRN2Config, dict]:
    require_family(state_dict, "f_proj", "HGRN2")
    if config.get("use_short_conv", False):
        raise ValueError("fla HGRN2 option use_short_conv=True is not supported")
    if config.get("hidden_act", "swish") != "swish":
        raise ValueError(f"fla HGRN2 option hidden_act={config['hidden_act']!r} is not supported (only 'swish')")
    expand_ratio = config.get("expand_ratio") or config["hidden_size"] // config["num_heads"]
    ours = HGRN2Config(expand_ratio=expand_ratio, **{k: config[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "use_lower_bound", "hidden_ratio", "intermediate_size",
        "norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
        if k in config})
    state = dict(state_dict)
    if ours.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    per_layer = ["attn_norm.weight", "attn.q_proj.weight", "attn.f_proj.weight", "attn.i_proj.weight",
                 "attn.g_norm.weight", "attn.o_proj.weight", "mlp_norm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"]
    expected = ["model.embeddings.weight", "model.norm.weight"] + (
        [] if ours.tie_word_embeddings else ["lm_head.weight"]) + (
        ["model.lower_bounds"] if ours.use_lower_bound else []) + [
        f"model.layers.{i}.{n}" for i in range(ours.num_hidden_layers) for n in per_layer]
    check_tensors(expected, state, "fla HGRN2")
    return ours, state
