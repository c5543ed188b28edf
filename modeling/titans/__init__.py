from ..family import BENCH_HEAD, BenchModel, Family
from .configuration_titans import VARIANTS, TitansConfig
from .modeling_titans import TitansForCausalLM, TitansModel


def bench_mac(width, layers, vocab, max_len):
    return TitansForCausalLM(TitansConfig(
        variant="mac", vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_heads=width // BENCH_HEAD,
        intermediate_size=3 * width, memory_depth=2, memory_chunk_size=64, segment_len=512,
        attention_window_size=512, num_persistent_tokens=4))


def titans_pytorch(width, layers, vocab, max_len):
    """The benchmarks' peer: titans-pytorch's MemoryAsContextTransformer at the same segment and chunk sizes."""
    from titans_pytorch import MemoryAsContextTransformer

    return MemoryAsContextTransformer(num_tokens=vocab, dim=width, depth=layers, segment_len=512,
                                      neural_memory_segment_len=64, num_persist_mem_tokens=4,
                                      num_longterm_mem_tokens=0, dim_head=BENCH_HEAD, heads=width // BENCH_HEAD,
                                      ff_mult=3, num_residual_streams=1)


FAMILY = Family(
    # no official weights exist, so no converters; token mixing is not counted in its FLOPs (6N)
    name="Titans", config=TitansConfig, model=TitansModel, causal_lm=TitansForCausalLM,
    tiny={  # memory chunk 4, MAC segment 8, window 6: the test sequences cross several of each
        f"recur_titans/{variant}": dict(variant=variant, vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                        num_heads=2, intermediate_size=64, memory_depth=2, memory_chunk_size=4,
                                        segment_len=8, attention_window_size=6, num_persistent_tokens=2)
        for variant in VARIANTS},
    bench={"recur_titans/mac": BenchModel(bench_mac, peer="titans-pytorch", build_peer=titans_pytorch)},
)

__all__ = ["TitansConfig", "TitansModel", "TitansForCausalLM", "FAMILY"]
