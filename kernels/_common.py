"""Shared plumbing for the kernels: input checks, compute dtype, impl choice, packed batches."""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

IMPLS = ("auto", "naive", "chunk", "triton")
STEP_IMPLS = ("auto", "naive", "triton")
_NOTICES: set[str] = set()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Decays, their sums and states are kept in float32 (float64 when the inputs are)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    try:
        import fla.ops  # noqa: F401  (slow: only tried when a CUDA tensor asks for the GPU path)
    except Exception:
        return False
    return True


def resolve_impl(impl: str, x: torch.Tensor, needs_fla: bool = True) -> str:
    """`auto`: GPU kernels for CUDA tensors, the chunkwise form elsewhere, one plain step for T == 1.

    `needs_fla=False` for our own Triton kernels, which need only triton.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if x.is_cuda and (not needs_fla or fla_available()):
            return "triton"
        return "naive" if x.shape[1] == 1 else "chunk"
    if impl == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for our own Triton kernels)")
    return impl


def resolve_step_impl(impl: str, x: torch.Tensor, needs_fla: bool = True) -> str:
    """For the `*_step` functions: `auto` is fla's fused recurrent kernel (at T = 1) for CUDA tensors,
    the PyTorch step elsewhere. There is no chunk form of one step."""
    if impl not in STEP_IMPLS:
        raise ValueError(f"impl must be one of {STEP_IMPLS} for a single step, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and (not needs_fla or fla_available()) else "naive"
    if impl == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    return impl


def fallback_notice(key: str, message: str) -> None:
    """Warns the first time (per process) that a path could not serve a call and another one did,
    rather than switching silently; later calls stay quiet (decoding would repeat it every token)."""
    if key not in _NOTICES:
        _NOTICES.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` holds ints or None (any size) for each dimension."""
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")


def check_varlen(cu_seqlens: torch.Tensor | None, batch: int, total: int) -> int:
    """Returns the number of sequences N (the batch size when not packed)."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (sequences concatenated along time), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [0, end_1, ..., T] of at least two entries")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {c}")
    return len(c) - 1


def pack_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] packed -> [N, Lmax, ...], each sequence left-aligned and padded at its end."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = x[0].split(lengths)
    lmax = max(lengths) if lengths else 0
    rows = [F.pad(p, (0, 0) * (p.dim() - 1) + (0, lmax - p.shape[0])) for p in parts]
    return torch.stack(rows)


def padded_to_pack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_to_padded`: [N, Lmax, ...] -> [1, T, ...]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.cat([row[:n] for row, n in zip(x, lengths)]).unsqueeze(0)


def run_varlen(fn, inputs: list, cu_seqlens):
    """Runs `fn(*inputs) -> (out, state)` on a packed batch by padding it into [N, Lmax].

    Pads are zeros at the end of each sequence, and zeros are inert for every recurrence here
    (no input, log-decay 0, β 0), so the state after the pads is the state at the sequence's end.
    """
    if cu_seqlens is None:
        return fn(*inputs)
    out, state = fn(*(pack_to_padded(x, cu_seqlens) for x in inputs))
    return padded_to_pack(out, cu_seqlens), state
