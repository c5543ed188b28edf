"""Fine-tuning through recur train: model.from (start from a saved model folder), train.lora and
train.trainable (only some parameters train; the export merges the LoRA), train.objective distill
(KL to a frozen transformers teacher), exact resume of a LoRA run, and one-line recipe errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recur.train.recipe import RecipeError, deep_merge, load_recipe, parse

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretrain"
VOCAB = 320  # the byte tokenizer's 259 tokens, rounded up to a multiple of 64
LORA = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}


def make_start(path: Path) -> Path:
    """A small recur_gla folder, as `recur linearize` or save_pretrained writes one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recur.data import load_tokenizer
    from recur.modeling import FAMILIES

    tokenizer = load_tokenizer("byte")
    settings = {**FAMILIES["recur_gla"].tiny["recur_gla"], "vocab_size": VOCAB, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("recur_gla", **settings)).save_pretrained(path)
    return path


def make_teacher(path: Path) -> Path:
    """A tiny transformers Llama with the same vocabulary and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recur.data import load_tokenizer

    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3)  # sharper than the default: a KL well above 0
    LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer("byte").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"start": make_start(root / "start"), "teacher": make_teacher(root / "teacher"), "root": root,
            "docs": make_documents(root / "docs.jsonl")}


def make_documents(path: Path) -> Path:
    """Short documents, so that every packed row holds several (and document boundaries matter)."""
    import random

    rng = random.Random(0)
    words = "the a recurrent model reads packed rows of short documents and learns from each token".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 15)))}) + "\n"
                            for _ in range(400)))
    return path


def recipe_file(folders, name: str, train: dict) -> Path:
    """A recipe on the tiny recipes' data that starts from folders['start']; gas 1, a constant schedule."""
    path = folders["root"] / f"{name}.yaml"
    raw = {"base": str(RECIPES / "_tiny.yaml"), "run_dir": str(folders["root"] / name),
           "model": {"from": str(folders["start"])}, "eval_every": 0, "export": True,
           "data": {"seq_len": 128, "sources": [{"path": str(folders["docs"])}]},
           "train": {"max_steps": 4, "global_batch": 2, "micro_batch": 2, "lr": 1.0e-3, "min_lr": 0.0,
                     "schedule": "constant", "warmup_steps": 0, "log_every": 1, "save_every": 100,
                     "zero_stage": 2, **train},
           "log": {"progress": False, "tensorboard": False}}
    import yaml
    path.write_text(yaml.safe_dump(raw))
    return path


def train(recipe: Path, *overrides, code=0) -> str:
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "recur.cli", "train", str(recipe), *overrides],
                            capture_output=True, text=True, env=environ, timeout=600)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(run_dir) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def first_batch(recipe_path: Path) -> dict:
    """The first micro-batch rank 0 trains on, read again from the recipe's data config."""
    from recur.data import build_loader, load_tokenizer

    recipe = load_recipe(str(recipe_path))
    loader = build_loader(recipe.data, load_tokenizer(recipe.data.tokenizer), recipe.train.micro_batch, 0, 1,
                          split="train")
    return next(iter(loader))


