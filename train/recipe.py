"""Training recipes: a YAML file plus `dotted.key=value` overrides, checked before anything starts.

    recipe = load_recipe("recipes/pretrain/gla-tiny.yaml", ["train.max_steps=20"], world_size=2)

A recipe (every key but model.type and train.max_steps has a default):

    base: other.yaml            # optional: a recipe this one extends (path relative to this file)
    run_dir: runs/gla-tiny      # resolved recipe, metrics.jsonl, checkpoints/, tensorboard/, loss.png, export/
    seed: 0                     # model init (the same on every rank)
    resume: null                # null: start fresh (refused if run_dir has checkpoints) | auto | a checkpoint path
    nproc: 1                    # processes to start on this machine when no launcher (torchrun, srun, deepspeed) did
    eval_every: 0               # validation loss every N steps (0: never; also at the last step)
    eval_batches: 20            # validation batches per rank, read once and kept (null: the whole held-out split)
    export: true                # write a transformers folder to run_dir/export at the end
    model:
      type: recur_gla           # a registered model type; every other key goes to its config class
      hidden_size: 64           # vocab_size defaults to the tokenizer's size rounded up to a multiple of 64
      from: null                # a saved recur model folder (recur linearize / recur export / save_pretrained) to
                                # start from: its config and weights (no other model keys; type may be left out)
    data: {...}                 # recur.data.DataConfig (sources, tokenizer, seq_len, ...)
    train:
      max_steps: 1000           # optimizer steps
      global_batch: 8           # sequences per optimizer step = micro_batch x gradient accumulation x world size
      micro_batch: 8            # sequences per forward/backward on one rank
      lr: 3.0e-4
      min_lr: 3.0e-5            # the schedule's floor
      schedule: cosine          # cosine | wsd (warmup-stable-decay) | constant (after warmup)
      warmup_steps: 100
      decay_steps: null         # wsd: length of the final decay (null: 20% of max_steps)
      weight_decay: 0.1         # on matrices (2-D weights) only
      betas: [0.9, 0.95]
      eps: 1.0e-8
      grad_clip: 1.0            # DeepSpeed's gradient_clipping, always set (its default changed in 0.19.3)
      zero_stage: 2             # 1, 2 or 3
      precision: auto           # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (torch_autocast: parameters stay fp32)
      activation_checkpointing: false   # recompute each block in backward
      compile: false            # torch.compile the model (DeepSpeed's engine.compile)
      log_every: 10             # a metrics.jsonl line every N steps (and at every evaluation and the last step)
      save_every: 1000          # a checkpoint every N steps (and at the end, and on SIGTERM / SIGUSR1)
      keep_checkpoints: 3       # keep the last K
      max_bad_steps: 5          # stop after this many non-finite steps in a row
      stop_margin_s: 240        # in a SLURM job with a time limit (SLURM_JOB_END_TIME): save and stop (exit 75)
                                # this many seconds before the job's end, should its warning signal be lost
      deepspeed: {}             # merged into the generated DeepSpeed config (e.g. an "optimizer" section)
      trainable: []             # regexes searched in parameter names: only those train (with lora: those besides
                                # the LoRA weights); [] and lora null: every parameter trains
      lora: null                # LoRA (peft) on a frozen model; export merges it into the weights. A mapping:
                                # {r: 8, alpha: 8, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj]}
      objective: next_token     # next_token (cross entropy) | distill (KL to train.teacher's next-token distribution)
                                # | align (each attention layer, given the teacher's input to it, matches the
                                # teacher's attention output: MSE, layers independent; a linearized model's stage 1)
      teacher: null             # distill, align: a transformers causal LM folder or a .gguf file (float32, frozen)
      distill_temperature: 1.0  # T: teacher and student logits divided by T, the KL multiplied by T²
      distill_weight: 1.0       # w: loss = w·KL + (1 - w)·CE, both token means over the scored tokens
    eval:                       # lm-eval tasks during training, on rank 0, at every eval_every (recur eval's code)
      tasks: []                 # lm-eval task names; lambada_openai, wikitext, piqa, hellaswag from data_dir
      limit: null               # documents per task (keep it small: it runs inside training)
      num_fewshot: null
      batch_size: 8
      include_path: []          # folders of task YAMLs (lm-eval's --include_path)
      data_dir: null            # local files of the standard tasks (null: ../shared/data when it exists)
    log:
      progress: true            # a progress bar on rank 0
      tensorboard: true
      wandb_project: null       # also log to Weights & Biases when set and wandb is installed

Every error is a RecipeError (a ValueError) whose one-line message starts with the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recur.config import RecipeError, apply_overrides, deep_merge, find_recipe, read_recipe, typed
from recur.data import DataConfig, DataError

__all__ = ["Recipe", "TrainConfig", "LogConfig", "EvalConfig", "RecipeError", "load_recipe", "parse", "validate",
           "apply_overrides", "deep_merge", "find_recipe"]

SCHEDULES = ("cosine", "wsd", "constant")
OBJECTIVES = ("next_token", "distill", "align")
PRECISIONS = ("auto", "fp32", "bf16")
# DeepSpeed keys the trainer sets itself from train.*: refused inside train.deepspeed.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / train.micro_batch", "gradient_clipping": "train.grad_clip",
    "scheduler": "train.schedule (the trainer sets the learning rate every step)",
    "bf16": "train.precision: bf16 (DeepSpeed's bf16 mode casts every parameter, the recurrent decays included, "
            "to bf16; train.precision: bf16 uses torch_autocast and keeps parameters in float32)",
    "fp16": "train.precision: bf16 (fp16 needs loss scaling and overflows the recurrent decays)",
    "torch_autocast": "train.precision", "zero_optimization.stage": "train.zero_stage",
}


@dataclass
class TrainConfig:
    max_steps: int = 0
    global_batch: int = 8
    micro_batch: int = 8
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    stop_margin_s: float = 240.0
    deepspeed: dict = field(default_factory=dict)
    trainable: list = field(default_factory=list)
    lora: dict | None = None
    objective: str = "next_token"
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_weight: float = 1.0


@dataclass
class LoraSettings:
    """train.lora (peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules)."""
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


@dataclass
class EvalConfig:
    tasks: list = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: list = field(default_factory=list)
    data_dir: str | None = None


@dataclass
class LogConfig:
    progress: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None


@dataclass
class Recipe:
    run_dir: str = ""
    seed: int = 0
    resume: str | None = None
    nproc: int = 1
    eval_every: int = 0
    eval_batches: int | None = 20
    export: bool = True
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""  # the file it came from (not a recipe key)

    def accumulation_steps(self, world_size: int) -> int:
        return self.train.global_batch // (self.train.micro_batch * world_size)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out["data"], out["train"], out["log"], out["eval"] = (
            self.data.to_dict(), dataclasses.asdict(self.train), dataclasses.asdict(self.log),
            dataclasses.asdict(self.eval))
        out["model"] = dict(self.model)
        return out

    def write(self, path: str | Path) -> None:
        """The resolved recipe (defaults filled in), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"# resolved from {self.source}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)


