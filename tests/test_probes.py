"""Long-context probes (eval/probes.py): exact-length prompts with the needle where asked, chunked prefill +
cached greedy decoding equal to generate() (recur and a transformers Llama), `recur eval --probe ...` end to
end on a saved tiny model, and bad input as one line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import recur  # noqa: F401  registers the families
from recur import cli
from recur.data import byte_tokenizer
from recur.eval import probes
from recur.eval.tasks import default_data_dir
from recur.modeling import FAMILIES

NEEDLE, QUESTION = "The pass key is 12345. Remember it. 12345 is the pass key.", "What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def tiny_recur(tokenizer, seed=0):
    torch.manual_seed(seed)
    settings = {**next(iter(FAMILIES["recur_gla"].tiny.values())), "vocab_size": len(tokenizer)}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("recur_gla", **settings)).eval()
    with torch.no_grad():  # random gates, so that the output depends on the context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_llama(tokenizer, max_positions=512):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-recur")
    tiny_recur(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("length", [128, 256, 1000])
@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 0.75, 1])
def test_prompt_has_the_length_and_the_needle_at_the_depth(tokenizer, length, depth):
    sentences = probes.sentence_ids(tokenizer, (" " + probes.FILLER) * 40, length)
    intro = probes.INTRO["passkey"]
    ids, at, actual = probes.build_prompt(tokenizer, sentences, length, depth, intro, NEEDLE, QUESTION)
    assert len(ids) == length  # exact: built from token ids
    needle = probes.encode(tokenizer, " " + NEEDLE)
    assert ids[at:at + len(needle)] == needle
    text = tokenizer.decode(ids)
    assert text.endswith("\n" + QUESTION) and text.count("12345") == 2
    assert text.startswith(probes.INTRO["passkey"]) == (length == 1000)  # no room for the intro in short prompts
    head = len(probes.encode(tokenizer, probes.INTRO["passkey"] + "\n")) if length == 1000 else 0
    budget = length - head - len(needle) - len(probes.encode(tokenizer, "\n" + QUESTION))
    assert actual == pytest.approx((at - head) / budget)
    sentence = max(map(len, sentences))  # the needle goes between sentences: within one of the depth asked
    assert abs(actual - depth) * budget <= sentence


def test_prompt_that_cannot_hold_the_needle_is_none(tokenizer):
    sentences = probes.sentence_ids(tokenizer, (" " + probes.FILLER) * 4, 64)
    assert probes.build_prompt(tokenizer, sentences, 64, 0.5, "", NEEDLE, QUESTION) is None


def test_exact_match():
    assert probes.exact_match(" 12345. Remember it.", "12345")
    assert probes.exact_match("12345", "12345")
    assert probes.exact_match(" is 12345 and 99", "12345")
    assert not probes.exact_match(" 123456", "12345")    # a longer number is not the key
    assert not probes.exact_match(" 1234", "12345")
    assert not probes.exact_match(" 54321, or 12345", "12345")  # the first number counts
    assert not probes.exact_match(" the grass is green", "12345")
    assert not probes.exact_match("", "12345")


@pytest.mark.parametrize("kind", ["recur", "llama"])
def test_chunked_prefill_and_cached_decoding_equal_generate(tokenizer, kind, monkeypatch):
    model = tiny_recur(tokenizer) if kind == "recur" else tiny_llama(tokenizer)
    monkeypatch.setattr(probes, "CHUNK", 48)  # a 200-token prompt in 5 pieces
    prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(3))
    eos = tokenizer.eos_token_id
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)[0, 200:].tolist()
    assert probes.greedy(model, prompt[0].tolist(), 12, eos) == expected
    assert len(set(expected)) > 1  # not a degenerate constant output


def test_transformer_skips_lengths_beyond_its_positions(tokenizer):
    model = tiny_llama(tokenizer, max_positions=300)
    result = probes.retrieval("passkey", model, tokenizer, [256, 512], [0.5], trials=1)
    short, long = result["cells"]
    assert short["accuracy"] == 0 and len(short["samples"]) == 1
    assert long["accuracy"] is None and "max_position_embeddings (300)" in long["note"]
    ppl = probes.ppl_by_position(model, tokenizer, [128, 512], trials=1)
    assert ppl["length"] == 128 and list(ppl["notes"]) == ["512"]


def test_real_text_sources(tmp_path):
    wiki = tmp_path / "pretrain/enwiki-2015"
    wiki.mkdir(parents=True)
    (wiki / "wiki_00").write_text('<doc id="1" url="u" title="A">\nA\n\nFirst article.\n</doc>\n'
                                  '<doc id="2" url="u" title="B">\nB\n\nSecond.\n</doc>\n')
    what, docs = probes.real_text(tmp_path)
    assert what.startswith("enwiki-2015") and docs == ["A\n\nFirst article.", "B\n\nSecond."]
    raw = tmp_path / "eval/wikitext-2-raw/wiki.test.raw"
    raw.parent.mkdir(parents=True)
    raw.write_text(" \n = One = \n \n Text one . \n \n = Two = \n \n Text two . \n")
    what, docs = probes.real_text(tmp_path)  # WikiText (held out) comes first
    assert what.startswith("wikitext-2-raw test") and len(docs) == 2


def run_cli(args, capsys):
    code = cli.main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def only_result(out: Path, probe: str) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].startswith(f"probe_{probe}_") and files[0].endswith(".json"), files
    assert files[1] == files[0][:-5] + ".png" and (out / files[1]).stat().st_size > 1000
    return json.loads((out / files[0]).read_text())


def test_passkey_command_line(folder, tmp_path):
    """The real command line: a planted key the untrained model cannot know gives accuracy 0 in every cell."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(recur.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "recur.cli", "eval", str(folder), "--probe", "passkey",
                           "--lengths", "128,256", "--depths", "0,1", "--trials", "1", "--output-path", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| length | depth 0 | depth 1 |" in done.stdout and "| 128 | 0.00 | 0.00 |" in done.stdout
    result = only_result(out, "passkey")
    assert result["probe"] == "passkey" and result["model"] == str(folder) and result["lengths"] == [128, 256]
    assert result["depths"] == [0, 1] and result["trials"] == 1 and result["text"].startswith("filler: The grass")
    assert [(c["length"], c["depth"], c["accuracy"]) for c in result["cells"]] == [
        (128, 0, 0), (128, 1, 0), (256, 0, 0), (256, 1, 0)]
    assert all(len(c["samples"]) == 1 and len(c["samples"][0]["key"]) == 5 for c in result["cells"])


