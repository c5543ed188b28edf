"""Packed, sharded, exactly resumable batches: what the trainer pulls.

    loader = build_loader(config, tokenizer, batch_size=8, rank=0, world_size=1, split="train")
    for batch in loader: ...   # input_ids, position_ids, labels: [8, seq_len] each
    state = loader.state_dict(); ...; loader.load_state_dict(state)

How it is exact:
- Documents are named by (file, index) and read in a fixed order: files shuffled per epoch by the
  seed (not a shuffle buffer, which cannot resume exactly), documents in file order.
- Every data-parallel rank × DataLoader worker is one "slot". With at least as many files as slots,
  slot s reads the files at positions s, s + slots, ...; otherwise every slot reads every file and
  keeps the documents whose running count is s mod slots. Over an epoch each document of the split
  goes to exactly one slot.
- A slot's whole state is small: per source where its document stream stands (epoch, file,
  document, count), the mixture RNG, and the tokens left over from the document cut at the end of
  the last row. torchdata's StatefulDataLoader keeps one such state per worker and knows which
  worker yields next.

Rows hold tokens of consecutive documents, each ended by eos, with no padding (the last row of the
validation split, or of the last epoch when data.epochs is set, is padded; its labels are -100 there). position_ids restart at 0 at each document
start, which makes every model reset its recurrent state there; a document cut at a row's end goes
on in the next row with its positions continuing.
"""
from __future__ import annotations

import dataclasses
import os
import random
import warnings
import zlib
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .config import DataConfig, DataError, SourceConfig
from .sources import Problems, no_documents, read_documents, source_files

STATE_VERSION = 1
_TOKENIZE_GROUP = 32  # documents tokenized in one call (the Rust tokenizer's per-call cost is then shared)


def in_validation(path: str, index: int, fraction: float) -> bool:
    """A stable, position-based choice: the same documents are held out on every machine and run."""
    if fraction <= 0:
        return False
    key = f"{os.path.basename(path)}:{index}".encode()
    return zlib.crc32(key) % 1_000_000 < fraction * 1_000_000


def encode(tokenizer, texts: list[str], add_bos: bool) -> list[list[int]]:
    """Token ids of whole documents, eos appended. Text that looks like a special token stays text."""
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return [bos + x + [tokenizer.eos_token_id] for x in ids]


@dataclass
class Cursor:
    """Where one source's document stream stands for one slot."""
    epoch: int = 0
    file: int = 0   # position in the epoch's file order
    doc: int = 0    # next document index within that file
    seen: int = 0   # documents of the split passed so far this epoch, by any slot


class DocumentStream:
    """One source's token documents for one slot and split, from a cursor; train cycles epochs."""

    def __init__(self, source: SourceConfig, index: int, config: DataConfig, tokenizer, split: str,
                 slot: int, slots: int, problems: Problems, prepared=None):
        self.source, self.index, self.config, self.tokenizer = source, index, config, tokenizer
        self.split, self.slot, self.slots, self.problems, self.prepared = split, slot, slots, problems, prepared
        # (checked once in the main process, by PackedDataset: not again in every worker)
        self.files = prepared.files(index) if prepared is not None else source_files(source, check=False)
        self.by_file = len(self.files) >= slots

    def file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.config.shuffle and self.split == "train":
            random.Random(f"{self.config.seed}:{self.index}:{epoch}").shuffle(order)
        return order

    def _documents(self, c: Cursor):
        """(index, text or tokens, cursor after it) of this slot's documents, from cursor c."""
        fraction = self.config.validation_fraction
        while True:
            fresh, produced, read, skipped = (c.file, c.doc) == (0, 0), False, 0, self.problems.count
            order = self.file_order(c.epoch)
            while c.file < len(order):
                path_index = order[c.file]
                if self.by_file and c.file % self.slots != self.slot:
                    c.file, c.doc = c.file + 1, 0
                    continue
                path = self.files[path_index]
                if self.prepared is not None:
                    docs = self.prepared.read(self.index, path_index, c.doc)
                else:
                    docs = read_documents(path, self.source, self.problems, c.doc)
                for doc_index, doc in docs:
                    c.doc = doc_index + 1
                    read += 1
                    if in_validation(path, doc_index, fraction) != (self.split == "validation"):
                        continue
                    mine = self.by_file or c.seen % self.slots == self.slot
                    c.seen += 1
                    if mine:
                        produced = True
                        yield doc, dataclasses.replace(c)
                c.file, c.doc = c.file + 1, 0
            if fresh and not read:  # not a matter of ranks x workers: the files hold no document
                mine = [self.files[i] for i in (order[self.slot::self.slots] if self.by_file else order)]
                raise DataError(no_documents(self.source, mine, self.problems, self.problems.count - skipped))
            epochs = self.config.epochs if self.split == "train" else 1
            if epochs is not None and c.epoch + 1 >= epochs:
                return
            if fresh and not produced:
                raise DataError(f"data source {self.source.path!r} has no {self.split} documents for loader slot "
                                f"{self.slot} of {self.slots} (too few documents for this many ranks x workers)")
            c = Cursor(epoch=c.epoch + 1)

    def stream(self, cursor: Cursor):
        """(token ids, cursor after the document); tokenizes a few documents per call."""
        docs = self._documents(dataclasses.replace(cursor))
        if self.prepared is not None:
            for tokens, c in docs:
                yield tokens.tolist(), c
            return
        while True:
            group = [d for _, d in zip(range(_TOKENIZE_GROUP), docs)]
            if not group:
                return
            for tokens, (_, c) in zip(encode(self.tokenizer, [t for t, _ in group], self.config.add_bos), group):
                yield tokens, c


