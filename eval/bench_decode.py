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
ratio of each model's tokens/s to the first model's. At each batch size and prompt length every
model prefills its cache, then the models take turns decoding (8 turns of 16 tokens by default), so
a slow or fast stretch of the machine falls on all of them alike. `--compile-step` turns on the
models' compiled one-token step where their config has one (`compile_decode_step`: Titans); its
compiling falls in the untimed tokens, whose time the table shows as the warm-up.
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
TURNS = 8  # the timed tokens of each model go in this many turns, the models taking turns


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


class Decoding:
    """One model after one prompt: the prompt (random token ids) through its cache `CHUNK` tokens at a
    time, `WARMUP` untimed greedy tokens, then timed ones in as many turns as the caller takes with
    the other models (`decode`), so that a slow moment of the machine falls on all of them."""

    @torch.no_grad()
    def __init__(self, model, prompt_len: int, batch: int = 1, seed: int = 0):
        self.model, self.prompt_len, self.batch, self.times = model, prompt_len, batch, []
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
        ids, start, self.cache = ids.to(model.device), time.perf_counter(), None
        for at in range(0, prompt_len, CHUNK):
            out = model(ids[:, at:at + CHUNK], use_cache=True, **({CACHE_FIELD: self.cache} if at else {}))
            self.cache = getattr(out, CACHE_FIELD)
        self.prefill_s, self.size = time.perf_counter() - start, cache_bytes(self.cache)
        self.token = out.logits[:, -1:].argmax(-1)
        self.warmup_s = sum(self._step() for _ in range(WARMUP))  # one-time costs (allocations, compiling)

    def _step(self) -> float:
        start = time.perf_counter()
        out = self.model(self.token, use_cache=True, **{CACHE_FIELD: self.cache})
        self.cache, self.token = getattr(out, CACHE_FIELD), out.logits[:, -1:].argmax(-1)
        if self.token.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, tokens: int):
        self.times += [self._step() for _ in range(tokens)]

    def result(self) -> dict:
        return {"prompt": self.prompt_len, "batch": self.batch,
                "tokens_per_s": self.batch / statistics.median(self.times),
                "tokens_per_s_mean": self.batch * len(self.times) / sum(self.times), "cache_mb": self.size / 2**20,
                "cache_mb_after": cache_bytes(self.cache) / 2**20, "prefill_s": self.prefill_s,
                "warmup_s": self.warmup_s}


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
    turns = [args.new_tokens // TURNS + (i < args.new_tokens % TURNS) for i in range(TURNS)]
    with tqdm(total=len(batches) * len(prompts) * len(models), desc="decode", unit="prefill") as bar, \
            memory_limit(models[0][1].device):
        for batch in batches:
            for prompt in prompts:
                runs = []  # (row, Decoding) of every model after this prompt, caches held together
                for name, model in models:
                    bar.set_postfix_str(f"{name.split('/')[-1]} {batch}x{prompt}")
                    row = {"model": name, "type": model.config.model_type, "prompt": prompt, "batch": batch}
                    with skipped_when_out_of_memory(row):
                        runs.append((row, Decoding(model, prompt, batch)))
                    rows.append(row)
                    bar.update()
                for tokens in turns:  # the models take turns
                    for row, decoding in runs:
                        with skipped_when_out_of_memory(row):
                            if "skipped" not in row:
                                decoding.decode(tokens)
                for row, decoding in runs:
                    if "skipped" not in row:
                        row.update(decoding.result())
                    bar.write(format_row(row), file=sys.stderr)  # stdout: the table or JSON
                del runs
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
