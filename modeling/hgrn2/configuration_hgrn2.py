"""Configuration of HGRN2 (arXiv 2404.07904) in fla's form, which the fla-hub checkpoints use."""
from transformers import PretrainedConfig


class HGRN2Config(PretrainedConfig):
    model_type = "recur_hgrn2"

    def __init__(self, vocab_size=32000, hidden_size=2048, num_hidden_layers=24, expand_ratio=128,
                 use_lower_bound=True, hidden_ratio=4, intermediate_size=None, norm_eps=1e-6,
                 initializer_range=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 pad_token_id=None, use_cache=True, **kwargs):
        if hidden_size % expand_ratio:
            raise ValueError(f"expand_ratio {expand_ratio} (the head size) must divide hidden_size {hidden_size}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.expand_ratio, self.num_heads = expand_ratio, hidden_size // expand_ratio
        self.use_lower_bound, self.hidden_ratio = use_lower_bound, hidden_ratio
        self.intermediate_size = intermediate_size or 256 * ((int(hidden_size * hidden_ratio * 2 / 3) + 255) // 256)
        self.norm_eps, self.initializer_range, self.use_cache = norm_eps, initializer_range, use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
