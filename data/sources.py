"""Where documents come from: files, globs, folders, the built-in corpus and the Hub.

Each source expands to an ordered list of "files" (a Hub dataset or the built-in corpus counts as
one), and each file to an ordered stream of documents. Order is the only thing the rest of the
pipeline relies on: a document is named by (file, index), which makes sharding, the validation
split and resuming exact.

Local files are read here with the standard library and pyarrow rather than `datasets`' builders,
because bad lines must be skipped and counted with their line number (the json builder stops at
the first one). Hub datasets go through `datasets.load_dataset(..., streaming=True)`.
"""
from __future__ import annotations

import codecs
import functools
import glob
import inspect
import json
import os
import re
import sysconfig
import warnings
from typing import Iterator

from .config import DataError, SourceConfig

BUILTIN = ("python-docs",)
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".raw": "text",
                  ".md": "text"}
_WIKI_OPEN = re.compile(rb"^<doc[ >]")
_DOCSTRING = re.compile(r'^[ \t]*[rR]?"""(.*?)"""', re.S | re.M)


def source_files(source: SourceConfig, check: bool = True) -> list[str]:
    """The files of a source, sorted; a clear error when there are none, or (check) when they hold no
    text: empty, binary or not UTF-8 (see `check_files`)."""
    files = _expand(source)
    if check:
        check_files(source, files)
    return files


def _expand(source: SourceConfig) -> list[str]:
    path, fmt = source.path, source.format
    if fmt == "builtin" or path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"unknown built-in corpus {path!r} (available: {', '.join('builtin:' + b for b in BUILTIN)})")
        return [f"builtin:{name}"]
    if fmt == "hub":  # the dataset's own shards (usually its files) play the part of files
        shards = _open_hub(source).num_shards
        return [f"{path}#shard{i}of{shards}" for i in range(shards)]
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data source {path!r}: the glob matches no files")
        return files
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
        if not files:
            raise DataError(f"data source {path!r}: the folder is empty")
        return files
    if os.path.isfile(path):
        return [path]
    raise DataError(f"data source {path!r}: no such file or folder")


_HEAD = 4096  # bytes of each file looked at before reading it
_UNITS = {"text": "paragraphs", "jsonl": "lines", "wikiextractor": "documents"}  # records of the text formats
_SCAN_RECORDS = 1000  # records looked at when the head has undecodable bytes


def check_files(source: SourceConfig, files: list[str]) -> None:
    """Name an empty, binary or non-UTF-8 local file up front, instead of an unexplained "no documents"
    later. Cheap: it reads a few KB of each file (an undecodable byte deep in a big file is skipped and
    warned about when read). Empty files are refused only when all of the source's are: one empty file
    among many loses nothing, while a binary or non-UTF-8 one means the source picks up the wrong files."""
    if source.format == "hub":
        return
    local = [f for f in files if not f.startswith("builtin:")]
    single = local == [os.path.expanduser(source.path)]  # the source is the file: name it once
    blank = []
    for path in local:
        fmt = file_format(path, source.format)
        why = _blank(path, fmt)
        if why:
            blank.append(why if single else f"{path} {why}")
        elif why := _not_text(path, source, fmt):
            raise DataError(f"data source {source.path!r} {why}" if single else
                            f"data source {source.path!r}: {path} {why}")
    if local and len(blank) == len(local):
        if single:
            raise DataError(f"data source {source.path!r} {blank[0]}")
        raise DataError(f"data source {source.path!r}: every one of its {len(blank)} files is empty "
                        f"(first: {blank[0]})")


def _blank(path: str, fmt: str) -> str | None:
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    if fmt not in _UNITS:
        return None
    with open(path, "rb") as f:  # stops at the first chunk with text, i.e. at once for any real file
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return None
    return f"is empty (only whitespace, {size} bytes)"


def _not_text(path: str, source: SourceConfig, fmt: str) -> str | None:
    if fmt not in _UNITS:
        return None
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if (nul := head.find(b"\0")) >= 0:  # text has no NUL bytes; binary files and UTF-16 have many
        return f"is binary, not text (a NUL byte at byte {nul})"
    try:  # final=False: a character cut at the end of the head is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return None
    except UnicodeDecodeError as e:
        first = e.start
    # Undecodable bytes near the top: an error only if no record decodes (a few bad ones are skipped).
    tally, first_few = _Tally(), ""
    try:
        for _ in read_documents(path, source, tally):
            return None
    except _Tally.Enough:
        first_few = "first "
    records = f"its {first_few}{tally.count} {_UNITS[fmt]}"
    if not tally.count or tally.undecodable < tally.count:
        return None  # records skipped for other reasons too (malformed JSON, ...): the pipeline names them
    return f"is not UTF-8 text (every one of {records} has undecodable bytes; first at byte {first})"


def file_format(path: str, fmt: str) -> str:
    if path.startswith("builtin:"):
        return "builtin"
    if fmt != "auto":
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    with open(path, "rb") as f:  # WikiExtractor names its files wiki_00, wiki_01, ...
        head = f.read(4096).lstrip()
    return "wikiextractor" if _WIKI_OPEN.match(head) else "text"


class Problems:
    """Counts skipped lines/documents; warns once per file, or raises at the first when strict."""

    def __init__(self, strict: bool):
        self.strict, self.count, self.first, self.last, self.warned = strict, 0, None, None, set()
        self._file_count = 0

    def skip(self, path: str, line: int, why: str) -> None:
        if self.strict:
            raise DataError(f"{path}:{line}: {why} (data.strict is true)")
        self.count += 1
        self._file_count += 1
        self.first = self.first or (path, line, why)
        self.last = (path, line, why)

    def end_file(self, path: str) -> None:
        if self._file_count and path not in self.warned:
            self.warned.add(path)
            file, line, why = self.first
            warnings.warn(f"skipped {self._file_count} malformed records in {path} "
                          f"({self.count} in all so far; first: {file}:{line}: {why}); data.strict: true makes this an error",
                          stacklevel=2)
        self._file_count = 0


