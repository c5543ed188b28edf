"""Titans' attention parts: persistent memory, sliding-window attention (MAG, MAL) and MAC's
attention inside a segment.

Persistent memory (paper eq. 19, x̃ = P ‖ x) is N_p learned tokens that every query sees first.
In one attention layer a prepended input-independent token contributes only its key and value,
so the tokens go through the layer's own k/v projections (without RoPE) and join every query's keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rows import write_slots


def rotary(x, position_ids, theta):
    """RoPE (rotate-half) on x [B, T, H, K] at positions [B, T]."""
    return rotate(x, rotary_angles(position_ids, x.shape[-1], theta))


def rotate(x, angles):
    """x [B, T, H, K] rotated by `angles` = (cos, sin) from rotary_angles (shared by tensors at the same positions)."""
    K, (cos, sin) = x.shape[-1], angles
    half = torch.cat([-x[..., K // 2:], x[..., :K // 2]], -1)
    return x * cos.to(x.dtype) + half * sin.to(x.dtype)


def rotary_angles(position_ids, dim, theta):
    """cos and sin [B, T, 1, dim] of RoPE at positions [B, T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], -1)[:, :, None]
    return emb.cos(), emb.sin()


def _softmax_read(scores, values):
    """softmax over the key axis (float32 or wider), then the weighted values: scores [..., q, s], values [..., s, V]."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(values.dtype) @ values


def window_attention(q, k, v, valid, window, prefix_k, prefix_v, cache=None, scale=None):
    """Each query attends to the persistent keys and the last `window` keys (itself included).

    q, k, v [B, T, H, K]; valid [B, T] bool (pad keys are never seen; a query always sees itself, so
    pad rows stay finite); prefix_k/v [N_p, H, K]; cache = (keys [B, W−1, H, K], values, valid [B, W−1])
    of the tokens before. Queries go in blocks of up to `window`, each against its W − 1 + block keys.
    Returns (out [B, T, H, K], the new cache).
    """
    B, T, H, K = q.shape
    P, scale = window - 1, scale or K ** -0.5
    if cache is None:
        cache = (k.new_zeros(B, P, H, K), v.new_zeros(B, P, H, v.shape[-1]),
                 torch.zeros(B, P, dtype=torch.bool, device=q.device))
    keys, values = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
    seen = torch.cat([cache[2], valid], 1)
    if T == 0:
        return q.new_zeros(B, 0, H, v.shape[-1]), (keys, values, seen)
    block = max(1, min(window, T))
    n = math.ceil(T / block)
    grow = n * block - T
    span = block + P
    qb = F.pad(q, (0, 0, 0, 0, 0, grow)).view(B, n, block, H, K)
    kb = F.pad(keys, (0, 0, 0, 0, 0, grow)).unfold(1, span, block)  # [B, n, H, K, span]
    vb = F.pad(values, (0, 0, 0, 0, 0, grow)).unfold(1, span, block)
    sb = F.pad(seen, (0, grow)).unfold(1, span, block)  # [B, n, span]
    r = torch.arange(block, device=q.device)[:, None]
    o = torch.arange(span, device=q.device)[None]
    local = (o >= r) & (o <= r + P)  # key o of a block is query r's, or one of its W − 1 before
    mask = (local & sb[:, :, None, None, :]) | (o == r + P)  # [B, n, 1, block, span]
    scores = torch.einsum("bnrhk,bnhks->bnhrs", qb, kb) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    fixed = torch.einsum("bnrhk,phk->bnhrp", qb, prefix_k.to(q.dtype)) * scale
    values_all = torch.cat([prefix_v.to(v.dtype).permute(1, 0, 2).expand(B, n, H, -1, -1),
                            vb.transpose(-1, -2)], -2)  # [B, n, H, N_p + span, V]
    out = _softmax_read(torch.cat([fixed, scores], -1), values_all)  # [B, n, H, block, V]
    out = out.permute(0, 1, 3, 2, 4).reshape(B, n * block, H, -1)[:, :T]
    return out, (keys[:, T:], values[:, T:], seen[:, T:])


class WindowAttention(nn.Module):
    """Sliding-window attention with persistent memory and RoPE (MAG's and MAL's attention)."""

    def __init__(self, config):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim, self.window, self.rope_theta = H, D // H, config.attention_window_size, config.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.persistent = nn.Parameter(torch.zeros(config.num_persistent_tokens, D))

    def prefix(self):
        return (self.k_proj(self.persistent).unflatten(-1, (self.num_heads, -1)),
                self.v_proj(self.persistent).unflatten(-1, (self.num_heads, -1)))

    def forward(self, x, position_ids, keep=None, states=None):
        B, T, _ = x.shape
        q, k, v = (p(x).unflatten(-1, (self.num_heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotary(q, position_ids, self.rope_theta), rotary(k, position_ids, self.rope_theta)
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if keep is None else keep
        out, cache = window_attention(q, k, v, valid, self.window, *self.prefix(),
                                      None if states is None else states.get("window"))
        if states is not None:
            states["window"] = cache
        return self.o_proj(out.flatten(-2))


class SegmentAttention(nn.Module):
    """MAC's attention (eqs. 22–23) over persistent ‖ retrieved h ‖ segment, causal over both: query i
    sees h_j and x_j for j ≤ i only (h_j is read with x_j's query, so a later h_j would leak x_j)."""

    def __init__(self, config):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.rope_theta = H, config.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.persistent = nn.Parameter(torch.zeros(config.num_persistent_tokens, D))

    def _project(self, x, h, positions):
        """q of x, and k, v of h and of x, at in-segment positions [B, c]: q [B, c, H, K] and
        (k_h, k_x, v_h, v_x) [B, H, c, K]."""
        c = x.shape[1]
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))  # noqa: E731
        angles = rotary_angles(positions, self.q_proj.out_features // self.num_heads, self.rope_theta)
        q = rotate(heads(self.q_proj(x)), angles)
        tokens = torch.cat([h, x], 1)
        k = rotate(heads(self.k_proj(tokens)), tuple(t.repeat(1, 2, 1, 1) for t in angles))
        k, v = k.transpose(1, 2), heads(self.v_proj(tokens)).transpose(1, 2)
        return q, (k[:, :, :c], k[:, :, c:], v[:, :, :c], v[:, :, c:])

    def persistent_kv(self, batch: int, dtype):
        """The persistent tokens' keys and values [batch, H, N_p, K]."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(0, 1)  # noqa: E731  [H, N_p, K]
        return tuple(heads(p(self.persistent)).to(dtype).expand(batch, -1, -1, -1) for p in (self.k_proj, self.v_proj))

    def forward(self, x, h, valid):
        """x, h [B, c, D] (the segment and its reads, from the segment start); valid [B, c] bool.
        Returns the output [B, c, D] and the keys and values (k_h, k_x, v_h, v_x) [B, H, c, K]."""
        B, c, _ = x.shape
        q, kv = self._project(x, h, torch.arange(c, device=x.device).expand(B, c))
        i, j = torch.arange(c, device=x.device)[:, None], torch.arange(c, device=x.device)[None]
        seen = ((j <= i) & valid[:, None, :]) | (j == i)  # [B, c, c]
        pk, pv = self.persistent_kv(B, q.dtype)
        keys, values = torch.cat([pk, kv[0], kv[1]], 2), torch.cat([pv, kv[2], kv[3]], 2)
        mask = torch.cat([seen.new_ones(B, c, pk.shape[2]), seen, seen], -1)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)  # keeps no scores
        return self.o_proj(out.transpose(1, 2).flatten(-2)), kv

    def step(self, x, h, position, cache):
        """One token per row: x, h [B, 1, D] at in-segment `position` [B]. cache = (keys, values)
        [B, H, N_p + 2C, K]: the persistent tokens', then slot N_p + j holds h_j's and N_p + C + j x_j's,
        the first `position` of each filled; the token's own go in at `position` (in place) and it
        attends to every filled slot."""
        q, (k_h, k_x, v_h, v_x) = self._project(x, h, position[:, None])
        keys, values = cache
        P = self.persistent.shape[0]
        C = (keys.shape[2] - P) // 2
        slots = torch.stack([P + position, P + C + position], 1)  # [B, 2]
        keys, values = write_slots((keys, values), slots, (torch.cat([k_h, k_x], 2).transpose(1, 2),
                                                           torch.cat([v_h, v_x], 2).transpose(1, 2)), dim=2)
        j = torch.arange(keys.shape[2], device=x.device)
        seen = (j < P) | ((j - P) % C <= position[:, None])  # [B, N_p + 2C]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=seen[:, None, None])
        return self.o_proj(out.transpose(1, 2).flatten(-2)), (keys, values)
