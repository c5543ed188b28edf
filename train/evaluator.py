"""Evaluation during training: the token-mean validation loss over every rank's held-out batches."""
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


class Evaluator:
    """Validation loss every `eval_every` steps (and at the last step). This rank's held-out batches
    are read once, at the first evaluation, and kept: the same set every time, as many on every rank
    (a streamed source's held-out documents are few and far between)."""

    def __init__(self, recipe, tokenizer, env, device):
        self.recipe, self.tokenizer, self.env, self.device = recipe, tokenizer, env, device
        self.batches = None

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
            if all_reduce([batch is None], self.device, "max")[0]:  # stop when any rank runs out
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
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}
