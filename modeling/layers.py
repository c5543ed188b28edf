"""Building blocks shared by the recur model families, each written once.

Normalisations compute in float32 whatever the input dtype. The sequence layers (short causal
convolution, token shift) take `position_ids` that restart at 0 at every document start, so a
packed row of several documents never mixes them, and a `state` (the last inputs) so that
prefill can be chunked and decoding goes one token at a time with constant memory.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or wider when x already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / rms(x) · (offset + weight). offset = 1 with a zero-initialised weight is Griffin's form."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _wide(self.weight) + self.offset if self.offset else _wide(self.weight)
        return F.rms_norm(_wide(x), (x.shape[-1],), weight, self.eps).to(x.dtype)  # one fused op


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a SiLU gate z, over groups of `group_size` channels.

    norm_before_gate=True: rmsnorm(x) · silu(z) (GLA's output norm);
    False: rmsnorm(x · silu(z)) (Mamba-2's, per group).
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = True):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide dim {dim}")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, gate = _wide(x), F.silu(_wide(z))
        if not self.norm_before_gate:
            y = y * gate
        y = F.rms_norm(y.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps).flatten(-2)
        y = y * _wide(self.weight)
        if self.norm_before_gate:
            y = y * gate
        return y.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), the names fla and Llama use."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _with_history(x: torch.Tensor, state: torch.Tensor | None, width: int) -> torch.Tensor:
    """[B, T, D] with the `width` inputs before it prepended (the state, or zeros)."""
    if state is None:
        return F.pad(x, (0, 0, width, 0))
    return torch.cat([state.to(x.dtype), x], 1)


def _may_look_back(position_ids: torch.Tensor | None, steps: int, like: torch.Tensor) -> torch.Tensor | float:
    """1 where the token `steps` back belongs to the same document (its position is ≥ steps), else 0."""
    if position_ids is None:
        return 1.0
    return (position_ids >= steps).unsqueeze(-1).to(like.dtype)


class _CausalTaps(torch.autograd.Function):
    """y_t = bias + Σ_i w_i ⊙ m_i,t · x_{t−i} over `full` = [K−1 inputs before | x] ([B, K−1+T, D]),
    weight [D, K] (weight[:, K−1] multiplies the current token), masks [K−1, B, T, 1] (m_i: the token i
    back is in the same document) or None. The backward is written out because autograd's through the
    shifted slices makes a zero-filled full-size copy per tap: this one is about 1.8x faster."""

    @staticmethod
    def forward(ctx, full, weight, bias, masks):
        K = weight.shape[1]
        T = full.shape[1] - (K - 1)
        current = full[:, K - 1:]
        y = current * weight[:, K - 1] if bias is None else torch.addcmul(bias, current, weight[:, K - 1])
        for back in range(1, K):
            earlier = full[:, K - 1 - back:K - 1 - back + T]
            y = torch.addcmul(y, earlier if masks is None else earlier * masks[back - 1], weight[:, K - 1 - back])
        ctx.save_for_backward(full, weight, masks)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        full, weight, masks = ctx.saved_tensors
        K = weight.shape[1]
        T = full.shape[1] - (K - 1)
        d_full = torch.empty_like(full) if ctx.needs_input_grad[0] else None
        d_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        if d_full is not None:
            torch.mul(grad, weight[:, K - 1], out=d_full[:, K - 1:])
            d_full[:, :K - 1].zero_()
        if d_weight is not None:
            d_weight[:, K - 1] = (grad * full[:, K - 1:]).sum((0, 1))
        for back in range(1, K):
            g = grad if masks is None else grad * masks[back - 1]
            earlier = slice(K - 1 - back, K - 1 - back + T)
            if d_full is not None:
                d_full[:, earlier].addcmul_(g, weight[:, K - 1 - back])
            if d_weight is not None:
                d_weight[:, K - 1 - back] = (g * full[:, earlier]).sum((0, 1))
        d_bias = grad.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_full, d_weight, d_bias, None


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time (Mamba-2's conv1d, fla's ShortConvolution).

    forward(x [B, T, D], position_ids, state [B, K−1, D]) -> (y, new_state): y_t = Σ_i w_i x_{t−i}
    over the same document only, then the activation; the state is the last K−1 inputs.
    position_ids (restarting at 0 at each document) are needed only where a row holds more than one
    document or pads (`document_positions`); without them a row is one sequence.
    Weights are laid out as nn.Conv1d's ([D, 1, K]) so official checkpoints load as they are.
    """

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True, activation: str | None = "silu"):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=bias, padding=kernel_size - 1)
        self.activation = activation

    def forward(self, x, position_ids=None, state=None):
        K, T = self.kernel_size, x.shape[1]
        full = _with_history(x, state, K - 1)
        weight = self.conv.weight[:, 0, :].to(x.dtype)  # [D, K]; weight[:, K-1] multiplies the current token
        bias = None if self.conv.bias is None else self.conv.bias.to(x.dtype)
        if T == 1 and position_ids is None:  # decoding: one weighted sum over the window
            y = (full * weight.t()).sum(1, keepdim=True)
            y = y if bias is None else y + bias
        else:
            masks = None
            if position_ids is not None and K > 1:
                masks = torch.stack([_may_look_back(position_ids, back, x) for back in range(1, K)])
            y = _CausalTaps.apply(full, weight, bias, masks)
        if self.activation == "silu":
            y = F.silu(y)
        window = full[:, -(K - 1):] if K > 1 else full[:, :0]
        return y, window.clone(memory_format=torch.contiguous_format)  # one layout after any call (compiled steps)


def document_positions(position_ids: torch.Tensor, pad, cu_seqlens) -> torch.Tensor | None:
    """The position_ids a sequence layer must respect to keep documents apart: only where a row holds
    pads or packed documents (a Layout's pad or cu_seqlens); otherwise None, each row being one sequence
    whose history is the state or zeros, which spares the per-token masks."""
    return position_ids if pad is not None or cu_seqlens is not None else None


def token_shift(x: torch.Tensor, position_ids=None, state=None):
    """RWKV's shift: the previous token of the same document (0 at a document start).

    x [B, T, D]; state [B, 1, D] = the token before x. Returns (shifted, new_state).
    """
    full = _with_history(x, state, 1)
    return full[:, :-1] * _may_look_back(position_ids, 1, x), full[:, -1:]