class PackedRows:
    """The iterator of one slot: rows of seq_len tokens, with a state_dict that resumes it exactly."""

    def __init__(self, dataset: "PackedDataset", slot: int, slots: int):
        self.dataset, self.slot, self.slots = dataset, slot, slots
        config = dataset.config
        self.problems = Problems(config.strict)
        self.streams = [DocumentStream(s, i, config, dataset.tokenizer, dataset.split, slot, slots, self.problems,
                                       dataset.prepared) for i, s in enumerate(config.sources)]
        self.weights = [s.weight for s in config.sources]
        self._reset({"cursors": [dataclasses.asdict(Cursor()) for _ in self.streams],
                     "rng": random.Random(f"mixture:{config.seed}:{slot}").getstate(),
                     "carry": [], "carry_position": 0, "exhausted": []})

    def _reset(self, state: dict) -> None:
        self.cursors = [Cursor(**c) for c in state["cursors"]]
        self.rng = random.Random()
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.carry, self.carry_position = list(state["carry"]), state["carry_position"]
        self.exhausted = set(state["exhausted"])  # sources that ended (validation, or a finite number of epochs)
        self.generators = [s.stream(c) for s, c in zip(self.streams, self.cursors)]
        self.done = False

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self.dataset.fingerprint(self.slot, self.slots),
                "cursors": [dataclasses.asdict(c) for c in self.cursors], "rng": self.rng.getstate(),
                "carry": list(self.carry), "carry_position": self.carry_position, "exhausted": sorted(self.exhausted)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data-loader state version {state.get('version')} is not {STATE_VERSION}")
        saved, now = state["fingerprint"], self.dataset.fingerprint(self.slot, self.slots)
        if saved != now:
            diff = [k for k in now if saved.get(k) != now[k]]
            raise DataError(f"data-loader state does not fit this run: {', '.join(diff)} changed "
                            f"(saved {[saved.get(k) for k in diff]}, now {[now[k] for k in diff]})")
        self._reset(state)

    def __iter__(self):
        return self

    def _next_document(self) -> list[int] | None:
        """The next document of the mixture: a source drawn by weight, among those not ended."""
        while True:
            live = [k for k in range(len(self.streams)) if k not in self.exhausted and self.weights[k] > 0]
            if not live:
                return None
            k = self.rng.choices(live, weights=[self.weights[k] for k in live])[0]
            item = next(self.generators[k], None)
            if item is not None:
                tokens, self.cursors[k] = item
                return tokens
            self.exhausted.add(k)

    def __next__(self) -> dict:
        L = self.dataset.config.seq_len
        if self.done:
            raise StopIteration
        tokens = self.carry
        positions = list(range(self.carry_position, self.carry_position + len(tokens)))
        while len(tokens) < L:
            doc = self._next_document()
            if doc is None:
                break
            tokens = tokens + doc
            positions += range(len(doc))
        # What is left over is the tail of one document: it opens the next row.
        self.carry, tokens = tokens[L:], tokens[:L]
        self.carry_position = positions[L] if self.carry else 0
        labels = tokens
        if len(tokens) < L:  # the data has ended (validation, or the last epoch): pad the last row, or stop
            self.done = True
            if not tokens:
                raise StopIteration
            labels = tokens + [-100] * (L - len(tokens))
            positions += range(L - len(tokens))
            tokens = tokens + [self.dataset.pad_id] * (L - len(tokens))
        return {"input_ids": torch.tensor(tokens), "position_ids": torch.tensor(positions[:L]),
                "labels": torch.tensor(labels)}


class PackedDataset(IterableDataset):
    """Rows for one data-parallel rank; each DataLoader worker of it is a slot of its own."""

    def __init__(self, config: DataConfig, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1,
                 prepared=None):
        if split not in ("train", "validation"):
            raise DataError(f"split must be 'train' or 'validation', not {split!r}")
        if split == "validation" and config.validation_fraction <= 0:
            raise DataError("data.validation_fraction is 0: there is no validation split")
        self.config, self.tokenizer, self.split = config, tokenizer, split
        self.rank, self.world_size, self.prepared = rank, world_size, prepared
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if prepared is None:  # a missing, empty, binary or non-UTF-8 source fails here, not inside a worker
            for source in config.sources:
                source_files(source)

    def fingerprint(self, slot: int, slots: int) -> dict:
        sources = [(s.path, s.format, s.weight, s.text_field) for s in self.config.sources]
        return {"sources": repr(sources), "seq_len": self.config.seq_len, "seed": self.config.seed,
                "shuffle": self.config.shuffle, "validation_fraction": self.config.validation_fraction,
                "vocab": len(self.tokenizer), "split": self.split, "slot": slot, "slots": slots}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return PackedRows(self, self.rank * workers + worker, self.world_size * workers)


def build_loader(config: DataConfig, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1,
                 split: str = "train", num_workers: int | None = None):
    """A torchdata StatefulDataLoader of packed rows for this rank: state_dict() resumes it exactly."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from .prepared import open_prepared

    prepared = open_prepared(config, tokenizer) if config.prepared else None
    dataset = PackedDataset(config, tokenizer, split, rank, world_size, prepared)
    workers = config.num_workers if num_workers is None else num_workers
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function in its constructor
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                  persistent_workers=False, multiprocessing_context="fork" if workers else None)


def _as_rng_state(state):
    """random.Random states come back from torch.load / JSON as lists; setstate wants tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
