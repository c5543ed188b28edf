"""The kernels against the sequential loop (float64), and their contracts: packed batches,
state hand-over, single-step decoding, dtypes, strong decays and bad input."""
import importlib.util
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from recur import kernels
from recur.kernels import _common
from recur.kernels.cases import NAMES, make_case, step


def _float_leaves(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _float_leaves(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _float_leaves(x)]
    return []


def _with_grad(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.is_floating_point())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_with_grad(x) for x in obj)
    if isinstance(obj, dict):
        return {n: _with_grad(x) for n, x in obj.items()}
    return obj


def run_with_grads(case, impl, inputs=None, state=None, cu_seqlens=None, weights=None, **kw):
    """Output, final state and the gradients of (o·do + state·dstate) w.r.t. every float input.

    `weights` = [do, dstate leaves...]; random (seeded) when not given."""
    inputs = _with_grad(case.inputs if inputs is None else inputs)
    state = _with_grad(state)
    kwargs = _with_grad(case.kwargs)
    leaves = _float_leaves(inputs) + _float_leaves(state) + _float_leaves(kwargs)
    o, final = case.fn(*inputs.values(), **kwargs, initial_state=state, output_final_state=True,
                       cu_seqlens=cu_seqlens, impl=impl, **kw)
    outs = [o] + _float_leaves(final)
    weights = _random_like(outs) if weights is None else weights
    loss = sum((x * w).sum() for x, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [x.detach() for x in outs], [torch.zeros_like(l) if d is None else d for l, d in zip(leaves, grads)]


def _random_like(tensors):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, dtype=x.dtype, generator=g) for x in tensors]


def assert_close(a, b, what, atol=1e-9, rtol=1e-7):
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what}[{i}]: shape {x.shape} vs {y.shape}"
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T,chunk_size", [(1, 64), (63, 64), (64, 64), (65, 64), (65, 16), (1000, 32)])
def test_chunk_matches_loop(name, T, chunk_size):
    """Outputs, final states and all gradients (initial state included), float64, ragged shapes."""
    case = make_case(name, T=T, K=12, V=10)
    ref_out, ref_grad = run_with_grads(case, "naive", state=case.state)
    out, grad = run_with_grads(case, "chunk", state=case.state, chunk_size=chunk_size)
    assert_close(out, ref_out, f"{name} outputs")
    assert_close(grad, ref_grad, f"{name} gradients")


@pytest.mark.parametrize("T,chunk_size,packed", [(1, 64, False), (65, 16, False), (300, 64, False), (100, 32, True)])
def test_grouped_queries_and_keys_equal_the_loop_over_every_head(T, chunk_size, packed):
    """scalar_decay_attention with q, k in G = 2 groups for H = 6 heads (Mamba-2's n_groups): the chunk
    path, which takes what a group shares once, against the loop over q and k repeated to every head:
    outputs, final states and all gradients, float64, ragged and packed."""
    case = make_case("scalar_decay_attention", B=1 if packed else 2, T=T, H=6, K=8, V=5)
    case.inputs.update(q=case.inputs["q"][:, :, :2], k=case.inputs["k"][:, :, :2])
    cu = torch.tensor([0, 7, 7, 70, 71, T]) if packed else None
    state = make_case("scalar_decay_attention", B=5, T=1, H=6, K=8, V=5, seed=4).state if packed else case.state
    ref_out, ref_grad = run_with_grads(case, "naive", state=state, cu_seqlens=cu)
    out, grad = run_with_grads(case, "chunk", state=state, cu_seqlens=cu, chunk_size=chunk_size)
    assert_close(out, ref_out, "grouped outputs")
    assert_close(grad, ref_grad, "grouped gradients")
    with pytest.raises(ValueError, match="multiple of q's and k's 4"):
        kernels.scalar_decay_attention(*(torch.zeros(1, 3, 4, 8),) * 2, torch.zeros(1, 3, 6, 5), torch.zeros(1, 3, 6))


@pytest.mark.parametrize("name", NAMES)
def test_chunk_matches_loop_without_initial_state(name):
    case = make_case(name, T=70, K=5, V=3, seed=3)
    assert_close(run_with_grads(case, "chunk")[1], run_with_grads(case, "naive")[1], f"{name} gradients")


