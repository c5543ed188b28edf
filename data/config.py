"""The `data:` section of a recipe, validated before anything is read.

    data:
      sources:
        - path: ../shared/data/pretrain/enwiki-2015/wiki_*   # file, folder, glob, builtin:python-docs, or a Hub name
          format: auto          # auto | text | jsonl | parquet | wikiextractor | hub | builtin
          weight: 1.0           # mixture weight (relative)
          text_field: text      # jsonl / parquet / hub column
      tokenizer: byte           # byte | a tokenizer folder | a .gguf file | a Hub repo id (org/name)
      seq_len: 512
      validation_fraction: 0.01 # documents held out, chosen by a hash of their position (stable)
      seed: 0
      shuffle: true             # shuffle files per epoch (exactly resumable, unlike a shuffle buffer)
      epochs: null              # null: the train split repeats forever; N: it ends after N epochs
      num_workers: 0
      strict: false             # true: a malformed line or undecodable bytes stop the run
      prepared: null            # a folder written by `recur data prepare` (same batches, no tokenizing)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import UserError, typed

FORMATS = ("auto", "text", "jsonl", "parquet", "wikiextractor", "hub", "builtin")


class DataError(UserError):
    """Bad data input; the message is one line naming the problem."""


@dataclass
class SourceConfig:
    path: str
    format: str = "auto"
    weight: float = 1.0
    text_field: str = "text"
    name: str | None = None        # Hub dataset config name
    split: str = "train"           # Hub split
    data_files: str | list | None = None  # Hub builders that read local files ("json", "parquet", ...)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig("builtin:python-docs")])
    tokenizer: str = "byte"
    seq_len: int = 512
    validation_fraction: float = 0.01
    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None
    num_workers: int = 0
    strict: bool = False
    add_bos: bool = False
    prepared: str | None = None

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "data") -> "DataConfig":
        if raw is not None and not isinstance(raw, dict):
            raise DataError(f"{where}: expected a mapping, got {raw!r}")
        raw = dict(raw or {})
        sources = raw.pop("sources", None)
        if sources is not None:
            if isinstance(sources, (str, dict)):
                sources = [sources]
            if not isinstance(sources, list) or not sources:
                raise DataError(f"{where}.sources: expected a non-empty list of sources")
            parsed = []
            for i, s in enumerate(sources):
                s = {"path": s} if isinstance(s, str) else s
                if not isinstance(s, dict):
                    raise DataError(f"{where}.sources[{i}]: expected a path or a mapping, got {type(s).__name__}")
                known = {f.name for f in dataclasses.fields(SourceConfig)}
                if "path" not in s and set(s) <= known:  # (an unknown key is named first, by typed)
                    raise DataError(f"{where}.sources[{i}]: missing key 'path'")
                parsed.append(typed(SourceConfig, s, f"{where}.sources[{i}]", DataError))
            raw["sources"] = parsed
        config = typed(cls, raw, where, DataError)
        config.validate(where)
        return config

    def validate(self, where: str = "data") -> None:
        for i, s in enumerate(self.sources):
            if s.format not in FORMATS:
                raise DataError(f"{where}.sources[{i}].format: {s.format!r} is not one of {', '.join(FORMATS)}")
            if not isinstance(s.weight, (int, float)) or s.weight < 0 or s.weight != s.weight:
                raise DataError(f"{where}.sources[{i}].weight: must be a number >= 0, got {s.weight!r}")
        if sum(s.weight for s in self.sources) <= 0:
            raise DataError(f"{where}.sources: the weights are all zero")
        if self.seq_len < 2:
            raise DataError(f"{where}.seq_len: must be at least 2, got {self.seq_len}")
        if not 0 <= self.validation_fraction < 1:
            raise DataError(f"{where}.validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise DataError(f"{where}.epochs: must be null or >= 1, got {self.epochs}")
        if self.num_workers < 0:
            raise DataError(f"{where}.num_workers: must be >= 0, got {self.num_workers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
