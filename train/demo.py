"""The README's main job until the trainer lands: pretrain a small recurrent LM on CPU, end to end.

    recur demo [--steps 400] [--out runs/demo]

A byte-level recur_gla model (GLA token mixing, SwiGLU channel mixing) trains on real English
text that ships with Python itself (the reference manual in the standard library's `pydoc_data`),
reports held-out bits per byte before and after, and generates text with `generate()` and its
constant-size recurrent cache, checked token for token against recomputing the whole sequence.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from recur.modeling import GLAConfig, GLAForCausalLM

VOCAB = 256  # bytes


def load_corpus(valid_fraction: float = 0.05) -> tuple[bytes, bytes]:
    """Python's reference-manual topics, one document each; every 20th document is held out."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise SystemExit(f"error: this Python has no pydoc_data (the demo's built-in English text): {e}") from e
    docs = [topics[name].strip().encode() + b"\n\n" for name in sorted(topics)]
    every = round(1 / valid_fraction)
    train = b"".join(d for i, d in enumerate(docs) if i % every)
    valid = b"".join(d for i, d in enumerate(docs) if not i % every)
    return train, valid


def demo_model() -> GLAForCausalLM:
    """A small byte-level recur_gla: 2 layers of width 128, two heads of 64."""
    config = GLAConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_heads=2, expand_k=1.0,
                       expand_v=1.0, intermediate_size=512, bos_token_id=None, eos_token_id=None)
    return GLAForCausalLM(config)


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
        rows = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def bits_per_byte(model: GLAForCausalLM, data: torch.Tensor, length: int = 512, max_rows: int = 48) -> float:
    rows = data[: (data.numel() - 1) // length * length + 1]
    ids = rows[:-1].view(-1, length)[:max_rows]
    targets = rows[1:].view(-1, length)[:max_rows]
    loss = F.cross_entropy(model(ids, use_cache=False).logits.flatten(0, 1), targets.flatten())
    return loss.item() / math.log(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="folder for metrics.jsonl and the model weights")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    torch.manual_seed(args.seed)
    train_text, valid_text = load_corpus()
    train = torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long()
    valid = torch.frombuffer(bytearray(valid_text), dtype=torch.uint8).long()
    model = demo_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: Python reference manual (pydoc_data), {len(train_text):,} training bytes, "
          f"{len(valid_text):,} held out")
    print(f"model: byte-level recur_gla, {model.config.num_hidden_layers} layers, {n_params / 1e6:.2f}M parameters, "
          "CPU float32")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))))
    before = bits_per_byte(model, valid)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("w")
    data = batches(train, args.batch, args.length, torch.Generator().manual_seed(args.seed))
    bar = tqdm(range(1, args.steps + 1), desc="pretraining", unit="step", mininterval=1.0)
    start = time.perf_counter()
    for step in bar:
        ids, targets = next(data)
        loss = F.cross_entropy(model(ids, use_cache=False).logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        tokens_per_s = step * ids.numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}")
        metrics.write(json.dumps(dict(step=step, loss=loss.item(), lr=schedule.get_last_lr()[0],
                                      grad_norm=grad_norm.item(), tokens=step * ids.numel(),
                                      tokens_per_s=tokens_per_s)) + "\n")
    metrics.close()
    after = bits_per_byte(model, valid)
    model.eval()
    model.save_pretrained(out / "model")

    print(f"\n| held-out bits per byte | before | after |\n|---|---|---|\n| Python reference manual | "
          f"{before:.3f} | {after:.3f} |")
    prompt = torch.tensor([list(b"The ")])
    mask = torch.ones_like(prompt)
    greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=48, do_sample=False)
    with torch.no_grad():  # the recurrent decode must pick what a full forward over the same text picks
        full = model(greedy[:, :-1], use_cache=False).logits.argmax(-1)[:, prompt.shape[1] - 1:]
    same = torch.equal(full, greedy[:, prompt.shape[1]:])
    torch.manual_seed(args.seed)
    sample = model.generate(prompt, attention_mask=mask, max_new_tokens=300, do_sample=True, temperature=0.8,
                            top_k=0)
    print(f"\ngreedy decode with the recurrent state equals the full forward: {'yes' if same else 'NO'}")
    print("sampled text (temperature 0.8):\n" + bytes(sample[0].tolist()).decode("utf-8", "replace"))
    print(f"\nmetrics in {out}/metrics.jsonl; the model (transformers format, code included) in {out}/model/")
    return 0 if same and after < before else 1
