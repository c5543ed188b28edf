"""Configuration of GLA (Gated Linear Attention, arXiv 2312.06635), as fla builds it."""
from transformers import PretrainedConfig


class GLAConfig(PretrainedConfig):
    model_type = "recur_gla"

    def __init__(self, vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5,
                 expand_v=1.0, gate_low_rank_dim=16, gate_logit_normalizer=16.0, hidden_ratio=4,
                 intermediate_size=None, norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_heads, self.expand_k, self.expand_v = num_heads, expand_k, expand_v
        self.gate_low_rank_dim, self.gate_logit_normalizer = gate_low_rank_dim, gate_logit_normalizer
        self.hidden_ratio = hidden_ratio
        # fla's rule: two thirds of hidden·ratio, rounded up to a multiple of 256
        self.intermediate_size = intermediate_size or 256 * ((int(hidden_size * hidden_ratio * 2 / 3) + 255) // 256)
        self.norm_eps, self.initializer_range, self.use_cache = norm_eps, initializer_range, use_cache
        for name, dim in (("expand_k", expand_k), ("expand_v", expand_v)):
            width = hidden_size * dim
            if width != int(width) or int(width) % num_heads:
                raise ValueError(f"hidden_size·{name} = {width} must be a whole multiple of num_heads = {num_heads}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
