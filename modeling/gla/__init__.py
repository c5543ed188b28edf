from ..family import BENCH_HEAD, BenchModel, Converter, Family
from .configuration_gla import GLAConfig
from .convert import from_fla
from .modeling_gla import GLAForCausalLM, GLAModel


def mixing_flops(config: GLAConfig, seq_len: int):
    """State S of H × dk × dv per layer: decay 1, outer product and add 2, readout 2 → 5·H·dk·dv."""
    dk, dv = config.hidden_size * config.expand_k, config.hidden_size * config.expand_v
    return config.num_hidden_layers * 5 * dk * dv / config.num_heads, "6N + 3·L·5·H·dk·dv"


FAMILY = Family(
    name="GLA", config=GLAConfig, model=GLAModel, causal_lm=GLAForCausalLM, mixing_flops=mixing_flops,
    converters=[Converter("fla GLA (fla-hub/gla-*)", from_fla, model_type="gla")],
    signature="gk_proj",
    tiny={"recur_gla": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_heads=2, gate_low_rank_dim=8,
                            intermediate_size=96)},
    bench={"recur_gla": BenchModel(lambda width, layers, vocab, max_len: GLAForCausalLM(GLAConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, intermediate_size=3 * width,
        num_heads=width // BENCH_HEAD // 2 or 1)))},  # expand_k 0.5: key heads of BENCH_HEAD
)

__all__ = ["GLAConfig", "GLAModel", "GLAForCausalLM", "FAMILY"]
