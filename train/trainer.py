"""`recur train RECIPE.yaml [dotted.key=value ...]`: pretrain a recur model with DeepSpeed.

The loop, once per optimizer step:
  1. every rank takes its micro-batches of the step from its own data loader (exactly resumable);
  2. small all-reduces agree on the step: whether a stop signal (SIGTERM / SIGUSR1) arrived on any
     rank (checked before taking data), the number of scored tokens in the global batch, whether
     any rank's data ended;
  3. the learning rate is set from the step (train/schedule.py);
  4. forward, backward and `engine.step()` per micro-batch: DeepSpeed accumulates, averages over
     ranks, clips and steps AdamW at the boundary (ZeRO 1/2/3 from the recipe). Each micro-batch's
     loss is weighted so the gradient is that of the mean over every scored token of the global
     batch, whatever the split into ranks and micro-batches;
  5. a non-finite loss or gradient norm: DeepSpeed's ZeRO optimizer skips the update (checked with
     `was_step_applied`); max_bad_steps in a row stop the run;
  6. metrics every log_every steps, validation every eval_every, a checkpoint every save_every.

Launch: `recur train` alone (one process, or `nproc` processes through torchrun when the recipe
asks), or under torchrun / the deepspeed launcher / srun (see train/distributed.py). On CPU the
engine runs in float32 with gloo; on GPU in bf16 (torch_autocast) with nccl.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .distributed import DistEnv, launched_env, single_process_env
from .recipe import Recipe, RecipeError, deep_merge, load_recipe

# Parameters that hold log-decays or recurrence rates, where bf16 rounding changes the dynamics.
FP32_PARAMETERS = ("A_log", "dt_bias", "D", "time_decay", "time_faaaa", "recurrent_param", "lower_bounds")
EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint: run again with resume=auto (EX_TEMPFAIL)
EXTENSIONS_DIR = "~/.cache/recur/torch_extensions"


class TrainingError(RuntimeError):
    pass


def use_extension_cache() -> None:
    """DeepSpeed JIT-builds its CPU communication op on first use (a minute on 2 cores): build it once."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(EXTENSIONS_DIR))


# ----------------------------------------------------------------------------------------- model

def model_config(recipe: Recipe, tokenizer):
    """The family's config from the recipe; vocab and special tokens default to the tokenizer's."""
    from transformers import AutoConfig

    from recur.data import DataError, check_vocab

    kwargs = {k: v for k, v in recipe.model.items() if k != "type"}
    kwargs.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(recipe.model["type"], **kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"model: {recipe.model['type']} refuses these settings: {e}") from None
    try:
        check_vocab(tokenizer, config.vocab_size)
    except DataError as e:
        raise RecipeError(f"model.vocab_size: {e}") from None
    return config


def preflight(recipe: Recipe):
    """What can be checked before any process starts: tokenizer, model config, vocabulary."""
    from recur.data import DataError, load_tokenizer

    try:
        tokenizer = load_tokenizer(recipe.data.tokenizer)
    except DataError as e:
        raise RecipeError(f"data.tokenizer: {e}") from None
    return tokenizer, model_config(recipe, tokenizer)


def build_model(recipe: Recipe, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    model = AutoModelForCausalLM.from_config(config)
    if recipe.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    if recipe.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return recipe.train.precision


def deepspeed_config(recipe: Recipe, world_size: int, precision: str) -> dict:
    t = recipe.train
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e5), stage3_max_live_parameters=int(1e9),
                    stage3_max_reuse_distance=int(1e9))
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": recipe.accumulation_steps(world_size),
        "gradient_clipping": t.grad_clip,  # explicit: DeepSpeed's default changed from 0 (off) to 1.0 in 0.19.3
        "zero_optimization": zero,
        "steps_per_print": 2**62,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Not DeepSpeed's "bf16" section, which casts every parameter (A_log, dt_bias, time_decay,
        # the RG-LRU's Λ) to bf16: torch_autocast computes the listed modules in bf16 and keeps
        # every parameter, gradient and optimizer state in float32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                    "lower_precision_safe_modules": ["torch.nn.Linear"]}
    return deep_merge(config, t.deepspeed)


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, decays and other vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_fp32_parameters(model) -> list[str]:
    """Names of the rounding-sensitive recurrent parameters; raises if any is not float32."""
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in FP32_PARAMETERS]
    wrong = [f"{n} ({p.dtype})" for n, p in model.named_parameters() if n in names and p.dtype != torch.float32]
    if wrong:
        raise TrainingError(f"recurrent parameters must stay float32, got {', '.join(wrong[:4])}")
    return names


