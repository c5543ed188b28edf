"""The public recurrence functions and their dispatch.

Every function takes [batch, time, heads, dim] tensors and returns (output, final_state);
`impl` picks the path: "naive" (sequential loop, the oracle), "chunk" (chunkwise-parallel
PyTorch, the CPU path), "triton" (fla's GPU kernels, or ours where fla has none) or "auto".
Packed batches: batch 1, `cu_seqlens` = [0, end_1, ..., T]; the state restarts at each boundary
(from `initial_state[n]` when given) and one final state is returned per sequence.
Decays, their sums and the states are float32 (float64 for float64 inputs); outputs keep the
input dtype.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .chunk import (assign_sinks, delta_rule_chunk, diagonal_chunk, gla_chunk, rwkv6_chunk, scalar_decay_chunk,
                    window_chunk, window_sink_chunk)
from .naive import delta_rule_naive, diagonal_naive, gla_naive, rwkv6_naive, scalar_decay_naive, window_naive
from .naive import delta_rule_step, diagonal_step, gla_step, scalar_decay_step, window_sink_naive, window_sink_step
from .naive import window_step
from .naive import rwkv6_step as rwkv6_torch_step
from ._common import (check_shape, check_varlen, compute_dtype, fallback_notice, pack_to_padded, resolve_impl,
                      resolve_step_impl, run_varlen)


def _run(impl, naive_fn, chunk_fn, chunk_size, inputs, state, cu_seqlens, out_dtype, output_final_state):
    """Casts to the compute dtype, runs the chosen PyTorch path (packed batches padded), casts back."""
    dt = compute_dtype(*inputs, state)
    if inputs[0].shape[1] == 0:  # an empty segment: nothing to compute, the state passes through
        o = inputs[0].new_empty(inputs[0].shape[:-1] + state.shape[-1:], dtype=out_dtype)
        return o, (state.to(dt) if output_final_state else None)
    fn = naive_fn if impl == "naive" else functools.partial(chunk_fn, chunk_size=chunk_size)
    inputs = [x.to(dt) for x in inputs]
    o, final = run_varlen(lambda *xs: fn(*xs, state=state.to(dt)), inputs, cu_seqlens)
    return o.to(out_dtype), (final if output_final_state else None)


def _zero_state(initial_state, shape, like):
    if initial_state is None:
        return like.new_zeros(shape, dtype=compute_dtype(like))
    check_shape("initial_state", initial_state, shape)
    return initial_state


def _check_qkv(q, k, v, grouped=False):
    """q, k [B, T, H, K], v [B, T, H, V]; `grouped`: v's heads a multiple of q's and k's. Returns (B, T, H, K, V)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, time, heads, dim], got shape {list(q.shape)}")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K))
    check_shape("v", v, (B, T, None if grouped else H, None))
    if v.shape[2] % H:
        raise ValueError(f"v's {v.shape[2]} heads must be a multiple of q's and k's {H}")
    return B, T, H, K, v.shape[-1]


