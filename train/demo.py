"""The README's main job until the trainer lands: pretrain a small recurrent LM on CPU, end to end.

    recur demo [--steps 400] [--out runs/demo]

A byte-level language model of gated-linear-attention blocks (GLA token mixing, SwiGLU channel
mixing), built directly on `recur.kernels`, trains on real English text that ships with Python
itself (the reference manual in the standard library's `pydoc_data`), reports held-out bits per
byte before and after, and generates text by decoding with a constant-size recurrent state,
checked token for token against recomputing the whole sequence.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from recur import kernels

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


class GLABlock(nn.Module):
    """x + GLA(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)); the gate is fla's low-rank form / 16."""

    def __init__(self, dim: int, heads: int, gate_rank: int = 16, gate_normaliser: float = 16.0):
        super().__init__()
        self.heads, self.head_dim, self.gate_normaliser = heads, dim // heads, gate_normaliser
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkvg = nn.Linear(dim, 4 * dim, bias=False)
        self.decay = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, dim))
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_in = nn.Linear(dim, 2 * 4 * dim, bias=False)
        self.mlp_out = nn.Linear(4 * dim, dim, bias=False)

    def _mix_inputs(self, x):
        shape = x.shape[:-1] + (self.heads, self.head_dim)
        q, k, v, g = self.qkvg(x).chunk(4, -1)
        log_decay = F.logsigmoid(self.decay(x)) / self.gate_normaliser
        return q.view(shape), k.view(shape), v.view(shape), log_decay.view(shape), g

    def _finish(self, x, o, g):
        o = self.out_norm(o).flatten(-2) * F.silu(g)
        h = x + self.out(o)
        a, b = self.mlp_in(self.norm2(h)).chunk(2, -1)
        return h + self.mlp_out(F.silu(a) * b)

    def forward(self, x):
        q, k, v, log_decay, g = self._mix_inputs(self.norm1(x))
        o, _ = kernels.gated_linear_attention(q, k, v, log_decay)
        return self._finish(x, o, g)

    def step(self, x, state):
        """One token: x [B, dim], state [B, H, K, V]."""
        q, k, v, log_decay, g = self._mix_inputs(self.norm1(x))
        o, state = kernels.gated_linear_attention_step(q, k, v, log_decay, state, self.head_dim**-0.5)
        return self._finish(x, o.to(x.dtype), g), state


class ByteLM(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(GLABlock(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0, seed: int = 0):
        """Decode with one [H, K, V] state per layer: memory stays constant however long the text."""
        gen = torch.Generator().manual_seed(seed)
        b = self.blocks[0]
        states = [prompt.new_zeros(prompt.shape[0], b.heads, b.head_dim, b.head_dim, dtype=torch.float32)
                  for _ in self.blocks]
        tokens = prompt
        for t in range(prompt.shape[1] + new_tokens - 1):
            x = self.embed(tokens[:, t])
            for i, block in enumerate(self.blocks):
                x, states[i] = block.step(x, states[i])
            if t + 1 < tokens.shape[1]:
                continue  # still reading the prompt
            logits = self.head(self.norm(x))
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
        return tokens


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
        rows = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: torch.Tensor, length: int = 512, max_rows: int = 48) -> float:
    rows = data[: (data.numel() - 1) // length * length + 1]
    ids = rows[:-1].view(-1, length)[:max_rows]
    targets = rows[1:].view(-1, length)[:max_rows]
    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
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
    model = ByteLM()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: Python reference manual (pydoc_data), {len(train_text):,} training bytes, "
          f"{len(valid_text):,} held out")
    print(f"model: byte-level GLA, {len(model.blocks)} layers, {n_params / 1e6:.2f}M parameters, CPU float32")

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
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
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
    torch.save(model.state_dict(), out / "model.pt")

    print(f"\n| held-out bits per byte | before | after |\n|---|---|---|\n| Python reference manual | "
          f"{before:.3f} | {after:.3f} |")
    prompt = torch.tensor([list(b"The ")])
    greedy = model.generate(prompt, 48)
    with torch.no_grad():  # the recurrent decode must pick what a full forward over the same text picks
        full = model(greedy[:, :-1]).argmax(-1)[:, prompt.shape[1] - 1:]
    same = torch.equal(full, greedy[:, prompt.shape[1]:])
    sample = model.generate(prompt, 300, temperature=0.8, seed=args.seed)
    print(f"\ngreedy decode with the recurrent state equals the full forward: {'yes' if same else 'NO'}")
    print("sampled text (temperature 0.8):\n" + bytes(sample[0].tolist()).decode("utf-8", "replace"))
    print(f"\nmetrics and weights in {out}/")
    return 0 if same and after < before else 1
