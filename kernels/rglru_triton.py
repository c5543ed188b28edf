"""Fused RG-LRU (Griffin / RecurrentGemma Real-Gated Linear Recurrent Unit) in Triton, forward and backward.

Per batch row b, channel d and time t (all math in float32)::

    r_t = sigmoid(gate_a_t)                 i_t = sigmoid(gate_x_t)
    log_a_t = -c * softplus(a_param) * r_t  a_t = exp(log_a_t)
    mult_t = sqrt(1 - a_t**2)               (mult_t = 1 and h_{t-1} = 0 where reset_t)
    h_t = a_t * h_{t-1} + mult_t * i_t * x_t,   y_t = h_t,   h_{-1} = initial_state or 0

The reference implementation (transformers' RecurrentGemma) materialises every gate as a [B, T, D]
tensor and steps through time from Python. Here one program owns a (batch row, block of channels)
pair and runs the whole time loop on-chip with the gate math fused in, so the forward reads x and
the two gate logits once and writes y once. The backward is the reverse-time scan of the same
recurrence; it recomputes the gates from the saved inputs and takes h_{t-1} from the saved output
y, so nothing beyond the inputs and the output is kept for it (for bf16 / fp16 inputs that h_{t-1}
is the rounded output; keeping it exact would cost an extra float32 [B, T, D] tensor).
"""

import os

import torch
import torch.nn.functional as F
try:  # (inside try, so transformers' remote-code check does not demand triton on CPU-only machines)
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("the fused RG-LRU kernel needs triton (it ships with CUDA builds of torch)") from e

# triton.jit chooses between interpreter and compiler when a kernel is decorated, i.e. when this
# module is imported, so this is the mode the kernels below actually run in.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _one_minus_exp(v):
    """1 - exp(v) for v <= 0, accurate to float32 as v -> 0 (i.e. -expm1(v)).

    Computing 1 - exp(v) directly cancels when a -> 1, which is where mult = sqrt(1 - a^2) matters
    most; libdevice's expm1 is not available in the interpreter, so use the degree-8 Taylor series
    (truncation error < 1e-8 relative for |v| < 0.5) there and the direct form, which does not
    cancel, elsewhere.
    """
    s = 1.0 + v * (1.0 / 8.0)
    s = 1.0 + v * (1.0 / 7.0) * s
    s = 1.0 + v * (1.0 / 6.0) * s
    s = 1.0 + v * (1.0 / 5.0) * s
    s = 1.0 + v * (1.0 / 4.0) * s
    s = 1.0 + v * (1.0 / 3.0) * s
    s = 1.0 + v * 0.5 * s
    return tl.where(v > -0.5, -v * s, 1.0 - tl.exp(v))


