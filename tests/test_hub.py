"""`recur push` against a loopback fake Hub (tests/fake_hub.py) through the real huggingface_hub client:
the pushed repo loads where recur is not installed, the card carries the eval results and the
recipe, errors are one line, and the token shows up nowhere."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import recur  # noqa: F401
from recur.cli import main as cli
from recur.data import byte_tokenizer
from recur.eval.harness import write_results
from recur.modeling import FAMILIES

from fake_hub import FakeHub

TOKEN = "hf_some-secret-token-0123456789"
RESULTS = {"results": {"lambada_openai": {"alias": "lambada_openai", "acc,none": 0.25, "acc_stderr,none": 0.01,
                                          "perplexity,none": 123.5, "perplexity_stderr,none": "N/A",
                                          "word_perplexity,none": float("nan")}},
           "versions": {"lambada_openai": 1.0}, "n-shot": {"lambada_openai": 0}, "config": {}}


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GLA saved as recur saves it (code + auto_map), a planted `recur eval` result, training
    info as recur export records it, and things beside the model that must stay home."""
    root = tmp_path_factory.mktemp("model")
    folder = root / "tiny-gla"
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = next(iter(FAMILIES["recur_gla"].tiny.values()))
    config = AutoConfig.for_model("recur_gla", **{**config, "vocab_size": max(config["vocab_size"], len(tokenizer))})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    (folder / "recur_checkpoint.json").write_text(json.dumps({"checkpoint": "/nowhere/checkpoints/step_00000007",
                                                              "step": 7, "tokens": 1792, "seq_len": 32}))
    write_results(RESULTS, folder / "eval", {"model": str(folder), "limit": None})
    (folder / "notes.txt").write_text("private notes")
    torch.save({"state": 1}, folder / "optimizer.pt")
    x = torch.randint(0, len(tokenizer), (2, 9))
    with torch.no_grad():
        torch.save((x, model(x).logits), root / "expected.pt")
    return folder


@pytest.fixture
def hub():
    fake = FakeHub().start()
    yield fake
    fake.stop()


