"""recur train: recipes, launch environments, schedules, FLOPs, and real DeepSpeed runs on CPU
(1 and 2 processes, ZeRO-2 and ZeRO-3): same losses across layouts, exact resume after SIGTERM,
SIGKILL and a crash inside a save, skipped non-finite steps, float32 recurrent parameters under
bf16 autocast, and export to a transformers folder."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from recur.train import distributed, flops, schedule
from recur.train.recipe import RecipeError, apply_overrides, deep_merge, load_recipe, parse
from recur.train.trainer import scored_tokens

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes" / "pretrain").glob("*.yaml")
                 if not p.name.startswith("_"))
TINY = {"run_dir": "runs/x", "model": {"type": "recur_gla", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2},
        "train": {"max_steps": 10, "warmup_steps": 2, "global_batch": 8, "micro_batch": 2}}


# ----------------------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.model["type"].startswith("recur_") and recipe.train.max_steps > 0


SIZES = {"340m": (0.3e9, 0.45e9), "760m": (0.65e9, 0.9e9), "1.3b": (1.1e9, 1.6e9), "7b": (6e9, 8e9)}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.rsplit("-", 1)[-1] in SIZES], ids=lambda p: p.stem)
def test_gpu_recipes_build_a_model_of_the_size_in_their_name(path):
    """On the meta device (no memory), with the vocabulary of the tokenizer the recipe names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = load_recipe(str(path))
    settings = {k: v for k, v in recipe.model.items() if k != "type"}
    settings.setdefault("vocab_size", 50288 if "neox" in recipe.data.tokenizer else 32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(recipe.model["type"], **settings))
    low, high = SIZES[path.stem.rsplit("-", 1)[-1]]
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert recipe.train.global_batch % recipe.train.micro_batch == 0


@pytest.mark.parametrize("change, key", [
    ({"trian": {}}, "trian"),
    ({"train": {"max_step": 3}}, "train.max_step"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"zero_stage": 4}}, "train.zero_stage"),
    ({"train": {"global_batch": 7}}, "train.global_batch"),
    ({"train": {"warmup_steps": 11}}, "train.warmup_steps"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"train": {"deepspeed": {"bf16": {"enabled": True}}}}, "train.deepspeed.bf16"),
    ({"train": {"deepspeed": {"zero_optimization": {"stage": 3}}}}, "train.deepspeed.zero_optimization.stage"),
    ({"train": {"deepspeed": {"gradient_clipping": 0.0}}}, "train.deepspeed.gradient_clipping"),
    ({"model": {"type": "recur_gla", "hiden_size": 32}}, "model.hiden_size"),
    ({"model": {"type": "recur_gla", "hidden_size": "big"}}, "model.hidden_size"),
    ({"model": {"type": "gpt2"}}, "model.type"),
    ({"data": {"seq_len": "long"}}, "data.seq_len"),
    ({"eval_every": 5, "data": {"validation_fraction": 0.0}}, "eval_every"),
    ({"resume": "/no/such/checkpoint"}, "resume"),
])
def test_bad_recipes_are_refused_naming_the_key(change, key):
    raw = deep_merge(TINY, change)
    with pytest.raises(RecipeError) as error:
        parse(raw)
    assert str(error.value).startswith(key + ":") or str(error.value).startswith(key + "."), str(error.value)
    assert "\n" not in str(error.value)


def test_global_batch_must_split_over_the_world():
    parse(TINY, world_size=4)  # 8 = 2 x 1 x 4
    with pytest.raises(RecipeError, match=r"^train.global_batch: 8 is not divisible by world size 3"):
        parse(TINY, world_size=3)


def test_overrides_are_yaml_values_at_dotted_keys(tmp_path):
    raw = apply_overrides(TINY, ["train.max_steps=20", "train.betas=[0.9, 0.99]", "train.lr=3e-4",
                                 "resume=null", "log.tensorboard=false", "train.deepspeed.zero_optimization.x=1"])
    recipe = parse(raw)
    assert recipe.train.max_steps == 20 and recipe.train.betas == [0.9, 0.99] and recipe.train.lr == 3e-4
    assert recipe.log.tensorboard is False and recipe.train.deepspeed == {"zero_optimization": {"x": 1}}
    with pytest.raises(RecipeError, match="^'max_steps': an override is dotted.key=value"):
        apply_overrides(TINY, ["max_steps"])


