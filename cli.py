"""The `recur` command line: one command, a subcommand per job."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="recur", description="Pretrain recurrent language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("demo", help="train a small recurrent LM on built-in English text, evaluate it, generate",
                   add_help=False)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    bench_sub.add_parser("kernels", help="chunkwise kernels vs the sequential loop (forward + backward)",
                         add_help=False)
    args, rest = parser.parse_known_args(argv)
    # Each job parses its own options, so `recur demo --help` shows them.
    if args.command == "demo":
        from recur.train.demo import main as job
    elif args.command == "bench" and args.bench == "kernels":
        from recur.eval.bench_kernels import main as job
    return job(rest)


if __name__ == "__main__":
    sys.exit(main())