@triton.jit
def _rglru_fwd_kernel(
    x_ptr, ga_ptr, gx_ptr, sp_ptr, reset_ptr, h0_ptr, y_ptr, ht_ptr,
    T, D, c,
    HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    neg_c_sp = -c * tl.load(sp_ptr + offs_d, mask=mask, other=0.0)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * D + offs_d, mask=mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    # int64 offsets: B * T * D can exceed 2**31.
    off = pid_b.to(tl.int64) * T * D + offs_d
    for t in range(T):
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gx = tl.load(gx_ptr + off, mask=mask, other=0.0).to(tl.float32)
        log_a = neg_c_sp * tl.sigmoid(ga)
        a = tl.exp(log_a)
        mult = tl.sqrt(_one_minus_exp(2.0 * log_a))
        if HAS_RESET:
            rst = tl.load(reset_ptr + pid_b * T + t) != 0
            a = tl.where(rst, 0.0, a)
            mult = tl.where(rst, 1.0, mult)
        h = a * h + mult * (tl.sigmoid(gx) * x)
        tl.store(y_ptr + off, h.to(y_ptr.dtype.element_ty), mask=mask)
        off += D
    if STORE_HT:
        tl.store(ht_ptr + pid_b * D + offs_d, h, mask=mask)


@triton.jit
def _rglru_bwd_kernel(
    x_ptr, ga_ptr, gx_ptr, sp_ptr, reset_ptr, h0_ptr, y_ptr, dy_ptr, dht_ptr,
    dx_ptr, dga_ptr, dgx_ptr, dsp_ptr, dh0_ptr,
    T, D, c,
    HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    neg_c_sp = -c * tl.load(sp_ptr + offs_d, mask=mask, other=0.0)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * D + offs_d, mask=mask, other=0.0)
    else:
        h0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    # dh: dL/dh_t from everything after step t (starts as the final-state gradient).
    if HAS_DHT:
        dh = tl.load(dht_ptr + pid_b * D + offs_d, mask=mask, other=0.0)
    else:
        dh = tl.zeros([BLOCK_D], dtype=tl.float32)
    # sum over t of dL/dlog_a_t * r_t; times -c it is this batch row's part of dL/dsoftplus(a_param).
    dsp = tl.zeros([BLOCK_D], dtype=tl.float32)
    off = (pid_b.to(tl.int64) * T + T - 1) * D + offs_d
    for i in range(T):
        t = T - 1 - i
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gx = tl.load(gx_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dh += tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        # h_{t-1} is the previous step's output, or the initial state at t = 0.
        if t > 0:
            h_prev = tl.load(y_ptr + off - D, mask=mask, other=0.0).to(tl.float32)
        else:
            h_prev = h0

        r = tl.sigmoid(ga)
        i_gate = tl.sigmoid(gx)
        log_a = neg_c_sp * r
        a = tl.exp(log_a)
        z = _one_minus_exp(2.0 * log_a)
        mult = tl.sqrt(z)
        u = i_gate * x
        # d mult / dz is bounded like RecurrentGemma's SqrtBoundDerivative:
        # 1 / sqrt(max(4 z, 1 / _MAX_SQRT_GRADIENT**2)) with _MAX_SQRT_GRADIENT = 1000, so it stays
        # finite (and bf16-friendly) as a -> 1, where the true 1 / (2 sqrt(z)) blows up.
        dz = dh * u / tl.sqrt(tl.maximum(4.0 * z, 1e-6))
        if HAS_RESET:
            rst = tl.load(reset_ptr + pid_b * T + t) != 0
            a = tl.where(rst, 0.0, a)
            mult = tl.where(rst, 1.0, mult)
        # log_a reaches h_t through a (times h_{t-1}) and through z = 1 - exp(2 log_a); at a reset
        # it reaches neither, and the factor a = 0 zeroes both terms.
        dlog_a = a * (dh * h_prev - 2.0 * a * dz)
        du = dh * mult
        tl.store(dx_ptr + off, (du * i_gate).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dgx_ptr + off, (du * x * i_gate * (1.0 - i_gate)).to(dgx_ptr.dtype.element_ty), mask=mask)
        tl.store(dga_ptr + off, (dlog_a * neg_c_sp * r * (1.0 - r)).to(dga_ptr.dtype.element_ty), mask=mask)
        dsp += dlog_a * r
        dh = a * dh
        off -= D
    tl.store(dsp_ptr + pid_b * D + offs_d, -c * dsp, mask=mask)
    if HAS_H0:
        tl.store(dh0_ptr + pid_b * D + offs_d, dh, mask=mask)


# The autotuner times its configs on the device, so it is used only when Triton compiles for a
# real GPU; the interpreter runs one fixed block size. Autotuning only changes BLOCK_D and the warp
# count, and both kernels overwrite all their outputs, so timing reruns are harmless.
if _INTERPRET:
    _fwd_kernel, _bwd_kernel, _block_kwargs = _rglru_fwd_kernel, _rglru_bwd_kernel, {"BLOCK_D": 32}
else:
    _autotune = triton.autotune(
        configs=[
            triton.Config({"BLOCK_D": block}, num_warps=warps)
            for block in (32, 64, 128, 256)
            for warps in (1, 2, 4)
            if block >= 32 * warps
        ],
        key=["D"],
    )
    _fwd_kernel, _bwd_kernel, _block_kwargs = _autotune(_rglru_fwd_kernel), _autotune(_rglru_bwd_kernel), {}


def _grid(B, D):
    return lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))


