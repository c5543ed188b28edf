"""Training-step tokens/s and peak memory: recur's families side by side with what users would otherwise train.

    recur bench train [--shapes 1x2048,1x8192,1x32768,16x512] [--models all] [--width 256] [--layers 4]

Every model has the same width, depth, head size (64) and vocabulary, random weights, float32; a step
is forward, backward and AdamW on random tokens. The peers: transformers' `LlamaForCausalLM` (SDPA
attention), `Mamba2ForCausalLM` (its torch path, the one that runs without mamba_ssm's CUDA kernels),
`RecurrentGemmaForCausalLM` (Griffin, and Hawk with recurrent blocks only) and titans-pytorch's
`MemoryAsContextTransformer`. recur's Mamba-2, Griffin and Hawk are converted from the peer's own
config (`from_transformers`), so those pairs are the same model. Everything runs in this process: at
each shape every model takes its first step, then the models take turns for `--steps` timed steps
(the best counts, as many at every shape), so that a slow or fast stretch of the machine falls on all
of them; `vs llama` and `vs peer` are ratios of tokens/s.

Peak memory is the first step's growth of resident memory on CPU (sampled every 2 ms, with glibc told
to hand large blocks back to the system when they are freed) and `max_memory_allocated` on GPU. MFU is
model FLOPs per token (train/flops.py: 6N plus the token mixing) times tokens/s over the measured
float32 matmul peak of this process. A model whose first step took longer than `--max-step-seconds` is
timed on one more step only ("1 step") and skipped at longer sequences, and so is one whose step,
scaled linearly from its last shape, would take longer; on CPU the process's address space is capped
just under the machine's memory, so a model that does not fit is reported out of memory instead of killing the run.
`--full-logits-too` also times each recur model with its loss taken from the whole [B, T, vocab]
float32 logits, as most training code does, and shows the peak memory of recur's chunked cross
entropy as a ratio of that. The timed steps run with freed memory kept in the process, as
`recur train` runs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import threading
import time

import torch
from tqdm import tqdm


FULL = " (full logits)"  # the row of a model whose loss came from the whole sequence's logits


def llama(width: int, layers: int, vocab: int, max_len: int):
    """The baseline every model is compared with: transformers' Llama with SDPA attention."""
    from transformers import LlamaForCausalLM

    from recur.modeling.family import bench_llama_config

    return LlamaForCausalLM(bench_llama_config(width, layers, vocab, max_len))


def lineup() -> tuple[dict, dict]:
    """(name -> build(width, layers, vocab, max_len), recur model -> its peer's name): Llama, then the peers
    the families declare, then the families' own models."""
    from recur.modeling import FAMILIES

    models = [(name, m) for family in FAMILIES.values() for name, m in family.bench.items()]
    builds = {"llama": llama}
    builds.update({m.peer: m.build_peer for _, m in models if m.peer})
    builds.update({name: m.build for name, m in models})
    return builds, {name: m.peer for name, m in models if m.peer}


def builders(width: int, layers: int, vocab: int, max_len: int) -> dict:
    """name -> a function building the model (random weights)."""
    return {name: (lambda build=build: build(width, layers, vocab, max_len)) for name, build in lineup()[0].items()}


class PeakMemory:
    """The most memory the block allocated beyond what was in use when it started, in bytes."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self._rss() - self._start)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start, self._done = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._done.set()
            self._thread.join()


def allocator(measuring_memory: bool) -> None:
    """glibc: while measuring memory, resident memory follows what is allocated; while timing, freed
    memory stays in the process as in `recur train`, so neither side pays page faults for its temporaries."""
    from recur.cli import keep_freed_memory, return_freed_memory

    (return_freed_memory if measuring_memory else keep_freed_memory)()


def memory_limit(device: torch.device):
    """On CPU, cap this process's address space just under the machine's memory, so that a model too
    large for it fails with an out-of-memory error (reported in its row) instead of the kernel killing
    the whole run."""
    import contextlib
    import resource

    if device.type != "cpu":
        return contextlib.nullcontext()
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * 4096  # address space already mapped

    @contextlib.contextmanager
    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (min(used + int(0.9 * available), hard if hard > 0 else 1 << 62), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return limited()


def out_of_memory(error: BaseException) -> bool:
    """CUDA's and Python's out-of-memory errors, and the CPU allocator's (a RuntimeError)."""
    return not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError) \
        or "can't allocate memory" in str(error) or "not enough memory" in str(error)