def test_base_recipes_merge_and_the_resolved_recipe_reloads(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: a\ntrain: {max_steps: 5, warmup_steps: 1, lr: 1.0e-3}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {type: recur_gla, hidden_size: 32, num_heads: 2}\n"
                                         "train: {lr: 2.0e-3}\n")
    recipe = load_recipe(str(tmp_path / "child.yaml"), ["train.micro_batch=4"])
    assert (recipe.run_dir, recipe.train.max_steps, recipe.train.lr, recipe.train.micro_batch) == ("a", 5, 2e-3, 4)
    recipe.write(tmp_path / "resolved.yaml")
    again = load_recipe(str(tmp_path / "resolved.yaml"))
    assert again.to_dict() == recipe.to_dict()


# ----------------------------------------------------------------------------------------- launch

def test_launch_environments():
    env = distributed.launched_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                    "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "node7", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[012-013,20],cpu1", "SLURM_JOB_ID": "123456"}
    env = distributed.launched_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu012", 20000 + 123456 % 20000, "slurm")
    assert distributed.launched_env({**slurm, "MASTER_PORT": "999"}).master_port == 999
    batch_script = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}  # sbatch shell: no srun step yet
    assert distributed.launched_env(batch_script) is None
    assert distributed.launched_env({}) is None
    assert distributed.first_host("node1") == "node1" and distributed.first_host("a[7,9-10]") == "a7"


# ----------------------------------------------------------------------------------------- schedule, flops, loss

