"""The package itself: imports without a GPU, the command line, the installed files, the README's main job."""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

import recur

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow  # a Python subprocess importing the whole package
def test_import_needs_no_gpu_and_loads_no_heavy_library():
    """`import recur` works with CUDA hidden and does not import fla or deepspeed (transformers brings triton)."""
    r = _python("import sys, recur, recur.kernels, recur.modeling, recur.train, recur.data, recur.eval\n"
                "heavy = [m for m in ('fla', 'deepspeed') if m in sys.modules]\n"
                "assert not heavy, heavy\n"
                "import torch; assert not torch.cuda.is_available()", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # a subprocess importing fla and triton
def test_fla_and_triton_import_without_a_gpu_driver():
    """With fla and triton installed but no driver, our GPU modules still import; auto picks the CPU path."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    r = _python("import torch, recur.kernels.rglru_triton, recur.kernels.fla_ops\n"
                "from recur.kernels._common import resolve_impl\n"
                "assert resolve_impl('auto', torch.zeros(1, 5)) == 'chunk'", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr


def test_recipes_and_slurm_folders_are_found_by_the_installed_code(tmp_path, monkeypatch):
    """Every recipe file in recur.RECIPES_DIR/pretrain and /linearize loads by its name from any folder (a
    linearize recipe as `linearize/NAME`), the names that `recur train` offers for an unknown one are exactly
    those files, and recur.SLURM_DIR holds its README and the templates `recur submit` renders."""
    from recur.train.recipe import RecipeError, find_recipe, load_recipe

    monkeypatch.chdir(tmp_path)  # found through the package, not through the working folder
    pretrain, linearize = recur.RECIPES_DIR / "pretrain", recur.RECIPES_DIR / "linearize"
    names = sorted(p.stem for p in pretrain.glob("*.yaml") if not p.stem.startswith("_"))
    linearized = sorted(f"linearize/{p.stem}" for p in linearize.glob("*.yaml") if not p.stem.startswith("_"))
    families = ("gla", "hgrn2", "mamba2", "rwkv6", "griffin", "hawk", "titans")
    assert {"quickstart", *(f"{f}-tiny" for f in families)} <= set(names), names  # the README's recipes
    assert "linearize/liger" in linearized, linearized
    for name in names:
        recipe = load_recipe(name)
        assert recipe.source == str(pretrain / f"{name}.yaml")
        assert recipe.model["type"].startswith("recur_") and recipe.train.max_steps > 0
    for name in linearized:  # found, read and checked up to the student folder that `recur linearize` writes
        assert find_recipe(name) == linearize / f"{name.split('/')[1]}.yaml"
        with pytest.raises(RecipeError, match=r"^model.from: 'runs/[\w-]+/student' is not a model folder"):
            load_recipe(name)
    with pytest.raises(RecipeError, match=r"not a shipped recipe \(shipped: .*\)$") as refused:
        find_recipe("no-such-recipe")
    assert refused.value.args[0].split("(shipped: ")[1][:-1].split(", ") == names + linearized
    assert "recur.SLURM_DIR" in (recur.SLURM_DIR / "README.md").read_text()
    for template in ("train.sbatch", "eval.sbatch", "local_cluster.py"):
        assert (recur.SLURM_DIR / template).is_file(), template


@pytest.mark.slow  # builds the wheel
def test_wheel_holds_every_subpackage_and_the_templates(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("recur-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    families = ("gla", "hgrn2", "mamba2", "rwkv6", "griffin", "titans")
    for sub in ["kernels", "modeling", "train", "data", "eval"] + [f"modeling/{f}" for f in families]:
        assert f"recur/{sub}/__init__.py" in names
    assert "recur/kernels/chunk.py" in names and "recur/cli.py" in names
    recipes = sorted(p.relative_to(ROOT).as_posix() for p in pathlib.Path(ROOT, "recipes").rglob("*") if p.is_file())
    assert recipes and all(f"recur/{r}" in names for r in recipes), recipes  # every recipe file and README
    assert all(f"recur/slurm/{f}" in names for f in ("README.md", "train.sbatch", "eval.sbatch", "local_cluster.py"))
    assert not any(n.startswith("recur/tests/") for n in names)


@pytest.mark.slow  # three `recur` subprocesses
def test_command_line_lists_its_jobs():
    r = subprocess.run([sys.executable, "-m", "recur.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout
    assert "train" in r.stdout and "export" in r.stdout and "quickstart" in r.stdout
    r = subprocess.run([sys.executable, "-m", "recur.cli", "no-such-job"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([sys.executable, "-m", "recur.cli", "train"], capture_output=True, text=True)
    assert r.returncode == 2 and "required: recipe" in r.stderr


@pytest.mark.slow  # recur quickstart: DeepSpeed training in subprocesses
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main job, shortened (a smaller model, 12 steps): tokenizer, 2-process ZeRO-2 training,
    export, held-out perplexity against the unigram model, a sample, the summary table; run again, it
    evaluates the finished run without training."""
    run = tmp_path / "quickstart"
    command = [sys.executable, "-m", "recur.cli", "quickstart", "--run-dir", str(run), "--min-ratio", "0",
               "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
               "train.max_steps=12", "train.warmup_steps=2", "train.log_every=2", "train.save_every=6",
               "eval_every=6", "eval_batches=2", "data.seq_len=64", "log.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for line in ("| model | recur_gla, 2 layers of width 64", "| training | 2 processes, DeepSpeed ZeRO-2",
                 "| held-out perplexity |", "| unigram baseline |", "sample (prompt 'The'"):
        assert line in r.stdout, line
    assert (run / "loss.png").exists() and (run / "export" / "model.safetensors").exists()
    assert (run / "tokenizer" / "tokenizer.json").exists() and list((run / "tensorboard").glob("events.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 6, 8, 10, 12]
    assert records[-1]["loss"] < records[0]["loss"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and "already trained" in again.stdout, again.stderr[-3000:]
    assert again.stdout.count("| held-out perplexity |") == 1


@pytest.mark.slow  # recur bench kernels in a subprocess
def test_kernel_benchmark_prints_a_table():
    r = subprocess.run([sys.executable, "-m", "recur.cli", "bench", "kernels", "--lengths", "64", "128",
                        "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    assert len(lines) == 1 + 7  # header + one row per function


def test_a_checkout_on_sys_path_does_not_hide_hugging_faces_kernels_package():
    """The repository root is the package `recur`; `python -m` in a checkout puts it on sys.path, where its
    `kernels/` folder would shadow Hugging Face's `kernels` package, which transformers imports."""
    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]); import kernels, recur.kernels; "
            "import transformers.modeling_utils; "
            "print(importlib.util.find_spec('kernels') is not None, kernels.__file__, recur.kernels.__file__)")
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hub_kernels, ours = r.stdout.split()[1:]
    assert pathlib.Path(ours).parent == pathlib.Path(ROOT, "kernels")
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's (transformers >= 5.25 requires it)
    except importlib.metadata.PackageNotFoundError:
        return
    assert not pathlib.Path(hub_kernels).is_relative_to(pathlib.Path(ROOT, "kernels")), hub_kernels
