"""The GPU path: fla's Triton kernels, called with our conventions.

Imported only when a CUDA tensor asks for `impl="triton"` (importing fla takes seconds).
Argument mapping, as fla 0.6.0 documents it: every decay is a log-decay in [B, T, H(, K)];
states are [N, H, K, V] in float32; `scale` is passed explicitly (RWKV-6 uses 1.0).
"""
from __future__ import annotations

try:  # (inside try, so transformers' remote-code check does not demand fla on CPU-only machines)
    from fla.ops.attn import parallel_attn
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.hgrn import fused_recurrent_hgrn
    from fla.ops.rwkv6 import chunk_rwkv6
    from fla.ops.simple_gla import chunk_simple_gla
except ImportError as e:
    raise ImportError("recur's GPU path needs flash-linear-attention (pip install flash-linear-attention)") from e


def gla(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    return chunk_gla(q, k, v, log_decay.float(), scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def scalar_decay(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    return chunk_simple_gla(q, k, v, g=log_decay.float(), scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def rwkv6(r, k, v, log_decay, bonus, initial_state, output_final_state, cu_seqlens):
    return chunk_rwkv6(r, k, v, log_decay.float(), bonus, scale=1.0, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def gated_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    return chunk_gated_delta_rule(q, k, v, log_decay.float(), beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def diagonal(x, log_decay, initial_state, output_final_state, cu_seqlens):
    # The fused recurrent kernel, not chunk_hgrn: it takes cu_seqlens, and it multiplies by exp(g)
    # step by step, so a −inf log-decay (a document start) gives 0, where chunk_hgrn's
    # differences of cumulative sums would give −inf − (−inf) = NaN.
    return fused_recurrent_hgrn(x, log_decay.float(), initial_state, output_final_state, cu_seqlens)


def window(q, k, v, window, scale, cu_seqlens):
    return parallel_attn(q, k, v, scale=scale, window_size=window, cu_seqlens=cu_seqlens)
