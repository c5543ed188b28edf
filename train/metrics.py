"""Metrics on rank 0: metrics.jsonl (one JSON object per line), TensorBoard, optionally wandb; loss.png.

Training lines have step, loss, lr, grad_norm, tokens, tokens_per_s, mfu (and val_loss, val_ppl
at evaluations, `skipped` when the update was skipped). Event lines (`"event": ...`, e.g. a
resume that fell back from a damaged checkpoint) have a step and no loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

from .checkpoint import write_atomic


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of run_dir/metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class MetricsLogger:
    def __init__(self, recipe, run_dir: Path, start_step: int, enabled: bool):
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
                                        resume="allow", config=recipe.to_dict())
            except ImportError:
                warnings.warn("log.wandb_project is set but wandb is not installed; skipping wandb")

    def _truncate_after(self, step: int) -> None:
        """On resume: drop lines a killed run wrote after its last checkpoint (they are computed again)."""
        if self.path.exists():
            keep = [json.dumps(r) for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
            write_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None and "event" not in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):  # lm-eval metrics are task/metric already
                    name = key if "/" in key else f"val/{key}" if key.startswith("val") else f"train/{key}"
                    self.tensorboard.add_scalar(name, value, record["step"])
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
    records = read_metrics(run_dir)
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
