"""The GPU path (fla's Triton kernels, our RG-LRU kernel) against the chunkwise PyTorch path.

Needs CUDA: skipped on CPU with the reason printed. Run on a lent GPU with
`.venv/bin/python -m pytest tests/test_kernels_gpu.py -v`.
"""
import pytest
import torch

from recur.kernels.cases import NAMES, make_case

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
    if packed:
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
