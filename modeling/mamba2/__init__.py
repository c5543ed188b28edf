from ..family import BENCH_HEAD, BenchModel, Converter, Family, converted
from .configuration_mamba2 import Mamba2Config
from .convert import from_transformers
from .modeling_mamba2 import Mamba2ForCausalLM, Mamba2Model


def mixing_flops(config: Mamba2Config, seq_len: int):
    """SSD: 7·d_inner·d_state per layer (Megatron-LM's Mamba layer count, `7·T·d_in·N`)."""
    return config.num_hidden_layers * 7 * config.d_inner * config.d_state, "6N + 3·L·7·d_inner·d_state"


def transformers_mamba2(width, layers, vocab, max_len):
    """The benchmarks' peer: transformers' Mamba2ForCausalLM (its torch path without mamba_ssm's kernels)."""
    import transformers

    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=width, num_heads=2 * width // BENCH_HEAD, head_dim=BENCH_HEAD, state_size=64, n_groups=1,
        expand=2, conv_kernel=4, chunk_size=256, vocab_size=vocab, num_hidden_layers=layers, use_conv_bias=True,
        use_bias=False, residual_in_fp32=True, tie_word_embeddings=False, norm_before_gate=False, rms_norm=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


FAMILY = Family(
    name="Mamba-2", config=Mamba2Config, model=Mamba2Model, causal_lm=Mamba2ForCausalLM, mixing_flops=mixing_flops,
    converters=[
        Converter("transformers Mamba2 (state-spaces/mamba2-*)", from_transformers, model_type="mamba2"),
        # mamba_ssm's own config.json has no model_type: d_model, n_layer and ssm_cfg
        Converter("mamba_ssm Mamba-2", from_transformers,
                  matches=lambda config: "model_type" not in config and "ssm_cfg" in config),
    ],
    signature="A_log",
    tiny={"recur_mamba2": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, d_state=16, headdim=12, ngroups=2,
                               chunk_size=16)},
    bench={"recur_mamba2": BenchModel(
        lambda *shape: converted(transformers_mamba2(*shape), from_transformers, Mamba2ForCausalLM),
        peer="mamba2-hf", build_peer=transformers_mamba2)},
)

__all__ = ["Mamba2Config", "Mamba2Model", "Mamba2ForCausalLM", "from_transformers", "FAMILY"]
