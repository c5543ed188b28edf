"""fla's GLA checkpoints (`fla-hub/gla-*`, model_type "gla") to recur_gla."""
from __future__ import annotations

from ..checkpoint import check_tensors, require_family
from .configuration_gla import GLAConfig

_UNSUPPORTED = {"use_short_conv": False, "feature_map": None, "use_output_gate": True, "clamp_min": None,
                "use_gv": False, "hidden_act": "swish", "elementwise_affine": True}


def from_fla(config: dict, state_dict: dict) -> tuple[GLAConfig, dict]:
    require_family(state_dict, "gk_proj", "GLA")
    for option, supported in _UNSUPPORTED.items():
        if config.get(option, supported) != supported:
            raise ValueError(f"fla GLA option {option}={config[option]!r} is not supported (only {supported!r})")
    if config.get("num_kv_heads") not in (None, config.get("num_heads", 4)):
        raise ValueError(f"fla GLA option num_kv_heads={config['num_kv_heads']} is not supported (grouped heads)")
    # sizes fla's config may not carry (its layer fixes the gate rank at 16) are read off the tensors
    shapes = dict(gate_low_rank_dim=state_dict["model.layers.0.attn.gk_proj.0.weight"].shape[0],
                  intermediate_size=state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0])
    ours = GLAConfig(**shapes, **{k: config[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v",
        "gate_logit_normalizer", "hidden_ratio", "norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range") if k in config})
    # fla names the output norm after its fused kernel when fuse_norm is on (the hub checkpoints)
    renamed = {k.replace("attn.g_norm_swish_gate.", "attn.g_norm."): v for k, v in state_dict.items()}
    if ours.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    check_tensors(_expected_names(ours), renamed, "fla GLA")
    return ours, renamed


def _expected_names(config: GLAConfig) -> list[str]:
    per_layer = ["attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                 "attn.g_proj.weight", "attn.gk_proj.0.weight", "attn.gk_proj.1.weight", "attn.gk_proj.1.bias",
                 "attn.o_proj.weight", "attn.g_norm.weight", "mlp_norm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names = ["model.embeddings.weight", "model.norm.weight"] + (
        [] if config.tie_word_embeddings else ["lm_head.weight"])
    return names + [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in per_layer]
