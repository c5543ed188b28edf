"""Long-context probes for any causal LM: `recur eval MODEL --probe passkey|needle|ppl-by-position`.

- passkey: a 5-digit key in repeated filler (Mohtashami & Jaggi 2023, the prompt LongLoRA runs), at
  depth d of an L-token prompt, then the question; greedy answer; exact match of the key.
- needle: "The special magic number for <word> is <7 digits>." in real text (WikiText-2 test, else the
  enwiki files of --data-dir, else Python's own docs), at depth d; exact match of the number.
- ppl-by-position: per-position NLL over L-token stretches of real documents (eos between them), in
  doubling buckets: does the model use context beyond its training length?

Prompts go through the model's cache CHUNK tokens at a time, then decode token by token, so a
recurrent model holds 16K tokens in flat memory. Writes probe_<name>_<time>.json and .png into the
output folder and prints a markdown table.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from ..modeling.base import CACHE_FIELD
from .harness import EvalError

CHUNK = 2048        # prefill piece: bounds activation memory, the cache carries the rest
MIN_LENGTH = 64
BUCKET0 = 128       # first ppl bucket [0, 128); then doubling
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = {"passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                    "them. I will quiz you about the important information there.",
         "needle": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                   "it. I will quiz you about the numbers afterwards."}
DIGITS = {"passkey": 5, "needle": 7}
WORDS = ("apple", "harbor", "violin", "glacier", "lantern", "meadow", "compass", "falcon", "orchid", "canyon",
         "pepper", "marble", "saddle", "thunder", "walnut", "ribbon", "island", "anchor", "velvet", "prairie")
# after a sentence end (or a newline) and before the whitespace that follows it: the pieces concatenate back
# to the text exactly, and each but the first starts with its space, so a needle can go between any two
SENTENCE_END = re.compile(r"(?<=[.!?\n])(?=\s)")
WIKI_DOC = re.compile(r"<doc[^>]*>\n(.*?)</doc>", re.S)


def check_args(lengths: str, depths: str, trials: int):
    """(sorted lengths, depths, trials), or one-line EvalError: checked before anything is written."""
    try:
        ls = sorted({int(x) for x in lengths.split(",") if x.strip()})
        ds = sorted({float(x) for x in depths.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--lengths {lengths} --depths {depths}: give comma-separated numbers") from None
    if not ls or ls[0] < MIN_LENGTH:
        raise EvalError(f"--lengths {lengths}: each length must be at least {MIN_LENGTH} tokens")
    if not ds or not all(0 <= d <= 1 for d in ds):
        raise EvalError(f"--depths {depths}: each depth must be in [0, 1] (0: the prompt's start, 1: its end)")
    if trials < 1:
        raise EvalError(f"--trials {trials}: must be at least 1")
    return ls, ds, trials


def exact_match(answer: str, key: str) -> bool:
    """The first number the model wrote is the key (a longer or other number is wrong)."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


def position_limit(model) -> int | None:
    """Longest sequence the model can hold: none for recurrent (stateful) models, else max_position_embeddings."""
    return None if getattr(model, "_is_stateful", False) else getattr(model.config, "max_position_embeddings", None)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sentence_ids(tokenizer, text: str, need: int) -> list[list[int]]:
    """The text's sentences as token ids, enough of them for `need` tokens."""
    parts, out, total = SENTENCE_END.split(text), [], 0
    for i in range(0, len(parts), 512):
        out += tokenizer(parts[i:i + 512], add_special_tokens=False)["input_ids"]
        total = sum(map(len, out))
        if total >= need:
            return out
    raise EvalError(f"the haystack text has {total} tokens, {need} are needed")