def load_recipe(name: str, overrides: list[str] = (), world_size: int | None = None) -> Recipe:
    raw, path = read_recipe(name, overrides)
    recipe = parse(raw, world_size)
    recipe.source = str(path) + (" with " + " ".join(overrides) if overrides else "")
    return recipe


def parse(raw: dict, world_size: int | None = None) -> Recipe:
    """Check every key and type, then the combinations; world_size (if known) checks the batch split."""
    raw = dict(raw)
    sections = {name: raw.pop(name, None) for name in ("model", "data", "train", "log", "eval")}
    recipe = typed(Recipe, raw, "", skip=("model", "data", "train", "log", "eval", "source"))
    if sections["model"] is None or not isinstance(sections["model"], dict):
        from recur.modeling import FAMILIES

        raise RecipeError(f"model: missing, or not a mapping (it needs at least `type:`, one of {', '.join(FAMILIES)})")
    recipe.model = dict(sections["model"])
    recipe.train = typed(TrainConfig, {} if sections["train"] is None else sections["train"], "train")
    recipe.log = typed(LogConfig, {} if sections["log"] is None else sections["log"], "log")
    recipe.eval = typed(EvalConfig, {} if sections["eval"] is None else sections["eval"], "eval")
    try:
        recipe.data = DataConfig.from_dict(sections["data"])
    except DataError as e:
        raise RecipeError(str(e)) from None
    validate(recipe, world_size)
    return recipe


