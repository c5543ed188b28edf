"""Configuration of RWKV-6 "Finch" (arXiv 2404.05892), as BlinkDL's RWKV-LM builds it (x060)."""
from transformers import PretrainedConfig


class RWKV6Config(PretrainedConfig):
    """Sizes of an RWKV-6 model; the defaults are those of RWKV-x060-World-1B6.

    attention_hidden_size is the width of r, k, v, g (BlinkDL's dim_att, = hidden_size in every
    released model); heads = attention_hidden_size / head_size. The time-mix low-rank widths are
    32 and 64 (64 and 128 for the 7B and 14B models).
    """

    model_type = "recur_rwkv6"

    def __init__(self, vocab_size=65536, hidden_size=2048, num_hidden_layers=24, attention_hidden_size=None,
                 head_size=64, intermediate_size=None, time_mix_low_rank_dim=32, time_decay_low_rank_dim=64,
                 layer_norm_epsilon=1e-5, head_size_divisor=8, initializer_range=0.02, tie_word_embeddings=False,
                 bos_token_id=0, eos_token_id=0, pad_token_id=None, use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.attention_hidden_size = attention_hidden_size or hidden_size
        self.head_size = head_size
        # RWKV-LM's rule: 3.5 × hidden, rounded down to a multiple of 32
        self.intermediate_size = intermediate_size or int(hidden_size * 3.5) // 32 * 32
        self.time_mix_low_rank_dim, self.time_decay_low_rank_dim = time_mix_low_rank_dim, time_decay_low_rank_dim
        self.layer_norm_epsilon, self.head_size_divisor = layer_norm_epsilon, head_size_divisor
        self.initializer_range, self.use_cache = initializer_range, use_cache
        if self.attention_hidden_size % head_size:
            raise ValueError(f"attention_hidden_size {self.attention_hidden_size} is not a multiple of "
                             f"head_size {head_size}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_heads(self) -> int:
        return self.attention_hidden_size // self.head_size

    @property
    def group_norm_eps(self) -> float:
        # RWKV-LM: 1e-5 · head_size_divisor² (64e-5 for the released models)
        return 1e-5 * self.head_size_divisor**2