class _Tally(Problems):
    """Problems that only counts (no warning), and stops a scan after _SCAN_RECORDS skips."""

    class Enough(Exception):
        pass

    def __init__(self):
        super().__init__(strict=False)
        self.undecodable = 0

    def skip(self, path: str, line: int, why: str) -> None:
        super().skip(path, line, why)
        self.undecodable += why.startswith("undecodable")
        if self.count >= _SCAN_RECORDS:
            raise self.Enough

    def end_file(self, path: str) -> None:
        pass


def no_documents(source: SourceConfig, files: list[str], problems: Problems, skipped: int) -> str:
    """Why a source gave no document at all: the last record skipped, or only blank records."""
    where = f" in {files[0]}" if len(files) == 1 else f" in its {len(files)} files"
    if files == [os.path.expanduser(source.path)]:  # the source is the file: name it once
        where = ""
    if skipped:
        file, line, why = problems.last
        return (f"data source {source.path!r} has no usable document{where} "
                f"({skipped} records skipped, the last {file}:{line}: {why})")
    return f"data source {source.path!r} has no document{where} (its records are all blank)"


def read_documents(path: str, source: SourceConfig, problems: Problems, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, text) for each non-empty document of one file, from index `start` on."""
    fmt = file_format(path, source.format)
    reader = {"text": _text, "jsonl": _jsonl, "wikiextractor": _wikiextractor, "parquet": _parquet,
              "builtin": _builtin, "hub": _hub}[fmt]
    # Readers yield a document, or None for a record that counts but holds no document (the Hub
    # skips by record). The Hub reader starts at `start` itself; local files are read from the top.
    index = start if fmt == "hub" else 0
    for text in reader(path, source, problems, start):
        if index >= start and text is not None:
            yield index, text
        index += 1
    problems.end_file(path)


def _decode(raw: bytes, path: str, line: int, problems: Problems) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.skip(path, line, f"undecodable bytes ({e.reason} at byte {e.start})")
        return None


def _text(path, source, problems, start):
    """Plain text: one document per paragraph (blank-line separated), like datasets' sample_by='paragraph'."""
    with open(path, "rb") as f:
        lines, first = [], 0
        for number, raw in enumerate(f, 1):
            if raw.strip():
                first = first or number
                lines.append(raw)
                continue
            if lines:
                text = _decode(b"".join(lines), path, first, problems)
                if text is not None:
                    yield text.strip()
                lines, first = [], 0
        if lines:
            text = _decode(b"".join(lines), path, first, problems)
            if text is not None:
                yield text.strip()


def _jsonl(path, source, problems, start):
    field = source.text_field
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, path, number, problems)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.skip(path, number, f"malformed JSON ({e.msg})")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                problems.skip(path, number, f"no string field {field!r}")
                continue
            if text.strip():
                yield text


def _wikiextractor(path, source, problems, start):
    """WikiExtractor output: `<doc id=.. url=.. title=..>` ... `</doc>`, one document each."""
    with open(path, "rb") as f:
        body, opened_at = None, 0
        for number, raw in enumerate(f, 1):
            if body is None:
                if _WIKI_OPEN.match(raw):
                    body, opened_at = [], number
                elif raw.strip():
                    problems.skip(path, number, "text outside <doc> ... </doc>")
                continue
            if raw.startswith(b"</doc>"):
                text = _decode(b"".join(body), path, opened_at, problems)
                if text is not None and text.strip():
                    yield text.strip()
                body = None
            else:
                body.append(raw)
        if body is not None:
            problems.skip(path, opened_at, "<doc> without </doc>")


def _parquet(path, source, problems, start):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if source.text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {source.text_field!r} (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[source.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _builtin(path, source, problems, start):
    yield from python_docs()


@functools.lru_cache(maxsize=1)
def python_docs() -> tuple[str, ...]:
    """builtin:python-docs: English that ships with CPython, about 1.7 MB: the reference manual's
    topics (`pydoc_data`), then for each standard-library module its docstrings as one document
    (read as text, not imported)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(f"builtin:python-docs: this Python has no pydoc_data ({e})") from e
    docs = [topics[name].strip() for name in sorted(topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__", "encodings", "pydoc_data"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    code = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            # Triple-quoted strings that open a line are docstrings, near enough; a regex reads the
            # whole standard library in well under a second, where ast takes several.
            parts = [inspect.cleandoc(m.group(1)) for m in _DOCSTRING.finditer(code)]
            parts = [p for p in parts if len(p) >= 100]  # short ones are fragments
            if sum(map(len, parts)) >= 500:
                docs.append("\n\n".join(parts))
    return tuple(docs)


def _open_hub(source: SourceConfig):
    import datasets

    try:
        return datasets.load_dataset(source.path, name=source.name, split=source.split, streaming=True,
                                     data_files=source.data_files)
    except Exception as e:  # offline, unknown name, bad config: all end the run the same way
        raise DataError(f"Hub dataset {source.path!r}: cannot open it ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _hub(path, source, problems, start):
    index, shards = map(int, path.rpartition("#shard")[2].split("of"))
    ds = _open_hub(source).shard(num_shards=shards, index=index)
    if start:
        ds = ds.skip(start)
    for number, record in enumerate(ds, start):
        text = record.get(source.text_field)
        if not isinstance(text, str):
            problems.skip(path, number, f"no string field {source.text_field!r}")
            text = None
        yield text if text and text.strip() else None