class _RGLRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_a, gate_x, sp, c, reset, initial_state, output_final_state):
        B, T, D = x.shape
        x, gate_a, gate_x = x.contiguous(), gate_a.contiguous(), gate_x.contiguous()
        reset_u8 = reset.to(torch.uint8).contiguous() if reset is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        y = torch.empty_like(x)
        ht = x.new_empty(B, D, dtype=torch.float32) if output_final_state else None
        # Absent optional tensors are replaced by x: the kernel never touches them (constexpr flags).
        _fwd_kernel[_grid(B, D)](
            x, gate_a, gate_x, sp,
            reset_u8 if reset_u8 is not None else x, h0 if h0 is not None else x, y, ht if ht is not None else x,
            T, D, c,
            HAS_RESET=reset_u8 is not None, HAS_H0=h0 is not None, STORE_HT=ht is not None, **_block_kwargs,
        )
        ctx.save_for_backward(x, gate_a, gate_x, sp, reset_u8, h0, y)
        ctx.c = c
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        x, gate_a, gate_x, sp, reset_u8, h0, y = ctx.saved_tensors
        B, T, D = x.shape
        dy = dy.contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        dx, dga, dgx = torch.empty_like(x), torch.empty_like(gate_a), torch.empty_like(gate_x)
        dsp = x.new_empty(B, D, dtype=torch.float32)  # per-batch-row partials, summed below
        dh0 = torch.empty_like(h0) if h0 is not None else None
        _bwd_kernel[_grid(B, D)](
            x, gate_a, gate_x, sp,
            reset_u8 if reset_u8 is not None else x, h0 if h0 is not None else x, y, dy, dht if dht is not None else x,
            dx, dga, dgx, dsp, dh0 if dh0 is not None else x,
            T, D, ctx.c,
            HAS_RESET=reset_u8 is not None, HAS_H0=h0 is not None, HAS_DHT=dht is not None, **_block_kwargs,
        )
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dx, dga, dgx, dsp.sum(0), None, None, dh0, None


def rg_lru_triton(x, gate_a, gate_x, a_param, c=8.0, reset=None, initial_state=None, output_final_state=False):
    """RG-LRU scan; returns (y, final_state or None).

    x, gate_a, gate_x: [B, T, D] (gate_a / gate_x are the pre-sigmoid gate logits); a_param: [D];
    reset: optional bool [B, T] (True starts a new sequence at t); initial_state: optional [B, D].
    y has x's dtype; final_state is float32 and is returned only if output_final_state.
    """
    if not x.is_cuda and not _INTERPRET:
        raise RuntimeError(
            "rg_lru_triton needs CUDA tensors; to run it on CPU set TRITON_INTERPRET=1 before triton is imported"
        )
    B, T, D = x.shape
    if gate_a.shape != x.shape or gate_x.shape != x.shape:
        raise ValueError(f"x, gate_a, gate_x must share a shape, got {x.shape}, {gate_a.shape}, {gate_x.shape}")
    if a_param.shape != (D,):
        raise ValueError(f"a_param must have shape ({D},), got {tuple(a_param.shape)}")
    if reset is not None and reset.shape != (B, T):
        raise ValueError(f"reset must have shape ({B}, {T}), got {tuple(reset.shape)}")
    if initial_state is not None and initial_state.shape != (B, D):
        raise ValueError(f"initial_state must have shape ({B}, {D}), got {tuple(initial_state.shape)}")
    # softplus(a_param) is per channel only, so torch does it (accurately, with its own autograd)
    # and the kernels take and return d/dsoftplus.
    sp = F.softplus(a_param.float()).contiguous()
    y, final_state = _RGLRUFunction.apply(
        x, gate_a, gate_x, sp, float(c), reset, initial_state, output_final_state
    )
    return y, final_state