@pytest.fixture
def in_process(hub, monkeypatch, tmp_path):
    """This process's huggingface_hub pointed at the fake Hub (its endpoint constants are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    return hub


def hub_env(hub, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
            "HF_MODULES_CACHE": str(home / "modules"), "OMP_NUM_THREADS": "1"}


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# Runs where `import recur` fails: download the repo from the fake Hub, load it as remote code.
LOAD_WITHOUT_RECUR = """
import importlib.abc, sys
class HideRecur(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "recur" or name.startswith("recur."):
            raise ImportError("recur is hidden in this test")
sys.meta_path.insert(0, HideRecur())
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM
path = snapshot_download(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x, expected = torch.load(sys.argv[2])
with torch.no_grad():
    torch.testing.assert_close(model(x).logits, expected)
print("OK", type(model).__name__)
"""


def test_push_then_load_from_the_hub_without_recur(model_dir, hub, tmp_path):
    before = listing(model_dir)
    env = hub_env(hub, tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "recur.cli", "push", str(model_dir), "--repo-id", "me/tiny-gla"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TOKEN not in r.stdout + r.stderr
    assert f"{hub.url}/me/tiny-gla" in r.stdout and "/commit/" in r.stdout
    assert f"Bearer {TOKEN}" in hub.authorizations  # HF_TOKEN was used
    assert listing(model_dir) == before  # nothing written into the user's folder

    files = hub.files("me/tiny-gla")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "recur_checkpoint.json"} <= set(files)
    assert any(p.startswith("modeling_") and p.endswith(".py") for p in files)
    assert not [p for p in files if p.startswith("eval/") or p.endswith(".pt") or p == "notes.txt"]
    assert "checkpoint" not in json.loads(files["recur_checkpoint.json"])  # no local path on the Hub
    assert "auto_map" in json.loads(files["config.json"])

    card = files["README.md"].decode()
    assert TOKEN not in card
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and {"recur", "recur_gla", "recurrent"} <= set(meta["tags"])
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["type"] == "lambada_openai"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"acc": 0.25, "perplexity": 123.5}
    assert "| lambada_openai | acc | 0.2500 |" in card
    assert "1,792 tokens seen" in card and "7 optimizer steps" in card
    assert 'from_pretrained("me/tiny-gla", trust_remote_code=True)' in card

    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_RECUR, "me/tiny-gla", str(model_dir.parent / "expected.pt")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("status, where", [(401, ""), (404, "/preupload/"), (500, "")])
def test_hub_errors_are_one_line_naming_the_repo_and_status(status, where, model_dir, in_process, capsys):
    in_process.fail = (status, where)  # the fake's error body echoes the Authorization header
    assert cli(["push", str(model_dir), "--repo-id", "me/tiny-gla"]) == 2
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "me/tiny-gla" in line and f"HTTP {status}" in line and "***" in line, line
    assert err.splitlines()[-1] == line


def test_dry_run_shows_files_and_card_and_sends_nothing(model_dir, in_process, capsys):
    before = listing(model_dir)
    assert cli(["push", str(model_dir), "--repo-id", "me/tiny-gla", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert in_process.requests == [] and listing(model_dir) == before
    assert "model.safetensors" in out and "config.json" in out and " kB" in out
    assert "model-index:" in out and "## How to load" in out and TOKEN not in out + err
    assert "notes.txt" in err and "eval/" in err  # said to stay home


def test_a_folder_without_code_is_saved_again_with_it(model_dir, in_process, tmp_path, capsys):
    old = tmp_path / "old-export"  # as an older recur exported it: no code files, no auto_map
    old.mkdir()
    for p in model_dir.iterdir():
        if p.is_file() and p.suffix != ".py":
            (old / p.name).write_bytes(p.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    assert cli(["push", str(old), "--repo-id", "me/old", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "modeling_" in out and "trust_remote_code=True" in out
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in model_dir.iterdir()
                                                           if p.is_file() and p.suffix != ".py")


@pytest.mark.parametrize("args, says", [(["{missing}"], "no such file or folder"),
                                        (["{empty}"], "neither a recur checkpoint"),
                                        (["{model}", "--repo-id", "tiny-gla"], "ORG/NAME"),
                                        (["{model}", "--repo-id", "a/b/c"], "ORG/NAME"),
                                        (["{model}", "--repo-id", "me/bad--name"], "--repo-id")])
def test_bad_input_is_one_line_and_sends_nothing(args, says, model_dir, in_process, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    values = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "model": model_dir}
    argv = [a.format(**values) for a in args]
    argv += [] if "--repo-id" in argv else ["--repo-id", "me/x"]
    assert cli(["push", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert in_process.requests == [] and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.slow  # recur train (DeepSpeed) in a subprocess
def test_push_a_checkpoint_exports_it_with_recipe_and_tokens(in_process, tmp_path, capsys):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "recur.cli", "train", "gla-tiny", f"run_dir={run}", "train.max_steps=1",
                        "train.warmup_steps=0", "train.save_every=1", "export=false", "log.progress=false",
                        "log.tensorboard=false", "eval_every=0", "model.hidden_size=32", "model.num_heads=2",
                        "model.num_hidden_layers=1", "model.intermediate_size=64", "data.seq_len=32",
                        "train.global_batch=2", "train.micro_batch=2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert cli(["push", str(run), "--repo-id", "me/run", "--revision", "step-1", "--private"]) == 0
    out = capsys.readouterr().out
    assert "(branch step-1)" in out and TOKEN not in out
    assert in_process.created["me/run"]["visibility"] == "private"
    files = in_process.files("me/run", "step-1")
    assert "model.safetensors" in files and not [p for p in files if p.endswith(".pt")]
    card = files["README.md"].decode()
    assert "64 tokens seen" in card and "1 optimizer steps" in card and "```yaml" in card
    assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])["model"]["type"] == "recur_gla"
    assert 'revision="step-1"' in card
    assert json.loads(files["recur_checkpoint.json"])["tokens"] == 64