@contextlib.contextmanager
def skipped_when_out_of_memory(row: dict):
    """An out-of-memory error inside the block marks the row skipped instead of ending the benchmark."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        row["skipped"] = "out of memory"


def train_step(model, optimizer, ids, full_logits: bool = False):
    """One step; `full_logits`: the loss from the [B, T, vocab] float32 logits, as most training code
    computes it, instead of recur's chunked cross entropy."""
    if type(model).__module__.startswith("titans_pytorch"):
        loss = model(ids, return_loss=True)
    elif full_logits:
        from recur.modeling.base import causal_lm_loss

        loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class Timing:
    """One model at one shape: a first step, which also measures the peak memory (and allocates
    AdamW's state), then timed steps that the caller takes in turns with the other models of the shape,
    so that a slow or fast stretch of a shared machine falls on all of them; the best step counts."""

    def __init__(self, model, batch: int, seq_len: int, device, full_logits: bool = False):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") \
            else model.token_emb.num_embeddings
        self.ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        self.model, self.full_logits, self.times = model, full_logits, []
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        allocator(measuring_memory=True)
        with PeakMemory(device) as memory:
            self.first = self._step()
        self.peak = memory.peak

    def _step(self) -> float:
        start = time.perf_counter()
        train_step(self.model, self.optimizer, self.ids, self.full_logits)
        self.sync()
        return time.perf_counter() - start

    def step(self):
        allocator(measuring_memory=False)
        self.times.append(self._step())

    def result(self) -> dict:
        seconds = min(self.times or [self.first])
        return {"tokens_per_s": self.ids.numel() / seconds, "step_s": seconds, "peak_mb": self.peak / 2**20}


def model_flops_per_token(model, seq_len: int) -> float | None:
    from recur.train.flops import flops_per_token

    if not type(model).__module__.startswith("recur."):
        return None
    return flops_per_token(model, seq_len)[0]


def _shape(text: str) -> tuple[int, int]:
    from .harness import EvalError

    try:
        b, t = text.lower().split("x")
        return int(b), int(t)
    except ValueError:
        raise EvalError(f"--shapes: {text!r} is not BxT, e.g. 1x2048") from None