def scored_tokens(batch: dict) -> int:
    """Targets the model's loss scores: not padding (-100), not the first token of a document
    (recur.modeling.base.causal_lm_loss drops the prediction across a document boundary)."""
    labels, positions = batch["labels"][:, 1:], batch["position_ids"][:, 1:]
    return int(((labels != -100) & (positions != 0)).sum())


# ----------------------------------------------------------------------------------------- logging

class Metrics:
    """metrics.jsonl (+ TensorBoard, + wandb) on rank 0."""

    def __init__(self, recipe: Recipe, run_dir: Path, start_step: int, enabled: bool):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if recipe.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                warnings.warn("log.tensorboard: the tensorboard package is not installed; skipping TensorBoard")
        if recipe.log.wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=recipe.log.wandb_project, name=run_dir.name, dir=str(run_dir),
                                        id="recur-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12],
                                        resume="allow",
                                        config=recipe.to_dict())
            except ImportError:
                warnings.warn("log.wandb_project is set but wandb is not installed; skipping wandb")

    def _truncate_after(self, step: int) -> None:
        """On resume: drop lines a killed run wrote after its last checkpoint (they are computed again)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
        checkpoint.write_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and self.tensorboard is not None:
                self.tensorboard.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}", value,
                                            record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish()


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: training loss per logged step and validation loss, from metrics.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png")
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- loop

class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def _all_reduce(values: list[float], device, op=None) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def validation_batches(recipe: Recipe, tokenizer, env: DistEnv, device) -> list[dict]:
    """This rank's held-out batches, read once and kept (the same set at every evaluation): up to
    eval_batches, as many on every rank (a streamed source's held-out documents are few and far between)."""
    import torch.distributed as dist

    from recur.data import build_loader

    loader = build_loader(recipe.data, tokenizer, recipe.train.micro_batch, env.rank, env.world_size,
                          split="validation", num_workers=0)
    batches, source = [], iter(loader)
    while recipe.eval_batches is None or len(batches) < recipe.eval_batches:
        batch = next(source, None)
        if _all_reduce([batch is None], device, dist.ReduceOp.MAX)[0]:  # stop when any rank runs out
            break
        batches.append(batch)
    return batches


def evaluate(engine, batches: list[dict], device) -> tuple[float, int]:
    """Token-mean loss over every rank's validation batches."""
    total = count = 0.0
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            batch, n = _to(batch, device), scored_tokens(batch)
            out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         use_cache=False)
            if n:
                total, count = total + out.loss.float().item() * n, count + n
    engine.train()
    total, count = _all_reduce([total, count], device)
    return (total / count if count else math.nan), int(count)


def _nan_steps() -> set[int]:
    """Tests inject a non-finite loss at these steps: RECUR_TEST_NAN_STEPS=3,4."""
    return {int(s) for s in os.environ.get("RECUR_TEST_NAN_STEPS", "").split(",") if s.strip()}