@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("name", NAMES)
def test_packed_equals_one_by_one(name, impl):
    lengths = [5, 0, 64, 1, 30]  # an empty sequence too
    case = make_case(name, B=1, T=sum(lengths), seed=2)
    cu = torch.tensor([0] + lengths).cumsum(0)
    states = make_case(name, B=len(lengths), T=1, seed=5).state
    o, final = case(impl, state=states, cu_seqlens=cu)
    weights = _random_like([o] + _float_leaves(final))  # do, dstate: row n of dstate weighs sequence n
    _, packed_grad = run_with_grads(case, impl, state=states, cu_seqlens=cu, weights=weights)
    n_in, n_state = len(case.inputs), len(_float_leaves(states))
    shared = [torch.zeros_like(g) for g in packed_grad[n_in + n_state:]]  # RWKV-6's bonus: summed over sequences
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = _index_state(states, n)
        o_n, final_n = case(impl, inputs=case.slice(a, b), state=one)
        torch.testing.assert_close(o[:, a:b], o_n, atol=1e-10, rtol=1e-8)
        for x, y in zip(_float_leaves(final_n) + _bool_leaves(final_n),
                        _float_leaves(_index_state(final, n)) + _bool_leaves(_index_state(final, n))):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)
        # the packed run's gradients, sliced to sequence n, are those of sequence n alone
        _, grad_n = run_with_grads(case, impl, inputs=case.slice(a, b), state=one,
                                   weights=[weights[0][:, a:b]] + [w[n:n + 1] for w in weights[1:]])
        assert_close(grad_n[:n_in], [g[:, a:b] for g in packed_grad[:n_in]], f"{name} input gradients, sequence {n}",
                     atol=1e-10, rtol=1e-8)
        assert_close(grad_n[n_in:n_in + n_state], [g[n:n + 1] for g in packed_grad[n_in:n_in + n_state]],
                     f"{name} initial-state gradients, sequence {n}", atol=1e-10, rtol=1e-8)
        shared = [s + g for s, g in zip(shared, grad_n[n_in + n_state:])]
    assert_close(shared, packed_grad[n_in + n_state:], f"{name} shared-parameter gradients", atol=1e-10, rtol=1e-8)


def _index_state(state, n):
    if isinstance(state, tuple):
        return tuple(s[n:n + 1] for s in state)
    return state[n:n + 1]


def _bool_leaves(state):
    return [s for s in state if s.dtype == torch.bool] if isinstance(state, tuple) else []


@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("name", NAMES)
def test_state_hand_over(name, impl):
    """[0:T1] then [T1:T] with the state handed over equals the full run, gradients included."""
    case = make_case(name, T=90, seed=4)
    full_out, full_grad = run_with_grads(case, impl, state=case.state)
    o1, s1 = case(impl, inputs=case.slice(0, 37), state=case.state)
    o2, s2 = case(impl, inputs=case.slice(37, 90), state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full_out[0], atol=1e-10, rtol=1e-8)
    assert_close(_float_leaves(s2), full_out[1:], "final state")


