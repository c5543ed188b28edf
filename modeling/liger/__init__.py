from ..family import BenchModel, Family, bench_llama_config
from .configuration_liger import METHODS, LigerConfig
from .modeling_liger import LigerForCausalLM, LigerModel


def mixing_flops(config: LigerConfig, seq_len: int):
    """Per layer: the window's softmax (QKᵀ and AV, 4·H·Dh·w̄, w̄ the mean keys a query sees) plus the
    recurrence's state (5·H·Dh·Dh: decay, outer product and add, readout); kept layers attend to all."""
    H, Dh, lin = config.num_attention_heads, config.head_dim, config.linearization
    mean_keys = lambda w: sum(min(t + 1, w) for t in range(seq_len)) / seq_len
    total = 0.0
    for i in range(config.num_hidden_layers):
        kind = config.layer_kind(i)
        if kind == "attention":
            total += 4 * H * Dh * mean_keys(config.teacher_windows[i] or seq_len)
            continue
        total += 4 * H * Dh * mean_keys(lin["window"] + lin["sinks"])
        if kind != "window-only":
            total += 5 * H * Dh * Dh
    return total, "6N + 3·Σ_layers (4·H·Dh·w̄ + 5·H·Dh²)"


def bench_liger_gla(width, layers, vocab, max_len):
    """Liger-GLA made from the benchmarks' Llama (window 64)."""
    teacher = bench_llama_config(width, layers, vocab, max_len)
    return LigerForCausalLM(LigerConfig.from_teacher(teacher, method="liger-gla", window=64))


_TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)

FAMILY = Family(
    # made by `recur linearize` from a transformer (no official layout of its own: no converters)
    name="Liger (linearized transformer)", config=LigerConfig, model=LigerModel, causal_lm=LigerForCausalLM,
    mixing_flops=mixing_flops,
    commands={"linearize": ("convert a pretrained Llama-family transformer into a gated recurrent model "
                            "(Liger and relatives)", "recur.modeling.liger.linearize:main")},
    tiny={  # window 6 and 2 sinks < the longer test sequences; layer 1 kept as softmax attention
        "recur_liger/liger-gla": dict(_TINY, linearization=dict(method="liger-gla", window=6, sinks=2,
                                                                keep_attention_layers=[1])),
        "recur_liger/liger-hgrn2": dict(_TINY, qkv_bias=True, linearization=dict(method="liger-hgrn2", window=6,
                                                                                 normalize=True)),
        "recur_liger/gated-deltanet": dict(_TINY, qk_norm=True, linearization=dict(method="gated-deltanet", window=6,
                                                                                   sinks=1)),
        "recur_liger/window-only": dict(_TINY, linearization=dict(method="window-only", window=6, sinks=2)),
    },
    bench={"recur_liger/liger-gla": BenchModel(bench_liger_gla)},
)

__all__ = ["LigerConfig", "LigerModel", "LigerForCausalLM", "METHODS", "FAMILY"]
