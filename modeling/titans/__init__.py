from ..family import Family
from .configuration_titans import VARIANTS, TitansConfig
from .modeling_titans import TitansForCausalLM, TitansModel

FAMILY = Family(
    # no official weights exist, so no converters; token mixing is not counted in its FLOPs (6N)
    name="Titans", config=TitansConfig, model=TitansModel, causal_lm=TitansForCausalLM,
    tiny={  # memory chunk 4, MAC segment 8, window 6: the test sequences cross several of each
        f"recur_titans/{variant}": dict(variant=variant, vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                        num_heads=2, intermediate_size=64, memory_depth=2, memory_chunk_size=4,
                                        segment_len=8, attention_window_size=6, num_persistent_tokens=2)
        for variant in VARIANTS},
)

__all__ = ["TitansConfig", "TitansModel", "TitansForCausalLM", "FAMILY"]