def build_prompt(tokenizer, sentences, length: int, depth: float, intro: str, needle: str, question: str):
    """(ids of exactly `length` tokens, the needle's index, its actual depth in the haystack) or None when
    the needle and the question alone do not fit. Built from token ids, not text, so the length is exact;
    the needle goes at the sentence boundary nearest `depth`, never inside a sentence (`sentences`: token
    ids of pieces that each start with their whitespace, enough for `length`). The intro is left
    out where it would take the haystack below half the prompt (short prompts, byte tokenizers)."""
    start = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS, for tokenizers that add one
    mid, end = encode(tokenizer, " " + needle), encode(tokenizer, "\n" + question)
    head = start + encode(tokenizer, intro + "\n")
    if len(head) + len(mid) + len(end) > length // 2:
        head = start
    budget = length - len(head) - len(mid) - len(end)
    if budget < 0:
        return None
    hay, ends = [], [0]
    for piece in sentences:
        if len(hay) >= budget:
            break
        hay += piece
        ends.append(len(hay))
    cut = len(hay) - budget  # the first sentence is cut (an excerpt), so the last ends before the question
    hay, bounds = hay[cut:], [e - cut for e in ends if e >= cut]
    at = min(bounds, key=lambda b: abs(b - depth * budget))
    return head + hay[:at] + mid + hay[at:] + end, len(head) + at, at / max(budget, 1)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, each=None):
    """Feeds ids [1, T] through the model's cache CHUNK tokens at a time; `each(start, logits)` sees every
    chunk's logits. (last logits [V], cache), or None when the model gives back no cache to carry."""
    cache, out = None, None
    for start in range(0, ids.shape[1], CHUNK):
        out = model(ids[:, start:start + CHUNK], use_cache=True, **({CACHE_FIELD: cache} if start else {}))
        cache = getattr(out, CACHE_FIELD, None)
        if cache is None and start + CHUNK < ids.shape[1]:
            return None
        if each is not None:
            each(start, out.logits)
    return out.logits[0, -1], cache


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy continuation of `ids` (up to new_tokens, stopping after eos): chunked prefill, then one token
    at a time through the cache. A model without a cache to carry: transformers' generate() on the whole prompt."""
    prompt = torch.tensor([ids], device=model.device)
    done = prefill(model, prompt)
    if done is None or done[1] is None:
        stop = {} if eos is None else {"eos_token_id": eos, "pad_token_id": eos}
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, **stop)
        return out[0, len(ids):].tolist()
    (logits, cache), tokens = done, []
    while True:
        tokens.append(int(logits.argmax()))
        if tokens[-1] == eos or len(tokens) == new_tokens:
            return tokens
        out = model(torch.tensor([tokens[-1:]], device=model.device), use_cache=True, **{CACHE_FIELD: cache})
        logits, cache = out.logits[0, -1], getattr(out, CACHE_FIELD)


def real_text(data_dir: Path | None):
    """(what, documents): WikiText-2 test (held out from pretraining), else the enwiki files, else Python's docs."""
    if data_dir is not None:
        wiki = Path(data_dir) / "eval/wikitext-2-raw/wiki.test.raw"
        if wiki.is_file():
            from .tasks import wikitext_pages

            return f"wikitext-2-raw test ({wiki})", wikitext_pages(wiki.read_text(encoding="utf-8"))
        files = sorted((Path(data_dir) / "pretrain/enwiki-2015").glob("wiki_*"))
        docs = [d.strip() for f in files for d in WIKI_DOC.findall(f.read_text(encoding="utf-8", errors="replace"))]
        if docs:
            return f"enwiki-2015 ({files[0].parent})", docs
    from ..data.sources import python_docs

    return "builtin:python-docs (no WikiText or enwiki under --data-dir)", list(python_docs())


