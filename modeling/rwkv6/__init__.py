from ..family import BENCH_HEAD, BenchModel, Converter, Family
from .configuration_rwkv6 import RWKV6Config
from .convert import from_blinkdl, from_hf
from .modeling_rwkv6 import RWKV6ForCausalLM, RWKV6Model


def mixing_flops(config: RWKV6Config, seq_len: int):
    """GLA's 5·H·dk·dv per layer plus 2·H·dk·dv for the bonus u: 7, with dk = dv = head_size."""
    return config.num_hidden_layers * 7 * config.attention_hidden_size * config.head_size, "6N + 3·L·7·H·dk·dv"


FAMILY = Family(
    name="RWKV-6", config=RWKV6Config, model=RWKV6Model, causal_lm=RWKV6ForCausalLM, mixing_flops=mixing_flops,
    converters=[
        Converter("RWKV/v6-Finch-*-HF", from_hf, model_type="rwkv6"),
        Converter("BlinkDL RWKV-6 .pth", lambda config, state: from_blinkdl(state), file_suffixes=(".pth", ".pt")),
    ],
    signature="time_maa",
    tiny={"recur_rwkv6": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, head_size=32,
                              intermediate_size=128, time_mix_low_rank_dim=8, time_decay_low_rank_dim=8)},
    bench={"recur_rwkv6": BenchModel(lambda width, layers, vocab, max_len: RWKV6ForCausalLM(RWKV6Config(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, intermediate_size=3 * width,
        head_size=BENCH_HEAD)))},
)

__all__ = ["RWKV6Config", "RWKV6Model", "RWKV6ForCausalLM", "from_blinkdl", "from_hf", "FAMILY"]
