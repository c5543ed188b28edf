"""`recur train RECIPE.yaml [dotted.key=value ...]`: pretrain a recur model with DeepSpeed.

The loop (`Trainer.fit`), once per optimizer step:
  1. the ranks agree, in one small all-reduce, whether a stop signal (SIGTERM / SIGUSR1, or the
     SLURM job's end time near: train/stop.py) arrived on any rank, whether any rank's data ended,
     and the number of scored tokens in the global batch; each rank has taken its micro-batches from
     its own data loader (exactly resumable; a signal during that wait ends it, and the loader state
     from before the step is saved);
  2. the learning rate is set from the step (train/schedule.py);
  3. forward, backward and `engine.step()` per micro-batch: DeepSpeed accumulates, averages over
     ranks, clips and steps AdamW at the boundary (ZeRO 1/2/3 from the recipe). Each micro-batch's
     loss is weighted so the gradient is that of the mean over every scored token of the global
     batch, whatever the split into ranks and micro-batches. Loss sums stay on the device; the host
     reads them only when it logs;
  4. a non-finite gradient: DeepSpeed's ZeRO optimizer skips the update (`was_step_applied`);
     max_bad_steps in a row stop the run (train/stop.py);
  5. metrics every log_every steps (train/metrics.py), validation every eval_every
     (train/evaluator.py), a checkpoint every save_every (train/checkpoint.py).

Before the loop (`run`): the run directory is locked for this run alone (train/rundir.py), the
checkpoint to resume from is verified and must fit the recipe, and only then is anything written.

Launch: `recur train` alone (one process, or `nproc` processes through torchrun when the recipe
asks), or under torchrun / the deepspeed launcher / srun (see train/distributed.py). On CPU the
engine runs in float32 with gloo; on GPU in bf16 (torch_autocast) with nccl.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from recur.config import UserError

from . import flops, schedule
from .checkpoint import Checkpointer, CheckpointError, clean_partial
from .distributed import DistEnv, all_reduce, launched_env, single_process_env
from .engine import TrainingError, build_engine, import_deepspeed, model_config, resolve_precision
from .evaluator import EvalInterrupted, Evaluator, scored_tokens, to_device
from .metrics import MetricsLogger, plot_loss
from .objectives import NextToken, build_objective
from .recipe import Recipe, RecipeError, load_recipe
from .rundir import RunDirLock, check_fits, make_run_dir
from .state import TrainState
from .stop import DataWaitInterrupted, StopPolicy

EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint: run again with resume=auto (EX_TEMPFAIL)


def load_tokenizer_and_config(recipe: Recipe):
    from recur.data import DataError, load_tokenizer

    try:
        tokenizer = load_tokenizer(recipe.data.tokenizer)
    except DataError as e:
        raise RecipeError(f"data.tokenizer: {e}") from None
    return tokenizer, model_config(recipe, tokenizer)


def preflight(recipe: Recipe, make_dir: bool = True, offline: list | None = None):
    """What can be checked before any process starts or anything is written: the run dir is not a
    file, the tokenizer loads, the model config builds, the data sources exist and hold text; then
    the run dir is made (`make_dir`).

    `offline` (a list: --check, recur submit --dry-run): with HF_HUB_OFFLINE=1, a Hub tokenizer that is
    not in the Hugging Face cache and the Hub datasets are not checked (a stand-in byte tokenizer
    checks the rest); what was left unchecked is appended to the list, for one line."""
    import dataclasses

    from recur.data import PackedDataset
    from recur.data.tokenizer import TokenizerNotCached, byte_tokenizer, hub_offline

    run_dir = Path(recipe.run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run_dir: {run_dir} exists and is a file, not a folder")
    data = recipe.data
    if offline is not None and hub_offline():
        from recur.data import DataError, load_tokenizer

        try:
            tokenizer = load_tokenizer(data.tokenizer)
        except TokenizerNotCached as e:
            offline.append(f"tokenizer {data.tokenizer!r} would be fetched from the Hub into {e.cache} (the rest "
                           "was checked with a stand-in byte tokenizer)")
            tokenizer = byte_tokenizer()
        except DataError as e:
            raise RecipeError(f"data.tokenizer: {e}") from None
        config = model_config(recipe, tokenizer)
        hub = [s.path for s in data.sources if s.format == "hub"]
        if hub:
            offline.append(f"Hub dataset{'s' if len(hub) > 1 else ''} {', '.join(map(repr, hub))} (streamed at run time)")
            local = [s for s in data.sources if s.format != "hub"]
            data = dataclasses.replace(data, sources=local) if local else None
    else:
        tokenizer, config = load_tokenizer_and_config(recipe)
    if data is not None and data.prepared is None:
        PackedDataset(data, tokenizer, "train")  # every source found and readable, or one line
    if make_dir:
        make_run_dir(run_dir)  # (only now: a run that cannot start leaves no folder behind)
    return tokenizer, config


class Trainer:
    """The loop and the parts it drives; built by `run`."""

    objective = NextToken()  # train.objective (train/objectives.py); `run` sets the recipe's

    def __init__(self, recipe: Recipe, env: DistEnv, engine, config, tokenizer, state: TrainState,
                 checkpointer: Checkpointer, metrics: MetricsLogger, evaluator: Evaluator, stop: StopPolicy,
                 precision: str, say=print):
        self.recipe, self.env, self.engine, self.config, self.tokenizer = recipe, env, engine, config, tokenizer
        self.state, self.checkpointer, self.metrics, self.evaluator, self.stop = (state, checkpointer, metrics,
                                                                                  evaluator, stop)
        self.device, self.say = env.device, say
        self.gas = recipe.accumulation_steps(env.world_size)
        self.tokens_per_step = recipe.train.global_batch * recipe.data.seq_len
        self.lr_at = schedule.for_recipe(recipe.train)
        self.last_saved = state.step if state.step else None
        self.flops_per_token, self.flops_formula = flops.flops_per_token(engine.module, recipe.data.seq_len)
        peak, self.peak_source = flops.device_peak(self.device, torch.bfloat16 if precision == "bf16" else torch.float32)
        self.peak = all_reduce([peak], self.device)[0] / env.world_size  # every rank measured at once: their mean
        self.pending = None  # a step's metrics line whose evaluation a stop interrupted (saved, done again on resume)

    def fit(self) -> int:
        """Train to max_steps; returns the exit code (EXIT_STOPPED after a stop signal)."""
        from tqdm import tqdm

        t, state = self.recipe.train, self.state
        bar = tqdm(total=t.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not (self.env.is_main and self.recipe.log.progress))
        data, window = iter(state.loader), [0, 0.0]  # tokens and seconds since the last log line
        if self.pending is not None:  # the evaluation a stop interrupted, before the checkpoint was saved
            try:
                self.log_pending()
            except EvalInterrupted:
                return self.stopped()
        while state.step < t.max_steps:
            start = time.perf_counter()
            if self.stop.requested(self.device):  # before taking data: the saved loader state must not
                return self.stopped()               # include batches that were never trained on
            before = state.loader.state_dict()  # (saved instead, should a stop signal end the wait for data)
            try:
                with self.stop.interrupting(DataWaitInterrupted):
                    batches, interrupted = [b for _, b in zip(range(self.gas), data)], False
            except DataWaitInterrupted:
                batches, interrupted = [], True
            ended, n_global, interrupted = all_reduce(
                [len(batches) < self.gas and not interrupted, sum(map(scored_tokens, batches)), interrupted], self.device)
            if interrupted:  # any rank: every rank saves its loader as it was before this step
                state.rewind(before)
                return self.stopped()
            if ended:
                self.say(f"the training data ended at step {state.step} (data.epochs = {self.recipe.data.epochs})")
                break
            lr = self.lr_at(state.step)
            loss_sum = self.train_step(batches, lr, n_global)
            state.advance(self.tokens_per_step)
            norm = self.engine.get_global_grad_norm()
            grad_norm, applied = float(norm) if norm is not None else math.nan, self.engine.was_step_applied()
            bad = self.stop.step_was_bad(state.step, grad_norm, applied, self.last_saved)
            window[0], window[1] = window[0] + self.tokens_per_step, window[1] + time.perf_counter() - start
            bar.update(1)
            self.stop.after_first_step(self.say)  # the job's end-time timer starts after this job's first step
            if bad or state.step % t.log_every == 0 or self.evaluator.due(state.step) or state.step == t.max_steps:
                loss = all_reduce([loss_sum.item()], self.device)[0] / n_global
                try:
                    self.log_step(loss, lr, grad_norm, applied, window)
                except EvalInterrupted:
                    return self.stopped()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window[0] / max(window[1], 1e-9):,.0f}", refresh=False)
                window = [0, 0.0]
            if state.step % t.save_every == 0 and not bad:
                self.save()
        bar.close()
        return self.finish()

    def train_step(self, batches: list[dict], lr: float, n_global: float) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; the sum of loss x scored tokens, on the device."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in batches:
            n = scored_tokens(batch)
            loss, logits = self.loss(to_device(batch, self.device))
            # DeepSpeed divides by gas and averages over ranks: this makes it the global token mean.
            scaled = loss * (n * self.gas * self.env.world_size / n_global) if n else logits.sum() * 0.0
            self.engine.backward(scaled)
            self.engine.step()
            loss_sum += loss.detach().float() * n
        return loss_sum

    def loss(self, batch: dict):
        """(mean loss over the micro-batch's scored tokens, logits), from the recipe's objective."""
        return self.objective(self.engine, batch)

    def log_step(self, loss: float, lr: float, grad_norm: float, applied: bool, window: list) -> None:
        step, tokens_per_s = self.state.step, window[0] / max(window[1], 1e-9)
        if not applied:
            self.say(f"warning: step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); the update "
                     f"was skipped ({self.stop.bad_in_a_row} in a row, the run stops at {self.stop.max_bad_steps})")
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.state.tokens,
                  "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / (self.peak * self.env.world_size)}
        if not applied:
            record["skipped"] = True
        if self.evaluator.due(step):
            self.pending = dict(record)  # until the evaluation ends (EvalInterrupted: saved with the checkpoint)
            record.update(self.evaluator(self.engine))
            self.pending = None
        self.metrics.log(record)

    def log_pending(self) -> None:
        """The metrics line of the step a stop interrupted the evaluation of: evaluated now, then logged."""
        record = dict(self.pending)
        record.update(self.evaluator(self.engine))
        self.pending = None
        self.metrics.log(record)

    def save(self) -> None:
        finite = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.engine.module.parameters())
        if all_reduce([not finite], self.device, "max")[0]:
            raise TrainingError(f"step {self.state.step}: the weights are not finite; not saving them")
        self.checkpointer.save(self.engine, self.state, self.config, self.tokenizer,
                               {"model_type": self.config.model_type, "seq_len": self.recipe.data.seq_len,
                                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                                "lora": self.recipe.train.lora, "trainable": self.recipe.train.trainable,
                                **({"pending_record": self.pending} if self.pending is not None else {})})
        self.last_saved = self.state.step

    def stopped(self) -> int:
        import torch.distributed as dist

        if self.last_saved != self.state.step:
            self.save()
        self.say(f"stopped by {self.stop.received or 'a signal on another rank'} at step {self.state.step}; "
                 f"checkpoint saved in {self.checkpointer.root}. Continue with resume=auto.")
        self.metrics.close()
        dist.barrier()
        return EXIT_STOPPED

    def finish(self) -> int:
        import torch.distributed as dist

        if self.last_saved != self.state.step and self.stop.bad_in_a_row == 0:
            self.save()
        self.metrics.close()
        if self.env.is_main:
            run_dir = Path(self.recipe.run_dir).expanduser()
            plot = plot_loss(run_dir)
            if self.recipe.export:
                export_final(self.checkpointer.root, run_dir / "export")
            self.say(f"done: step {self.state.step}, {self.state.tokens:,} tokens; metrics in {run_dir / 'metrics.jsonl'}"
                     + (f", curve in {plot}" if plot else "")
                     + (f", model in {run_dir / 'export'}" if self.recipe.export else ""))
        dist.barrier()
        return 0


def tokenizer_fingerprint(tokenizer) -> str:
    from recur.data.prepared import tokenizer_fingerprint as fingerprint

    return fingerprint(tokenizer)


def export_final(root: Path, out: Path) -> None:
    """run_dir/export from the last checkpoint, replacing a previous export only once the new one is complete."""
    from .checkpoint import export

    fresh = out.with_name(out.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    export(root, fresh)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(fresh, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------- setup

def _agree(env: DistEnv, error: UserError | None) -> None:
    """Every rank raises if any rank failed (rank 0 prints its own message), or none does."""
    import torch.distributed as dist

    messages = [None] * env.world_size
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [m for m in messages if m is not None]
    if failed:
        raise error if error is not None else UserError(failed[0])


def run(recipe: Recipe, env: DistEnv) -> int:
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    from recur.data import build_loader

    env.export()
    # DeepSpeed 0.19.8 calls a torch.distributed function that torch 2.13 deprecates, at every save
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    device = env.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # decays reach float32 denormals, ~100x slower on x86
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)
    say = (lambda *a: print(*a, flush=True)) if env.is_main else (lambda *a: None)
    run_dir = Path(recipe.run_dir).expanduser()
    lock = RunDirLock(run_dir)
    error = None
    try:
        if env.is_main:
            lock.acquire()  # one run per run dir, for the whole run
    except UserError as e:
        error = e
    _agree(env, error)
    stop = StopPolicy(recipe.train.max_bad_steps, recipe.train.stop_margin_s)
    try:
        checkpointer = Checkpointer(run_dir / "checkpoints", env, recipe.train.keep_checkpoints)
        resume, fallback = checkpointer.resume_point(recipe.resume, run_dir)
        tokenizer, config = load_tokenizer_and_config(recipe)
        if resume is not None:  # nothing in the run dir changes before the recipe is known to fit
            check_fits(resume[0] / resume[1], config, tokenizer_fingerprint(tokenizer), recipe.data.seq_len,
                       env.world_size, lora=recipe.train.lora, trainable=recipe.train.trainable)
        loader = build_loader(recipe.data, tokenizer, recipe.train.micro_batch, env.rank, env.world_size,
                              split="train")
        objective = build_objective(recipe, config, tokenizer, device, resolve_precision(recipe, device))
        engine, precision = build_engine(recipe, config, device, env.world_size)
        state, saved = TrainState(loader), {}
        if resume is not None:
            saved = checkpointer.load(engine, *resume, state)
            say(f"resumed from {resume[0] / resume[1]} at step {state.step} ({state.tokens:,} tokens)")
        dist.barrier()
        if env.is_main:  # the first writes into the run dir (the lock file aside)
            clean_partial(checkpointer.root)
            recipe.write(run_dir / "recipe.yaml")
        metrics = MetricsLogger(recipe, run_dir, state.step, env.is_main)
        if fallback is not None:
            say(f"warning: {checkpointer.root / fallback['damaged']} is damaged ({'; '.join(fallback['problems'])}); "
                f"resumed from {fallback['resumed_from']} instead")
            metrics.log({"step": state.step, **fallback})
        trainer = Trainer(recipe, env, engine, config, tokenizer, state, checkpointer, metrics,
                          Evaluator(recipe, tokenizer, env, device, stop), stop, precision, say)
        trainer.objective = objective
        trainer.pending = saved.get("pending_record")
        describe(trainer, precision, say)
        return trainer.fit()
    finally:
        lock.release()


def describe(trainer: Trainer, precision: str, say) -> None:
    from .engine import check_fp32_parameters

    recipe, env, t = trainer.recipe, trainer.env, trainer.recipe.train
    n_params = sum(flops.numel(p) for p in trainer.engine.module.parameters())
    fp32 = sorted({n.rsplit(".", 1)[-1] for n in check_fp32_parameters(trainer.engine.module)})
    say(f"model: {trainer.config.model_type}, {n_params / 1e6:.2f}M parameters, {precision}"
        + (f" (float32: {', '.join(fp32)})" if fp32 else ""))
    say(f"run: {env.world_size} process(es) [{env.launcher}], {trainer.device.type}, ZeRO-{t.zero_stage}, "
        f"global batch {t.global_batch} = {t.micro_batch} x {trainer.gas} accumulation x {env.world_size} ranks, "
        f"{trainer.tokens_per_step:,} tokens/step, {t.max_steps} steps")
    say(f"MFU: {trainer.flops_per_token / 1e6:.1f} MFLOPs/token ({trainer.flops_formula}) against "
        f"{trainer.peak / 1e12:.3f} TFLOP/s per process ({trainer.peak_source})")


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
    env = launched_env()
    recipe = load_recipe(args.recipe, args.overrides)  # RecipeError: one line, exit 2 (the command line)
    world = env.world_size if env is not None else recipe.nproc
    recipe = load_recipe(args.recipe, args.overrides, world_size=world)
    unchecked = [] if args.check else None
    if env is None or env.is_main:
        preflight(recipe, make_dir=not args.check, offline=unchecked)
    if args.check:
        import yaml
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        if unchecked:
            print(f"offline (HF_HUB_OFFLINE=1), not checked: {'; '.join(unchecked)}", file=sys.stderr)
        return 0
    if env is None and recipe.nproc > 1:
        run_dir = make_run_dir(Path(recipe.run_dir).expanduser())
        with RunDirLock(run_dir):  # held here; the workers torchrun starts are told so
            return spawn([a for a in argv if a != "--check"], recipe.nproc)
    try:
        return run(recipe, env or single_process_env())
    except TrainingError as e:
        print(f"error (rank {(env or DistEnv()).rank}): {e}", file=sys.stderr)
        return 1
    except UserError as e:
        if env is None or env.is_main:
            from recur.cli import one_line

            print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


__all__ = ["main", "run", "Trainer", "preflight", "EXIT_STOPPED", "CheckpointError", "scored_tokens"]