def test_schedules():
    common = dict(lr=1.0, min_lr=0.1, max_steps=100, warmup_steps=10)
    cosine = [schedule.learning_rate(s, schedule="cosine", **common) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0) and cosine[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    wsd = [schedule.learning_rate(s, schedule="wsd", decay_steps=20, **common) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[99] == pytest.approx(0.1) and wsd[80] == pytest.approx(1 - 0.9 / 20)


def tiny(model_type, **kw):
    """The family's first declared test config, vocabulary 128, with `kw` on top."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recur.modeling import FAMILIES
    settings = {**next(iter(FAMILIES[model_type].tiny.values())), "vocab_size": 128, **kw}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))


def test_flops_per_token_formulas():
    gla = tiny("recur_gla", hidden_size=64, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1.0)
    embedding = gla.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in gla.parameters()) - embedding
    # GLA: H=2, dk = 64·0.5 = 32 (16 per head), dv = 64 (32 per head): S = 2·16·32 = 1024 per layer
    assert flops.flops_per_token(gla, 256)[0] == 6 * n + 3 * 2 * 5 * 1024
    griffin = tiny("recur_griffin", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                   attention_window_size=8)  # layers: recurrent, recurrent, attention; window 8 over 16 tokens
    n = sum(p.numel() for p in griffin.parameters())  # tied: the embedding counts once, as the head
    w = (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 * 9) / 16
    assert flops.flops_per_token(griffin, 16)[0] == pytest.approx(6 * n + 3 * 4 * 4 * 16 * w)
    mamba = tiny("recur_mamba2", hidden_size=64, num_hidden_layers=2, d_state=16, headdim=16, ngroups=1)
    assert flops.mixing_forward_flops(mamba.config, 64)[0] == 2 * 7 * 128 * 16


def test_scored_tokens_is_what_the_model_loss_averages():
    model = tiny("recur_gla")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    labels = ids.clone()
    labels[1, 9:] = -100
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    out = model(**batch, use_cache=False)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  reduction="none", ignore_index=-100).view(2, 11)
    per_token[0, 4] = 0  # the prediction across the document boundary (position 5 restarts at 0) is not scored
    assert scored_tokens(batch) == 11 + 11 - 1 - 3
    torch.testing.assert_close(out.loss * scored_tokens(batch), per_token.sum())


# ----------------------------------------------------------------------------------------- real runs

COMMON = ["gla-tiny", "train.max_steps=12", "train.warmup_steps=2", "train.global_batch=4", "train.micro_batch=2",
          "train.log_every=1", "train.save_every=4", "eval_every=6", "eval_batches=2", "log.progress=false",
          "log.tensorboard=false", "data.seq_len=128", "export=false", "model.hidden_size=64",
          "model.intermediate_size=128"]


FAULTS = str(Path(__file__).with_name("faults.py"))  # recur train in one process, with injected faults


def launch(run_dir, *overrides, env=None, faults=()):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [FAULTS, *faults, "--"] if faults else ["-m", "recur.cli", "train"]
    return subprocess.Popen([sys.executable, *command, *COMMON, f"run_dir={run_dir}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def train(run_dir, *overrides, env=None, faults=()):
    code, out = finish(launch(run_dir, *overrides, env=env, faults=faults))
    assert code == 0, out[-3000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]


def descendants(pid):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for_step(process, run_dir, step, timeout=240):
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {timeout} s")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Reference runs shared by the tests below (the first one may build DeepSpeed's CPU op, ~1 min once)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    train(root / "zero2", "nproc=2")  # 2 processes x micro-batch 2, no accumulation
    out["zero2"] = root / "zero2"
    return out


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_two_processes_zero2_train_and_learn(runs):
    records = metrics(runs["zero2"])
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 128 and 0 < r["mfu"] < 1 and math.isfinite(r["grad_norm"])
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert "val_loss" in records[5] and "val_loss" in records[11] and "val_loss" not in records[6]
    assert (runs["zero2"] / "recipe.yaml").exists()
    checkpoints = runs["zero2"] / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000008", "step_00000012"]  # keep 2
    assert {p.name for p in (checkpoints / "step_00000012").glob("data_rank*")} == {"data_rank00000.pt",
                                                                                   "data_rank00001.pt"}


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_one_process_with_accumulation_matches_two_processes(runs, tmp_path):
    """Same global batch (the rows of data slots 0 and 1): 2 ranks x 1 micro-batch vs 1 rank x 2 micro-batches
    (2 loader workers make the same 2 slots). Float32 reduction order differs, nothing else."""
    train(tmp_path / "one", "nproc=1", "data.num_workers=2")
    one, two = losses(tmp_path / "one"), losses(runs["zero2"])
    assert [s for s, _ in one] == [s for s, _ in two]
    for (step, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=2e-5, abs=2e-5), (step, a, b)


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_zero3_matches_zero2_and_exports(runs, tmp_path):
    train(tmp_path / "z3", "nproc=2", "train.zero_stage=3",
          "train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0")  # partition every tensor
    z3, z2 = metrics(tmp_path / "z3"), metrics(runs["zero2"])
    for a, b in zip(z3, z2):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5, abs=2e-5), (a, b)
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=2e-5, abs=2e-5)
    # recur export from ZeRO-3 shards and from ZeRO-2 shards: transformers loads both, same model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    logits = []
    for name, run in (("z3", tmp_path / "z3"), ("z2", runs["zero2"])):
        out = tmp_path / f"export-{name}"
        result = subprocess.run([sys.executable, "-m", "recur.cli", "export", str(run), str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in out.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
        ids = torch.tensor([tokenizer("The Python language")["input_ids"]])
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
    again = subprocess.run([sys.executable, "-m", "recur.cli", "export", str(runs["zero2"]), str(tmp_path / "export-z2")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_sigterm_then_sigkill_then_resume_gives_the_same_metrics(runs, tmp_path):
    """2 processes: SIGTERM (checkpoint + exit 75), resume, SIGKILL at a random step, resume=auto: the
    metrics equal the uninterrupted run's, step for step, exactly."""
    run = tmp_path / "interrupted"
    first = launch(run, "nproc=2")
    wait_for_step(first, run, 2)
    first.send_signal(signal.SIGTERM)  # the spawning command forwards it to torchrun, which tells the workers
    code, out = finish(first)
    assert code == 75, out[-3000:]
    stopped = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 2 <= stopped < 12 and "stopped by SIGTERM" in out
    kill_at = random.Random().randint(stopped + 1, 11)
    second = launch(run, "nproc=2", "resume=auto")
    wait_for_step(second, run, kill_at)
    for pid in [second.pid] + descendants(second.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    second.communicate()
    train(run, "nproc=2", "resume=auto")
    expected = metrics(runs["zero2"])
    got = metrics(run)
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in expected], (
        f"stopped at {stopped}, killed at {kill_at}")


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_a_crash_inside_a_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "crash"
    args = ("nproc=1", "train.max_steps=8", "eval_every=0")
    code, out = finish(launch(run, *args, faults=["--crash", "publish:8"]))
    assert code != 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert (checkpoints / ".tmp-step_00000008").is_dir() and not (checkpoints / "step_00000008").exists()
    # again from step 4, crashing after the rename but before `latest` moves: still step 4
    code, out = finish(launch(run, *args, "resume=auto", faults=["--crash", "latest:8"]))
    assert code != 0 and (checkpoints / "latest").read_text() == "step_00000004"
    assert "resumed from" in out and (checkpoints / "step_00000008").is_dir()
    out = train(run, *args, "resume=auto")
    assert "at step 4" in out
    assert (checkpoints / "latest").read_text() == "step_00000008" and not list(checkpoints.glob(".tmp-*"))
    fresh = tmp_path / "fresh"
    train(fresh, *args)
    assert losses(run) == losses(fresh)
    code, out = finish(launch(fresh, *args))  # checkpoints exist and resume is not set: refused
    assert code == 2 and "set resume=auto" in out


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path):
    run = tmp_path / "nan"
    out = train(run, "nproc=1", "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=10", "eval_every=0",
                faults=["--nan-steps", "4"])
    records = metrics(run)
    assert records[3]["skipped"] is True and math.isnan(records[3]["loss"]) and "step 4: non-finite" in out
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 4)  # the NaN update was not applied
    assert records[5]["loss"] < records[0]["loss"]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert saved == ["step_00000002", "step_00000006"]  # the step whose update was skipped is not saved
    code, out = finish(launch(tmp_path / "nan2", "nproc=1", "train.max_steps=8", "train.max_bad_steps=3",
                              "eval_every=0", faults=["--nan-steps", "3,4,5"]))
    assert code == 1 and "3 non-finite steps in a row" in out


