from ..family import BENCH_HEAD, BenchModel, Converter, Family
from .configuration_hgrn2 import HGRN2Config
from .convert import from_fla
from .modeling_hgrn2 import HGRN2ForCausalLM, HGRN2Model


def mixing_flops(config: HGRN2Config, seq_len: int):
    """GLA's state with dk = dv = expand_ratio and H = hidden / expand_ratio: 5·H·dk·dv per layer."""
    return config.num_hidden_layers * 5 * config.hidden_size * config.expand_ratio, "6N + 3·L·5·H·dk·dv"


FAMILY = Family(
    name="HGRN2", config=HGRN2Config, model=HGRN2Model, causal_lm=HGRN2ForCausalLM, mixing_flops=mixing_flops,
    converters=[Converter("fla HGRN2 (fla-hub/hgrn2-*)", from_fla, model_type="hgrn2")],
    signature="f_proj",
    tiny={"recur_hgrn2": dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, expand_ratio=16,
                              intermediate_size=96)},
    bench={"recur_hgrn2": BenchModel(lambda width, layers, vocab, max_len: HGRN2ForCausalLM(HGRN2Config(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, intermediate_size=3 * width,
        expand_ratio=BENCH_HEAD)))},
)

__all__ = ["HGRN2Config", "HGRN2Model", "HGRN2ForCausalLM", "FAMILY"]
