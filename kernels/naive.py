"""The recurrences as written in the papers: one step at a time.

Each `*_step` function advances the state by one token; the models decode with them. Each
`*_naive` function is a plain loop over those steps: slow, obviously right, and the oracle that
every faster path is tested against (in float64).

Shapes per step: q, k, r, log_decay [B, H, K]; v [B, H, V]; state [B, H, K, V].
"""
from __future__ import annotations

import torch


def gla_step(q, k, v, log_decay, state, scale):
    """S = diag(exp(g)) S + kᵀv;  o = scale · q S."""
    state = state * log_decay.exp().unsqueeze(-1) + k.unsqueeze(-1) * v.unsqueeze(-2)
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def scalar_decay_step(q, k, v, log_decay, state, scale):
    """As `gla_step` with one log-decay per head: log_decay [B, H]."""
    state = state * log_decay.exp()[..., None, None] + k.unsqueeze(-1) * v.unsqueeze(-2)
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def rwkv6_step(r, k, v, log_decay, bonus, state):
    """o = r (S + diag(u) kᵀv), read before the update;  S = diag(exp(w)) S + kᵀv."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", r, state + bonus.unsqueeze(-1) * kv)
    return o, state * log_decay.exp().unsqueeze(-1) + kv


def delta_rule_step(q, k, v, beta, log_decay, state, scale):
    """S = exp(g)(I − β kᵀk) S + β kᵀv;  o = scale · q S.  beta, log_decay [B, H]."""
    state = state * log_decay.exp()[..., None, None]
    error = v - torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + (beta.unsqueeze(-1) * k).unsqueeze(-1) * error.unsqueeze(-2)
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def diagonal_step(x, log_decay, state):
    """h = exp(a) ⊙ h + x.  x, log_decay, state [B, D]."""
    state = log_decay.exp() * state + x
    return state, state


def window_step(q, k, v, state, scale):
    """Softmax attention of one query over the cached keys plus its own key.

    q [B, H, K]; k [B, Hk, K]; v [B, Hk, V]; state = (keys [B, W-1, Hk, K], values, valid [B, W-1]).
    Returns the output and the cache shifted by one (a constant-size window).
    """
    keys, values, valid = state
    keys = torch.cat([keys, k.unsqueeze(1)], 1)
    values = torch.cat([values, v.unsqueeze(1)], 1)
    valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], 1)
    B, H, K = q.shape
    Hk = k.shape[1]
    qg = q.view(B, Hk, H // Hk, K)
    scores = torch.einsum("bgqk,bwgk->bgqw", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bgqw,bwgv->bgqv", scores.softmax(-1), values).reshape(B, H, -1)
    return o, (keys[:, 1:], values[:, 1:], valid[:, 1:])


def _loop(step, per_step, state, *extra):
    outs = []
    # unbind rather than x[:, t]: the backward of T indexings would build T full-size gradients
    for inputs_t in zip(*(x.unbind(1) for x in per_step)):
        o, state = step(*inputs_t, state, *extra)
        outs.append(o)
    return torch.stack(outs, 1), state


def gla_naive(q, k, v, log_decay, scale, state):
    return _loop(gla_step, (q, k, v, log_decay), state, scale)


def scalar_decay_naive(q, k, v, log_decay, scale, state):
    return _loop(scalar_decay_step, (q, k, v, log_decay), state, scale)


def rwkv6_naive(r, k, v, log_decay, bonus, state):
    def step(r, k, v, w, state):
        return rwkv6_step(r, k, v, w, bonus, state)

    return _loop(step, (r, k, v, log_decay), state)


def delta_rule_naive(q, k, v, beta, log_decay, scale, state):
    return _loop(delta_rule_step, (q, k, v, beta, log_decay), state, scale)


def diagonal_naive(x, log_decay, state):
    return _loop(diagonal_step, (x, log_decay), state)


def window_naive(q, k, v, scale, state):
    return _loop(window_step, (q, k, v), state, scale)


def window_sink_step(q, k, v, valid_t, state, scale):
    """`window_step` with attention sinks and key validity (StreamingLLM / LoLA sinks).

    valid_t [B] bool: whether this token's key may be attended to (False for padding). The first S
    valid keys of a sequence are its sinks: every later query sees them, besides its window, and
    they are kept apart so a key is never counted twice. A query always sees its own key (a padding
    query then has a finite output, which nothing reads). state = (keys [B, W−1, Hk, K], values,
    valid [B, W−1] — window keys that are neither padding nor sinks —, sink_keys [B, S, Hk, K],
    sink_values, sink_valid [B, S]).
    """
    keys, values, valid, sink_k, sink_v, sink_valid = state
    S = sink_k.shape[1]
    filled = sink_valid.sum(1)
    is_sink = valid_t & (filled < S)
    slot = (torch.arange(S, device=q.device) == filled.unsqueeze(1)) & is_sink.unsqueeze(1)  # [B, S]
    sink_k = torch.where(slot[..., None, None], k.unsqueeze(1), sink_k)
    sink_v = torch.where(slot[..., None, None], v.unsqueeze(1), sink_v)
    sink_valid = sink_valid | slot
    keys = torch.cat([keys, k.unsqueeze(1)], 1)
    values = torch.cat([values, v.unsqueeze(1)], 1)
    own = valid.new_ones(valid.shape[0], 1)
    seen = torch.cat([sink_valid, valid, own & ~is_sink.unsqueeze(1)], 1)  # (a sink is seen through its slot)
    B, H, K = q.shape
    Hk = k.shape[1]
    qg = q.view(B, Hk, H // Hk, K)
    all_k, all_v = torch.cat([sink_k, keys], 1), torch.cat([sink_v, values], 1)
    scores = torch.einsum("bgqk,bwgk->bgqw", qg, all_k) * scale
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    o = torch.einsum("bgqw,bwgv->bgqv", scores.softmax(-1), all_v).reshape(B, H, -1)
    valid = torch.cat([valid, (valid_t & ~is_sink).unsqueeze(1)], 1)
    return o, (keys[:, 1:], values[:, 1:], valid[:, 1:], sink_k, sink_v, sink_valid)


def window_sink_naive(q, k, v, key_valid, scale, state):
    def step(q, k, v, valid_t, state):
        return window_sink_step(q, k, v, valid_t, state, scale)

    return _loop(step, (q, k, v, key_valid), state)
