"""Tokenizers: load any transformers tokenizer, a GGUF file's, or the built-in byte tokenizer; train new ones.

    recur tokenizer train SOURCES... --vocab-size N --kind bpe|unigram OUT

trains a byte-level BPE (tokenizers) or a Unigram model (sentencepiece, with byte fallback) on the
same sources the trainer reads, and saves a folder `AutoTokenizer.from_pretrained` loads, with
bos, eos and pad tokens. A text too small for the vocabulary asked is an error (a BPE ends with
fewer than 90% of --vocab-size tokens; sentencepiece cannot make --vocab-size pieces) unless
--allow-smaller, which keeps the smaller vocabulary with a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from typing import Iterable

from ..files import atomic_folder
from .config import DataError, SourceConfig
from .sources import Problems, no_documents, read_documents, source_files

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MIN_VOCAB_SHARE = 0.9  # a trained vocabulary below this share of the size asked: an error (--allow-smaller: a warning)


def byte_tokenizer():
    """256 byte tokens (id = byte value) plus <s>, </s>, <pad>: exact for any text, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as a Hub repo id


class TokenizerNotCached(DataError):
    """A Hub tokenizer that is not in the Hugging Face cache, with the Hub unreachable by choice (HF_HUB_OFFLINE)."""

    def __init__(self, message: str, cache: str):
        super().__init__(message)
        self.cache = cache


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (set now, not when it was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# What a tokenizer is made of on the Hub (no weights): transformers' file names, sentencepiece models, the config
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*", "config.json"]


def hub_tokenizer(repo_id: str):
    """A tokenizer from the Hub, through the Hugging Face cache: fetched by the first process to ask (under a
    file lock in the cache, so the ranks of a node, or of every node on a shared cache, fetch it once), read
    from the cache by every other one, without a request. Only the tokenizer's files are fetched."""
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download
    from transformers import AutoTokenizer

    cache = constants.HF_HUB_CACHE
    try:
        os.makedirs(os.path.join(cache, ".locks"), exist_ok=True)
        lock = FileLock(os.path.join(cache, ".locks", f"recur-tokenizer--{repo_id.replace('/', '--')}.lock"))
    except OSError:  # a read-only cache: no lock, every process reads it as it is
        lock = None
    with lock if lock is not None else contextlib.nullcontext():
        try:
            folder = snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES, local_files_only=True)
        except Exception as e:  # not in the cache
            if hub_offline():
                raise TokenizerNotCached(f"tokenizer {repo_id!r}: not in the Hugging Face cache ({cache}) and "
                                         "HF_HUB_OFFLINE is set: fetch it once where the Hub is reachable (recur "
                                         "submit does), or give a tokenizer folder", cache) from e
            try:
                folder = snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES)
            except Exception as e:
                raise DataError(f"tokenizer {repo_id!r}: no such file or folder here, and the Hub did not give it "
                                f"({type(e).__name__}: {_first_line(e)})") from e
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise DataError(f"tokenizer {repo_id!r}: cannot load it from {folder} ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def load_tokenizer(spec: str):
    """`byte`, a tokenizer folder, a .gguf file (its embedded tokenizer), or a Hub repo id (org/name, fetched
    once into the Hugging Face cache); must have an eos token."""
    from transformers import AutoTokenizer

    if spec == "byte":
        tokenizer = byte_tokenizer()
    elif not os.path.exists(os.path.expanduser(spec)) and HUB_ID.match(spec) and not spec.endswith(".gguf"):
        tokenizer = hub_tokenizer(spec)
    else:
        path = os.path.expanduser(spec)
        if not os.path.exists(path):
            raise DataError(f"tokenizer {spec!r}: no such file or folder (use 'byte', a tokenizer folder, a .gguf "
                            "file or a Hub repo id like EleutherAI/gpt-neox-20b)")
        try:
            if path.endswith(".gguf"):
                tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
            else:
                tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many types for a folder that is not a tokenizer
            raise DataError(f"tokenizer {spec!r}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r} has no eos token, which marks document ends in packed rows")
    return tokenizer


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    if len(tokenizer) > vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
                        f"set model.vocab_size >= {len(tokenizer)}")


def iter_texts(sources: list[SourceConfig], strict: bool = False, max_chars: int | None = None) -> Iterable[str]:
    """The documents of every source in order; a source that gives none is an error naming why."""
    problems, chars = Problems(strict), 0
    for source in sources:
        files, found, skipped = source_files(source), 0, problems.count
        for path in files:
            for _, text in read_documents(path, source, problems):
                yield text
                found += 1
                chars += len(text)
                if max_chars and chars >= max_chars:
                    return
        if not found:
            raise DataError(no_documents(source, files, problems, problems.count - skipped))