@pytest.mark.parametrize("name", NAMES)
def test_single_steps_equal_full_run(name):
    case = make_case(name, T=20, seed=6)
    o, final = case("chunk", state=case.state)
    state, outs = case.state, []
    for t in range(20):
        o_t, state = step(case, {n: x[:, t] for n, x in case.inputs.items()}, state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o, atol=1e-10, rtol=1e-8)
    assert_close(_float_leaves(state), _float_leaves(final), "state")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_float32_state(name, dtype):
    case = make_case(name, T=65, seed=7)
    ref, ref_state = case("naive", state=case.state)
    low = {n: x.to(dtype) for n, x in case.inputs.items()}
    o, final = case("chunk", inputs=low, state=case.state if name == "sliding_window_attention" else
                    case.state.float())
    assert o.dtype == dtype
    if name != "sliding_window_attention":
        assert final.dtype == torch.float32
    tol = 2e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(o.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sliding_window_attention"])
def test_strong_decays_stay_finite(name):
    """Decays of e^-60 per step: exp(cum_i)·exp(−cum_j) would overflow float32 within a chunk."""
    case = make_case(name, T=200, dtype=torch.float32, seed=8)
    decay = "log_decay"
    case.inputs[decay] = torch.full_like(case.inputs[decay], -60.0)
    state = case.state.float()
    out, grad = run_with_grads(case, "chunk", state=state)
    ref_out, ref_grad = run_with_grads(case, "naive", state=state)
    for x in out + grad:
        assert torch.isfinite(x).all()
    assert_close(out, ref_out, f"{name} outputs", atol=1e-4, rtol=1e-4)
    assert_close(grad, ref_grad, f"{name} gradients", atol=1e-4, rtol=1e-4)


def test_document_start_drops_state():
    """A log-decay of −inf resets the diagonal recurrence (how Griffin marks document starts)."""
    x = torch.randn(1, 100, 8, dtype=torch.float64)
    a = torch.full_like(x, -0.1)
    a[:, 40] = float("-inf")
    for impl in ["naive", "chunk"]:
        xg = x.clone().requires_grad_()
        h, _ = kernels.diagonal_recurrence(xg, a, impl=impl)
        h2, _ = kernels.diagonal_recurrence(x[:, 40:], a[:, 40:].clamp(min=-0.1), impl=impl)
        torch.testing.assert_close(h[:, 40:], h2)
        h.sum().backward()
        assert torch.isfinite(xg.grad).all()


def test_sliding_window_sees_itself_and_window_minus_one_before():
    """window=3: query t attends keys t−2, t−1, t; checked against an explicit softmax."""
    q, k, v = (torch.randn(1, 9, 1, 4, dtype=torch.float64) for _ in range(3))
    for impl in ["naive", "chunk"]:
        o, _ = kernels.sliding_window_attention(q, k, v, window=3, impl=impl)
        for t in range(9):
            lo = max(0, t - 2)
            w = torch.softmax((k[0, lo:t + 1, 0] @ q[0, t, 0]) / 2.0, 0)
            torch.testing.assert_close(o[0, t, 0], w @ v[0, lo:t + 1, 0])


def test_window_longer_than_sequence_is_causal_attention():
    q, k, v = (torch.randn(2, 30, 4, 8, dtype=torch.float64) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    o, _ = kernels.sliding_window_attention(q, k, v, window=1000, impl="chunk")
    torch.testing.assert_close(o, ref.transpose(1, 2))


@pytest.mark.parametrize("bad,message", [
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k[:, :5], v, g), "k has shape"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g[..., 0]), "log_decay has shape"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g, impl="fast"), "impl must be one of"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g, cu_seqlens=torch.tensor([0, 5])), "batch size 1"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 3])),
     "must rise from 0 to T=10"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g, chunk_size=48), "power of two"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g, initial_state=torch.zeros(2, 3, 4)),
     "initial_state has shape"),
    (lambda q, k, v, g: kernels.gated_linear_attention(q, k, v, g, impl="triton"), "needs CUDA tensors"),
    (lambda q, k, v, g: kernels.sliding_window_attention(q, k, v, window=0), "window must be a positive int"),
])
def test_bad_input_is_refused_with_a_clear_message(bad, message):
    q, k, v, g = (torch.randn(2, 10, 3, 4) for _ in range(4))
    with pytest.raises((ValueError, RuntimeError), match=message):
        bad(q, k, v, g)


