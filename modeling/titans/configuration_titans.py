"""Configuration of Titans (Behrouz, Zhong, Mirrokni, arXiv 2501.00663).

`variant` picks how the neural long-term memory meets attention:
- "lmm": the memory alone is the sequence mixer;
- "mag": memory as a gate: sliding-window attention (with the persistent prefix) and the memory
  read the same input; out = RMSNorm(attention) ⊙ σ(RMSNorm(memory));
- "mal": memory as a layer: a memory sub-block, then a sliding-window-attention sub-block;
- "mac": memory as context: segments of `segment_len` tokens; each segment reads the memory as it
  was at the segment start, attends over persistent ‖ retrieved ‖ segment, stores the attention
  output in the memory and gates it with the memory's read of it.

The memory (per head an MLP of `memory_depth` layers; depth 1 is a matrix memory) stores each
token with one gradient step on ½‖M(k) − v‖², with momentum and forgetting,
    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t'}; x_t),   M_t = (1 − α_t) M_{t−1} + S_t,
all gradients of a chunk of `memory_chunk_size` tokens taken at the chunk-start weights M_{t'}.
θ_t = memory_max_lr · σ(·), η_t = σ(·), α_t = σ(·) are **per token** (as the paper; titans-pytorch
shares η and α per chunk, which agrees when its chunk_size is 1). The b gradients of a chunk all
act on the same weights, so θ·b near 2 (with unit keys) overshoots: `memory_max_lr` defaults to 0.1. Token t reads M_t(q_t), the
weights that include its own update (as gated_delta_rule's o_t = q_t S_t). `use_momentum=False`
is η = 0: with `memory_depth=1` that is the gated delta rule.

`compile_decode_step=True` runs each layer's one-token decoding step through torch.compile: a few
hundred small ops per layer fuse into a few kernels (about 2.5× the tokens/s at width 256 on CPU),
for 15–30 s of compiling on the first decoded tokens (and again for each new batch size). Off by default.
"""
from transformers import PretrainedConfig

VARIANTS = ("mac", "mag", "mal", "lmm")


class TitansConfig(PretrainedConfig):
    model_type = "recur_titans"

    def __init__(self, vocab_size=32000, hidden_size=1024, num_hidden_layers=24, intermediate_size=None,
                 variant="mac", num_heads=8, head_dim=None, memory_depth=2, memory_expansion=2.0,
                 memory_activation="gelu", memory_chunk_size=16, memory_max_lr=0.1, use_momentum=True,
                 memory_conv_size=4, num_attention_heads=None, attention_window_size=512, segment_len=64,
                 num_persistent_tokens=4, rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.02,
                 compile_decode_step=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 pad_token_id=None, use_cache=True, **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        head_dim = head_dim or hidden_size // num_heads
        num_attention_heads = num_attention_heads or num_heads
        if hidden_size % num_attention_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} must divide hidden_size {hidden_size}")
        if memory_depth < 1 or memory_chunk_size < 1 or attention_window_size < 1 or segment_len < 1:
            raise ValueError("memory_depth, memory_chunk_size, attention_window_size and segment_len must be >= 1")
        if variant == "mac" and segment_len % memory_chunk_size:
            # a segment boundary is then always a chunk boundary: the segment-start weights are settled
            raise ValueError(f"segment_len {segment_len} must be a multiple of memory_chunk_size {memory_chunk_size}")
        if memory_activation not in ("gelu", "silu"):
            raise ValueError(f"memory_activation must be 'gelu' or 'silu', got {memory_activation!r}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.variant, self.num_heads, self.head_dim = variant, num_heads, head_dim
        self.memory_depth, self.memory_expansion = memory_depth, memory_expansion
        self.memory_activation, self.memory_chunk_size = memory_activation, memory_chunk_size
        self.memory_max_lr, self.use_momentum, self.memory_conv_size = memory_max_lr, use_momentum, memory_conv_size
        self.num_attention_heads, self.attention_window_size = num_attention_heads, attention_window_size
        self.segment_len, self.num_persistent_tokens, self.rope_theta = segment_len, num_persistent_tokens, rope_theta
        self.rms_norm_eps, self.initializer_range, self.use_cache = rms_norm_eps, initializer_range, use_cache
        self.compile_decode_step = compile_decode_step
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