def retrieval(name, model, tokenizer, lengths, depths, trials, data_dir=None) -> dict:
    """passkey or needle: per (length, depth) cell, accuracy over `trials` keys (seeded by cell and trial)."""
    from tqdm import tqdm

    limit, need = position_limit(model), max(lengths)
    new_tokens = len(encode(tokenizer, " " + "9" * DIGITS[name])) + 2  # the key, and a little slack
    if name == "passkey":
        text = "filler: " + FILLER
        filler = (" " + FILLER) * (need // max(len(encode(tokenizer, FILLER)), 1) + 2)
        hays = [sentence_ids(tokenizer, filler, need)] * trials
    else:
        text, docs = real_text(data_dir)
        whole = "\n\n".join(docs)
        hays = []
        for t in range(trials):  # trial t: the same stretch of text at every length and depth
            at = whole.find("\n", random.Random(f"needle-text:{t}").randrange(len(whole))) + 1
            hays.append(sentence_ids(tokenizer, (whole[at:] + "\n\n" + whole[:at])[:need * 16], need))
    cells = []
    for length, depth in tqdm(list(itertools.product(lengths, depths)), desc=f"probe {name}", unit="cell"):
        cell, samples = {"length": length, "depth": depth, "accuracy": None}, []
        if limit is not None and length + new_tokens > limit:
            cells.append({**cell, "note": f"skipped: longer than max_position_embeddings ({limit})"})
            continue
        for t in range(trials):
            rng = random.Random(f"{name}:{length}:{depth}:{t}")
            key = str(rng.randrange(10 ** (DIGITS[name] - 1), 10 ** DIGITS[name]))
            if name == "passkey":
                needle, question = f"The pass key is {key}. Remember it. {key} is the pass key.", \
                    "What is the pass key? The pass key is"
            else:
                word = rng.choice(WORDS)
                needle = f"The special magic number for {word} is {key}."
                question = f"What is the special magic number for {word}? The special magic number for {word} is"
            built = build_prompt(tokenizer, hays[t], length, depth, INTRO[name], needle, question)
            if built is None:
                break
            ids, _, actual = built
            answer = tokenizer.decode(greedy(model, ids, new_tokens, tokenizer.eos_token_id), skip_special_tokens=True)
            samples.append({"key": key, "answer": answer, "correct": exact_match(answer, key),
                            "depth": round(actual, 3)})
        if len(samples) < trials:
            cells.append({**cell, "note": "skipped: the needle and the question alone are longer"})
            continue
        cells.append({**cell, "accuracy": sum(s["correct"] for s in samples) / trials, "samples": samples})
    return {"text": text, "cells": cells}


@torch.no_grad()
def ppl_by_position(model, tokenizer, lengths, trials, data_dir=None, seq_len=None) -> dict:
    """Mean NLL by position over `trials` sequences of the longest length the model holds, in buckets
    [0, 128), [128, 256), ... doubling up to the length (bucket by the position of the predicted token)."""
    from tqdm import tqdm

    limit = position_limit(model)
    fits = [n for n in lengths if limit is None or n <= limit]
    notes = {str(n): f"skipped: longer than max_position_embeddings ({limit})" for n in lengths if n not in fits}
    if not fits:
        return {"text": None, "notes": notes, "buckets": []}
    length = fits[-1]
    text, docs = real_text(data_dir)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else encode(tokenizer, "\n\n")
    stream, rows = [], []
    for doc in docs:  # documents back to back, eos between, cut into sequences of `length`
        stream += encode(tokenizer, doc) + sep
        while len(stream) >= length and len(rows) < trials:
            rows.append(stream[:length])
            stream = stream[length:]
        if len(rows) == trials:
            break
    if not rows:
        raise EvalError(f"{text}: fewer than {length} tokens of text")
    total = torch.zeros(length - 1, dtype=torch.float64)
    for row in tqdm(rows, desc="probe ppl-by-position", unit="sequence"):
        ids = torch.tensor([row], device=model.device)

        def add(start, logits):  # position start+j predicts token start+j+1
            targets = ids[0, start + 1:start + 1 + logits.shape[1]]
            nll = torch.nn.functional.cross_entropy(logits[0, :len(targets)].float(), targets, reduction="none")
            total[start:start + len(targets)] += nll.double().cpu()

        if prefill(model, ids, add) is None:  # no cache to carry: the whole sequence at once
            add(0, model(ids, use_cache=False).logits)
    mean = total / len(rows)
    edges = [0] + [BUCKET0 << k for k in range(32) if BUCKET0 << k < length] + [length]
    buckets = []
    for a, b in zip(edges, edges[1:]):
        nll = float(mean[max(a - 1, 0):b - 1].mean())
        buckets.append({"start": a, "end": b, "nll": round(nll, 4), "ppl": round(math.exp(nll), 3),
                        "beyond_training": None if seq_len is None else a >= seq_len})
    return {"text": text, "notes": notes, "length": length, "sequences": len(rows), "buckets": buckets}


def table(result: dict) -> str:
    seq_len, mark = result.get("training_seq_len"), " †"
    if result["probe"] == "ppl-by-position":
        rows = ["| positions | nll | ppl |", "|---|---|---|"]
        rows += [f"| [{b['start']}, {b['end']}){mark if b['beyond_training'] else ''} | {b['nll']:.3f} "
                 f"| {b['ppl']:.2f} |"
                 for b in result["buckets"]]
        notes = [f"{n}: {why}" for n, why in result["notes"].items()]
    else:
        depths = result["depths"]
        rows = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
        for n in result["lengths"]:
            cells = [c for c in result["cells"] if c["length"] == n]
            values = ["skip" if c["accuracy"] is None else f"{c['accuracy']:.2f}" for c in cells]
            rows.append(f"| {n}{mark if seq_len and n > seq_len else ''} | " + " | ".join(values) + " |")
        notes = sorted({f"{c['length']}: {c['note']}" for c in result["cells"] if "note" in c})
    lines = rows + ([f"\n† beyond the training length ({seq_len} tokens)"] if seq_len else []) + notes
    return f"{result['probe']} on {result['text'] or 'no text'}\n\n" + "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax, seq_len = fig.add_subplot(), result.get("training_seq_len")
    if result["probe"] == "ppl-by-position":
        buckets = result["buckets"]
        if buckets:  # one step per bucket: its perplexity holds over the positions it covers
            ax.step([max(b["start"], 1) for b in buckets] + [buckets[-1]["end"]],
                    [b["ppl"] for b in buckets] + [buckets[-1]["ppl"]], where="post")
        ax.set(xscale="log", xlabel="token position (bucket)", ylabel="perplexity")
        if seq_len:
            ax.axvline(seq_len, color="gray", linestyle="--", label=f"training length {seq_len}")
            ax.legend()
    else:
        lengths, depths = result["lengths"], result["depths"]
        grid = [[next(c["accuracy"] for c in result["cells"] if (c["length"], c["depth"]) == (n, d)) for d in depths]
                for n in lengths]
        image = ax.imshow([[math.nan if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                          cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j) in itertools.product(range(len(lengths)), range(len(depths))):
            ax.text(j, i, "skip" if grid[i][j] is None else f"{grid[i][j]:.2f}", ha="center", va="center")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n}{' †' if seq_len and n > seq_len else ''}" for n in lengths])
        ax.set(xlabel="depth of the needle", ylabel="prompt length (tokens)")
        fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"{result['probe']}: {Path(result['model']).name}")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main_probe(args, model, tokenizer, source, out: Path, data_dir: Path | None) -> int:
    """`recur eval MODEL --probe NAME`: run it, write JSON + PNG into `out`, print the table."""
    lengths, depths, trials = check_args(args.lengths, args.depths, args.trials)
    began = time.perf_counter()
    if args.probe == "ppl-by-position":
        result = ppl_by_position(model, tokenizer, lengths, trials, data_dir, source.seq_len)
    else:
        result = retrieval(args.probe, model, tokenizer, lengths, depths, trials, data_dir)
    result = {"probe": args.probe, "model": str(source.path), "kind": source.kind, "lengths": lengths,
              "depths": depths if args.probe != "ppl-by-position" else None, "trials": trials,
              "training_seq_len": source.seq_len, "position_limit": position_limit(model), "chunk": CHUNK,
              **result, "seconds": round(time.perf_counter() - began, 1)}
    out.mkdir(parents=True, exist_ok=True)
    stem, k = f"probe_{args.probe}_{time.strftime('%Y%m%d-%H%M%S')}", 1
    while (out / f"{stem}.json").exists():
        stem, k = f"{stem.rsplit('~', 1)[0]}~{k}", k + 1
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(table(result))
    print(f"probe results in {out / stem}.json and .png", file=sys.stderr)
    return 0
