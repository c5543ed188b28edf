"""The GPU path: fla's Triton kernels, called with our conventions.

Imported only when a CUDA tensor asks for `impl="triton"` (importing fla takes seconds).
Argument mapping, as fla 0.6.0 documents it: every decay is a log-decay in [B, T, H(, K)];
states are [N, H, K, V] in float32; `scale` is passed explicitly (RWKV-6 uses 1.0).
The chunk kernels serve whole sequences; the `*_step` functions decode one token with the fused
recurrent kernels at T = 1, as fla's layers decode. Their inputs are per step, [B, H, ...], as in
kernels/naive.py.
"""
from __future__ import annotations

try:  # (inside try, so transformers' remote-code check does not demand fla on CPU-only machines)
    from fla.ops.attn import parallel_attn
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.hgrn import fused_recurrent_hgrn
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
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


# One decoding step: [B, H, ...] -> T = 1 and back; fla returns a float32 state and o in q's dtype.
def _t1(*xs):
    return [x.unsqueeze(1) for x in xs]


def gla_step(q, k, v, log_decay, state, scale):
    q, k, v, g = _t1(q, k, v, log_decay.float())
    o, state = fused_recurrent_gla(q, k, v, gk=g, scale=scale, initial_state=state, output_final_state=True)
    return o[:, 0], state


def scalar_decay_step(q, k, v, log_decay, state, scale):
    q, k, v, g = _t1(q, k, v, log_decay.float())
    o, state = fused_recurrent_simple_gla(q, k, v, g=g, scale=scale, initial_state=state, output_final_state=True)
    return o[:, 0], state


def rwkv6_step(r, k, v, log_decay, bonus, state):
    r, k, v, w = _t1(r, k, v, log_decay.float())
    o, state = fused_recurrent_rwkv6(r, k, v, w, bonus, scale=1.0, initial_state=state, output_final_state=True)
    return o[:, 0], state


def delta_rule_step(q, k, v, beta, log_decay, state, scale):
    # forward only: fla's fused recurrent GDN has no backward (decoding needs none)
    q, k, v, beta, g = _t1(q, k, v, beta, log_decay.float())
    o, state = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=state,
                                                output_final_state=True)
    return o[:, 0], state


def diagonal_step(x, log_decay, state):
    # float32 input, so that the state fla returns (in x's dtype) stays float32
    x, g = _t1(x.float(), log_decay.float())
    o, state = fused_recurrent_hgrn(x, g, state, True)
    return o[:, 0], state