def main(argv=None) -> int:
    from recur.modeling.family import BENCH_HEAD
    from recur.train.flops import measured_matmul_peak

    from .harness import EvalError

    parser = argparse.ArgumentParser(prog="recur bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x2048,1x8192,1x32768,16x512", help="batch x sequence length, comma-separated")
    parser.add_argument("--models", default="all", help="comma-separated names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps after the first, the same number at every shape (the best counts)")
    parser.add_argument("--max-step-seconds", type=float, default=120.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--full-logits-too", action="store_true",
                        help="also time each recur model with its loss from the full logits (what chunked "
                             "cross entropy saves)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    shapes = [_shape(s) for s in args.shapes.split(",") if s.strip()]
    if not shapes or min(min(s) for s in shapes) < 1 or args.width % BENCH_HEAD or args.width < BENCH_HEAD:
        raise EvalError(f"--shapes must be positive and --width a multiple of {BENCH_HEAD}")
    table = builders(args.width, args.layers, args.vocab, max(t for _, t in shapes))
    if args.list:
        print("\n".join(table))
        return 0
    names = list(table) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise EvalError(f"--models: unknown {', '.join(unknown)} (known: {', '.join(table)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = measured_matmul_peak(device)
    builds, peers = lineup()
    ours = set(builds) - {"llama"} - set(peers.values())
    runs = [(name, False) for name in names]
    if args.full_logits_too:
        runs = [(name, full) for name in names for full in ((False, True) if name in ours else (False,))]
    rows, last = [], {}  # last: (label, batch) -> (seq_len, step seconds) of its latest timed shape
    with tqdm(total=len(shapes) * len(runs) * (1 + args.steps), desc="bench train", unit="step") as bar, \
            memory_limit(device):
        for batch, seq_len in shapes:
            shape_rows, timings = [], []  # timings: (row, model, Timing, first step over the limit) per model
            for name, full in runs:  # first steps, one model after another
                label = f"{name}{FULL if full else ''}"
                bar.set_postfix_str(f"{label} {batch}x{seq_len}")
                row = {"model": label, "batch": batch, "seq_len": seq_len}
                before = last.get((label, batch))
                if before == "skip":
                    row["skipped"] = "skipped at a shorter length"
                elif before and before[1] * seq_len / before[0] > args.max_step_seconds:
                    row["skipped"] = f"a step would take over {args.max_step_seconds:g} s"
                else:
                    torch.manual_seed(0)
                    model = table[name]().to(device).train()
                    with skipped_when_out_of_memory(row):
                        timing = Timing(model, batch, seq_len, device, full)
                        # over the limit: one timed step all the same (the first, measuring memory, is slower)
                        timings.append((row, model, timing, timing.first > args.max_step_seconds))
                    gc.collect()
                shape_rows.append(row)
                timed = bool(timings) and timings[-1][0] is row
                bar.update(1 if timed else 1 + args.steps)  # (a model without timed steps: its share at once)
            for turn in range(args.steps):  # timed steps: the models take turns
                for row, _, timing, over in timings:
                    if "skipped" not in row and not (over and turn):
                        bar.set_postfix_str(f"{row['model']} {batch}x{seq_len}")
                        with skipped_when_out_of_memory(row):
                            timing.step()
                    bar.update()
            for row, model, timing, over in timings:
                if "skipped" not in row:
                    row.update(timing.result(), over_step_limit=over)
                    flops = model_flops_per_token(model, seq_len)
                    row["mfu"] = None if flops is None else flops * row["tokens_per_s"] / peak
            del timings
            gc.collect()
            for row in shape_rows:
                skipped = row.get("skipped") or row.get("over_step_limit")
                last[row["model"], batch] = "skip" if skipped else (seq_len, row["step_s"])
                bar.write(format_table([row], header=False), file=sys.stderr)  # stdout: the table or JSON
            rows += shape_rows
    add_ratios(rows)
    if args.json:
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "matmul_peak_flops": peak,
                          "width": args.width, "layers": args.layers, "vocab": args.vocab, "rows": rows}, indent=1))
        return 0
    print(f"training step (forward, backward, AdamW), float32, {device} ({torch.get_num_threads()} threads), "
          f"width {args.width}, {args.layers} layers, vocab {args.vocab}; matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print(format_table(rows))
    return 0


def add_ratios(rows: list[dict]) -> None:
    """vs_llama and vs_peer: tokens/s over the same shape's llama and the model's own peer."""
    peers = lineup()[1]
    speed = {(r["model"], r["batch"], r["seq_len"]): r.get("tokens_per_s") for r in rows}
    for r in rows:
        key = (r["batch"], r["seq_len"])
        for field, other in (("vs_llama", "llama"), ("vs_peer", peers.get(r["model"]))):
            base = speed.get((other, *key)) if other and other != r["model"] else None
            r[field] = r["tokens_per_s"] / base if r.get("tokens_per_s") and base else None
    peak = {(r["model"], r["batch"], r["seq_len"]): r.get("peak_mb") for r in rows}
    for r in rows:  # chunked cross entropy's peak memory over the same model's with full logits
        full = peak.get((r["model"] + FULL, r["batch"], r["seq_len"]))
        r["memory_vs_full_logits"] = r["peak_mb"] / full if full and r.get("peak_mb") is not None else None


def format_table(rows: list[dict], header: bool = True) -> str:
    ratio = lambda x: "" if x is None else f"{x:.2f}x"
    peers = lineup()[1]
    lines = ["| model | B x T | tokens/s | vs llama | vs peer | peak memory | MFU |", "|---|---|---|---|---|---|---|"]
    lines = lines if header else []
    for r in rows:
        shape = f"{r['batch']} x {r['seq_len']:,}"
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {shape} | skipped: {r['skipped']} | | | | |")
            continue
        note = " (1 step)" if r["over_step_limit"] else ""
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.0f}%"
        peer = peers.get(r["model"], "")
        saved = r.get("memory_vs_full_logits")
        memory = f" ({ratio(saved)} of full logits)" if saved else ""
        lines.append(f"| {r['model']} | {shape} | {r['tokens_per_s']:,.0f}{note} | {ratio(r.get('vs_llama'))} | "
                     f"{ratio(r.get('vs_peer'))}{' ' + peer if peer and r.get('vs_peer') else ''} | "
                     f"{r['peak_mb']:,.0f} MB{memory} | {mfu} |")
    return "\n".join(lines)
