"""`python tests/faults.py [--nan-steps 3,4] [--crash POINT:STEP] -- recur-train-arguments...`

Runs `recur train` in this process (nproc=1) with faults injected by monkeypatching, so that no
test hook lives in the trainer:
- --nan-steps: the loss of these optimizer steps (1-based) is multiplied by NaN;
- --crash publish:N: SIGKILL in the save of step N, after every file and the manifest are written,
  before the folder is renamed into place;
- --crash latest:N: SIGKILL after the save of step N is renamed into place, before `latest` moves;
- --pause-at N --marker PATH: the wait for step N's data lasts up to 10 minutes (after the loader has
  given the first batch, so the loader state has moved on), unless PATH exists; PATH is created when
  the wait starts (a resumed run does not pause again; "{rank}" in PATH is the rank);
- --slow-eval N --marker PATH: each held-out batch of step N's evaluation takes a second, PATH created
  when it starts.
Under srun (a custom batch template) every rank does the same.
"""
import argparse
import math
import os
import signal
import sys


def install_pause(step: int, marker: str) -> None:
    import time

    from recur.train.trainer import Trainer

    original_fit = Trainer.fit

    def fit(self):  # the train loader's batches, counted: batch i feeds step i // gas + 1 (of this run)
        loader, gas, first = self.state.loader, self.gas, self.state.step
        original_iter = type(loader).__iter__

        mine = marker.format(rank=os.environ.get("RANK", "0"))  # ("{rank}": a marker per rank)

        def batches(it):
            for i, batch in enumerate(it):
                if first + i // gas + 1 == step and i % gas == 0 and not os.path.exists(mine):
                    open(mine, "w").close()
                    time.sleep(600)  # a stop signal ends this wait (the trainer's DataWaitInterrupted)
                yield batch

        class Paused(type(loader)):
            def __iter__(self):
                return batches(original_iter(self))

        loader.__class__ = Paused
        return original_fit(self)

    Trainer.fit = fit


def install_slow_eval(step: int, marker: str) -> None:
    import time

    from recur.train import evaluator
    from recur.train.evaluator import Evaluator

    original_call, original_scored = Evaluator.__call__, evaluator.scored_tokens
    at = {"step": None}

    def call(self, engine):
        at["step"] = self.current_step
        try:
            return original_call(self, engine)
        finally:
            at["step"] = None

    def scored(batch):  # called once per held-out batch inside the evaluation loop
        if at["step"] == step:
            open(marker, "w").close()
            time.sleep(1)
        return original_scored(batch)

    from recur.train.trainer import Trainer

    original_log = Trainer.log_step

    def log_step(self, *args, **kwargs):
        self.evaluator.current_step = self.state.step
        return original_log(self, *args, **kwargs)

    original_pending = Trainer.log_pending

    def log_pending(self):
        self.evaluator.current_step = self.state.step
        return original_pending(self)

    Evaluator.current_step = None
    Evaluator.__call__, evaluator.scored_tokens = call, scored
    Trainer.log_step, Trainer.log_pending = log_step, log_pending


def install(nan_steps: set[int], crash: str | None) -> None:
    from recur.train.checkpoint import Checkpointer, tag_order
    from recur.train.trainer import Trainer

    if nan_steps:
        original_loss = Trainer.loss

        def loss(self, batch):
            value, logits = original_loss(self, batch)
            return (value * math.nan if self.state.step + 1 in nan_steps else value), logits

        Trainer.loss = loss
    if crash:
        point, step = crash.split(":")
        step = int(step)
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
        if point == "publish":
            original_publish = Checkpointer._publish

            def publish(self, tmp, at):
                if at == step:
                    kill()
                return original_publish(self, tmp, at)

            Checkpointer._publish = publish
        elif point == "latest":
            original_point = Checkpointer._point_latest

            def point_latest(self, tag):
                if tag_order(tag)[0] == step:
                    kill()
                return original_point(self, tag)

            Checkpointer._point_latest = point_latest
        else:
            raise SystemExit(f"unknown crash point {point!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-steps", default="")
    parser.add_argument("--crash", default=None)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--slow-eval", type=int, default=None)
    parser.add_argument("--marker", default=None)
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    install({int(s) for s in args.nan_steps.split(",") if s}, args.crash)
    if args.pause_at is not None:
        install_pause(args.pause_at, args.marker)
    if args.slow_eval is not None:
        install_slow_eval(args.slow_eval, args.marker)
    from recur.cli import main as recur

    return recur(["train", *train, "nproc=1"])


if __name__ == "__main__":
    sys.exit(main())