def test_needle_command_line(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli([folder, "--probe", "needle", "--lengths", "256,512", "--depths", "0,0.5,1",
                               "--trials", "2", "--output-path", out], capsys)
    assert code == 0 and "| 512 | 0.00 | 0.00 | 0.00 |" in stdout
    result = only_result(out, "needle")
    data = default_data_dir()
    assert result["text"].startswith("wikitext-2-raw test" if data else "builtin:python-docs")
    assert len(result["cells"]) == 6 and all(c["accuracy"] == 0 for c in result["cells"])
    keys = [s["key"] for c in result["cells"] for s in c["samples"]]
    assert all(len(k) == 7 for k in keys) and len(set(keys)) == len(keys)  # a new key in every trial


def test_ppl_by_position_command_line(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli([folder, "--probe", "ppl-by-position", "--lengths", "128,512", "--trials", "2",
                               "--output-path", out], capsys)
    assert code == 0 and "| [256, 512) |" in stdout
    result = only_result(out, "ppl-by-position")
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [(0, 128), (128, 256), (256, 512)]
    assert all(math.isfinite(b["ppl"]) and b["ppl"] > 1 for b in result["buckets"])
    assert result["sequences"] == 2 and result["length"] == 512


@pytest.mark.parametrize("flag, message", [
    (["--lengths", "10"], "error: --lengths 10: each length must be at least 64 tokens"),
    (["--depths", "2"], "error: --depths 2: each depth must be in [0, 1]"),
    (["--trials", "0"], "error: --trials 0: must be at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, flag, message):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([folder, "--probe", "passkey", *flag, "--output-path", out], capsys)
    lines = stderr.strip().splitlines()  # (transformers' weight-loading bar may come before it)
    assert code == 2 and lines[-1].startswith(message) and [line for line in lines if "error" in line] == lines[-1:]
    assert not out.exists() and not stdout
