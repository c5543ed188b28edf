"""Pre-tokenized shards: tokenize once, memory-map on every later run.

    recur data prepare RECIPE.yaml OUT [data.key=value ...]

writes, for source i and file j, `OUT/s{i}/f{j}.tokens` (uint16 or uint32, every document's ids
with eos appended, back to back) and `OUT/s{i}/f{j}.index` (int64 rows: document index, start,
end), plus `manifest.json` (sources, files, tokenizer fingerprint). A run with `data.prepared: OUT`
then reads token slices instead of text; everything else (order, split, sharding, packing) is the
same code, so its batches are identical to the streaming path's for the same sources and seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os

import numpy as np
from tqdm import tqdm

from .config import DataConfig, DataError
from ..files import atomic_folder
from .pipeline import encode
from .sources import Problems, no_documents, read_documents, source_files

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}".encode()).hexdigest()[:16]


def _source_key(config: DataConfig) -> list:
    return [[s.path, s.format, s.text_field, s.name, s.split] for s in config.sources]


def prepare(config: DataConfig, tokenizer, out: str) -> dict:
    """Tokenize every document of every source (both splits) into memory-mappable files."""
    if os.path.exists(out) and os.listdir(out):
        raise DataError(f"output folder {out!r} exists and is not empty")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    problems = Problems(config.strict)
    files, total = [], 0
    with atomic_folder(out) as tmp:
        for i, source in enumerate(config.sources):
            paths = source_files(source)
            files.append(paths)
            os.makedirs(os.path.join(tmp, f"s{i}"))
            skipped_before, documents = problems.count, 0
            for j, path in enumerate(tqdm(paths, desc=f"source {i}: {source.path}", unit="file")):
                index, chunks, start = [], [], 0
                docs = list(read_documents(path, source, problems))
                documents += len(docs)
                for g in range(0, len(docs), 256):
                    group = docs[g:g + 256]
                    for (doc_index, _), ids in zip(group, encode(tokenizer, [t for _, t in group], config.add_bos)):
                        index.append((doc_index, start, start + len(ids)))
                        chunks.append(np.asarray(ids, dtype=dtype))
                        start += len(ids)
                stem = os.path.join(tmp, f"s{i}", f"f{j}")
                (np.concatenate(chunks) if chunks else np.zeros(0, dtype)).tofile(stem + ".tokens")
                np.asarray(index, dtype=np.int64).reshape(-1, 3).tofile(stem + ".index")
                total += start
            if not documents:  # shards of nothing would only fail later, in training
                raise DataError(no_documents(source, paths, problems, problems.count - skipped_before))
        manifest = {"sources": _source_key(config), "files": files, "dtype": np.dtype(dtype).name,
                    "tokenizer": tokenizer_fingerprint(tokenizer), "vocab": len(tokenizer), "add_bos": config.add_bos,
                    "tokens": total}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


class Prepared:
    """Read side: token slices by (source, file, document index)."""

    def __init__(self, folder: str, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.dtype = np.dtype(manifest["dtype"])
        self._open: dict = {}

    def files(self, source: int) -> list[str]:
        return self.manifest["files"][source]

    def read(self, source: int, file: int, start: int = 0):
        if (source, file) not in self._open:  # opened lazily: in the worker that reads it
            stem = os.path.join(self.folder, f"s{source}", f"f{file}")
            tokens = np.memmap(stem + ".tokens", dtype=self.dtype, mode="r") if os.path.getsize(stem + ".tokens") \
                else np.zeros(0, self.dtype)
            self._open[(source, file)] = (tokens, np.fromfile(stem + ".index", dtype=np.int64).reshape(-1, 3))
        tokens, index = self._open[(source, file)]
        for doc_index, a, b in index[np.searchsorted(index[:, 0], start):]:
            yield int(doc_index), tokens[a:b]

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        return {"folder": self.folder, "manifest": self.manifest, "dtype": self.dtype, "_open": {}}


def open_prepared(config: DataConfig, tokenizer) -> Prepared:
    folder = os.path.expanduser(config.prepared)
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"data.prepared {config.prepared!r}: no {MANIFEST} there (write it with `recur data prepare`)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest["sources"] != _source_key(config):
        raise DataError(f"data.prepared {config.prepared!r} was written for other sources: {manifest['sources']}")
    if manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"data.prepared {config.prepared!r} was written with another tokenizer "
                        f"({manifest['vocab']} tokens); prepare it again with {config.tokenizer!r}")
    if manifest["add_bos"] != config.add_bos:
        raise DataError(f"data.prepared {config.prepared!r} was written with add_bos={manifest['add_bos']}")
    return Prepared(folder, manifest)


def main(argv=None) -> int:
    from .tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="recur data prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a recipe (a shipped name such as gla-tiny, or a YAML file; its data: "
                                       "section is used) or a YAML file that is only a data section")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("overrides", nargs="*", help="data.key=value")
    args = parser.parse_intermixed_args(argv)
    config = load_data_config(args.recipe, args.overrides)  # errors: one line, exit 2 (cli)
    tokenizer = load_tokenizer(config.tokenizer)
    manifest = prepare(config, tokenizer, args.out)
    print(f"wrote {manifest['tokens']:,} tokens from {sum(map(len, manifest['files']))} files to {args.out}")
    return 0


def load_data_config(name: str, overrides: list[str] = ()) -> DataConfig:
    """The data: section of a recipe (read as every command reads recipes: shipped names, `base:`
    chains), or of a file that is only a data section, with data.key=value overrides applied."""
    from recur.config import apply_overrides, find_recipe, read_yaml

    path = find_recipe(name)
    raw = read_yaml(path)
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    if "data" not in raw and raw and set(raw) <= data_keys:  # a file that is only a data section
        raw = {"data": raw}
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise DataError(f"override {bad[0]!r}: recur data prepare takes data.key=value overrides only")
    raw = apply_overrides(raw, list(overrides))
    return DataConfig.from_dict(raw.get("data"))