def gated_linear_attention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, impl="auto", chunk_size=64):
    """S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t,  o_t = scale · q_t S_t;  g = log_decay [B, T, H, K] ≤ 0.

    GLA, HGRN2, Liger. State [N, H, K, V].
    """
    B, T, H, K, V = _check_qkv(q, k, v)
    check_shape("log_decay", log_decay, (B, T, H, K))
    N = check_varlen(cu_seqlens, B, T)
    scale = K**-0.5 if scale is None else scale
    impl = resolve_impl(impl, q)
    if impl == "triton":
        from .fla_ops import gla as fla_gla

        return fla_gla(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    state = _zero_state(initial_state, (N, H, K, V), q)
    return _run(impl, functools.partial(gla_naive, scale=scale), functools.partial(gla_chunk, scale=scale),
                chunk_size, [q, k, v, log_decay], state, cu_seqlens, v.dtype, output_final_state)


def scalar_decay_attention(q, k, v, log_decay, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, impl="auto", chunk_size=64):
    """As `gated_linear_attention` with one log-decay per head and step: log_decay [B, T, H].

    Mamba-2's SSD (q = C, k = B, v = Δ·x, g = Δ·A, scale = 1) and RetNet. State [N, H, K, V].
    q and k may have G heads for v's H, H a multiple of G (Mamba-2's groups: each group of H / G
    heads shares them); the chunk path then computes what the heads share once per group.
    """
    B, T, G, K, V = _check_qkv(q, k, v, grouped=True)
    H = v.shape[2]
    check_shape("log_decay", log_decay, (B, T, H))
    N = check_varlen(cu_seqlens, B, T)
    scale = K**-0.5 if scale is None else scale
    impl = resolve_impl(impl, q)
    if impl != "chunk" and G != H:  # the loop and fla's kernel take q and k per head
        q, k = q.repeat_interleave(H // G, 2), k.repeat_interleave(H // G, 2)
    if impl == "triton":
        from .fla_ops import scalar_decay as fla_scalar_decay

        return fla_scalar_decay(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    state = _zero_state(initial_state, (N, H, K, V), q)
    return _run(impl, functools.partial(scalar_decay_naive, scale=scale),
                functools.partial(scalar_decay_chunk, scale=scale),
                chunk_size, [q, k, v, log_decay], state, cu_seqlens, v.dtype, output_final_state)


def rwkv6(r, k, v, log_decay, bonus, initial_state=None, output_final_state=False, cu_seqlens=None,
          impl="auto", chunk_size=64):
    """o_t = r_t (S_{t−1} + diag(u) k_tᵀ v_t), then S_t = diag(exp(w_t)) S_{t−1} + k_tᵀ v_t.

    w = log_decay [B, T, H, K] (RWKV-6: −exp(decay)); u = bonus [H, K]; no 1/√d. State [N, H, K, V].
    """
    B, T, H, K, V = _check_qkv(r, k, v)
    check_shape("log_decay", log_decay, (B, T, H, K))
    check_shape("bonus", bonus, (H, K))
    N = check_varlen(cu_seqlens, B, T)
    impl = resolve_impl(impl, r)
    if impl == "triton":
        from .fla_ops import rwkv6 as fla_rwkv6

        return fla_rwkv6(r, k, v, log_decay, bonus, initial_state, output_final_state, cu_seqlens)
    state = _zero_state(initial_state, (N, H, K, V), r)
    u = bonus.to(compute_dtype(r, bonus))
    return _run(impl, functools.partial(rwkv6_naive, bonus=u), functools.partial(rwkv6_chunk, bonus=u),
                chunk_size, [r, k, v, log_decay], state, cu_seqlens, v.dtype, output_final_state)


def gated_delta_rule(q, k, v, beta, log_decay, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, impl="auto", chunk_size=64):
    """S_t = exp(g_t)(I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,  o_t = scale · q_t S_t.

    beta, log_decay [B, T, H]; pass k L2-normalised. Titans' linear memory, Gated DeltaNet.
    """
    B, T, H, K, V = _check_qkv(q, k, v)
    check_shape("beta", beta, (B, T, H))
    check_shape("log_decay", log_decay, (B, T, H))
    N = check_varlen(cu_seqlens, B, T)
    scale = K**-0.5 if scale is None else scale
    impl = resolve_impl(impl, q)
    if impl == "triton":
        from .fla_ops import gated_delta_rule as fla_gated_delta_rule

        return fla_gated_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    state = _zero_state(initial_state, (N, H, K, V), q)
    return _run(impl, functools.partial(delta_rule_naive, scale=scale),
                functools.partial(delta_rule_chunk, scale=scale),
                chunk_size, [q, k, v, beta, log_decay], state, cu_seqlens, v.dtype,
                output_final_state)


def diagonal_recurrence(x, log_decay, initial_state=None, output_final_state=False, cu_seqlens=None,
                        impl="auto", chunk_size=16):
    """h_t = exp(a_t) ⊙ h_{t−1} + x_t;  x, log_decay [B, T, D]; returns (h, h_T). Griffin, HGRN.

    A log-decay of −inf drops the state (a document start). The chunk path scans C = chunk_size
    positions per step of a loop, so small chunks mean fewer steps in all (T/C chunk ends recurse).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, time, dim], got shape {list(x.shape)}")
    B, T, D = x.shape
    check_shape("log_decay", log_decay, (B, T, D))
    N = check_varlen(cu_seqlens, B, T)
    impl = resolve_impl(impl, x)
    if impl == "triton":
        from .fla_ops import diagonal as fla_diagonal

        return fla_diagonal(x, log_decay, initial_state, output_final_state, cu_seqlens)
    state = _zero_state(initial_state, (N, D), x)
    return _run(impl, diagonal_naive, diagonal_chunk, chunk_size, [x, log_decay],
                state, cu_seqlens, x.dtype, output_final_state)


def sliding_window_attention(q, k, v, window, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, impl="auto", chunk_size=64, sinks=0, key_valid=None):
    """Causal softmax attention of each query over the last `window` keys, itself included.

    k, v may have fewer heads than q (grouped / multi-query). The state is the window cache
    (keys [N, window−1, Hk, K], values [N, window−1, Hk, V], valid [N, window−1] bool), so
    prefill can be chunked and decoding keeps constant memory.

    `sinks` > 0 keeps the first `sinks` valid keys of each sequence visible to every later query
    as well (attention sinks, StreamingLLM / LoLA); `key_valid` [B, T] bool marks keys that may be
    attended to (False: padding, which then changes no state). With either, the state gains the
    sink slots: (keys, values, valid, sink_keys [N, sinks, Hk, K], sink_values, sink_valid [N, sinks]).
    """
    if sinks or key_valid is not None:
        return _window_with_sinks(q, k, v, window, scale, initial_state, output_final_state, cu_seqlens, impl,
                                  chunk_size, sinks, key_valid)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, time, heads, dim], got shape {list(q.shape)}")
    B, T, H, K = q.shape
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != K or H % k.shape[2]:
        raise ValueError(f"k has shape {list(k.shape)}; expected [{B}, {T}, Hk, {K}] with Hk dividing {H}")
    Hk = k.shape[2]
    check_shape("v", v, (B, T, Hk, None))
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    N = check_varlen(cu_seqlens, B, T)
    scale = K**-0.5 if scale is None else scale
    impl = resolve_impl(impl, q)
    P = window - 1
    if T == 0:
        o = v.new_empty(B, 0, H, v.shape[-1])
    elif impl == "triton" and initial_state is None:
        from .fla_ops import window as fla_window

        o = fla_window(q, k, v, window, scale, cu_seqlens)
    else:
        if impl == "triton":  # fla's kernel takes no cache: a chunked prefill continues in PyTorch
            fallback_notice("window_cache", "sliding_window_attention: fla's parallel_attn takes no KV cache "
                            "prefix, so calls with an initial_state run the PyTorch chunk path instead")
            impl = "chunk"
        dt = compute_dtype(q, k, v)
        if initial_state is None:
            # Without a cache, a window longer than the segment is the whole causal prefix.
            size = min(P, T)
            cache = (q.new_zeros(N, size, Hk, K, dtype=dt), q.new_zeros(N, size, Hk, v.shape[-1], dtype=dt),
                     torch.zeros(N, size, dtype=torch.bool, device=q.device))
        else:
            keys, values, valid = _check_window_state(initial_state, N, P, Hk, K, v.shape[-1])
            cache = (keys.to(dt), values.to(dt), valid)
        fn = window_naive if impl == "naive" else functools.partial(window_chunk, chunk_size=chunk_size)
        o, _ = run_varlen(lambda q, k, v: fn(q, k, v, scale=scale, state=cache), [q.to(dt), k.to(dt), v.to(dt)],
                          cu_seqlens)
        o = o.to(v.dtype)
    if not output_final_state:
        return o, None
    return o, _window_final_state(initial_state, k, v, P, N, cu_seqlens)


def _window_with_sinks(q, k, v, window, scale, initial_state, output_final_state, cu_seqlens, impl, chunk_size,
                       sinks, key_valid):
    """sliding_window_attention with sink slots and key validity (the PyTorch paths on every device)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must be [B, T, H, K] and [B, T, Hk, K]")
    B, T, H, K = q.shape
    Hk, V = k.shape[2], v.shape[-1]
    check_shape("v", v, (B, T, Hk, None))
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    N = check_varlen(cu_seqlens, B, T)
    if key_valid is None:
        key_valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
    check_shape("key_valid", key_valid, (B, T))
    scale = K**-0.5 if scale is None else scale
    impl = resolve_impl(impl, q)
    if impl == "triton":
        fallback_notice("window_sinks", "sliding_window_attention: fla's parallel_attn has no sinks or key mask, "
                        "so these calls run the PyTorch chunk path")
        impl = "chunk"
    P, dt = window - 1, compute_dtype(q, k, v)
    if initial_state is None:
        size = min(P, T)  # (without a cache, a window longer than the segment is the whole prefix)
        state = (q.new_zeros(N, size, Hk, K, dtype=dt), q.new_zeros(N, size, Hk, V, dtype=dt),
                 torch.zeros(N, size, dtype=torch.bool, device=q.device), q.new_zeros(N, sinks, Hk, K, dtype=dt),
                 q.new_zeros(N, sinks, Hk, V, dtype=dt), torch.zeros(N, sinks, dtype=torch.bool, device=q.device))
    else:
        state = _check_sink_state(initial_state, N, P, sinks, Hk, K, V)
        state = tuple(x.to(dt) if x.is_floating_point() else x for x in state)
    fn = window_sink_naive if impl == "naive" else functools.partial(window_sink_chunk, chunk_size=chunk_size)
    run = lambda q, k, v, valid: fn(q, k, v, valid > 0.5, scale=scale, state=state)
    o, _ = run_varlen(run, [q.to(dt), k.to(dt), v.to(dt), key_valid.to(dt)], cu_seqlens)
    o = o.to(v.dtype)
    if not output_final_state:
        return o, None
    # The final state: the sink slots after this segment, and the window of its last keys.
    rows = (lambda x: pack_to_padded(x, cu_seqlens)) if cu_seqlens is not None else (lambda x: x)
    valid_rows = rows(key_valid.unsqueeze(-1).to(dt))[..., 0] > 0.5
    cached = state if initial_state is not None else None
    sink_k, sink_v, sink_valid, _, is_sink = assign_sinks(rows(k.to(dt)), rows(v.to(dt)), valid_rows,
                                                         *(initial_state[3:] if initial_state is not None else state[3:]))
    keys, values, valid = _window_final_state(None if cached is None else cached[:3], k, v, P, N, cu_seqlens,
                                              valid_rows & ~is_sink)
    return o, (keys, values, valid, sink_k.to(k.dtype), sink_v.to(v.dtype), sink_valid)


def _check_sink_state(state, N, P, S, Hk, K, V):
    if not (isinstance(state, (tuple, list)) and len(state) == 6):
        raise ValueError("initial_state for sliding_window_attention with sinks or key_valid must be (keys, values, "
                         "valid, sink_keys, sink_values, sink_valid)")
    _check_window_state(state[:3], N, P, Hk, K, V)
    check_shape("initial_state sink_keys", state[3], (N, S, Hk, K))
    check_shape("initial_state sink_values", state[4], (N, S, Hk, V))
    check_shape("initial_state sink_valid", state[5], (N, S))
    return tuple(state)


def _check_window_state(state, N, P, Hk, K, V):
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise ValueError("initial_state for sliding_window_attention must be (keys, values, valid)")
    check_shape("initial_state keys", state[0], (N, P, Hk, K))
    check_shape("initial_state values", state[1], (N, P, Hk, V))
    check_shape("initial_state valid", state[2], (N, P))
    return tuple(state)


def _window_final_state(initial_state, k, v, P, N, cu_seqlens, valid_rows=None):
    """The last window−1 keys/values of each sequence (cache ‖ segment), invalid-padded on the left;
    `valid_rows` [N, L] marks the segment keys that stay visible (default: all of each sequence)."""
    if cu_seqlens is None:
        lengths = torch.full((N,), k.shape[1], dtype=torch.long, device=k.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(k.device)
        k, v = pack_to_padded(k, cu_seqlens), pack_to_padded(v, cu_seqlens)
    L = k.shape[1]
    if initial_state is None:
        cache = (k.new_zeros(N, P, *k.shape[2:]), v.new_zeros(N, P, *v.shape[2:]),
                 torch.zeros(N, P, dtype=torch.bool, device=k.device))
    else:
        cache = initial_state
    keys = torch.cat([k.new_zeros(N, P, *k.shape[2:]), cache[0].to(k.dtype), k], 1)
    values = torch.cat([v.new_zeros(N, P, *v.shape[2:]), cache[1].to(v.dtype), v], 1)
    in_sequence = torch.arange(L, device=k.device).unsqueeze(0) < lengths.unsqueeze(1)
    if valid_rows is not None:
        in_sequence = in_sequence & valid_rows
    valid = torch.cat([torch.zeros(N, P, dtype=torch.bool, device=k.device), cache[2], in_sequence], 1)
    idx = (P + P + lengths - P).unsqueeze(1) + torch.arange(P, device=k.device)  # [N, P]: positions end−P..end−1
    take = lambda x: x.gather(1, idx.view(N, P, *([1] * (x.dim() - 2))).expand(N, P, *x.shape[2:]))
    return take(keys), take(values), valid.gather(1, idx)


MAX_SQRT_GRADIENT = 1000.0  # RecurrentGemma's bound (transformers, and our Triton kernel)


class SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose derivative 1 / (2 sqrt(x)) is capped at MAX_SQRT_GRADIENT, so it stays finite at x = 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (2 * torch.sqrt(x.clamp(min=0.25 / MAX_SQRT_GRADIENT**2)))


def rg_lru(x, gate_a, gate_x, a_param, c=8.0, reset=None, initial_state=None, output_final_state=False,
           impl="auto", chunk_size=16):
    """Griffin's Real-Gated Linear Recurrent Unit over x, gate logits [B, T, D] and Λ = a_param [D]:

        log a_t = −c · softplus(Λ) · σ(gate_a_t),   h_t = a_t ⊙ h_{t−1} + sqrt(1 − a_t²) ⊙ σ(gate_x_t) ⊙ x_t

    `reset` [B, T] marks document starts: the state is dropped and the input is not rescaled there
    (RecurrentGemma's convention). The GPU path is our fused Triton kernel; the CPU paths compute the
    gates in PyTorch and run `diagonal_recurrence`. Returns (h, h_T).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, time, dim], got shape {list(x.shape)}")
    B, T, D = x.shape
    check_shape("gate_a", gate_a, (B, T, D))
    check_shape("gate_x", gate_x, (B, T, D))
    check_shape("a_param", a_param, (D,))
    if reset is not None:
        check_shape("reset", reset, (B, T))
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, D))
    impl = resolve_impl(impl, x, needs_fla=False)
    if impl == "triton":
        from .rglru_triton import rg_lru_triton

        return rg_lru_triton(x, gate_a, gate_x, a_param, c, reset, initial_state, output_final_state)
    dt = compute_dtype(x, gate_a, gate_x, a_param)
    log_a = -c * F.softplus(a_param.to(dt)) * torch.sigmoid(gate_a.to(dt))
    # sqrt(1 − a²) = sqrt(−expm1(2 log a)), with RecurrentGemma's bounded derivative (finite as a → 1)
    multiplier = SqrtBoundedGrad.apply(-torch.expm1(2 * log_a))
    if reset is not None:
        multiplier = torch.where(reset.unsqueeze(-1), torch.ones_like(multiplier), multiplier)
        log_a = log_a.masked_fill(reset.unsqueeze(-1), float("-inf"))
    gated_x = multiplier * torch.sigmoid(gate_x.to(dt)) * x.to(dt)
    h, final = diagonal_recurrence(gated_x, log_a, initial_state, output_final_state, impl=impl, chunk_size=chunk_size)
    return h.to(x.dtype), final


# Single steps for decoding: per-step tensors [B, H, ...] (no time axis), as in kernels/naive.py.
# On CUDA they run fla's fused recurrent kernels at T = 1 (never a chunk kernel), elsewhere the
# PyTorch step; states are float32 (float64 for float64 inputs), outputs keep v's dtype.

def _step(step_fn, inputs, state, out_dtype, *extra):
    dt = compute_dtype(*inputs, state)
    o, state = step_fn(*(x.to(dt) for x in inputs), state.to(dt), *extra)
    return o.to(out_dtype), state


def _check_step_qkv(q, k, v):
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, dim] (one step), got shape {list(q.shape)}")
    B, H, K = q.shape
    check_shape("k", k, (B, H, K))
    check_shape("v", v, (B, H, None))
    return B, H, K, v.shape[-1]


def gated_linear_attention_step(q, k, v, log_decay, state=None, scale=None, impl="auto"):
    """One token of `gated_linear_attention`: q, k, log_decay [B, H, K], v [B, H, V], state [B, H, K, V]
    (None: zeros). Returns (o [B, H, V], new state)."""
    B, H, K, V = _check_step_qkv(q, k, v)
    check_shape("log_decay", log_decay, (B, H, K))
    scale = K**-0.5 if scale is None else scale
    state = _zero_state(state, (B, H, K, V), q)
    if resolve_step_impl(impl, q) == "triton":
        from .fla_ops import gla_step as fla_step

        o, state = fla_step(q, k, v, log_decay, state, scale)
        return o.to(v.dtype), state
    return _step(gla_step, [q, k, v, log_decay], state, v.dtype, scale)


def scalar_decay_attention_step(q, k, v, log_decay, state=None, scale=None, impl="auto"):
    """One token of `scalar_decay_attention`: log_decay [B, H]; otherwise as `gated_linear_attention_step`."""
    B, H, K, V = _check_step_qkv(q, k, v)
    check_shape("log_decay", log_decay, (B, H))
    scale = K**-0.5 if scale is None else scale
    state = _zero_state(state, (B, H, K, V), q)
    if resolve_step_impl(impl, q) == "triton":
        from .fla_ops import scalar_decay_step as fla_step

        o, state = fla_step(q, k, v, log_decay, state, scale)
        return o.to(v.dtype), state
    return _step(scalar_decay_step, [q, k, v, log_decay], state, v.dtype, scale)


def rwkv6_step(r, k, v, log_decay, bonus, state=None, impl="auto"):
    """One token of `rwkv6`: r, k, log_decay [B, H, K], v [B, H, V], bonus [H, K], state [B, H, K, V]."""
    B, H, K, V = _check_step_qkv(r, k, v)
    check_shape("log_decay", log_decay, (B, H, K))
    check_shape("bonus", bonus, (H, K))
    state = _zero_state(state, (B, H, K, V), r)
    if resolve_step_impl(impl, r) == "triton":
        from .fla_ops import rwkv6_step as fla_step

        o, state = fla_step(r, k, v, log_decay, bonus, state)
        return o.to(v.dtype), state
    u = bonus.to(compute_dtype(r, bonus))
    return _step(lambda r, k, v, w, s: rwkv6_torch_step(r, k, v, w, u, s), [r, k, v, log_decay], state, v.dtype)


def gated_delta_rule_step(q, k, v, beta, log_decay, state=None, scale=None, impl="auto"):
    """One token of `gated_delta_rule`: beta, log_decay [B, H]. The GPU step has no backward."""
    B, H, K, V = _check_step_qkv(q, k, v)
    check_shape("beta", beta, (B, H))
    check_shape("log_decay", log_decay, (B, H))
    scale = K**-0.5 if scale is None else scale
    state = _zero_state(state, (B, H, K, V), q)
    if resolve_step_impl(impl, q) == "triton":
        from .fla_ops import delta_rule_step as fla_step

        o, state = fla_step(q, k, v, beta, log_decay, state, scale)
        return o.to(v.dtype), state
    return _step(delta_rule_step, [q, k, v, beta, log_decay], state, v.dtype, scale)


def diagonal_recurrence_step(x, log_decay, state=None, impl="auto"):
    """One token of `diagonal_recurrence`: x, log_decay, state [B, D]. Returns (h in x's dtype, h)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, dim] (one step), got shape {list(x.shape)}")
    check_shape("log_decay", log_decay, tuple(x.shape))
    state = _zero_state(state, tuple(x.shape), x)
    if resolve_step_impl(impl, x) == "triton":
        from .fla_ops import diagonal_step as fla_step

        h, state = fla_step(x, log_decay, state)
        return h.to(x.dtype), state
    return _step(diagonal_step, [x, log_decay], state, x.dtype)


def sliding_window_attention_step(q, k, v, state, scale=None, impl="auto", key_valid=None):
    """One token of `sliding_window_attention`: q [B, H, K], k [B, Hk, K], v [B, Hk, V], state the
    window cache (keys [B, window−1, Hk, K], values, valid [B, window−1]), or with sinks its six
    parts; `key_valid` [B] (False: a padding token). Returns (o, the cache after this token).

    The PyTorch step on every device: one softmax over a constant-size cache (fla has no decoding
    kernel for it; impl="triton" says so once).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, dim] (one step), got shape {list(q.shape)}")
    B, H, K = q.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != K or H % k.shape[1]:
        raise ValueError(f"k has shape {list(k.shape)}; expected [{B}, Hk, {K}] with Hk dividing {H}")
    Hk = k.shape[1]
    check_shape("v", v, (B, Hk, None))
    if isinstance(state, (tuple, list)) and len(state) == 6 or key_valid is not None:
        return _window_sink_step(q, k, v, state, scale, impl, key_valid)
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise ValueError("state for sliding_window_attention_step must be (keys, values, valid)")
    keys, values, valid = _check_window_state(state, B, state[0].shape[1], Hk, K, v.shape[-1])
    scale = K**-0.5 if scale is None else scale
    resolve_step_impl(impl, q, needs_fla=False)  # checks impl; every impl runs the step below
    if impl == "triton":
        fallback_notice("window_step", "sliding_window_attention_step: fla has no decoding kernel for window "
                        "attention, so impl='triton' runs the PyTorch step")
    dt = compute_dtype(q, k, v)
    o, cache = window_step(q.to(dt), k.to(dt), v.to(dt), (keys.to(dt), values.to(dt), valid), scale)
    # the cache keeps k's and v's dtype, as sliding_window_attention's final state does
    return o.to(v.dtype), (cache[0].to(k.dtype), cache[1].to(v.dtype), cache[2])


def _window_sink_step(q, k, v, state, scale, impl, key_valid):
    B, H, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    if not (isinstance(state, (tuple, list)) and len(state) == 6):
        raise ValueError("state for sliding_window_attention_step with key_valid must have the six parts of a "
                         "sink window cache (keys, values, valid, sink_keys, sink_values, sink_valid)")
    state = _check_sink_state(state, B, state[0].shape[1], state[3].shape[1], Hk, K, V)
    if key_valid is None:
        key_valid = torch.ones(B, dtype=torch.bool, device=q.device)
    check_shape("key_valid", key_valid, (B,))
    scale = K**-0.5 if scale is None else scale
    resolve_step_impl(impl, q, needs_fla=False)
    dt = compute_dtype(q, k, v)
    o, new = window_sink_step(q.to(dt), k.to(dt), v.to(dt), key_valid,
                              tuple(x.to(dt) if x.is_floating_point() else x for x in state), scale)
    keys, values, valid, sink_k, sink_v, sink_valid = new
    return o.to(v.dtype), (keys.to(k.dtype), values.to(v.dtype), valid, sink_k.to(k.dtype), sink_v.to(v.dtype),
                           sink_valid)
