"""transformers' RecurrentGemma checkpoints (`google/recurrentgemma-*`, model_type "recurrent_gemma") to recur_griffin."""
from __future__ import annotations

from ..checkpoint import check_tensors, require_family
from .configuration_griffin import GriffinConfig

_BLOCK_TYPES = {"recurrent": "recurrent", "linear_attention": "recurrent", "attention": "attention",
                "sliding_attention": "attention"}


def from_transformers(config: dict, state_dict: dict) -> tuple[GriffinConfig, dict]:
    require_family(state_dict, "recurrent_param", "Griffin / RecurrentGemma")
    act = config.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"RecurrentGemma option hidden_activation={act!r} is not supported (only tanh GELU)")
    if config.get("attention_bias", False):
        raise ValueError("RecurrentGemma option attention_bias=True is not supported")
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    ours = GriffinConfig(
        intermediate_size=config["intermediate_size"] // 2, rope_theta=rope_theta, partial_rotary_factor=partial,
        block_types=[_BLOCK_TYPES[t] for t in config.get("block_types", ["recurrent", "recurrent", "attention"])],
        num_key_value_heads=config.get("num_key_value_heads") or 1, embeddings_scale_by_sqrt_dim=True,
        **{k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "lru_width", "attention_window_size", "conv1d_width", "logits_soft_cap",
                                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                  "pad_token_id", "w_init_variance_scale") if k in config and config[k] is not None})
    state = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.embed_tokens."):
            name = name.replace("model.embed_tokens.", "model.embeddings.")
        elif name.startswith("model.final_norm."):
            name = name.replace("model.final_norm.", "model.norm.")
        name = name.replace(".temporal_block.conv_1d.", ".temporal_block.conv_1d.conv.")
        state[name] = tensor
    if ours.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = ["model.embeddings.weight", "model.norm.weight"] + (
        [] if ours.tie_word_embeddings else ["lm_head.weight"])
    mlp = [f"mlp_block.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")]
    recurrent = [f"temporal_block.linear_{p}.{w}" for p in ("x", "y", "out") for w in ("weight", "bias")] + [
        "temporal_block.conv_1d.conv.weight", "temporal_block.conv_1d.conv.bias", "temporal_block.rg_lru.recurrent_param"
    ] + [f"temporal_block.rg_lru.{g}_gate_{w}" for g in ("input", "recurrent") for w in ("weight", "bias")]
    attention = [f"temporal_block.{p}_proj.weight" for p in "qkvo"] + ["temporal_block.o_proj.bias"]
    for i, kind in enumerate(ours.layers_block_type):
        expected += [f"model.layers.{i}.{n}" for n in ["temporal_pre_norm.weight", "channel_pre_norm.weight"] + mlp + (
            attention if kind == "attention" else recurrent)]
    check_tensors(expected, state, "transformers RecurrentGemma")
    return ours, state