@pytest.mark.parametrize("T", [1, 65, 300])
def test_rg_lru_chunk_matches_loop(T):
    """RG-LRU through the chunkwise path vs the loop: outputs and gradients, resets included."""
    g = torch.Generator().manual_seed(T)
    x, gate_a, gate_x = (torch.randn(2, T, 24, dtype=torch.float64, generator=g) for _ in range(3))
    a_param = torch.randn(24, dtype=torch.float64, generator=g)
    reset = torch.rand(2, T, generator=g) < 0.05
    reset[0, 0] = True
    h0 = torch.randn(2, 24, dtype=torch.float64, generator=g)
    results = []
    for impl in ["naive", "chunk"]:
        leaves = [t.clone().requires_grad_() for t in (x, gate_a, gate_x, a_param, h0)]
        h, hT = kernels.rg_lru(*leaves[:4], reset=reset, initial_state=leaves[4], output_final_state=True, impl=impl)
        loss = (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum() + hT.sum()
        results.append([h, hT, *torch.autograd.grad(loss, leaves)])
    assert_close(results[1], results[0], "rg_lru outputs and gradients")


def test_rg_lru_follows_its_definition():
    """One step by hand: a = exp(−8 softplus(Λ) σ(gate_a)), h = a h0 + sqrt(1 − a²) σ(gate_x) x."""
    x, ga, gx = torch.randn(3, 1, 1, 5, dtype=torch.float64)
    lam, h0 = torch.randn(2, 5, dtype=torch.float64)
    a = torch.exp(-8 * torch.nn.functional.softplus(lam) * torch.sigmoid(ga))
    expected = a * h0 + torch.sqrt(1 - a**2) * torch.sigmoid(gx) * x
    h, _ = kernels.rg_lru(x, ga, gx, lam, initial_state=h0.unsqueeze(0))
    torch.testing.assert_close(h[0, 0], expected[0, 0])
    h_reset, _ = kernels.rg_lru(x, ga, gx, lam, reset=torch.ones(1, 1, dtype=torch.bool), initial_state=h0.unsqueeze(0))
    torch.testing.assert_close(h_reset[0, 0], (torch.sigmoid(gx) * x)[0, 0])


def test_rg_lru_matches_transformers_recurrent_gemma():
    """Outside reference: transformers' RecurrentGemmaRglru (its block-diagonal gates computed here)."""
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    torch.manual_seed(0)
    config = RecurrentGemmaConfig(lru_width=24, num_attention_heads=3, hidden_size=24)
    ref = RecurrentGemmaRglru(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 37, 24)
    position_ids = torch.arange(37).repeat(2, 1)
    position_ids[1, 20:] = torch.arange(17)  # a second document starts at t = 20 in row 1
    expected = ref(x, position_ids)

    blocks = x.view(2, 37, 3, 8)
    gate_x = (torch.einsum("bthi,hij->bthj", blocks, ref.input_gate_weight) + ref.input_gate_bias).flatten(2)
    gate_a = (torch.einsum("bthi,hij->bthj", blocks, ref.recurrent_gate_weight) + ref.recurrent_gate_bias).flatten(2)
    for impl in ["naive", "chunk"]:
        h, _ = kernels.rg_lru(x, gate_a, gate_x, ref.recurrent_param, reset=position_ids == 0, impl=impl)
        torch.testing.assert_close(h, expected, atol=1e-5, rtol=1e-5)


def test_sqrt_bounded_grad_matches_recurrent_gemma():
    """Our sqrt with a capped derivative against transformers' SqrtBoundDerivative, down to x = 0."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import SqrtBoundDerivative

    from recur.kernels.ops import SqrtBoundedGrad

    for dtype in (torch.float32, torch.float64):
        x = torch.cat([torch.zeros(1), torch.logspace(-12, 0, 50), torch.rand(20)]).to(dtype)
        grad = torch.randn_like(x)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        SqrtBoundedGrad.apply(ours).backward(grad)
        SqrtBoundDerivative.apply(theirs).backward(grad)
        torch.testing.assert_close(SqrtBoundedGrad.apply(x), torch.sqrt(x), atol=0, rtol=0)
        torch.testing.assert_close(ours.grad, theirs.grad)
        assert ours.grad.abs().max() <= 1000.0 * grad.abs().max()


# Runs the CPU paths of every kernel (rg_lru's backward included) with the kernels package loaded
# alone: recur/__init__ registers the model families with transformers, the kernels must not need it.
KERNELS_ALONE = """
import importlib.util, sys, types
import torch
path = importlib.util.find_spec("recur").submodule_search_locations
sys.modules["recur"] = package = types.ModuleType("recur")
package.__path__ = list(path)
import recur.kernels as kernels
from recur.kernels.cases import NAMES, make_case, step
for name in NAMES:
    case = make_case(name, T=9)
    for impl in ("naive", "chunk"):
        case(impl, state=case.state)
    step(case, {n: x[:, 0] for n, x in case.inputs.items()}, case.state)
x, ga, gx = (torch.randn(2, 9, 8, requires_grad=True) for _ in range(3))
for impl in ("naive", "chunk"):
    kernels.rg_lru(x, ga, gx, torch.randn(8), impl=impl)[0].sum().backward()
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""


def test_kernels_import_and_run_without_transformers():
    r = subprocess.run([sys.executable, "-c", KERNELS_ALONE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout, r.stdout


class _CudaFlagged(torch.Tensor):
    """A CPU tensor that reports is_cuda, to see which path a CUDA tensor would take."""

    @property
    def is_cuda(self):
        return True


def test_steps_dispatch_cuda_tensors_to_fla_fused_recurrent_kernels(monkeypatch):
    x = torch.zeros(2, 3).as_subclass(_CudaFlagged)
    monkeypatch.setattr(_common, "fla_available", lambda: True)
    assert _common.resolve_step_impl("auto", x) == "triton"
    assert _common.resolve_step_impl("auto", torch.zeros(2, 3)) == "naive"
    monkeypatch.setattr(_common, "fla_available", lambda: False)
    assert _common.resolve_step_impl("auto", x) == "naive"
    with pytest.raises(ValueError, match="for a single step"):
        _common.resolve_step_impl("chunk", x)

    # each public step hands a CUDA tensor to its fla wrapper (a stub here: fla needs a GPU)
    monkeypatch.setattr(_common, "fla_available", lambda: True)
    called = []

    def wrapper(name):
        def fla_step(*args):
            called.append((name, args))
            return args[0], None
        return fla_step

    fla_names = {"gated_linear_attention": "gla_step", "scalar_decay_attention": "scalar_decay_step",
                 "rwkv6": "rwkv6_step", "gated_delta_rule": "delta_rule_step", "diagonal_recurrence": "diagonal_step"}
    stub = types.ModuleType("recur.kernels.fla_ops")
    for name, fn in fla_names.items():
        setattr(stub, fn, wrapper(name))
    monkeypatch.setitem(sys.modules, "recur.kernels.fla_ops", stub)
    for name in fla_names:
        case = make_case(name, T=1, dtype=torch.float32)
        inputs_t = {n: t[:, 0].as_subclass(_CudaFlagged) for n, t in case.inputs.items()}
        step(case, inputs_t, case.state.float())
    assert [n for n, _ in called] == list(fla_names)
    assert dict(called)["gated_linear_attention"][-1] == 12 ** -0.5  # the scale is passed on explicitly


def test_a_path_that_cannot_serve_a_call_says_so_once(monkeypatch):
    """fla's parallel_attn takes no cache: with one, impl="triton" runs the chunk path and warns, once.
    (TRITON_INTERPRET=1 lets impl="triton" through on CPU; the fallback never reaches fla.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "_NOTICES", set())
    case = make_case("sliding_window_attention", T=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, final = case("triton", state=case.state)
        case("triton", state=case.state)
    assert len(caught) == 1 and "parallel_attn takes no KV cache" in str(caught[0].message)
    ref, ref_final = case("chunk", state=case.state)
    assert_close([o, *final], [ref, *ref_final], "fallback")

    inputs_t = {n: x[:, 0] for n, x in case.inputs.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step(case, inputs_t, case.state, impl="triton")
    assert len(caught) == 1 and "no decoding kernel" in str(caught[0].message)


@pytest.mark.parametrize("name", NAMES)
def test_steps_keep_float32_state_and_start_from_zeros(name):
    case = make_case(name, T=1, dtype=torch.float32, seed=9)
    inputs_t = {n: x[:, 0].to(torch.bfloat16) for n, x in case.inputs.items()}
    state = case.state if name == "sliding_window_attention" else case.state.float()
    o, new = step(case, inputs_t, state)
    assert o.dtype == torch.bfloat16
    if name == "sliding_window_attention":  # the window cache keeps k's and v's dtype
        assert [s.dtype for s in _float_leaves(new)] == [torch.bfloat16] * 2
    else:
        assert new.dtype == torch.float32
        torch.testing.assert_close(step(case, inputs_t, None)[1], step(case, inputs_t, torch.zeros_like(state))[1])


# fla's fused recurrent kernels in Triton's CPU interpreter; its autotuner needs a GPU benchmarker,
# so a stub gives every config the same time (../shared/reference/kernels.md §5.3).
FUSED_RECURRENT_ON_CPU = """
import torch
import triton.runtime.autotuner
triton.runtime.autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]
from recur.kernels.cases import make_case, step
for name in ["gated_linear_attention", "scalar_decay_attention", "rwkv6", "gated_delta_rule", "diagonal_recurrence"]:
    case = make_case(name, B=2, T=3, H=4, K=32, V=32, dtype=torch.float32)
    results = {}
    for impl in ["naive", "triton"]:
        state, outs = case.state.float(), []
        for t in range(3):
            o, state = step(case, {n: x[:, t].contiguous() for n, x in case.inputs.items()}, state, impl=impl)
            outs.append(o)
        results[impl] = outs + [state]
    for a, b in zip(results["triton"], results["naive"]):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: name + ": " + m)
print("OK")
"""


@pytest.mark.slow  # the Triton interpreter in a subprocess
@pytest.mark.skipif(importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None,
                    reason="needs flash-linear-attention and triton")
def test_fla_fused_recurrent_steps_in_the_triton_interpreter():
    """The GPU step wrappers (kernels/fla_ops.py: argument order, scale, RWKV-6's bonus) against the
    PyTorch steps, three chained steps each, on CPU."""
    r = subprocess.run([sys.executable, "-c", FUSED_RECURRENT_ON_CPU], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
