"""Evaluation during training: the token-mean validation loss over every rank's held-out batches.

A stop signal during an evaluation ends it (EvalInterrupted): the ranks agree at every held-out batch
(one small all-reduce), and rank 0 inside lm-eval raises at once while the others wait for it. The
trainer then saves without the step's metrics line, and the resumed run evaluates that step again.
"""
from __future__ import annotations

import math

import torch

from .distributed import all_reduce


def scored_tokens(batch: dict) -> int:
    """Targets the model's loss scores: not padding (-100), not the first token of a document
    (recur.modeling.base.causal_lm_loss drops the prediction across a document boundary)."""
    labels, positions = batch["labels"][:, 1:], batch["position_ids"][:, 1:]
    return int(((labels != -100) & (positions != 0)).sum())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class EvalInterrupted(BaseException):
    """A stop signal arrived during an evaluation (BaseException: lm-eval's `except Exception` lets it pass)."""


class Evaluator:
    """Validation loss every `eval_every` steps (and at the last step). This rank's held-out batches
    are read once, at the first evaluation, and kept: the same set every time, as many on every rank
    (a streamed source's held-out documents are few and far between). With `eval.tasks`, rank 0 then
    runs lm-eval on the live model through `recur eval`'s own code while the other ranks wait."""

    def __init__(self, recipe, tokenizer, env, device, stop=None):
        self.recipe, self.tokenizer, self.env, self.device = recipe, tokenizer, env, device
        self.stop = stop  # train/stop.py's StopPolicy: a signal ends the evaluation
        self.batches = None

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.local()

    def due(self, step: int) -> bool:
        every = self.recipe.eval_every
        return bool(every) and (step % every == 0 or step == self.recipe.train.max_steps)

    def _read_batches(self) -> list[dict]:
        from recur.data import build_loader

        recipe, env = self.recipe, self.env
        loader = build_loader(recipe.data, self.tokenizer, recipe.train.micro_batch, env.rank, env.world_size,
                              split="validation", num_workers=0)
        batches, source = [], iter(loader)
        while recipe.eval_batches is None or len(batches) < recipe.eval_batches:
            batch = next(source, None)
            ended, stop = all_reduce([batch is None, self._stopping()], self.device, "max")
            if stop:
                raise EvalInterrupted()
            if ended:  # stop when any rank runs out
                break
            batches.append(batch)
        return batches

    def __call__(self, engine) -> dict:
        if self.batches is None:
            self.batches = self._read_batches()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        engine.eval()
        with torch.no_grad():
            for batch in self.batches:
                if all_reduce([self._stopping()], self.device, "max")[0]:  # every rank at the same batch
                    engine.train()
                    raise EvalInterrupted()
                n = scored_tokens(batch)
                if n:
                    batch = to_device(batch, self.device)
                    out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 labels=batch["labels"], use_cache=False)
                    total += out.loss.double() * n
                    count += n
        engine.train()
        total, count = all_reduce([total.item(), count], self.device)
        loss = total / count if count else math.nan
        record = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}
        if self.recipe.eval.tasks:
            record.update(self.lm_eval(engine.module))
        return record

    def lm_eval(self, model) -> dict:
        """`task/metric` -> value of the recipe's eval.tasks, computed on rank 0 (ZeRO 1/2: whole weights)."""
        import torch.distributed as dist

        record, interrupted = {}, False
        if self.env.is_main:
            from pathlib import Path

            from recur.eval.harness import evaluate, flat_metrics
            from recur.eval.tasks import default_data_dir

            e = self.recipe.eval
            data_dir = Path(e.data_dir).expanduser() if e.data_dir else default_data_dir()
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self._interruptible():
                    results = evaluate(model, self.tokenizer, list(e.tasks), num_fewshot=e.num_fewshot,
                                       limit=e.limit, batch_size=e.batch_size, max_length=self.recipe.data.seq_len,
                                       include_paths=[Path(p).expanduser() for p in e.include_path],
                                       data_dir=data_dir, device=str(self.device))
                record = flat_metrics(results)
            except EvalInterrupted:
                interrupted = True
            model.train(was_training)
        dist.barrier()
        if all_reduce([interrupted], self.device, "max")[0]:
            raise EvalInterrupted()
        return record

    def _interruptible(self):
        from contextlib import nullcontext

        return nullcontext() if self.stop is None else self.stop.interrupting(EvalInterrupted)
