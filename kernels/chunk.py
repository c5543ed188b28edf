"""Chunkwise-parallel forms of the recurrences in pure PyTorch (the CPU path).

The sequence is cut into chunks of C tokens. Inside a chunk everything is a few batched matmuls;
between chunks only the [K, V] state is carried, by a short loop over T/C chunks. Autograd runs
through all of it.

Numerics: log-decays are summed within each chunk (b = cumsum g, in float32 or wider) and a
decay between positions j ≤ i is only ever formed as exp(b_i − b_j) with the pair masked to
j ≤ i first, so every exponent is ≤ 0 and nothing overflows, whatever the decay strength. Where a
product must be factored (queries × keys of earlier sub-blocks), it is split at a point r between
them, exp(b_i − b_r) · exp(b_r − b_j), and both factors are again ≤ 1 (see `_gla_intra`).

All inputs arrive already in the compute dtype, shaped [B, T, H, ·]; states are [B, H, K, V].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def _chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, n, C, D], zero-padded at the end (zeros are inert for every recurrence)."""
    B, T, H, D = x.shape
    n = -(-T // C)
    x = F.pad(x, (0, 0, 0, 0, 0, n * C - T))
    return x.view(B, n, C, H, D).permute(0, 3, 1, 2, 4)


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n, C, D] -> [B, T, H, D]."""
    B, H, n, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, D)[:, :T]


def _chunk_size(T: int, chunk_size: int) -> int:
    """No bigger than the sequence needs."""
    return min(chunk_size, max(T, 1))


def _carry_states(decay: torch.Tensor, increments: torch.Tensor, state: torch.Tensor):
    """State entering each chunk: S_c = decay_{c-1} ⊙ S_{c-1} + increment_{c-1}.

    decay [B, H, n, K, 1] or [B, H, n, 1, 1]; increments [B, H, n, K, V]. Returns ([B, H, n, K, V], final).
    """
    entering = []
    # unbind, not indexing: the backward of one unbind is one stack; of n indexings, n full-size zero tensors.
    for d, inc in zip(decay.unbind(2), increments.unbind(2)):
        entering.append(state)
        state = d * state + inc
    return torch.stack(entering, 2), state


def _causal_exp(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(diff) where mask, 0 elsewhere; masks before exponentiating so no inf ever appears."""
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _gla_intra(q, k, v, bq, bk, strict: bool) -> torch.Tensor:
    """Intra-chunk output Σ_{j ≤ i} (Σ_k q_ik k_jk exp(bq_ik − bk_jk)) v_j (j < i if strict).

    q, k, bq, bk: [B, H, n, C, K], C a power of two. Halving the blocks recursively: at each
    level, the queries of a block's second half meet the keys of its first half through the
    split point r = the first half's last position, exp(bq_i − b_r) · exp(b_r − bk_j), both ≤ 1,
    so each level is two scalings and two matmuls. What remains are the pairs j = i, whose decay
    is exp(0) = 1. Work O(C log C · K) per chunk instead of O(C² K) for the full pairwise exponent.
    """
    B, H, n, C, K = q.shape
    V = v.shape[-1]
    o = torch.zeros_like(v) if strict else (q * k).sum(-1, keepdim=True) * v
    S = C
    while S > 1:
        h = S // 2
        # unbind (not indexing) so the backward is one stack, not a zero-filled copy per selection
        (q_, q_late), (k_early, _), (_, bq_late), (bk_early, _), (v_early, _) = (
            x.view(B, H, n, C // S, 2, h, x.shape[-1]).unbind(-3) for x in (q, k, bq, bk, v))
        ref = bk_early[..., -1:, :]
        scores = (q_late * (bq_late - ref).exp()) @ (k_early * (ref - bk_early).exp()).transpose(-1, -2)
        o_late = scores @ v_early
        o = o + torch.stack([torch.zeros_like(o_late), o_late], -3).view(B, H, n, C, V)
        S = h
    return o


def _gla_core(q, k, v, g, scale, state, chunk_size, strict=False):
    """Per-key-channel decay; `strict` reads the state before the current token (RWKV-6)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two for per-channel decays, got {chunk_size}")
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    q, k, v, g = (_chunked(x, C) for x in (q, k, v, g))
    b = g.cumsum(-2)  # inclusive, within each chunk
    bq = b - g if strict else b
    b_end = b[..., -1:, :]  # [B,H,n,1,K]

    increments = (k * (b_end - b).exp()).transpose(-1, -2) @ v  # [B,H,n,K,V]
    if state is None:
        state = q.new_zeros(B, H, K, V)
    entering, final = _carry_states(b_end.transpose(-1, -2).exp(), increments, state)

    o = (q * bq.exp()) @ entering + _gla_intra(q, k, v, bq, b, strict)
    return scale * _unchunked(o, T), final


def gla_chunk(q, k, v, log_decay, scale, state, chunk_size=64):
    return _gla_core(q, k, v, log_decay, scale, state, chunk_size)


def rwkv6_chunk(r, k, v, log_decay, bonus, state, chunk_size=64):
    o, final = _gla_core(r, k, v, log_decay, 1.0, state, chunk_size, strict=True)
    # The bonus term: the current token's own kᵀv, weighted by u, read by r.
    o = o + (r * bonus * k).sum(-1, keepdim=True) * v
    return o, final


def scalar_decay_chunk(q, k, v, log_decay, scale, state, chunk_size=64):
    """One decay per head and step: the decay matrix is [C, C], no per-channel expansion needed."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = _chunk_size(T, chunk_size)
    q, k, v, g = (_chunked(x, C) for x in (q, k, v, log_decay.unsqueeze(-1)))
    b = g.cumsum(-2)  # [B,H,n,C,1]
    b_end = b[..., -1:, :]

    increments = (k * (b_end - b).exp()).transpose(-1, -2) @ v
    if state is None:
        state = q.new_zeros(B, H, K, V)
    entering, final = _carry_states(b_end.exp(), increments, state)

    idx = torch.arange(C, device=q.device)
    decay = _causal_exp(b - b.transpose(-1, -2), idx.view(C, 1) >= idx.view(1, C))  # [B,H,n,C,C]
    o = (q * b.exp()) @ entering + ((q @ k.transpose(-1, -2)) * decay) @ v
    return scale * _unchunked(o, T), final


def delta_rule_chunk(q, k, v, beta, log_decay, scale, state, chunk_size=64):
    """Gated delta rule in the WY form (DeltaNet / Gated DeltaNet papers).

    Inside a chunk, with b = cumsum g and u_t = β_t (v_t − exp(g_t) k_t S_{t−1}) the corrected values,
    S_t = exp(b_t) S_0 + Σ_{j≤t} exp(b_t − b_j) k_jᵀ u_j, and the u solve the unit lower-triangular
    system (I + L) U = diag(β)(V − diag(exp(b)) K S_0), L_tj = β_t exp(b_t − b_j) k_t·k_j (j < t).
    So U = Ũ − W S_0 with Ũ, W computed for all chunks at once; only U needs the carried state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = _chunk_size(T, chunk_size)
    q, k, v = (_chunked(x, C) for x in (q, k, v))
    beta, g = (_chunked(x.unsqueeze(-1), C) for x in (beta, log_decay))
    b = g.cumsum(-2)  # [B,H,n,C,1]
    b_end = b[..., -1:, :]

    idx = torch.arange(C, device=q.device)
    diff = b - b.transpose(-1, -2)
    strictly_lower = _causal_exp(diff, idx.view(C, 1) > idx.view(1, C))
    lower = _causal_exp(diff, idx.view(C, 1) >= idx.view(1, C))
    L = beta * (k @ k.transpose(-1, -2)) * strictly_lower
    I_plus_L = L + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta * v, beta * b.exp() * k], -1)
    solved = torch.linalg.solve_triangular(I_plus_L, rhs, upper=False, unitriangular=True)
    u_tilde, w = solved[..., :V], solved[..., V:]

    if state is None:
        state = q.new_zeros(B, H, K, V)
    k_to_end = k * (b_end - b).exp()
    decay_end = b_end.exp()  # [B,H,n,1,1]
    entering, corrected = [], []
    for u_c, w_c, d_c, k_c in zip(*(x.unbind(2) for x in (u_tilde, w, decay_end, k_to_end))):
        entering.append(state)
        u = u_c - w_c @ state
        corrected.append(u)
        state = d_c * state + k_c.transpose(-1, -2) @ u
    entering, u = torch.stack(entering, 2), torch.stack(corrected, 2)

    o = (q * b.exp()) @ entering + ((q @ k.transpose(-1, -2)) * lower) @ u
    return scale * _unchunked(o, T), state


def _scan_in_chunks(x: torch.Tensor, a: torch.Tensor):
    """h_t = exp(a_t) h_{t−1} + x_t along dim −2 (the C positions of each chunk), from h = 0.

    A loop over the C positions, each step one fused multiply-add over all chunks at once: the
    data is read once, where a log-depth scan would read it log C times. Returns h and the
    inclusive cumulative log-decay from the chunk start (≤ 0: exp of it never overflows).
    """
    h, hs = None, []
    for x_t, decay_t in zip(x.unbind(-2), a.exp().unbind(-2)):
        h = x_t if h is None else torch.addcmul(x_t, decay_t, h)
        hs.append(h)
    return torch.stack(hs, -2), a.cumsum(-2)


def diagonal_chunk(x, log_decay, state, chunk_size=64):
    """h_t = exp(a_t) ⊙ h_{t−1} + x_t for x [B, T, D]: scan inside chunks, then over chunk ends.

    Linear work: the scan over the chunk ends is the same function one level up (T/C of them).
    """
    B, T, D = x.shape
    C = max(2, chunk_size)
    if T <= C:
        h, cum = _scan_in_chunks(x, log_decay)
        if state is not None:
            h = h + cum.exp() * state.unsqueeze(1)
        return h, h[:, -1] if T else state
    n = -(-T // C)
    xs, a = (F.pad(t, (0, 0, 0, n * C - T)).view(B, n, C, D) for t in (x, log_decay))
    h, cum = _scan_in_chunks(xs, a)
    ends, final = diagonal_chunk(h[:, :, -1], cum[:, :, -1], state, chunk_size)  # state after each chunk
    entering = torch.cat([ends.new_zeros(B, 1, D) if state is None else state.unsqueeze(1), ends[:, :-1]], 1)
    h = h + cum.exp() * entering.unsqueeze(2)
    return h.reshape(B, n * C, D)[:, :T], final


def window_chunk(q, k, v, scale, state, chunk_size=64):
    """Softmax attention of each query over the last W keys (itself included), in query blocks.

    state = (keys [B, W−1, Hk, K], values, valid [B, W−1]) holds the keys before this segment.
    Laid end to end, cache ‖ keys puts query t's window at positions [t, t + W − 1], so a block
    of C queries needs one span of C + W − 1 keys: one unfold, no gather.
    """
    cache_k, cache_v, valid = state
    B, T, H, K = q.shape
    Hk = k.shape[2]
    P = cache_k.shape[1]  # W − 1
    C = _chunk_size(T, chunk_size)
    n = -(-T // C)
    span = C + P
    keys = F.pad(torch.cat([cache_k, k], 1), (0, 0, 0, 0, 0, n * C - T))
    values = F.pad(torch.cat([cache_v, v], 1), (0, 0, 0, 0, 0, n * C - T))
    # Pad keys count as valid: only pad queries can see them, and that keeps their softmax finite.
    ok = F.pad(torch.cat([valid, valid.new_ones(B, T)], 1), (0, n * C - T), value=True)
    keys = keys.unfold(1, span, C)  # [B, n, Hk, K, span]
    values = values.unfold(1, span, C)
    ok = ok.unfold(1, span, C)  # [B, n, span]

    i = torch.arange(C, device=q.device).view(C, 1)
    e = torch.arange(span, device=q.device).view(1, span)
    in_window = (e >= i) & (e <= i + P)  # query i of the block sees keys i..i+W−1 of the span
    mask = in_window & ok.unsqueeze(2)  # [B, n, C, span]
    # Each block is one attention call over its span: torch's fused CPU/GPU attention does the rest.
    qb = F.pad(q, (0, 0, 0, 0, 0, n * C - T)).view(B * n, C, H, K).transpose(1, 2)
    o = F.scaled_dot_product_attention(qb, keys.flatten(0, 1).transpose(-1, -2), values.flatten(0, 1).transpose(-1, -2),
                                       attn_mask=mask.view(B * n, 1, C, span), scale=scale, enable_gqa=Hk != H)
    o = o.transpose(1, 2).reshape(B, n * C, H, -1)
    return o[:, :T], None
