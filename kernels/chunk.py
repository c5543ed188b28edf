"""Chunkwise-parallel forms of the recurrences in pure PyTorch (the CPU path).

The sequence is cut into chunks of C tokens. Inside a chunk everything is a few batched matmuls;
between chunks only the [K, V] state is carried, by the same scan that runs the diagonal
recurrence. Autograd runs through it, except where a hand-written backward (`_GLAIntra`,
`_DiagonalRecurrence`) does the same work with far fewer full-size temporaries.

Numerics: log-decays are summed within each chunk (b = cumsum g, in float32 or wider) and a
decay between positions j ≤ i is only ever formed as exp(b_i − b_j) with the pair masked to
j ≤ i first, so every exponent is ≤ 0 and nothing overflows, whatever the decay strength. Where a
product must be factored (queries × keys of earlier sub-blocks), it is split at a point r between
them, exp(b_i − b_r) · exp(b_r − b_j), and both factors are again ≤ 1 (see `_GLAIntra`).

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
    return x.view(B, n, C, H, D).permute(0, 3, 1, 2, 4).contiguous()  # one copy here, not one per matmul


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n, C, D] -> [B, T, H, D]."""
    B, H, n, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, D)[:, :T]


def _chunk_size(T: int, chunk_size: int) -> int:
    """No bigger than the sequence needs."""
    return min(chunk_size, max(T, 1))


def _carry_block(n: int) -> int:
    """The scan's block over n chunk states: 16, or n itself when fewer (no padding to a full block)."""
    return max(2, min(16, n))


def _carry_states(log_decay: torch.Tensor, increments: torch.Tensor, state: torch.Tensor):
    """State entering each chunk: S_c = exp(log_decay_{c-1}) ⊙ S_{c-1} + increment_{c-1}.

    A diagonal recurrence over the chunks, one lane per state entry, so it runs on the same scan
    as `diagonal_recurrence`. log_decay [B, H, n, K, 1] or [B, H, n, 1, 1]; increments
    [B, H, n, K, V]; state [B, H, K, V]. Returns (entering [B, H, n, K, V], final state).
    """
    B, H, n, K, V = increments.shape
    lanes = lambda x: x.reshape(B * H, -1, K * V)
    after = _DiagonalRecurrence.apply(lanes(increments), lanes(log_decay.expand(B, H, n, K, V)),
                                      state.reshape(B * H, K * V), _carry_block(n))  # the state after each chunk
    entering = torch.cat([state.reshape(B * H, 1, K * V), after[:, :-1]], 1)
    return entering.view(B, H, n, K, V), after[:, -1].view(B, H, K, V)