def load(path):
    from transformers import AutoModelForCausalLM

    import recur  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def teacher_logits_per_document(teacher, batch) -> torch.Tensor:
    """The teacher run on each document of each row alone (a new document wherever position_ids restart)."""
    rows = []
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        starts = [0] + [i for i in range(1, len(positions)) if positions[i] == 0] + [len(positions)]
        rows.append(torch.cat([teacher(input_ids=ids[None, s:e], position_ids=positions[None, s:e]).logits[0]
                               for s, e in zip(starts, starts[1:])]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def lora_run(folders):
    """4 LoRA steps from the start folder, exported: the reference of the tests below."""
    recipe = recipe_file(folders, "lora", {"lora": LORA})
    out = train(recipe)
    return recipe, folders["root"] / "lora", out


@pytest.mark.slow  # recur train / DeepSpeed in a subprocess
def test_model_from_starts_from_the_saved_weights(folders, lora_run):
    """Step 1's loss is the start model's loss on the first batch (LoRA's B starts at 0: the same function)."""
    recipe, run, out = lora_run
    batch = first_batch(recipe)
    with torch.no_grad():
        expected = load(folders["start"])(**batch, use_cache=False).loss.item()
    step, loss = losses(run)[0]
    assert step == 1 and loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert "model: recur_gla" in out


@pytest.mark.slow  # recur train / DeepSpeed in a subprocess
def test_lora_trains_only_the_lora_and_the_export_merges_it(folders, lora_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, get_peft_model

    recipe, run, _ = lora_run
    export = run / "export"
    assert not (export / "adapter_config.json").exists()
    assert json.loads((export / "config.json").read_text())["model_type"] == "recur_gla"
    start, merged = load(folders["start"]), load(export)  # plain transformers, no peft
    before, after = start.state_dict(), merged.state_dict()
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    targets = {name for name in before if name.rsplit(".", 2)[-2] in LORA["target_modules"]}
    assert changed == targets and len(targets) == 3 * start.config.num_hidden_layers
    for name in targets:  # what changed is a rank-r product: the merged LoRA
        assert torch.linalg.matrix_rank(after[name] - before[name]).item() <= LORA["r"]
    # merge correctness: the unmerged peft model with the checkpoint's LoRA weights gives the export's logits
    tag = (run / "checkpoints" / "latest").read_text()
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    peft_model = get_peft_model(load(folders["start"]), LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=LORA["target_modules"]))
    lora_weights = {k: v for k, v in trained.items() if "lora_" in k}
    assert lora_weights and not peft_model.load_state_dict(lora_weights, strict=False).unexpected_keys
    inputs = {k: v for k, v in first_batch(recipe).items() if k != "labels"}
    with torch.no_grad():
        want = peft_model.eval()(**inputs, use_cache=False).logits
        got = merged(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    state = json.loads((run / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["lora"] == LORA and state["trainable"] == []


@pytest.mark.slow  # recur train / DeepSpeed in a subprocess
@pytest.mark.parametrize("stage", [1, 3])
def test_lora_exports_from_zero1_and_zero3_checkpoints(folders, lora_run, stage):
    """ZeRO-1 checkpoints keep no fp32 copy of frozen parameters (they come from the module state),
    ZeRO-3 partitions them: the same export as ZeRO-2's."""
    name = f"lora-zero{stage}"
    train(recipe_file(folders, name, {"lora": LORA, "zero_stage": stage}))
    for (_, a), (_, b) in zip(losses(folders["root"] / name), losses(lora_run[1])):
        assert a == pytest.approx(b, rel=1e-5)
    got, want = load(folders["root"] / name / "export").state_dict(), load(lora_run[1] / "export").state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_a_resumed_lora_run_logs_the_losses_of_an_uninterrupted_one(folders, lora_run):
    """2 steps, then resume=auto to 4 (the constant schedule does not depend on max_steps): the same losses.
    A resume with other LoRA settings is refused in one line, before anything is written."""
    recipe = recipe_file(folders, "resumed", {"lora": LORA})
    run = folders["root"] / "resumed"
    train(recipe, "train.max_steps=2", "export=false")
    out = train(recipe, "resume=auto", "train.lora={r: 4}", code=2)
    assert "train.lora (" in out and "does not fit" in out
    train(recipe, "resume=auto")
    assert losses(run) == losses(lora_run[1])


@pytest.mark.slow  # recur train / DeepSpeed in a subprocess
def test_distill_step_one_is_the_kl_to_the_teacher(folders):
    """distill_weight 0.5 at temperature 2: step 1's loss = 0.5 · 4 · KL_T + 0.5 · CE over the scored tokens,
    computed here from the start model and the teacher run document by document. train.trainable alone
    trains only the q_proj weights."""
    t, w = 2.0, 0.5
    recipe = recipe_file(folders, "distill", {"objective": "distill", "teacher": str(folders["teacher"]),
                                              "distill_temperature": t, "distill_weight": w, "max_steps": 1,
                                              "trainable": [r"q_proj\.weight$"]})
    train(recipe)
    batch = first_batch(recipe)
    student, teacher = load(folders["start"]), load(folders["teacher"])
    with torch.no_grad():
        out = student(**batch, use_cache=False)
        teacher_logits = teacher_logits_per_document(teacher, batch)
    targets = batch["labels"][:, 1:]
    scored = (targets != -100) & (batch["position_ids"][:, 1:] != 0)
    p = torch.softmax(teacher_logits[:, :-1][scored] / t, -1)
    q = torch.softmax(out.logits[:, :-1][scored] / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    expected = w * kl.item() + (1 - w) * out.loss.item()
    step, loss = losses(folders["root"] / "distill")[0]
    assert step == 1 and loss == pytest.approx(expected, rel=1e-5)
    before, after = student.state_dict(), load(folders["root"] / "distill" / "export").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith("q_proj.weight")} and changed


# ----------------------------------------------------------------------------------------- fast checks

class Leaky(torch.nn.Module):
    """A causal LM that ignores document boundaries (a 2-D attention mask turns off transformers' packing)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, position_ids, use_cache=False):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=use_cache)


def test_packed_teacher_keeps_documents_apart_and_the_kl_matches_a_direct_formula(folders):
    from recur.train.objectives import Distill, distill_kl, isolates_documents, scored_mask, segments

    teacher = load(folders["teacher"])
    assert isolates_documents(teacher)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 24), generator=g),
             "position_ids": torch.tensor([list(range(40, 49)) + list(range(10)) + list(range(5)), list(range(24))])}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][1, 20:] = -100
    assert segments(batch["position_ids"][0]) == [(0, 9), (9, 19), (19, 24)]
    distill = Distill(teacher)
    with torch.no_grad():
        packed = distill.teacher_logits(batch)
        distill.packed = False  # the fallback: one document at a time
        alone = distill.teacher_logits(batch)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed, teacher_logits_per_document(teacher, batch), rtol=1e-5, atol=1e-5)
        leaky = Leaky(teacher)  # a teacher that attends across documents: run one document at a time
        assert not isolates_documents(leaky)
        fallback = Distill(leaky)
        assert not fallback.packed
        torch.testing.assert_close(fallback.teacher_logits(batch), alone, rtol=1e-5, atol=1e-5)
    student = torch.randn(2, 24, VOCAB, generator=g)
    mask = scored_mask(batch["labels"], batch["position_ids"])
    assert int(mask.sum()) == 23 + 23 - 2 - 4
    p, q = torch.softmax(packed[:, :-1][mask] / 3, -1), torch.softmax(student[:, :-1][mask] / 3, -1)
    direct = torch.nn.functional.kl_div(q.log(), p, reduction="batchmean") * 9
    torch.testing.assert_close(distill_kl(student, packed, mask, 3.0), direct)
    assert distill_kl(packed, packed, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_a_teacher_of_another_vocabulary_is_refused(folders, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from recur.data import load_tokenizer
    from recur.train.engine import model_config
    from recur.train.objectives import build_objective

    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "wide")
    tokenizer = load_tokenizer("byte")
    raw = {"run_dir": "x", "model": {"from": str(folders["start"])},
           "train": {"max_steps": 1, "warmup_steps": 0, "objective": "distill", "teacher": str(tmp_path / "wide")}}
    recipe = parse(raw)
    config = model_config(recipe, tokenizer)
    with pytest.raises(RecipeError, match=r"^train.teacher: .* predicts 384 tokens, the student's vocab_size is 320"):
        build_objective(recipe, config, tokenizer, "cpu", "fp32")
    recipe.train.teacher = str(folders["teacher"])
    assert build_objective(recipe, config, tokenizer, "cpu", "fp32").packed


def test_model_from_takes_the_folders_config(folders):
    from recur.data import load_tokenizer
    from recur.train.engine import build_model, model_config, select_trainable

    recipe = parse({"run_dir": "x", "model": {"from": str(folders["start"])},
                    "train": {"max_steps": 1, "warmup_steps": 0, "lora": {"r": 2}}})
    assert recipe.model == {"from": str(folders["start"]), "type": "recur_gla"}  # the type filled in
    assert recipe.train.lora == {**LORA, "r": 2, "alpha": 8.0}
    config = model_config(recipe, load_tokenizer("byte"))
    assert config.vocab_size == VOCAB and config.hidden_size == 48
    model = select_trainable(build_model(recipe, config), recipe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    from recur.train.engine import check_fp32_parameters
    assert check_fp32_parameters(model) == []  # GLA keeps none; the peft wrapper does not confuse it
    recipe.train.lora["target_modules"] = ["q_proj", "qkv"]
    with pytest.raises(RecipeError, match=r"^train.lora.target_modules: recur_gla has no module 'qkv' \(its linear"):
        select_trainable(build_model(recipe, config), recipe)
    recipe.train.lora, recipe.train.trainable = None, ["nothing_like_this"]
    with pytest.raises(RecipeError, match=r"^train.trainable: 'nothing_like_this' matches no parameter"):
        select_trainable(build_model(recipe, config), recipe)


def test_check_fp32_parameters_sees_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from recur.modeling import FAMILIES
    from recur.train.engine import TrainingError, check_fp32_parameters

    settings = next(iter(FAMILIES["recur_mamba2"].tiny.values()))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("recur_mamba2", **settings))
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["in_proj"]))
    names = check_fp32_parameters(wrapped)
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["A_log", "D", "dt_bias"]
    wrapped.get_base_model().model.layers[0].mixer.A_log.data = torch.zeros(1, dtype=torch.bfloat16)
    with pytest.raises(TrainingError, match="A_log"):
        check_fp32_parameters(wrapped)


BASE = {"run_dir": "x", "model": {"type": "recur_gla", "hidden_size": 32, "num_heads": 2},
        "train": {"max_steps": 4, "warmup_steps": 0}}


@pytest.mark.parametrize("change, key", [
    ({"train": {"lora": {"r": 0}}}, "train.lora.r"),
    ({"train": {"lora": {"rank": 8}}}, "train.lora.rank"),
    ({"train": {"lora": {"alpha": float("nan")}}}, "train.lora.alpha"),
    ({"train": {"lora": {"alpha": 0}}}, "train.lora.alpha"),
    ({"train": {"lora": {"dropout": 1.0}}}, "train.lora.dropout"),
    ({"train": {"lora": {"target_modules": []}}}, "train.lora.target_modules"),
    ({"train": {"lora": {"target_modules": "q_proj"}}}, "train.lora.target_modules"),
    ({"train": {"lora": 8}}, "train.lora"),
    ({"train": {"trainable": "b_proj"}}, "train.trainable"),
    ({"train": {"trainable": ["(unclosed"]}}, "train.trainable"),
    ({"train": {"objective": "kl"}}, "train.objective"),
    ({"train": {"objective": "distill"}}, "train.teacher"),
    ({"train": {"objective": "distill", "teacher": "/no/such/teacher"}}, "train.teacher"),
    ({"train": {"teacher": "."}}, "train.teacher"),
    ({"train": {"distill_temperature": 0}}, "train.distill_temperature"),
    ({"train": {"distill_temperature": float("inf")}}, "train.distill_temperature"),
    ({"train": {"distill_weight": 1.5}}, "train.distill_weight"),
    ({"train": {"distill_weight": -0.1}}, "train.distill_weight"),
    ({"model": {"from": "/no/such/model"}}, "model.from"),
    ({"model": {"from": 3}}, "model.from"),
])
def test_bad_fine_tuning_keys_are_refused_naming_the_key(change, key):
    raw = deep_merge(BASE, change)
    if "from" in change.get("model", {}):
        raw["model"] = dict(change["model"])
    with pytest.raises(RecipeError) as error:
        parse(raw)
    assert str(error.value).startswith(key + ":"), str(error.value)
    assert "\n" not in str(error.value)


def test_model_from_must_be_a_recur_model_of_the_named_type(folders):
    raw = {"run_dir": "x", "train": {"max_steps": 1, "warmup_steps": 0}}
    with pytest.raises(RecipeError, match=r"^model.type: 'recur_mamba2' does not match the model in model.from "
                                          r"\('recur_gla'"):
        parse({**raw, "model": {"type": "recur_mamba2", "from": str(folders["start"])}})
    with pytest.raises(RecipeError, match=r"^model.hidden_size: cannot be set with model.from"):
        parse({**raw, "model": {"from": str(folders["start"]), "hidden_size": 64}})
    with pytest.raises(RecipeError, match=r"^model.from: .* holds a 'llama' model, not a recur model family"):
        parse({**raw, "model": {"from": str(folders["teacher"])}})
    recipe = parse({**raw, "model": {"type": "recur_gla", "from": str(folders["start"])},
                    "train": {"max_steps": 1, "warmup_steps": 0, "objective": "distill",
                              "teacher": str(folders["teacher"]), "distill_weight": 0}})
    assert recipe.train.teacher == str(folders["teacher"]) and recipe.train.distill_weight == 0.0
    recipe.write(folders["root"] / "resolved.yaml")  # the resolved recipe reloads to the same recipe
    assert load_recipe(str(folders["root"] / "resolved.yaml")).to_dict() == recipe.to_dict()