def run(recipe: Recipe, env: DistEnv) -> int:
    use_extension_cache()
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    from recur.data import build_loader

    from . import flops, schedule

    env.export()
    # DeepSpeed 0.19.8 calls a torch.distributed function that torch 2.13 deprecates, at every save
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    device = env.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # decays reach float32 denormals, ~100x slower on x86
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)
    stop = StopSignal()
    run_dir = Path(recipe.run_dir).expanduser()
    root = run_dir / "checkpoints"
    say = (lambda *a: print(*a, flush=True)) if env.is_main else (lambda *a: None)

    resume = checkpoint.find_resume(recipe.resume, run_dir)
    dist.barrier()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(root)
        recipe.write(run_dir / "recipe.yaml")
    tokenizer, config = preflight(recipe)
    model = build_model(recipe, config)
    precision = resolve_precision(recipe, device)
    ds_config = deepspeed_config(recipe, env.world_size, precision)
    t = recipe.train
    optimizer = None
    if "optimizer" not in ds_config:  # the torch optimizer: no JIT-built fused Adam (a minute on CPU)
        optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                      eps=t.eps, fused=device.type == "cuda")
    parameters = None if optimizer is not None else optimizer_groups(model, t.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=parameters,
                                           config=ds_config)
    fp32_names = check_fp32_parameters(engine.module)
    if t.compile:
        engine.compile()
    n_params = sum(flops.numel(p) for p in engine.module.parameters())
    fpt, formula = flops.flops_per_token(engine.module, recipe.data.seq_len)
    peak, peak_source = flops.device_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    peak = _all_reduce([peak], device)[0] / env.world_size  # every rank measured at once: their mean

    loader = build_loader(recipe.data, tokenizer, t.micro_batch, env.rank, env.world_size, split="train")
    step = tokens = 0
    if resume is not None:
        state = checkpoint.load(engine, *resume, loader, env)
        step, tokens = state["step"], state["tokens"]
        say(f"resumed from {resume[0] / resume[1]} at step {step} ({tokens:,} tokens)")
    gas = recipe.accumulation_steps(env.world_size)
    tokens_per_step = t.global_batch * recipe.data.seq_len
    lr_at = schedule.for_recipe(t)
    say(f"model: {config.model_type}, {n_params / 1e6:.2f}M parameters, {precision}"
        f"{' (float32: ' + ', '.join(sorted({n.rsplit('.', 1)[-1] for n in fp32_names})) + ')' if fp32_names else ''}")
    say(f"run: {env.world_size} process(es) [{env.launcher}], {device.type}, ZeRO-{t.zero_stage}, "
        f"global batch {t.global_batch} = {t.micro_batch} x {gas} accumulation x {env.world_size} ranks, "
        f"{tokens_per_step:,} tokens/step, {t.max_steps} steps")
    say(f"MFU: {fpt / 1e6:.1f} MFLOPs/token ({formula}) against {peak / 1e12:.3f} TFLOP/s per process "
        f"({peak_source})")

    metrics = Metrics(recipe, run_dir, step, env.is_main)
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not (env.is_main and recipe.log.progress))
    data = iter(loader)
    nan_steps = _nan_steps()
    bad = 0
    held_out = None  # validation batches, read at the first evaluation
    last_saved = step if resume is not None else None
    window_tokens, window_time = 0, 0.0
    stopped_by = None

    def save_now():
        nonlocal last_saved
        finite = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters())
        if _all_reduce([not finite], device, dist.ReduceOp.MAX)[0]:
            raise TrainingError(f"step {step}: the weights are not finite; not saving them")
        checkpoint.save(engine, root, step, tokens, loader, env, t.keep_checkpoints, engine.module, tokenizer,
                        {"model_type": config.model_type})
        last_saved = step

    while step < t.max_steps:
        start = time.perf_counter()
        if _all_reduce([stop.received is not None], device)[0]:  # before taking data: the saved loader state
            stopped_by = stop.received or "a signal on another rank"  # must not include unused batches
            break
        batches = []
        for _ in range(gas):
            batch = next(data, None)
            if batch is None:
                break
            batches.append(batch)
        n_global, ended = _all_reduce([sum(scored_tokens(b) for b in batches), len(batches) < gas], device)
        if ended:
            say(f"the training data ended at step {step} (data.epochs = {recipe.data.epochs})")
            break
        lr = lr_at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for batch in batches:
            batch = _to(batch, device)
            n = scored_tokens(batch)
            out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         use_cache=False)
            loss = out.loss * math.nan if step + 1 in nan_steps else out.loss
            # DeepSpeed divides by gas and averages over ranks: this makes it the global token mean.
            scaled = loss * (n * gas * env.world_size / n_global) if n else out.logits.sum() * 0.0
            engine.backward(scaled)
            engine.step()
            loss_sum += loss.detach().float().item() * n
        step += 1
        tokens += tokens_per_step
        loss = _all_reduce([loss_sum], device)[0] / n_global
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        applied = engine.was_step_applied()
        window_time += time.perf_counter() - start
        window_tokens += tokens_per_step
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and applied):
            bad += 1
            say(f"warning: step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); the update was "
                f"{'APPLIED' if applied else 'skipped'} ({bad} in a row, the run stops at {t.max_bad_steps})")
            if bad >= t.max_bad_steps:
                raise TrainingError(f"{bad} non-finite steps in a row (up to step {step}): the run diverged. "
                                    f"Lower train.lr or raise train.warmup_steps, then resume=auto from the last "
                                    f"checkpoint (step {last_saved})")
        else:
            bad = 0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}", refresh=False)

        evaluate_now = recipe.eval_every and (step % recipe.eval_every == 0 or step == t.max_steps)
        if step % t.log_every == 0 or evaluate_now or step == t.max_steps:
            tokens_per_s = window_tokens / max(window_time, 1e-9)
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": tokens_per_s, "mfu": fpt * tokens_per_s / (peak * env.world_size)}
            if not applied:
                record["skipped"] = True
            if evaluate_now:
                if held_out is None:
                    held_out = validation_batches(recipe, tokenizer, env, device)
                record["val_loss"], _ = evaluate(engine, held_out, device)
                record["val_ppl"] = math.exp(min(record["val_loss"], 700))
            metrics.log(record)
            window_tokens, window_time = 0, 0.0
        if step % t.save_every == 0 and bad == 0:
            save_now()
    bar.close()

    if stopped_by is not None:
        if last_saved != step:
            save_now()
        say(f"stopped by {stopped_by} at step {step}; checkpoint saved in {root}. Continue with resume=auto.")
        metrics.close()
        dist.barrier()
        return EXIT_STOPPED
    if last_saved != step and bad == 0:
        save_now()
    metrics.close()
    if env.is_main:
        plot = plot_loss(run_dir)
        if recipe.export:
            export_final(root, run_dir / "export")
        say(f"done: step {step}, {tokens:,} tokens; metrics in {run_dir / 'metrics.jsonl'}"
            + (f", curve in {plot}" if plot else "") + (f", model in {run_dir / 'export'}" if recipe.export else ""))
    dist.barrier()
    return 0


