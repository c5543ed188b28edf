"""Kernel benchmark: forward + backward time of each recurrence, chunkwise form vs the sequential loop.

    recur bench kernels [--lengths 1024 4096 8192] [--impls chunk naive] [--peers]

B = 1, H = 4, K = V = 64 (diagonal recurrence and RG-LRU: D = H·K = 256; sliding window: 512 keys),
float32. Both implementations run in this process on the same inputs; the table gives each time,
their ratio and, per implementation, how time grows from 4096 to 8192 tokens (2.0 = linear).

`--peers` adds the pure-PyTorch form another library ships for the same function, on the same
inputs, and the ratio of its time to ours: fla's naive chunk references (simple GLA, gated delta
rule), its recurrent ones where it has no chunk form (GLA, RWKV-6, HGRN), RecurrentGemma's RG-LRU
scan from transformers. (transformers' Mamba-2 SSD is inline in its mixer's `torch_forward`, not a
function: `recur bench train` compares it inside the model, against the same model converted.)
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from recur import kernels
from recur.kernels.cases import NAMES, make_case

SHAPE = dict(B=1, H=4, K=64, V=64)
WINDOW = 512
RG_LRU = "rg_lru"


def _inputs(name: str, T: int, device: str):
    if name == RG_LRU:
        D = SHAPE["H"] * SHAPE["K"]
        g = torch.Generator().manual_seed(0)
        args, kwargs = [torch.randn(1, T, D, generator=g) for _ in range(3)] + [torch.randn(D, generator=g)], {}
    else:
        case = make_case(name, T=T, dtype=torch.float32, window=WINDOW, **SHAPE)
        args, kwargs = list(case.inputs.values()), case.kwargs
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x
    return [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}


def _rg_lru_transformers(x, gate_a, gate_x, a_param, c=8.0):
    """RecurrentGemma's RG-LRU (transformers' gates and `_rnn_scan`, its linear-mode loop) on our inputs."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru, SqrtBoundDerivative

    log_a = -c * torch.sigmoid(gate_a) * torch.nn.functional.softplus(a_param)
    normalized = x * torch.sigmoid(gate_x) * SqrtBoundDerivative.apply(1 - torch.exp(2 * log_a))
    reset = torch.zeros(x.shape[:2] + (1,), dtype=torch.bool, device=x.device)
    return RecurrentGemmaRglru._rnn_scan(None, normalized, torch.exp(log_a), reset, None)


def peer(name: str):
    """(label, fn(*args, **kwargs) -> (out, state)) of another library's pure-PyTorch form, or None."""
    heads_first = lambda *xs: [x.transpose(1, 2) for x in xs]
    if name == "gated_linear_attention":
        from fla.ops.gla.naive import naive_recurrent_gla
        return "fla naive_recurrent_gla", lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)
    if name == "scalar_decay_attention":
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla
        return "fla naive_chunk_simple_gla", lambda q, k, v, g: naive_chunk_simple_gla(q, k, v, g)
    if name == "gated_delta_rule":
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        return "fla naive_chunk_gated_delta_rule", lambda q, k, v, b, g: naive_chunk_gated_delta_rule(q, k, v, g, b)
    if name == "rwkv6":
        from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6
        return "fla naive_recurrent_rwkv6", lambda r, k, v, w, bonus: naive_recurrent_rwkv6(
            *heads_first(r, k, v, w), bonus, scale=1.0)
    if name == "diagonal_recurrence":
        from fla.ops.hgrn.naive import naive_recurrent_hgrn
        return "fla naive_recurrent_hgrn", lambda x, g: naive_recurrent_hgrn(x, g)
    if name == RG_LRU:
        return "transformers RecurrentGemma _rnn_scan", _rg_lru_transformers
    return None


def time_peer(name: str, T: int, device: str) -> float | None:
    """Best of two forward + backward runs of the peer's form, None when there is none (or fla is absent)."""
    try:
        found = peer(name)
    except ImportError:
        return None
    if found is None:
        return None
    args, kwargs = _inputs(name, T, device)
    kwargs = {k: v for k, v in kwargs.items() if k == "bonus"}
    best = float("inf")
    for _ in range(2):
        leaves = [a.detach().requires_grad_() for a in args]
        _sync(device)
        start = time.perf_counter()
        out = found[1](*leaves, *kwargs.values())
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward_backward(name: str, T: int, impl: str, repeats: int, device: str) -> float:
    """Best wall time (s) of forward + backward through all float inputs."""
    fn = getattr(kernels, name)
    args, kwargs = _inputs(name, T, device)
    best = float("inf")
    for _ in range(repeats):
        leaves = [a.detach().requires_grad_() for a in args]
        _sync(device)
        start = time.perf_counter()
        out, _ = fn(*leaves, **kwargs, impl=impl)
        out.sum().backward()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(lengths, impls, repeats, device, peers=False):
    names = NAMES + [RG_LRU]
    times = {}
    jobs = [(n, T, impl) for n in names for T in lengths for impl in impls + (["peer"] if peers else [])]
    for name, T, impl in tqdm(jobs, desc="kernels", unit="run"):
        if impl == "peer":
            times[name, T, impl] = time_peer(name, T, device)
            continue
        # The loop takes seconds: two timed runs, no warm-up, are enough for it.
        slow = impl == "naive"
        if not slow:
            time_forward_backward(name, T, impl, 1, device)  # warm-up (and Triton compilation)
        times[name, T, impl] = time_forward_backward(name, T, impl, 2 if slow else repeats, device)
    return names, times


def format_table(names, lengths, impls, times) -> str:
    base, fast = impls[-1], impls[0]
    head = "| function | " + " | ".join(f"{impl} T={T} (ms)" for T in lengths for impl in impls)
    head += " | " + " | ".join(f"{base}/{fast} T={T}" for T in lengths)
    growth = [i for i in impls] if 4096 in lengths and 8192 in lengths else []
    head += "".join(f" | {impl} t(8192)/t(4096)" for impl in growth) + " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in names:
        cells = [f"{times[n, T, impl] * 1e3:.1f}" for T in lengths for impl in impls]
        cells += [f"{times[n, T, base] / times[n, T, fast]:.1f}x" for T in lengths]
        cells += [f"{times[n, 8192, impl] / times[n, 4096, impl]:.2f}" for impl in growth]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    if any(impl == "peer" for _, _, impl in times):
        rows += ["", "| function | peer | " + " | ".join(f"peer/{fast} T={T}" for T in lengths) + " |",
                 "|---|---|" + "---|" * len(lengths)]
        for n in names:
            try:
                label = (peer(n) or ("none",))[0]
            except ImportError:
                label = "not installed"
            cells = [f"{times[n, T, 'peer'] / times[n, T, fast]:.1f}x" if times[n, T, "peer"] else ""
                     for T in lengths]
            rows.append(f"| {n} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recur bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--impls", nargs=2, default=["chunk", "naive"], metavar=("FAST", "BASELINE"),
                        help="the implementation measured and the baseline it is compared with")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs for the fast path")
    parser.add_argument("--peers", action="store_true",
                        help="also time other libraries' pure-PyTorch forms of each function (fla, transformers)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to compare e.g. --impls triton chunk")
    args = parser.parse_args(argv)
    names, times = run(args.lengths, args.impls, args.repeats, args.device, args.peers)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; B=1 H=4 K=V=64 float32, forward+backward")
    print(format_table(names, args.lengths, args.impls, times))
    return 0
