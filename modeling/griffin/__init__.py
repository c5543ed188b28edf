from ..family import BENCH_HEAD, BenchModel, Converter, Family, converted
from .configuration_griffin import GriffinConfig
from .convert import from_transformers
from .modeling_griffin import GriffinForCausalLM, GriffinModel


def mixing_flops(config: GriffinConfig, seq_len: int):
    """The RG-LRU is diagonal (a few FLOPs per channel, not counted); each local-attention layer costs
    4·heads·head_dim·w̄ (QKᵀ and AV), w̄ the mean number of keys a query sees: min(t + 1, window)."""
    attention_layers = sum(t == "attention" for t in config.layers_block_type)
    window = sum(min(t + 1, config.attention_window_size) for t in range(seq_len)) / seq_len
    per_layer = 4 * config.num_attention_heads * config.head_dim * window
    return attention_layers * per_layer, "6N + 3·L_attn·4·heads·head_dim·w̄"


def recurrent_gemma(blocks: list[str]):
    """The benchmarks' peer: transformers' RecurrentGemmaForCausalLM with these block types."""
    def build(width, layers, vocab, max_len):
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        return RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
            num_attention_heads=width // BENCH_HEAD, lru_width=width, attention_window_size=2048, conv1d_width=4,
            logits_soft_cap=30.0, block_types=blocks, num_key_value_heads=1, pad_token_id=0, bos_token_id=2,
            eos_token_id=1, tie_word_embeddings=True))
    return build


def bench_pair(blocks: list[str], peer: str) -> BenchModel:
    """recur's Griffin converted from the peer itself, so the pair is the same model."""
    build_peer = recurrent_gemma(blocks)
    return BenchModel(lambda *shape: converted(build_peer(*shape), from_transformers, GriffinForCausalLM, as_dict=True),
                      peer=peer, build_peer=build_peer)


FAMILY = Family(
    name="Griffin / RecurrentGemma", config=GriffinConfig, model=GriffinModel, causal_lm=GriffinForCausalLM,
    mixing_flops=mixing_flops,
    converters=[Converter("transformers RecurrentGemma (google/recurrentgemma-*)", from_transformers,
                          model_type="recurrent_gemma")],
    signature="recurrent_param",
    tiny={
        # window 6 < the longer test sequences, so the window cache is exercised
        "recur_griffin": dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, intermediate_size=64,
                              num_attention_heads=4, lru_width=64, attention_window_size=6, logits_soft_cap=30.0),
        "recur_griffin/hawk": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, intermediate_size=64,
                                   num_attention_heads=4, block_types=["recurrent"], logits_soft_cap=0.0,
                                   embeddings_scale_by_sqrt_dim=False),
    },
    bench={"recur_griffin": bench_pair(["recurrent", "recurrent", "attention"], peer="recurrentgemma-hf"),
           "recur_griffin/hawk": bench_pair(["recurrent"], peer="hawk-hf")},
)

__all__ = ["GriffinConfig", "GriffinModel", "GriffinForCausalLM", "FAMILY"]
