"""The README's main job: pretrain a small recurrent LM on CPU with the real trainer, end to end.

    recur quickstart [--run-dir runs/quickstart] [key=value ...]

1. trains a 4096-token byte-level BPE tokenizer on the built-in English text (Python's own
   documentation, ~2 MB, shipped with CPython) — a few seconds;
2. runs `recur train quickstart` (recipes/pretrain/quickstart.yaml): a 5.5M-parameter recur_gla
   model, 2 processes (torchrun) with DeepSpeed ZeRO-2, float32 on CPU, about five minutes;
   metrics.jsonl, TensorBoard events, checkpoints, loss.png and export/ land in the run dir;
3. loads export/ with transformers' AutoModelForCausalLM and measures perplexity on the held-out
   documents, against a unigram model of the training tokens (their frequencies);
4. generates a sample with `generate()` and prints a summary table.

Extra key=value arguments go to `recur train` (e.g. train.max_steps=100). Run again to continue
(resume=auto); a finished run is evaluated again without training.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .trainer import scored_tokens

VOCAB = 4096
SOURCE = "builtin:python-docs"


def held_out_losses(model, data_config, tokenizer, unigram_logp: torch.Tensor, batch_size: int = 8):
    """(model loss, unigram loss) in nats per token over every scored token of the validation split."""
    from recur.data import build_loader

    loader = build_loader(data_config, tokenizer, batch_size, split="validation", num_workers=0)
    model_total = unigram_total = count = 0.0
    with torch.no_grad():
        for batch in loader:
            n = scored_tokens(batch)
            if not n:
                continue
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False)
            model_total += out.loss.item() * n
            targets = batch["labels"][:, 1:]
            scored = (targets != -100) & (batch["position_ids"][:, 1:] != 0)
            unigram_total += -unigram_logp[targets[scored]].sum().item()
            count += n
    return model_total / count, unigram_total / count, int(count)


def unigram(data_config, tokenizer, vocab_size: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities of the training tokens' frequencies (add-one smoothed) and their entropy (nats)."""
    from recur.data import build_loader

    once = dataclasses.replace(data_config, epochs=1)
    counts = Counter()
    for batch in build_loader(once, tokenizer, 64, split="train", num_workers=0):
        counts.update(batch["input_ids"][batch["labels"] != -100].tolist())
    freq = torch.ones(vocab_size, dtype=torch.float64)
    for token, c in counts.items():
        freq[token] += c
    p = freq / freq.sum()
    return p.log(), float(-(p * p.log()).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/quickstart")
    parser.add_argument("--min-ratio", type=float, default=2.0,
                        help="fail unless the held-out perplexity is this many times below the unigram model's "
                             "(0: report only)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides passed to recur train (dotted.key=value)")
    args = parser.parse_intermixed_args(argv)
    from .rundir import RunDirLock, make_run_dir

    run_dir = make_run_dir(Path(args.run_dir))
    with RunDirLock(run_dir):  # one quickstart or training per run dir; its `recur train` is told it holds it
        return quickstart(run_dir, args)


def quickstart(run_dir: Path, args) -> int:
    start = time.perf_counter()

    from recur.data import SourceConfig, load_tokenizer, train_tokenizer
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.exists():
        print(f"[1/4] training a {VOCAB}-token BPE tokenizer on {SOURCE} ...", flush=True)
        train_tokenizer([SourceConfig(SOURCE)], VOCAB, "bpe", str(tokenizer_dir))
    else:
        print(f"[1/4] tokenizer: {tokenizer_dir} (already trained)", flush=True)

    command = [sys.executable, "-m", "recur.cli", "train", "quickstart", f"run_dir={run_dir}",
               f"data.tokenizer={tokenizer_dir}", *args.overrides]
    print("[2/4] pretraining:", "recur train quickstart", *command[5:], flush=True)
    train_start = time.perf_counter()
    code = subprocess.call(command)
    train_seconds = time.perf_counter() - train_start
    if code != 0:
        print(f"error: recur train exited with {code}" + (" (stopped by a signal: run the same command again to "
                                                          "continue)" if code == 75 else ""), file=sys.stderr)
        return code

    print("[3/4] held-out perplexity of export/ (loaded with transformers) vs a unigram model ...", flush=True)
    # Small work: one thread (several threads stall when other processes share the cores), no denormals.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .recipe import load_recipe
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    unigram_logp, entropy = unigram(recipe.data, tokenizer, model.config.vocab_size)
    model_loss, unigram_loss, n_tokens = held_out_losses(model, recipe.data, tokenizer, unigram_logp)

    print("[4/4] a sample from generate() ...", flush=True)
    prompt = "The"
    ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    sample = model.generate(**ids, max_new_tokens=80, min_new_tokens=80, do_sample=True, temperature=0.8, top_k=40)
    text = tokenizer.decode(sample[0], skip_special_tokens=True)

    from .metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "loss" in r]  # (not event lines)
    last = records[-1]
    n_params = sum(p.numel() for p in model.parameters())
    t = recipe.train
    val = [r for r in records if "val_loss" in r]
    rows = [
        ("model", f"{model.config.model_type}, {model.config.num_hidden_layers} layers of width "
                  f"{model.config.hidden_size}, {n_params / 1e6:.1f}M parameters"),
        ("training", f"{recipe.nproc} processes, DeepSpeed ZeRO-{t.zero_stage}, float32 on CPU, {last['step']} steps, "
                     f"{last['tokens']:,} tokens, {train_seconds / 60:.1f} min (incl. start-up)"),
        ("throughput", f"{last['tokens_per_s']:,.0f} tokens/s, MFU {100 * last['mfu']:.0f}% of a measured matmul peak"),
        ("train loss", f"{records[0]['loss']:.2f} (step {records[0]['step']}) -> {last['loss']:.2f} (step {last['step']})"),
        ("validation loss", " -> ".join(f"{r['val_loss']:.2f}" for r in val) + " (during training)"),
        ("held-out perplexity", f"**{math.exp(model_loss):.1f}** (recur model, {n_tokens:,} held-out tokens)"),
        ("unigram baseline", f"{math.exp(unigram_loss):.1f} on the same tokens (training-token entropy "
                             f"{entropy:.2f} nats: perplexity {math.exp(entropy):.1f})"),
        ("files", f"{run_dir}/loss.png, metrics.jsonl, tensorboard/, checkpoints/, export/"),
    ]
    print(f"\nsample (prompt {prompt!r}, temperature 0.8):\n{text}\n")
    print("| quickstart | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\ntotal {(time.perf_counter() - start) / 60:.1f} min")
    ratio = math.exp(unigram_loss - model_loss)
    print(f"held-out perplexity {ratio:.1f}x below the unigram model's")
    if ratio < args.min_ratio:
        print(f"error: the model did not learn enough: its held-out perplexity is {ratio:.2f}x below the unigram "
              f"model's, short of {args.min_ratio}x", file=sys.stderr)
        return 1
    return 0
