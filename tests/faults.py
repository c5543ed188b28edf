"""`python tests/faults.py [--nan-steps 3,4] [--crash POINT:STEP] -- recur-train-arguments...`

Runs `recur train` in this process (nproc=1) with faults injected by monkeypatching, so that no
test hook lives in the trainer:
- --nan-steps: the loss of these optimizer steps (1-based) is multiplied by NaN;
- --crash publish:N: SIGKILL in the save of step N, after every file and the manifest are written,
  before the folder is renamed into place;
- --crash latest:N: SIGKILL after the save of step N is renamed into place, before `latest` moves.
"""
import argparse
import math
import os
import signal
import sys


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
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    install({int(s) for s in args.nan_steps.split(",") if s}, args.crash)
    from recur.cli import main as recur

    return recur(["train", *train, "nproc=1"])


if __name__ == "__main__":
    sys.exit(main())
