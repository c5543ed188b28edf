"""Data-loader benchmark: tokens/s the loader delivers vs tokens/s a training step consumes.

    recur bench data [--source PATH] [--tokenizer bpe|byte|PATH] [--workers 1 2] [--batches 200]

The loader packs the 20 MB Wikipedia sample (../shared/data/pretrain/enwiki-2015, WikiExtractor
format) when it is there, else builtin:python-docs. Its tokens/s is measured from the first batch
on (worker start-up and tokenization included); the training step is that of the README's main job
(`recur quickstart`: the quickstart recipe's model, built for this tokenizer), forward + backward +
AdamW on batches of the same shape, timed in this process, one process. The loader
must deliver at least 10x what training consumes, so data never stalls a step.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import torch
from tqdm import tqdm

from recur.data import DataConfig, SourceConfig, build_loader, load_tokenizer, train_tokenizer

SHARED_WIKI = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pretrain" / "enwiki-2015"


def loader_tokens_per_s(config: DataConfig, tokenizer, batch_size: int, batches: int, workers: int) -> dict:
    """Tokens/s over `batches` batches from a fresh loader, and how the rows are packed."""
    loader = build_loader(config, tokenizer, batch_size, num_workers=workers)
    start, tokens, pad, starts, rows, continued = time.perf_counter(), 0, 0, 0, 0, 0
    for _, batch in zip(tqdm(range(batches), desc=f"loader, {workers} worker(s)", unit="batch", leave=False), loader):
        tokens += batch["input_ids"].numel()
        pad += (batch["labels"] == -100).sum().item()
        starts += (batch["position_ids"] == 0).sum().item()
        rows += batch["input_ids"].shape[0]
        continued += (batch["position_ids"][:, 0] != 0).sum().item()
    return dict(rate=tokens / (time.perf_counter() - start), efficiency=1 - pad / max(tokens, 1),
                docs_per_row=starts / rows, continued=continued / rows)


def train_tokens_per_s(model, vocab: int, batch_size: int, seq_len: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    for step in range(steps + 1):
        if step == 1:  # the first step allocates; time the rest
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * ids.numel() / (time.perf_counter() - start)


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from recur.cli import keep_freed_memory
    from recur.train.recipe import load_recipe
    from recur.train.trainer import model_config

    parser = argparse.ArgumentParser(prog="recur bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(SHARED_WIKI) if SHARED_WIKI.exists() else "builtin:python-docs")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (trained here, 4096 tokens), byte, or a folder/.gguf")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer == "bpe":
            folder = os.path.join(tmp, "tokenizer")
            train_tokenizer([SourceConfig(args.source)], 4096, "bpe", folder, max_chars=4_000_000)
            tokenizer = load_tokenizer(folder)
        else:
            tokenizer = load_tokenizer(args.tokenizer)
        config = DataConfig(sources=[SourceConfig(args.source)], tokenizer=args.tokenizer, seq_len=args.seq_len)
        print(f"source: {args.source}\ntokenizer: {args.tokenizer} ({len(tokenizer)} tokens); "
              f"batches of {args.batch_size} x {args.seq_len} tokens")
        rows = []
        for workers in args.workers:
            rows.append((workers, loader_tokens_per_s(config, tokenizer, args.batch_size, args.batches, workers)))

    recipe = load_recipe("quickstart")
    model = AutoModelForCausalLM.from_config(model_config(recipe, tokenizer)).train()
    torch.set_flush_denormal(True)
    n_params = sum(p.numel() for p in model.parameters())
    train = train_tokens_per_s(model, len(tokenizer), args.batch_size, args.seq_len, args.train_steps)
    print(f"training step of the README's quickstart model ({n_params / 1e6:.2f}M parameters, CPU, "
          f"{torch.get_num_threads()} threads): {train:,.0f} tokens/s\n")
    print("| loader workers | tokens/s | loader / training step | packing efficiency (non-pad) | documents per row "
          "| rows opening mid-document |\n|---|---|---|---|---|---|")
    for workers, r in rows:
        print(f"| {workers} | {r['rate']:,.0f} | {r['rate'] / train:.1f}x | {r['efficiency']:.1%} | "
              f"{r['docs_per_row']:.2f} | {r['continued']:.0%} |")
    worst = min(r["rate"] for _, r in rows) / train
    print(f"\nslowest loader / training step = {worst:.1f}x (target: at least 10x)")
    return 0 if worst >= 10 else 1