def validate(recipe: Recipe, world_size: int | None = None) -> None:
    t = recipe.train
    if not recipe.run_dir:
        raise RecipeError("run_dir: missing (the folder for metrics, checkpoints and the export)")
    if recipe.resume is not None and recipe.resume != "auto" and not os.path.exists(os.path.expanduser(recipe.resume)):
        raise RecipeError(f"resume: {recipe.resume!r} is not 'auto', null or an existing checkpoint path")
    _positive(recipe, "nproc")
    if recipe.eval_every < 0:
        raise RecipeError(f"eval_every: must be >= 0, got {recipe.eval_every}")
    if recipe.eval_batches is not None and recipe.eval_batches < 1:
        raise RecipeError(f"eval_batches: must be >= 1 or null, got {recipe.eval_batches}")
    if recipe.eval_every and recipe.data.validation_fraction <= 0:
        raise RecipeError("eval_every: needs a validation split, but data.validation_fraction is 0")
    validate_model(recipe.model)
    validate_eval(recipe)
    if t.max_steps < 1:
        raise RecipeError(f"train.max_steps: must be at least 1, got {t.max_steps}")
    for key in ("global_batch", "micro_batch", "log_every", "save_every", "keep_checkpoints", "max_bad_steps"):
        _positive(t, key, "train.")
    if t.global_batch % t.micro_batch:
        raise RecipeError(f"train.global_batch: {t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}")
    if world_size is not None and t.global_batch % (t.micro_batch * world_size):
        raise RecipeError(f"train.global_batch: {t.global_batch} is not divisible by world size {world_size} x "
                          f"train.micro_batch {t.micro_batch}")
    for key in ("lr", "min_lr", "weight_decay", "eps", "grad_clip", "stop_margin_s"):
        if getattr(t, key) < 0:
            raise RecipeError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.min_lr > t.lr:
        raise RecipeError(f"train.min_lr: {t.min_lr} is above train.lr {t.lr}")
    if t.schedule not in SCHEDULES:
        raise RecipeError(f"train.schedule: {t.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0 <= t.warmup_steps <= t.max_steps:
        raise RecipeError(f"train.warmup_steps: must be between 0 and train.max_steps ({t.max_steps}), got {t.warmup_steps}")
    if t.decay_steps is not None:
        if t.schedule != "wsd":
            raise RecipeError(f"train.decay_steps: only the wsd schedule has a decay phase (train.schedule is {t.schedule})")
        if not 0 < t.decay_steps <= t.max_steps - t.warmup_steps:
            raise RecipeError(f"train.decay_steps: must be between 1 and max_steps - warmup_steps "
                              f"({t.max_steps - t.warmup_steps}), got {t.decay_steps}")
    if (not isinstance(t.betas, list) or len(t.betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in t.betas)):
        raise RecipeError(f"train.betas: expected two numbers in [0, 1), got {t.betas!r}")
    if t.zero_stage not in (1, 2, 3):
        raise RecipeError(f"train.zero_stage: must be 1, 2 or 3, got {t.zero_stage}")
    if t.precision not in PRECISIONS:
        raise RecipeError(f"train.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    for key, use in OWNED_DEEPSPEED_KEYS.items():
        head, _, tail = key.partition(".")
        section = t.deepspeed.get(head)
        if (head in t.deepspeed and not tail) or (tail and isinstance(section, dict) and tail in section):
            raise RecipeError(f"train.deepspeed.{key}: set by the trainer; use {use}")
    validate_tuning(t)


def validate_tuning(t: TrainConfig) -> None:
    """train.trainable, train.lora and the objective; train.lora is filled in with its defaults."""
    if not all(isinstance(p, str) and p for p in t.trainable):
        raise RecipeError(f"train.trainable: expected a list of regexes of parameter names, got {t.trainable!r}")
    for pattern in t.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise RecipeError(f"train.trainable: {pattern!r} is not a regex ({e})") from None
    if t.lora is not None:
        lora = typed(LoraSettings, t.lora, "train.lora")
        if lora.r < 1:
            raise RecipeError(f"train.lora.r: must be at least 1, got {lora.r}")
        if lora.alpha <= 0:
            raise RecipeError(f"train.lora.alpha: must be > 0, got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise RecipeError(f"train.lora.dropout: must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules or not all(isinstance(m, str) and m for m in lora.target_modules):
            raise RecipeError(f"train.lora.target_modules: expected a list of module names (e.g. q_proj), "
                              f"got {lora.target_modules!r}")
        t.lora = dataclasses.asdict(lora)
    if t.objective not in OBJECTIVES:
        raise RecipeError(f"train.objective: {t.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if t.distill_temperature <= 0:
        raise RecipeError(f"train.distill_temperature: must be > 0, got {t.distill_temperature}")
    if not 0 <= t.distill_weight <= 1:
        raise RecipeError(f"train.distill_weight: must be in [0, 1], got {t.distill_weight}")
    if t.objective in ("distill", "align") and t.teacher is None:
        raise RecipeError(f"train.teacher: missing; train.objective {t.objective} needs a teacher (a transformers "
                          "causal LM folder or a .gguf file)")
    if t.objective == "align" and t.zero_stage == 3:
        raise RecipeError("train.objective: align calls each attention layer on its own, which ZeRO-3's gathering "
                          "does not see; use train.zero_stage 1 or 2")
    if t.teacher is not None:
        if t.objective not in ("distill", "align"):
            raise RecipeError(f"train.teacher: only used by train.objective distill or align (it is {t.objective})")
        path = Path(t.teacher).expanduser()
        if not ((path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".gguf")):
            raise RecipeError(f"train.teacher: {t.teacher!r} is neither a model folder with config.json nor a "
                              ".gguf file")


def validate_eval(recipe: Recipe) -> None:
    e = recipe.eval
    if not e.tasks:
        return
    if not all(isinstance(t, str) and t for t in e.tasks):
        raise RecipeError(f"eval.tasks: expected a list of lm-eval task names, got {e.tasks!r}")
    if not recipe.eval_every:
        raise RecipeError("eval.tasks: set eval_every (the tasks run at every evaluation)")
    if recipe.train.zero_stage == 3:
        raise RecipeError("eval.tasks: lm-eval runs on rank 0 with the whole model, which ZeRO-3 partitions; use "
                          "train.zero_stage 1 or 2, or recur eval on the checkpoints")
    if e.limit is not None and e.limit <= 0:
        raise RecipeError(f"eval.limit: must be > 0 or null, got {e.limit}")
    if e.batch_size < 1:
        raise RecipeError(f"eval.batch_size: must be at least 1, got {e.batch_size}")
    for path in e.include_path + ([e.data_dir] if e.data_dir else []):
        if not isinstance(path, str) or not os.path.isdir(os.path.expanduser(path)):
            raise RecipeError(f"eval: {path!r} is not a folder (eval.include_path, eval.data_dir)")


def validate_model(model: dict) -> None:
    """model.type must be a recur family; other keys must be arguments of its config class, of the right type.
    With model.from, the folder's config is the model's: model.type (filled in when left out) must match it."""
    from transformers import CONFIG_MAPPING

    import recur  # noqa: F401  registers the families

    families = sorted(k for k in CONFIG_MAPPING.keys() if k.startswith("recur_"))
    if model.get("from", ...) is None:
        del model["from"]
    if "from" in model:
        return validate_model_from(model, families)
    kind = model.get("type")
    if kind not in families:  # the trainer relies on recur's document-aware loss and position_ids
        raise RecipeError(f"model.type: {kind!r} is not a recur model family ({', '.join(families)})")
    config_class = CONFIG_MAPPING[kind]
    signature = inspect.signature(config_class.__init__).parameters
    known = {n for n, p in signature.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    known |= set(getattr(config_class, "attribute_map", {}))
    for key, value in model.items():
        if key == "type":
            continue
        if key not in known:
            raise RecipeError(f"model.{key}: unknown key for {kind} (known: {', '.join(sorted(known))})")
        default = signature[key].default if key in signature else None
        if not _same_kind(default, value):
            raise RecipeError(f"model.{key}: expected {type(default).__name__} like the default {default!r}, got {value!r}")
        if not _finite_like(default, value):
            raise RecipeError(f"model.{key}: must be finite numbers, got {value!r}")


def validate_model_from(model: dict, families: list[str]) -> None:
    source = model["from"]
    if not isinstance(source, str) or not source:
        raise RecipeError(f"model.from: expected the path of a saved model folder, got {source!r}")
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise RecipeError(f"model.from: {source!r} is not a model folder (no config.json there)")
    try:
        saved = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise RecipeError(f"model.from: cannot read {path / 'config.json'} ({type(e).__name__})") from None
    if saved not in families:
        raise RecipeError(f"model.from: {source!r} holds a {saved!r} model, not a recur model family "
                          f"({', '.join(families)})")
    kind = model.setdefault("type", saved)
    if kind != saved:
        raise RecipeError(f"model.type: {kind!r} does not match the model in model.from ({saved!r} in {source})")
    for key in model:
        if key not in ("type", "from"):
            raise RecipeError(f"model.{key}: cannot be set with model.from (the config comes from {source})")


def _numbers(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _finite_like(default, value) -> bool:
    """No NaN; an infinity only where the default has one (Mamba-2's dt_limit is (0, inf))."""
    numbers = _numbers(value)
    if any(math.isnan(x) for x in numbers):
        return False
    allows_inf = default not in (None, inspect.Parameter.empty) and any(math.isinf(x) for x in _numbers(default))
    return allows_inf or all(math.isfinite(x) for x in numbers)


def _same_kind(default, value) -> bool:
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _positive(obj, key: str, prefix: str = "") -> None:
    if getattr(obj, key) < 1:
        raise RecipeError(f"{prefix}{key}: must be at least 1, got {getattr(obj, key)}")
