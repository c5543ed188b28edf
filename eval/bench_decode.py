"""Decoding speed and cache memory after long prompts, models side by side in one process.

    recur bench decode MODEL [MODEL ...] [--prompts 1024,4096,16384] [--new-tokens 128] [--batch 1,8] [--compile-step]

MODEL is anything `recur eval` loads (a run dir, a checkpoint, a model folder, a .gguf file), or a
name of `recur bench train`'s lineup (`llama`, `recur_gla`, ...: random weights, `--width`,
`--layers` and `--vocab` as there), so `recur bench decode llama recur_gla recur_mamba2` compares
each family with the same-width Llama and its KV cache. For each batch size and prompt length: the
prompt (random token ids) goes through the model's cache 2048 tokens at a time, then 4 untimed and
`--new-tokens` timed greedy tokens are decoded one at a time; the table gives decode tokens/s (the
batch over the median time of a token, so that a moment of noise on a shared machine does not
count; the JSON also has the mean), the cache's size after the prompt and after decoding, and the
ratio of each model's tokens/s to the first model's. The models take turns at each batch size and
prompt length, so a slow or fast stretch of the machine falls on all of them alike. `--compile-step` turns on the models' compiled one-token step where their config has
one (`compile_decode_step`: Titans); its compiling falls in the untimed tokens, whose time the table
shows as the warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tqdm import tqdm

from recur.modeling.base import CACHE_FIELD

CHUNK = 2048
WARMUP = 4  # decoded tokens before the clock starts


def cache_bytes(cache) -> int:
    """Bytes of every tensor a cache holds (recur's per-layer states, transformers' keys and values)."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return sum(walk(v) for v in vars(x).values()) if hasattr(x, "__dict__") else 0

    return sum(walk(layer) for layer in getattr(cache, "layers", []))


@torch.no_grad()
def decode_speed(model, prompt_len: int, new_tokens: int = 64, batch: int = 1, seed: int = 0) -> dict:
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(model.device)
    start, cache = time.perf_counter(), None
    for at in range(0, prompt_len, CHUNK):
        out = model(ids[:, at:at + CHUNK], use_cache=True, **({CACHE_FIELD: cache} if at else {}))
        cache = getattr(out, CACHE_FIELD)
    prefill = time.perf_counter() - start
    size = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(WARMUP + new_tokens):  # the first steps, untimed, pay one-time costs (allocations, compiling)
        start = time.perf_counter()
        out = model(token, use_cache=True, **{CACHE_FIELD: cache})
        cache, token = getattr(out, CACHE_FIELD), out.logits[:, -1:].argmax(-1)
        if token.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[WARMUP:]
    return {"prompt": prompt_len, "batch": batch, "tokens_per_s": batch / statistics.median(timed),
            "tokens_per_s_mean": batch * len(timed) / sum(timed), "cache_mb": size / 2**20,
            "cache_mb_after": cache_bytes(cache) / 2**20, "prefill_s": prefill, "warmup_s": sum(times[:WARMUP])}


def main(argv=None) -> int:
    from .bench_train import builders, memory_limit, skipped_when_out_of_memory
    from .harness import EvalError
    from .load import load

    parser = argparse.ArgumentParser(prog="recur bench decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="models to compare (the first is the baseline of the ratios)")
    parser.add_argument("--prompts", default="1024,4096,16384", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    parser.add_argument("--width", type=int, default=256, help="lineup models: width (bench train's)")
    parser.add_argument("--layers", type=int, default=4, help="lineup models: layers")
    parser.add_argument("--vocab", type=int, default=4096, help="lineup models: vocabulary")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile-step", action="store_true",
                        help="torch.compile the one-token step of models whose config offers it (compile_decode_step)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
        batches = [int(x) for x in args.batch.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--prompts {args.prompts!r} and --batch {args.batch!r}: comma-separated numbers") from None
    if not prompts or not batches or min(prompts + batches) < 1 or args.new_tokens < 1:
        raise EvalError("--prompts, --new-tokens and --batch must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    lineup = builders(args.width, args.layers, args.vocab, max(prompts) + args.new_tokens)
    models = []
    for spec in args.models:
        if spec in lineup:
            torch.manual_seed(0)
            model, name = lineup[spec]().eval(), spec
        else:
            model, _, source = load(spec)
            name = str(source.path)
        if args.compile_step and hasattr(model.config, "compile_decode_step"):
            model.config.compile_decode_step, name = True, f"{name} (compiled step)"
        models.append((name, model))
    rows = []
    runs = [(b, p, m) for b in batches for p in prompts for m in models]
    with tqdm(runs, desc="decode", unit="run") as bar, memory_limit(models[0][1].device):
        for batch, prompt, (name, model) in bar:
            row = {"model": name, "type": model.config.model_type, "prompt": prompt, "batch": batch}
            with skipped_when_out_of_memory(row):
                row.update(decode_speed(model, prompt, args.new_tokens, batch))
            rows.append(row)
            bar.write(format_row(row), file=sys.stderr)  # stdout: the table or JSON
    rows.sort(key=lambda r: [name for name, _ in models].index(r["model"]))  # model by model (a stable sort)
    base = {(r["batch"], r["prompt"]): r.get("tokens_per_s") for r in rows if r["model"] == rows[0]["model"]}
    for r in rows:
        first = base.get((r["batch"], r["prompt"]))
        r["vs_first"] = r["tokens_per_s"] / first if first and "tokens_per_s" in r else None
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
        return 0
    print(f"decoding {args.new_tokens} tokens after a prompt, {torch.get_num_threads()} threads (ratio: tokens/s "
          f"against {rows[0]['model']})\n")
    print("| model | type | batch | prompt | decode tokens/s | ratio | cache after the prompt | after decoding | prefill "
          "| warm-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(format_row(r))
    return 0


def format_row(r: dict) -> str:
    start = f"| {r['model']} | {r['type']} | {r['batch']} | {r['prompt']:,} |"
    if "skipped" in r:
        return f"{start} {r['skipped']} | | | | | |"
    ratio = "" if r.get("vs_first") is None else f"{r['vs_first']:.2f}x"
    return (f"{start} {r['tokens_per_s']:.1f} | {ratio} | {r['cache_mb']:.2f} MB | {r['cache_mb_after']:.2f} MB | "
            f"{r['prefill_s']:.1f} s | {r['warmup_s']:.1f} s |")
