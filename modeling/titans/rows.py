"""Rows as contiguous token streams, for the parts of Titans that count tokens in blocks.

The memory updates every `memory_chunk_size` tokens and MAC works in segments, both counted from the
document start. A batch row may hold pads (left padding) and continue a cache whose open block holds
a different number of tokens per row, so its blocks do not line up with the columns. `realign` moves
each row's cached open-block tokens and its real new tokens to the left of a fresh buffer: block
boundaries are then at the same columns in every row, and the row's `length` says where it ends.
`tail` takes the tokens after each row's last complete block: the next open block, to cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def realign(new: list, keep=None, cached: list | None = None, count=None):
    """new: tensors [B, T, ...]; keep [B, T] bool (False = pad); cached: tensors [B, P, ...] of
    which the first `count` [B] rows are the open block. Returns (aligned tensors [B, P + T, ...],
    lengths [B], index [B, T]: where each new token went), or (new, None, None) if nothing moves."""
    if keep is None and cached is None:
        return new, None, None
    B, T = new[0].shape[:2]
    P = 0 if cached is None else cached[0].shape[1]
    start = torch.zeros(B, dtype=torch.long, device=new[0].device) if cached is None else count.long()
    if keep is None:
        keep = torch.ones(B, T, dtype=torch.bool, device=new[0].device)
    index = torch.where(keep, start[:, None] + keep.long().cumsum(1) - 1, P + T)  # pads go to a spare column
    out = []
    for i, t in enumerate(new):
        buffer = t.new_zeros(B, P + T + 1, *t.shape[2:])
        if P:
            opened = (torch.arange(P, device=t.device) < start[:, None]).view(B, P, *[1] * (t.dim() - 2))
            buffer = torch.cat([torch.where(opened, cached[i].to(t.dtype), 0), buffer[:, P:]], 1)
        spread = index.view(B, T, *[1] * (t.dim() - 2)).expand_as(t)
        out.append(buffer.scatter(1, spread, t)[:, :-1])
    return out, start + keep.sum(1), index


def unalign(out: torch.Tensor, index, keep=None) -> torch.Tensor:
    """The inverse of `realign` for an output [B, P + T, ...]: back to [B, T, ...], zero at pads."""
    if index is None:
        return out
    spread = index.clamp(max=out.shape[1] - 1).view(*index.shape, *[1] * (out.dim() - 2))
    out = out.gather(1, spread.expand(*index.shape, *out.shape[2:]))
    if keep is not None:
        out = torch.where(keep.view(*keep.shape, *[1] * (out.dim() - 2)), out, 0)
    return out


def tail(aligned: list, lengths, block: int, size: int):
    """The tokens after each row's last complete block of `block` tokens, in `size` ≥ block − 1 slots
    (zeros after them). Returns (tensors [B, size, ...], their count [B])."""
    B, L = aligned[0].shape[:2]
    done = lengths // block * block
    index = done[:, None] + torch.arange(size, device=lengths.device)  # [B, size]
    opened = torch.arange(size, device=lengths.device) < (lengths - done)[:, None]
    out = []
    for t in aligned:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, size))
        spread = index.view(B, size, *[1] * (t.dim() - 2)).expand(B, size, *t.shape[2:])
        out.append(torch.where(opened.view(B, size, *[1] * (t.dim() - 2)), t.gather(1, spread), 0))
    return out, lengths - done


def window_before(history, x, ends, size: int):
    """The `size` slots before each row's position `ends` [B] in x [B, T, ...], with the `size`
    slots before x in `history` (zeros when None): a convolution's window at a row's last token."""
    B = x.shape[0]
    if history is None:
        history = x.new_zeros(B, size, *x.shape[2:])
    full = torch.cat([history.to(x.dtype), x], 1)
    index = (ends[:, None] + torch.arange(size, device=x.device)).view(B, size, *[1] * (x.dim() - 2))
    return full.gather(1, index.expand(B, size, *x.shape[2:]))


def write_slots(caches, index, values, dim: int = 1) -> tuple:
    """cache[b, ..., index[b], ...] = value[b] (the slot on `dim`) for every row b and every (cache,
    value) pair, the caches having the same slots (index [B], or [B, n] with values [B, n, ...]): in
    place while decoding (no copy of the cache per token), into new tensors when autograd records."""
    size = caches[0].shape[dim]
    if size == 0:
        return tuple(caches)
    rows = torch.arange(index.shape[0], device=index.device).view(-1, *[1] * (index.dim() - 1)).expand_as(index)
    at = (rows, index.clamp(max=size - 1))
    recording = torch.is_grad_enabled()
    out = []
    for cache, value in zip(caches, values):
        view, value = cache.movedim(dim, 1), value.to(cache.dtype)
        if recording and (cache.requires_grad or value.requires_grad):
            out.append(view.index_put(at, value).movedim(1, dim))
        else:
            view.index_put_(at, value)
            out.append(cache)
    return tuple(out)