def export_final(root: Path, out: Path) -> None:
    """run_dir/export from the last checkpoint, replacing a previous export only once the new one is complete."""
    import shutil

    fresh = out.with_name(out.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    checkpoint.export(root, fresh)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(fresh, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------- command

def spawn(argv: list[str], nproc: int) -> int:
    """Run this same command in nproc processes on this machine through torchrun (torch.distributed.run)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "recur.cli", "train", *argv]
    print("launching: torchrun --standalone --nproc_per_node", nproc, "-m recur.cli train", " ".join(argv), flush=True)
    child = subprocess.Popen(command, env=env)
    forwarded = []

    def forward(signum, frame):  # torchrun passes SIGTERM on to its workers, which save and stop
        forwarded.append(signum)
        child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = child.wait()
    return EXIT_STOPPED if forwarded and code != 0 else code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="recur train", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("recipe", help="a recipe YAML file, or the name of one in recipes/pretrain/ (e.g. gla-tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=20 run_dir=runs/x")
    parser.add_argument("--check", action="store_true", help="validate the recipe, print it resolved, and exit")
    args = parser.parse_intermixed_args(argv)
    use_extension_cache()
    env = launched_env()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        world = env.world_size if env is not None else recipe.nproc
        recipe = load_recipe(args.recipe, args.overrides, world_size=world)
        if env is None or env.is_main:
            preflight(recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        import yaml
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if env is None and recipe.nproc > 1:
        return spawn([a for a in argv if a != "--check"], recipe.nproc)
    try:
        return run(recipe, env or single_process_env())
    except (TrainingError, checkpoint.CheckpointError, RecipeError) as e:
        print(f"error (rank {(env or DistEnv()).rank}): {e}", file=sys.stderr)
        return 1
