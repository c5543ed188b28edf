"""Configuration of Griffin / Hawk (arXiv 2402.19427), RecurrentGemma's architecture.

`intermediate_size` is the width F of each GeGLU branch (transformers' RecurrentGemma stores 2·F).
`block_types` cycles over the layers; Hawk is block_types=["recurrent"].
"""
from transformers import PretrainedConfig


class GriffinConfig(PretrainedConfig):
    model_type = "recur_griffin"

    def __init__(self, vocab_size=256000, hidden_size=2560, num_hidden_layers=26, intermediate_size=7680,
                 num_attention_heads=10, num_key_value_heads=1, lru_width=None, attention_window_size=2048,
                 conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
                 block_types=("recurrent", "recurrent", "attention"), rope_theta=10000.0, partial_rotary_factor=0.5,
                 embeddings_scale_by_sqrt_dim=True, w_init_variance_scale=0.01, final_w_init_variance_scale=None,
                 initializer_range=0.02, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                 use_cache=True, **kwargs):
        if hidden_size % num_attention_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} must divide hidden_size {hidden_size}")
        lru_width = lru_width or hidden_size
        if lru_width % num_attention_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} must divide lru_width {lru_width}")
        block_types = list(block_types)
        if not block_types or set(block_types) - {"recurrent", "attention"}:
            raise ValueError(f"block_types must be a non-empty list of 'recurrent'/'attention', got {block_types}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.intermediate_size, self.num_attention_heads = intermediate_size, num_attention_heads
        self.num_key_value_heads, self.lru_width = num_key_value_heads, lru_width
        self.head_dim = hidden_size // num_attention_heads
        self.attention_window_size, self.conv1d_width = attention_window_size, conv1d_width
        self.logits_soft_cap, self.rms_norm_eps, self.block_types = logits_soft_cap, rms_norm_eps, block_types
        self.rope_theta, self.partial_rotary_factor = rope_theta, partial_rotary_factor
        self.embeddings_scale_by_sqrt_dim = embeddings_scale_by_sqrt_dim
        self.w_init_variance_scale = w_init_variance_scale
        self.final_w_init_variance_scale = final_w_init_variance_scale or 2.0 / num_hidden_layers
        self.initializer_range, self.use_cache = initializer_range, use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def layers_block_type(self):
        return [self.block_types[i % len(self.block_types)] for i in range(self.num_hidden_layers)]