PRECISION_SCRIPT = textwrap.dedent("""
    import os, sys, torch, deepspeed
    sys.path.insert(0, {tests!r})
    from test_train import tiny
    from recur.train.distributed import single_process_env
    from recur.train.recipe import parse
    from recur.train.engine import check_fp32_parameters, deepspeed_config, TrainingError
    single_process_env().export()
    deepspeed.init_distributed("gloo", verbose=False)
    recipe = parse({{"run_dir": "x", "model": {{"type": "recur_gla"}},
                    "train": {{"max_steps": 1, "warmup_steps": 0, "global_batch": 2, "micro_batch": 2,
                              "precision": "bf16"}}}})
    for family in ("recur_mamba2", "recur_rwkv6", "recur_griffin", "recur_hgrn2"):
        model = tiny(family)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config=deepspeed_config(recipe, 1, "bf16"))
        seen = []
        linear = next(m for m in engine.module.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        ids = torch.randint(0, 128, (2, 16))
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        if family in ("recur_mamba2", "recur_griffin"):  # the CPU chunk kernel of GLA/HGRN2/RWKV-6 has no
            engine.backward(out.loss)                     # autocast backward (GPU uses fla's kernels)
            engine.step()
        names = check_fp32_parameters(engine.module)
        print(family, seen[0], sorted({{n.rsplit(".", 1)[-1] for n in names}}), flush=True)
        assert seen[0] == torch.bfloat16 and names
    # DeepSpeed's own bf16 mode casts them: the check refuses it
    model = tiny("recur_mamba2")
    config = {{**deepspeed_config(recipe, 1, "fp32"), "bf16": {{"enabled": True}}}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    try:
        check_fp32_parameters(engine.module)
    except TrainingError as e:
        print("refused:", e)
    else:
        raise SystemExit("bf16 mode kept A_log in float32?")
""")


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_bf16_autocast_keeps_recurrent_parameters_float32():
    tests = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT.format(tests=tests)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert "recur_mamba2 torch.bfloat16 ['A_log', 'D', 'dt_bias']" in out
    rwkv6 = next(line for line in out.splitlines() if line.startswith("recur_rwkv6 torch.bfloat16"))
    assert "'time_decay'" in rwkv6 and "'time_faaaa'" in rwkv6  # (and the token-mix amounts, all time_*)
    assert "recur_griffin torch.bfloat16 ['recurrent_param']" in out
    assert "recur_hgrn2 torch.bfloat16 ['lower_bounds']" in out
    assert "refused: recurrent parameters must stay float32" in out and "A_log" in out


@pytest.mark.slow  # recur train in a subprocess, per family
@pytest.mark.parametrize("recipe, extra, model_type", [
    ("gla-tiny", [], "recur_gla"), ("hgrn2-tiny", [], "recur_hgrn2"), ("mamba2-tiny", [], "recur_mamba2"),
    ("rwkv6-tiny", [], "recur_rwkv6"), ("griffin-tiny", [], "recur_griffin"), ("hawk-tiny", [], "recur_griffin"),
    ("titans-tiny", [], "recur_titans"), ("titans-tiny", ["model.variant=mal"], "recur_titans"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_every_family_trains_from_its_tiny_recipe(recipe, extra, model_type, tmp_path):
    """3 steps of each tiny recipe with ZeRO-1, activation checkpointing and the final export."""
    run = tmp_path / "run"
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "recur.cli", "train", recipe, f"run_dir={run}",
                             "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1", "train.zero_stage=1",
                             "train.activation_checkpointing=true", "data.seq_len=64", "eval_every=3",
                             "eval_batches=1", "log.progress=false", *extra], capture_output=True, text=True,
                            env=environ)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(records[-1]["val_loss"]) and (run / "loss.png").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert model.config.model_type == model_type
    if extra:
        assert model.config.variant == "mal"