def train_tokenizer(sources: list[SourceConfig], vocab_size: int, kind: str, out: str,
                    max_chars: int | None = None, allow_smaller: bool = False) -> None:
    """Train and save atomically: a folder is either complete or not there."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"output folder {out!r} is a file")
    if os.path.exists(out) and os.listdir(out):
        raise DataError(f"output folder {out!r} exists and is not empty")
    if vocab_size < 300:
        raise DataError(f"--vocab-size {vocab_size} is too small: the 256 bytes and 3 special tokens need 259")
    failed = []  # what the texts raised: sentencepiece turns it into a RuntimeError of its own

    def texts():
        try:
            yield from iter_texts(sources, max_chars=max_chars)
        except BaseException as e:
            failed.append(e)
            raise

    try:
        if kind == "bpe":
            tokenizer = _train_bpe(texts(), vocab_size)
        else:
            tokenizer = _train_unigram(texts(), vocab_size, allow_smaller)
    except BaseException:
        if failed:
            raise failed[0] from None
        raise
    if len(tokenizer) < MIN_VOCAB_SHARE * vocab_size:
        message = (f"--vocab-size {vocab_size}: the text gives only {len(tokenizer)} tokens "
                   f"(below {MIN_VOCAB_SHARE:.0%} of the size asked)")
        if not allow_smaller:
            raise DataError(f"{message}; give more text or a smaller --vocab-size, or --allow-smaller to keep it")
        warnings.warn(f"{message}; kept, as --allow-smaller asks", stacklevel=2)
    try:
        with atomic_folder(out) as tmp:
            tokenizer.save_pretrained(tmp)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        where = f"{e.filename}: " if e.filename else ""
        raise DataError(f"output folder {out!r}: cannot write it ({where}{e.strerror or e})") from e


def _train_bpe(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def _train_unigram(texts, vocab_size, allow_smaller=False):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    # byte_fallback: no text is ever out of vocabulary. ids 0-3 are the specials, as Llama's.
    # hard_vocab_limit off: sentencepiece makes as many pieces as the text allows, up to vocab_size.
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for text in texts for line in text.splitlines() if line.strip()),
            model_writer=model, vocab_size=vocab_size, model_type="unigram", byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece=SPECIALS["bos_token"],
            eos_piece=SPECIALS["eos_token"], pad_piece=SPECIALS["pad_token"], character_coverage=1.0,
            minloglevel=2, hard_vocab_limit=not allow_smaller)
    except RuntimeError as e:  # "INTERNAL: ... Vocabulary size too high (5000). Please set it to a value <= 288."
        if "KeyboardInterrupt" in str(e):  # Ctrl-C while sentencepiece was reading the texts
            raise KeyboardInterrupt from None
        most = re.search(r"Vocabulary size (?:is )?too high.*?<= *(\d+)", str(e))
        if most:
            raise DataError(f"--vocab-size {vocab_size} is too high for this text: sentencepiece can make at most "
                            f"{most.group(1)} unigram pieces; give more text or a smaller --vocab-size, "
                            f"or --allow-smaller to keep fewer") from None
        raise DataError(f"sentencepiece cannot train on this text: {str(e).strip().splitlines()[0]}") from e
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        # transformers turns the sentencepiece model into its tokenizers-backed Llama tokenizer.
        return LlamaTokenizer.from_pretrained(tmp, unk_token="<unk>", add_bos_token=False, **SPECIALS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur tokenizer train", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="files, folders, globs or builtin:python-docs")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--kind", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--text-field", default="text", help="jsonl / parquet field holding the text")
    parser.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters")
    parser.add_argument("--allow-smaller", action="store_true",
                        help=f"keep a vocabulary below {MIN_VOCAB_SHARE * 100:.0f}%% of --vocab-size (a text too "
                             "small for it), with a warning, instead of stopping")
    args = parser.parse_args(argv)
    sources = [SourceConfig(path=s, text_field=args.text_field) for s in args.sources]
    # Bad input raises DataError: the recur command prints it as one line and exits 2.
    try:
        with warnings.catch_warnings():  # one line each, as the errors, not warnings' two with a source line
            warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
            for source in sources:  # checked before the progress line, so bad input is the only line
                source_files(source)
            print(f"training a {args.kind} tokenizer of {args.vocab_size} tokens on {', '.join(args.sources)}",
                  file=sys.stderr, flush=True)
            train_tokenizer(sources, args.vocab_size, args.kind, args.out, args.max_chars, args.allow_smaller)
        tokenizer = load_tokenizer(args.out)
    except KeyboardInterrupt:  # no traceback, and no half-written folder: atomic_folder removes its temporary one
        written = os.path.isdir(args.out) and os.listdir(args.out)  # (if it came after the folder was complete)
        print("interrupted" if written else f"interrupted: nothing written to {args.out}", file=sys.stderr)
        return 130
    print(f"saved a {args.kind} tokenizer with {len(tokenizer)} tokens to {args.out}")
    return 0
