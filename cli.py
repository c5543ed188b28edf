"""The `recur` command line: one command, a subcommand per job."""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from recur.config import UserError


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of handing multi-MB blocks back to the OS.

    PyTorch's CPU ops allocate large temporaries with malloc; by default glibc returns them at
    free, so every new tensor first-touches fresh pages (page faults, zeroing), which costs as
    much as the arithmetic in the chunkwise kernels. This is what jemalloc/tcmalloc would do,
    set once for the process. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_mmap_max, 0)  # nor mmap blocks over 32 MB (T = 32K activations): 2-3x a step at 32K
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def return_freed_memory() -> None:
    """The opposite, for measuring a step's peak resident memory: blocks of 64 KiB and more come from
    mmap and go back to the system on free, and what the process kept so far is handed back now."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4  # from <malloc.h>
    libc.mallopt(m_trim_threshold, 128 << 10)  # glibc's default
    libc.mallopt(m_top_pad, 0)
    libc.mallopt(m_mmap_threshold, 64 << 10)
    libc.mallopt(m_mmap_max, 65536)  # glibc's default
    libc.malloc_trim(0)


def quiet_deepspeed() -> None:
    """Without a GPU, name DeepSpeed's accelerator: otherwise every command that imports it (through
    accelerate, lm-eval or the trainer) prints a warning before its own output."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    quiet_deepspeed()
    parser = argparse.ArgumentParser(prog="recur", description="Pretrain recurrent language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("quickstart", help="pretrain a 5.5M-parameter recurrent LM on CPU with 2 processes (~5 min), "
                   "export, held-out perplexity, a sample", add_help=False)
    sub.add_parser("train", help="pretrain a model from a YAML recipe with DeepSpeed (recur train RECIPE key=value ...)",
                   add_help=False)
    sub.add_parser("export", help="write a transformers folder from a training checkpoint (any ZeRO stage)",
                   add_help=False)
    sub.add_parser("convert", help="convert an official checkpoint (fla, transformers, BlinkDL) to recur",
                   add_help=False)
    sub.add_parser("eval", help="lm-eval tasks or long-context probes on a checkpoint or any causal LM (offline)",
                   add_help=False)
    sub.add_parser("push", help="push a model (exported from a checkpoint if need be) to the Hugging Face Hub, "
                   "with a model card", add_help=False)
    sub.add_parser("submit", help="submit a recipe to SLURM (recur submit RECIPE --nodes N --gpus-per-node G ...): "
                   "srun, one task per GPU, continues itself after preemption and time limits", add_help=False)
    sub.add_parser("submit-eval", help="submit recur eval of a run's checkpoints to SLURM as a job array",
                   add_help=False)
    sub.add_parser("status", help="a run at a glance: its SLURM jobs, step, loss, tokens/s, ETA, checkpoints, "
                   "evaluations", add_help=False)
    from recur.modeling import FAMILIES  # (a family may bring a command of its own, e.g. linearize)

    family_commands = {name: target for family in FAMILIES.values() for name, (_, target) in family.commands.items()}
    for family in FAMILIES.values():
        for name, (text, _) in family.commands.items():
            sub.add_parser(name, help=text, add_help=False)
    tokenizer = sub.add_parser("tokenizer", help="tokenizers")
    tokenizer.add_subparsers(dest="tokenizer", metavar="WHAT", required=True).add_parser(
        "train", help="train a byte-level BPE or Unigram tokenizer on data sources", add_help=False)
    data = sub.add_parser("data", help="data")
    data.add_subparsers(dest="data", metavar="WHAT", required=True).add_parser(
        "prepare", help="pre-tokenize a recipe's data sources into memory-mapped shards", add_help=False)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    bench_sub.add_parser("kernels", help="chunkwise kernels vs the sequential loop (forward + backward)",
                         add_help=False)
    bench_sub.add_parser("data", help="data-loader tokens/s vs the tokens/s a training step consumes",
                         add_help=False)
    bench_sub.add_parser("train", help="training-step tokens/s and peak memory, every family against transformers' "
                         "Llama, Mamba-2 and RecurrentGemma", add_help=False)
    bench_sub.add_parser("decode", help="decode tokens/s and cache memory after long prompts, models side by side",
                         add_help=False)
    args, rest = parser.parse_known_args(argv)
    # Each job parses its own options, so `recur quickstart --help` shows them.
    if args.command == "quickstart":
        from recur.train.quickstart import main as job
    elif args.command == "train":
        from recur.train.trainer import main as job
    elif args.command == "export":
        from recur.train.checkpoint import main as job
    elif args.command == "convert":
        from recur.modeling.convert import main as job
    elif args.command in family_commands:
        import importlib

        module, function = family_commands[args.command].split(":")
        job = getattr(importlib.import_module(module), function)
    elif args.command == "eval":
        from recur.eval.harness import main as job
    elif args.command == "push":
        from recur.eval.hub import main as job
    elif args.command == "submit":
        from recur.train.submit import submit_main as job
    elif args.command == "submit-eval":
        from recur.train.submit import submit_eval_main as job
    elif args.command == "status":
        from recur.train.slurm import status_main as job
    elif args.command == "tokenizer":
        from recur.data.tokenizer import main as job
    elif args.command == "data":
        from recur.data.prepared import main as job
    elif args.command == "bench" and args.bench == "kernels":
        from recur.eval.bench_kernels import main as job
    elif args.command == "bench" and args.bench == "data":
        from recur.eval.bench_data import main as job
    elif args.command == "bench" and args.bench == "train":
        from recur.eval.bench_train import main as job
    elif args.command == "bench" and args.bench == "decode":
        from recur.eval.bench_decode import main as job
    try:
        return job(rest)
    except UserError as e:  # bad input: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The message of an error. One raised in a DataLoader worker comes back wrapped with the
    worker's traceback; its last line is the original `module.Class: message`."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith("Error") and " " not in head else last


if __name__ == "__main__":
    sys.exit(main())
