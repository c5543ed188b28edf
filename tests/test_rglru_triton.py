"""Tests for the fused RG-LRU Triton kernel (recur.kernels.rglru_triton).

Every check compares the kernel with a plain sequential float64 loop (autograd supplies its
gradients). On CPU the kernel runs in Triton's interpreter, which must be switched on before triton
is imported; the pytest process may already have imported triton, so this file re-runs itself as
a script with TRITON_INTERPRET=1 and does all interpreter cases in that one process (one import).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# transformers' RecurrentGemma _MAX_SQRT_GRADIENT: the kernel bounds d sqrt(z) / dz the same way.
MAX_SQRT_GRADIENT = 1000.0

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# name -> (T, D, reset, initial_state, output_final_state, extra options for _errors)
CASES = {
    f"T{T}-D{D}{'-reset' if reset else ''}{'-h0' if h0 else ''}": (T, D, reset, h0, True, {})
    for T in (1, 7, 33)
    for D in (5, 40)
    for reset in (False, True)
    for h0 in (False, True)
}
CASES["no-final-state"] = (7, 40, True, True, False, {})
CASES["c=4"] = (7, 40, True, True, True, {"c": 4.0})
# softplus(-20) ~ 2e-9, so 1 - a^2 < 2.5e-7 everywhere: the forward needs the accurate expm1 form
# and the backward's sqrt-derivative bound is active.
CASES["sqrt-bound"] = (7, 40, True, True, True, {"a_param": -20.0})
CASES["bf16"] = (7, 40, True, True, True, {"dtype": torch.bfloat16})


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt with RecurrentGemma's clipped gradient, 1 / sqrt(max(4 z, 1 / MAX_SQRT_GRADIENT**2))."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad / (4 * z).clamp_min(1 / MAX_SQRT_GRADIENT**2).sqrt()


def rg_lru_loop(x, gate_a, gate_x, a_param, c, reset, initial_state):
    """The RG-LRU step by step, straight from the definition; returns (y, final state)."""
    B, T, D = x.shape
    h = initial_state if initial_state is not None else x.new_zeros(B, D)
    ys = []
    for t in range(T):
        log_a = -c * F.softplus(a_param) * torch.sigmoid(gate_a[:, t])
        a = log_a.exp()
        mult = SqrtBoundDerivative.apply(-torch.expm1(2 * log_a))
        if reset is not None:
            r = reset[:, t, None]
            a = torch.where(r, 0.0, a)
            mult = torch.where(r, 1.0, mult)
        h = a * h + mult * torch.sigmoid(gate_x[:, t]) * x[:, t]
        ys.append(h)
    return torch.stack(ys, dim=1), h


def _errors(T, D, use_reset, use_h0, output_final_state, *, B=2, c=8.0, dtype=torch.float32, a_param=None,
            device="cpu", seed=0):
    """Max |kernel - loop| / max |loop| for the outputs and the gradients of every input."""
    from recur.kernels.rglru_triton import rg_lru_triton

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = {
        "x": randn(B, T, D, dtype=dtype),
        "gate_a": randn(B, T, D, dtype=dtype),
        "gate_x": randn(B, T, D, dtype=dtype),
        "a_param": randn(D) if a_param is None else torch.full((D,), a_param, device=device),
    }
    if use_h0:
        inputs["initial_state"] = randn(B, D)
    reset = None
    if use_reset:
        reset = (torch.rand(B, T, generator=gen) < 0.25).to(device)
        reset[0, 0], reset[1, 0] = True, False  # row 0 drops its initial state, row 1 keeps it
    dy, dht = randn(B, T, D), randn(B, D)

    def run(fn, inputs):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, ht = fn(**leaves)
        loss = (y.double() * dy).sum()
        if output_final_state:
            loss = loss + (ht.double() * dht).sum()
        loss.backward()
        out = {"y": y, **{f"d_{k}": v.grad for k, v in leaves.items()}}
        if output_final_state:
            out["final_state"] = ht
        return out

    got = run(
        lambda **kw: rg_lru_triton(**kw, c=c, reset=reset, output_final_state=output_final_state), inputs
    )
    want = run(
        lambda initial_state=None, **kw: rg_lru_loop(**kw, c=c, reset=reset, initial_state=initial_state),
        {k: v.double() for k, v in inputs.items()},
    )
    assert got.keys() == want.keys()
    if not output_final_state:
        assert rg_lru_triton(**inputs, c=c, reset=reset)[1] is None
    return {
        k: ((got[k].double() - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)).item() for k in want
    }


@pytest.fixture(scope="module")
def interpreter_errors():
    proc = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the Triton interpreter in a subprocess, every case
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_loop(case, interpreter_errors):
    tol = TOLERANCE[CASES[case][5].get("dtype", torch.float32)]
    errors = interpreter_errors[case]
    assert {k: e for k, e in errors.items() if not e <= tol} == {}, errors


def test_cpu_without_interpreter_raises(monkeypatch):
    import recur.kernels.rglru_triton as rglru

    monkeypatch.setattr(rglru, "_INTERPRET", False)
    x = torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rglru.rg_lru_triton(x, x, x, torch.randn(4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_loop(dtype):
    errors = _errors(1000, 256, True, True, True, dtype=dtype, device="cuda")
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    assert {k: e for k, e in errors.items() if not e <= tol} == {}, errors


if __name__ == "__main__":
    # Interpreter run (started by the interpreter_errors fixture): one JSON line of errors per case.
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, (T, D, use_reset, use_h0, final, options) in CASES.items():
        results[name] = _errors(T, D, use_reset, use_h0, final, **options)
        print(name, results[name], file=sys.stderr)
    print(json.dumps(results))
