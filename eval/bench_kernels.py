"""Kernel benchmark: forward + backward time of each recurrence, chunkwise form vs the sequential loop.

    recur bench kernels [--lengths 1024 4096 8192] [--impls chunk naive]

B = 1, H = 4, K = V = 64 (diagonal recurrence and RG-LRU: D = H·K = 256; sliding window: 512 keys),
float32. Both implementations run in this process on the same inputs; the table gives each time,
their ratio and, per implementation, how time grows from 4096 to 8192 tokens (2.0 = linear).
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


def run(lengths, impls, repeats, device):
    names = NAMES + [RG_LRU]
    times = {}
    jobs = [(n, T, impl) for n in names for T in lengths for impl in impls]
    for name, T, impl in tqdm(jobs, desc="kernels", unit="run"):
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
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recur bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--impls", nargs=2, default=["chunk", "naive"], metavar=("FAST", "BASELINE"),
                        help="the implementation measured and the baseline it is compared with")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs for the fast path")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to compare e.g. --impls triton chunk")
    args = parser.parse_args(argv)
    names, times = run(args.lengths, args.impls, args.repeats, args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; B=1 H=4 K=V=64 float32, forward+backward")
    print(format_table(names, args.lengths, args.impls, times))
    return 0
