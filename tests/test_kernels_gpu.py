"""The GPU path (fla's Triton kernels, our RG-LRU kernel) against the chunkwise PyTorch path.

Needs CUDA: skipped on CPU with the reason printed. Run on a lent GPU with
`.venv/bin/python -m pytest tests/test_kernels_gpu.py -v`.
"""
import warnings

import pytest
import torch

from recur.kernels import _common
from recur.kernels.cases import NAMES, make_case, step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _to(obj, device, dtype=None):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype if dtype is not None and obj.is_floating_point() else obj.dtype)
    if isinstance(obj, tuple):
        return tuple(_to(x, device, dtype) for x in obj)
    if isinstance(obj, dict):
        return {n: _to(x, device, dtype) for n, x in obj.items()}
    return obj


def _rel_rms(a, b):
    """fla's measure: RMS of the difference over RMS of the reference."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_triton_matches_chunk(name, packed, dtype, ratio):
    case = make_case(name, B=1 if packed else 2, T=1000, H=4, K=64, V=64, dtype=torch.float32, window=128)
    cu = torch.tensor([0, 100, 163, 640, 1000], device="cuda") if packed else None
    inputs = _to(case.inputs, "cuda", dtype)
    kwargs = _to(case.kwargs, "cuda")
    # No cache for the window: fla's parallel_attn takes none, and with one the triton path would
    # fall back to chunk and compare chunk with chunk (test_window_with_cache_matches_chunk).
    if packed or name == "sliding_window_attention":
        state = None
    else:
        state = _to(case.state, "cuda")
    outs = {}
    for impl in ["chunk", "triton"]:
        leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
        o, final = case.fn(*leaves.values(), **kwargs, initial_state=state, output_final_state=True,
                           cu_seqlens=cu, impl=impl)
        o.float().pow(2).sum().backward()
        outs[impl] = [o] + [leaves[n].grad for n in leaves] + ([final] if isinstance(final, torch.Tensor) else [])
    for a, b in zip(outs["triton"], outs["chunk"]):
        assert _rel_rms(a, b) < ratio, f"{name}: relative RMS {_rel_rms(a, b):.2e}"


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
def test_window_with_cache_matches_chunk(dtype, ratio, monkeypatch):
    """With a cache the triton path runs the chunk path, says so once, and still matches the loop."""
    monkeypatch.setattr(_common, "_NOTICES", set())
    case = make_case("sliding_window_attention", B=2, T=300, H=4, K=64, V=64, dtype=torch.float32, window=128)
    inputs, state = _to(case.inputs, "cuda", dtype), _to(case.state, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, final = case("triton", inputs=inputs, state=state)
        case("triton", inputs=inputs, state=state)
    assert len(caught) == 1
    ref, ref_final = case("naive", inputs=inputs, state=state)
    assert _rel_rms(o, ref) < ratio
    for a, b in zip(final, ref_final):
        assert torch.equal(a, b)


FUSED_RECURRENT = [n for n in NAMES if n != "sliding_window_attention"]  # fla has no window decoding kernel


@pytest.mark.parametrize("name", FUSED_RECURRENT)
def test_fused_recurrent_step_matches_pytorch_step(name):
    """Each *_step on CUDA (fla's fused recurrent kernel at T = 1) against the PyTorch step, four chained steps."""
    case = make_case(name, B=2, T=4, H=4, K=64, V=64, dtype=torch.float32)
    inputs, kwargs = _to(case.inputs, "cuda"), _to(case.kwargs, "cuda")
    case.kwargs = kwargs
    results = {}
    for impl in ["naive", "triton"]:
        state, outs = _to(case.state, "cuda"), []
        for t in range(4):
            o, state = step(case, {n: x[:, t].contiguous() for n, x in inputs.items()}, state, impl=impl)
            outs.append(o)
        results[impl] = outs + [state]
    assert _common.resolve_step_impl("auto", inputs[next(iter(inputs))]) == "triton"
    for a, b in zip(results["triton"], results["naive"]):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert _rel_rms(a, b) < 5e-3, f"{name}: relative RMS {_rel_rms(a, b):.2e}"