def _causal_exp(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(diff) where mask, 0 elsewhere; masks before exponentiating so no inf ever appears."""
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _halves(x: torch.Tensor, h: int):
    """[..., C, D] -> views [..., C/2h, h, D] of the first and second half of each block of 2h rows."""
    *lead, C, D = x.shape
    return x.view(*lead, C // (2 * h), 2, h, D).unbind(-3)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for the 1- and 2-row blocks of the lowest levels as a broadcast product, which on CPU
    beats thousands of tiny batched matmuls."""
    return a @ b if a.shape[-2] > 2 else (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _levels(C: int):
    h = C // 2
    while h >= 1:
        yield h
        h //= 2


class _GLAIntra(torch.autograd.Function):
    """Intra-chunk output o_i = Σ_{j ≤ i} (Σ_k q_ik k_jk exp(bq_ik − bk_jk)) v_j  (j < i if strict).

    q, k, bq, bk: [B, H, n, C, K], v [B, H, n, C, V], C a power of two. Halving the blocks
    recursively: at each level the queries of a block's second half meet the keys of its first
    half through the split point r = the first half's last position,
    exp(bq_i − b_r) · exp(b_r − bk_j), both factors ≤ 1, so each level is two scalings and two
    matmuls; what remains are the pairs j = i, whose decay is exp(0) = 1. O(C log C · K) work per
    chunk instead of O(C² K) for the pairwise exponent. The backward is written out so that each
    level adds into half-blocks in place, instead of autograd's zero-filled full-size copies.
    """

    @staticmethod
    def forward(ctx, q, k, v, bq, bk, strict):
        o = torch.zeros_like(v) if strict else (q * k).sum(-1, keepdim=True) * v
        saved = []  # per level: the scaled late queries and early keys, their decays, their scores
        for h in _levels(q.shape[-2]):
            (_, q_late), (k_early, _), (v_early, _), (_, bq_late), (bk_early, _) = (
                _halves(x, h) for x in (q, k, v, bq, bk))
            ref = bk_early[..., -1:, :]
            eq, ek = (bq_late - ref).exp(), (ref - bk_early).exp()
            qs, ks = q_late * eq, k_early * ek
            scores = _mm(qs, ks.transpose(-1, -2))
            _halves(o, h)[1].add_(_mm(scores, v_early))
            saved += [qs, ks, eq, ek, scores]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.strict = strict
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, *saved = ctx.saved_tensors
        dv = torch.zeros_like(v)
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)  # through the decays only, until the end
        for i, h in enumerate(_levels(q.shape[-2])):
            qs, ks, eq, ek, scores = saved[5 * i:5 * i + 5]
            do_late, v_early = _halves(do, h)[1], _halves(v, h)[0]
            d_scores = _mm(do_late, v_early.transpose(-1, -2))
            _halves(dv, h)[0].add_(_mm(scores.transpose(-1, -2), do_late))
            _halves(dq, h)[1].add_(_mm(d_scores, ks) * eq)
            _halves(dk, h)[0].add_(_mm(d_scores.transpose(-1, -2), qs) * ek)
            # The split point r cancels in qs·ks (exp(−r)·exp(r)), so it gets no gradient.
        dbq, dbk = dq * q, (dk * k).neg_()  # d/dbq of q·exp(bq − r) is itself, of k·exp(r − bk) minus itself
        if not ctx.strict:  # the j = i pairs: (q_i · k_i) v_i
            dv.addcmul_((q * k).sum(-1, keepdim=True), do)
            d_qk = (do * v).sum(-1, keepdim=True)
            dq.addcmul_(d_qk, k)
            dk.addcmul_(d_qk, q)
        return dq, dk, dv, dbq, dbk, None


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
    entering, final = _carry_states(b_end.transpose(-1, -2), increments, state)

    o = (q * bq.exp()) @ entering + _GLAIntra.apply(q, k, v, bq, b, strict)
    return scale * _unchunked(o, T), final


def gla_chunk(q, k, v, log_decay, scale, state, chunk_size=64):
    return _gla_core(q, k, v, log_decay, scale, state, chunk_size)


def rwkv6_chunk(r, k, v, log_decay, bonus, state, chunk_size=64):
    o, final = _gla_core(r, k, v, log_decay, 1.0, state, chunk_size, strict=True)
    # The bonus term: the current token's own kᵀv, weighted by u, read by r.
    o = o + (r * bonus * k).sum(-1, keepdim=True) * v
    return o, final


def scalar_decay_chunk(q, k, v, log_decay, scale, state, chunk_size=64):
    """One decay per head and step: the decay matrix is [C, C], no per-channel expansion needed.

    q, k [B, T, G, K] with G dividing v's H heads: a group's heads share q and k, so q kᵀ is taken
    once per group, and the products of q or k with the state side are one matmul over the group's
    heads side by side (the decays, being per head, go on the values and outputs instead)."""
    B, T, G, K = q.shape
    H, V = v.shape[2:]
    r = H // G
    C = _chunk_size(T, chunk_size)
    q, k, v, g = (_chunked(x, C) for x in (q, k, v, log_decay.unsqueeze(-1)))  # q, k [B,G,n,C,K]; v [B,H,n,C,V]
    b = g.cumsum(-2)  # [B,H,n,C,1]
    b_end = b[..., -1:, :]
    side = lambda x: x.unflatten(1, (G, r)).permute(0, 1, 3, 4, 2, 5).flatten(-2)  # noqa: E731  [B,H,n,X,D] -> [B,G,n,X,rD]
    back = lambda x: x.unflatten(-1, (r, V)).permute(0, 1, 4, 2, 3, 5).flatten(1, 2)  # noqa: E731  and back

    increments = back(k.transpose(-1, -2) @ side((b_end - b).exp() * v))  # [B,H,n,K,V]
    if state is None:
        state = q.new_zeros(B, H, K, V)
    entering, final = _carry_states(b_end, increments, state)

    idx = torch.arange(C, device=q.device)
    decay = _causal_exp(b - b.transpose(-1, -2), idx.view(C, 1) >= idx.view(1, C))  # [B,H,n,C,C]
    scores = (q @ k.transpose(-1, -2)).unsqueeze(2) * decay.unflatten(1, (G, r))  # [B,G,r,n,C,C]
    o = b.exp() * back(q @ side(entering)) + scores.flatten(1, 2) @ v
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
    lower = _causal_exp(diff, idx.view(C, 1) >= idx.view(1, C))
    strictly_lower = lower.tril(-1)
    L = beta * (k @ k.transpose(-1, -2)) * strictly_lower
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # (I + L)⁻¹ once per chunk (C right-hand sides), then two matmuls: cheaper than solving for the
    # K + V columns of [βV | β e^b K] directly.
    inverse = torch.linalg.solve_triangular(L + eye, eye.expand_as(L), upper=False, unitriangular=True)
    u_tilde, w = inverse @ (beta * v), inverse @ (beta * b.exp() * k)

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


def _scan(x: torch.Tensor, decay: torch.Tensor, state, C: int, reverse: bool = False) -> torch.Tensor:
    """h_t = decay_t ⊙ h_{t−1} + x_t for x, decay [B, T, D], decay = exp(a) ∈ [0, 1]; no autograd.

    reverse=True runs the same recurrence from the end: h_t = x_t + decay_{t+1} ⊙ h_{t+1} (what
    the backward needs), with `state` entering after the last position.
    Inside chunks of C: a loop over the C positions, each step one multiply-add over all chunks
    at once, written in place (the data is read once; a log-depth scan would read it log C
    times). The state entering each chunk comes from the same scan one level up, over the T/C
    chunk ends, so the work stays linear. Only products of decays ≤ 1 are formed, never a ratio.
    """
    B, T, D = x.shape
    n = -(-T // C)
    if n * C != T:  # pads at the end: zero input, decay 1, inert in both directions
        x, decay = F.pad(x, (0, 0, 0, n * C - T)), F.pad(decay, (0, 0, 0, n * C - T), value=1.0)
    xs, ds = x.reshape(B, n, C, D), decay.reshape(B, n, C, D)
    h, prod = torch.empty_like(xs), torch.empty_like(ds)  # local scan; decays between it and the chunk's edge
    edge, steps = (C - 1, range(C - 2, -1, -1)) if reverse else (0, range(1, C))
    h[:, :, edge] = xs[:, :, edge]
    prod[:, :, edge] = 1.0 if reverse else ds[:, :, 0]
    compiling = torch.compiler.is_compiling()  # Dynamo cannot trace out= into a strided slice: assign there
    for t in steps:
        prev, d = (t + 1, ds[:, :, t + 1]) if reverse else (t - 1, ds[:, :, t])
        if compiling:
            h[:, :, t], prod[:, :, t] = torch.addcmul(xs[:, :, t], d, h[:, :, prev]), d * prod[:, :, prev]
        else:
            torch.addcmul(xs[:, :, t], d, h[:, :, prev], out=h[:, :, t])
            torch.mul(d, prod[:, :, prev], out=prod[:, :, t])
    if n > 1 or state is not None:
        if reverse:  # chunk c receives decay(start of c+1) · g(start of c+1) at its last position
            last = h.new_zeros(B, D) if state is None else state
            entering = last.unsqueeze(1)
            if n > 1:
                factors = torch.cat([ds.new_ones(B, 1, D), prod[:, :-1, 0] * ds[:, 1:, 0]], 1)  # read at c + 1
                starts = _scan(h[:, :, 0], factors, None if state is None else prod[:, -1, 0] * state, C, True)
                entering = torch.cat([ds[:, 1:, 0] * starts[:, 1:], entering], 1)
        else:
            first = h.new_zeros(B, 1, D) if state is None else state.unsqueeze(1)
            ends = _scan(h[:, :, -1], prod[:, :, -1], state, C) if n > 1 else None  # state after each chunk
            entering = first if n == 1 else torch.cat([first, ends[:, :-1]], 1)
        h.addcmul_(prod, entering.unsqueeze(2))
    return h.view(B, n * C, D)[:, :T]


class _DiagonalRecurrence(torch.autograd.Function):
    """The scan forward; backward, the same scan run backwards in time, so autograd records nothing
    per step: the gradient reaching h_t is g_t = dh_t + exp(a_{t+1}) g_{t+1}, and then
    dx = g, da_t = g_t exp(a_t) h_{t−1} = g_t (h_t − x_t), dh_0 = g_0 exp(a_0)."""

    @staticmethod
    def forward(ctx, x, a, state, C):
        decay = a.exp()
        h = _scan(x, decay, state, C)
        ctx.save_for_backward(x, decay, h, state)
        ctx.C = C
        return h

    @staticmethod
    def backward(ctx, dh):
        x, decay, h, state = ctx.saved_tensors
        g = _scan(dh.contiguous(), decay, None, ctx.C, reverse=True)
        d_state = None if state is None else g[:, 0] * decay[:, 0]
        return g, g * (h - x), d_state, None


def diagonal_chunk(x, log_decay, state, chunk_size=64):
    """h_t = exp(a_t) ⊙ h_{t−1} + x_t for x, log_decay [B, T, D]; returns (h, h_T)."""
    if x.shape[1] == 0:
        return x, state
    h = _DiagonalRecurrence.apply(x, log_decay, state, max(2, chunk_size))
    return h, h[:, -1]


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


def assign_sinks(k, v, key_valid, sink_k, sink_v, sink_valid):
    """The segment's sinks: its valid keys while sink slots are free, each into slot (filled + valid keys
    before it). Returns the new slots (keys, values, valid), the position each new sink appears at
    (−1 for the cached ones: visible to every query) and which keys are sinks."""
    B, T = key_valid.shape
    S = sink_k.shape[1]
    filled = sink_valid.sum(1, keepdim=True)
    slot = filled + key_valid.long().cumsum(1) - key_valid.long()
    is_sink = key_valid & (slot < S)
    target = torch.where(is_sink, slot, torch.full_like(slot, S))  # S: a slot thrown away
    place = lambda buffer, x: torch.cat([buffer, buffer.new_zeros(B, 1, *buffer.shape[2:])], 1).scatter(
        1, target.view(B, T, 1, 1).expand(-1, -1, *x.shape[2:]), x)[:, :S]
    since = torch.full((B, S + 1), -1, dtype=torch.long, device=k.device).scatter(
        1, target, torch.arange(T, device=k.device).expand(B, T))[:, :S]
    sink_valid = torch.arange(S, device=k.device) < (filled + is_sink.sum(1, keepdim=True))
    return place(sink_k, k), place(sink_v, v), sink_valid, since, is_sink


def window_sink_chunk(q, k, v, key_valid, scale, state, chunk_size=64):
    """`window_chunk` with attention sinks and key validity (see naive.window_sink_step), in query blocks.

    Each block attends over the S sink slots ‖ its span of C + W − 1 keys. The segment's own sinks
    are written into free slots (assign_sinks), each visible from its own position on; cached sinks
    are visible to every query; sinks and padding are not window keys, so nothing counts twice.
    """
    cache_k, cache_v, valid, sink_k, sink_v, sink_valid = state
    B, T, H, K = q.shape
    Hk, S, P = k.shape[2], sink_k.shape[1], cache_k.shape[1]
    sink_k, sink_v, sink_valid, since, is_sink = assign_sinks(k, v, key_valid, sink_k, sink_v, sink_valid)
    C = _chunk_size(T, chunk_size)
    n = -(-T // C)
    span = C + P
    pad = n * C - T
    keys = F.pad(torch.cat([cache_k, k], 1), (0, 0, 0, 0, 0, pad)).unfold(1, span, C)  # [B, n, Hk, K, span]
    values = F.pad(torch.cat([cache_v, v], 1), (0, 0, 0, 0, 0, pad)).unfold(1, span, C)
    ok = F.pad(torch.cat([valid, key_valid & ~is_sink], 1), (0, pad), value=False).unfold(1, span, C)
    pad_query = F.pad(~key_valid, (0, pad), value=True).view(B, n, C)
    i = torch.arange(C, device=q.device).view(C, 1)
    e = torch.arange(span, device=q.device).view(1, span)
    in_window = ((e >= i) & (e <= i + P)).expand(B, n, C, span) & ok.unsqueeze(2)
    own = (e == i + P) & pad_query.unsqueeze(-1)  # a padding query sees its own key (a finite output)
    position = torch.arange(n, device=q.device).view(n, 1) * C + i.view(1, C)  # [n, C] in the segment
    sees_sink = sink_valid[:, None, None, :] & (since[:, None, None, :] <= position[None, :, :, None])
    mask = torch.cat([sees_sink, in_window | own], -1)  # [B, n, C, S + span]
    keys = torch.cat([sink_k.unsqueeze(1).expand(B, n, S, Hk, K).permute(0, 1, 3, 4, 2), keys], -1)
    values = torch.cat([sink_v.unsqueeze(1).expand(B, n, S, Hk, v.shape[-1]).permute(0, 1, 3, 4, 2), values], -1)
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B * n, C, H, K).transpose(1, 2)
    o = F.scaled_dot_product_attention(qb, keys.flatten(0, 1).transpose(-1, -2), values.flatten(0, 1).transpose(-1, -2),
                                       attn_mask=mask.reshape(B * n, 1, C, S + span), scale=scale,
                                       enable_gqa=Hk != H)
    o = o.transpose(1, 2).reshape(B, n * C, H, -1)
    return o[:, :T], None
