"""`recur eval MODEL --tasks T1,T2 ...`: lm-eval on any checkpoint or model, offline.

MODEL is a run dir (its `latest` checkpoint), one checkpoint of any ZeRO stage, an exported
folder, any transformers causal LM folder, or a GGUF model (`--gguf-file`); see eval/load.py.
lm-eval does the work: `simple_evaluate` with its `HFLM` over the loaded model object and a
`TaskManager(include_path=...)`. Nothing of its scoring or task formats is re-implemented here.

Tasks are any lm-eval task name, plus the YAMLs of `--include-path DIR` (exactly lm-eval's own
flag). The standard `lambada_openai`, `wikitext`, `piqa` and `hellaswag` run from local files when
`--data-dir` (default `../shared/data` when it exists) holds them: eval/tasks.py writes task YAMLs
that include lm-eval's stock one and override only the dataset keys. Without local files the stock
tasks go to the Hub, as lm-eval normally does.

Results: lm-eval's table on stdout, and in `--output-path` (default: `eval/` in the run dir or the
model folder) `results_<time>.json` (lm-eval's results, plus what recur ran) and `results_<time>.md`.
`--probe passkey|needle|ppl-by-position` runs a long-context probe instead (eval/probes.py).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..config import UserError
from . import tasks as local_tasks

RESULTS_PREFIX = "results_"


class EvalError(UserError):
    pass


def task_manager(names: list[str], include_paths: list[Path]):
    """lm-eval's TaskManager over the include paths; its own ~15k stock configs are indexed (9 s) only
    when a task is not found in the include paths."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise EvalError(f"--tasks: unknown task {unknown[0]!r}{hint} (lm-eval ls tasks lists them all)")
    return manager


def evaluate(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 1, max_length: int | None = None, include_paths: list[Path] = (),
             data_dir: Path | None = None, device: str = "cpu", log_samples: bool = False) -> dict:
    """lm-eval's results dict for `tasks` on a loaded model; the local standard tasks when `data_dir` has them."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="recur-tasks-") as generated:
        paths = list(include_paths)
        local = local_task_names(tasks, data_dir, paths, strict=False)
        if local_tasks.write_local_tasks(local, Path(data_dir), Path(generated)) if local else False:
            paths.append(Path(generated))
        manager = task_manager(tasks, paths)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, bootstrap_iters=0, log_samples=log_samples,
                                              device=device)
        except (ConnectionError, OSError) as e:  # a stock task's dataset on the Hub, offline
            raise EvalError(f"--tasks {','.join(tasks)}: cannot load a task's data ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); offline, give --data-dir with the "
                            "files or --include-path with local task YAMLs") from None
    return results


def local_task_names(tasks: list[str], data_dir: Path | None, include_paths, strict: bool) -> list[str]:
    """The standard tasks to run from `data_dir`: those it has the files of (all of them when `strict`,
    else a missing file is an error naming it), unless the user's include paths define them."""
    if data_dir is None:
        return []
    local = []
    for task in tasks:
        if task not in local_tasks.STOCK or _defined_in(task, include_paths):
            continue
        missing = local_tasks.missing_files(task, data_dir)
        if missing and strict:
            raise EvalError(f"--data-dir {data_dir}: {task} needs {missing[0]}, which is not there "
                            f"(expected: {', '.join(local_tasks.FILES[task])})")
        if not missing:
            local.append(task)
    return local


def _defined_in(task: str, paths: list[Path]) -> bool:
    """Whether the user's include paths define this task name themselves (theirs wins)."""
    for path in paths:
        for yaml_file in Path(path).rglob("*.yaml"):
            text = yaml_file.read_text(errors="replace")
            if f"task: {task}\n" in text or f"task: {task}\r\n" in text:
                return True
    return False


def metric_values(results: dict):
    """(task, metric, value) for every numeric metric of lm-eval's results (no stderr, no alias)."""
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")  # metrics are "name,filter"; alias, sample_len are not
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            yield task, metric + ("" if filter_name in ("", "none") else f" ({filter_name})"), float(value)


def flat_metrics(results: dict) -> dict:
    """`task/metric` -> value, as metrics.jsonl and TensorBoard take them."""
    return {f"{task}/{metric}": value for task, metric, value in metric_values(results)}


def markdown_table(results: dict) -> str:
    """One row per task and metric: the figures a person compares."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    rows += [f"| {task} | {metric} | {value:.4f} |" for task, metric, value in metric_values(results)]
    return "\n".join(rows) + "\n"


def write_results(results: dict, out: Path, run: dict) -> Path:
    """results_<time>.json (lm-eval's results without per-sample logs, plus `recur`: what was run) and .md."""
    from lm_eval.utils import handle_non_serializable

    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{RESULTS_PREFIX}{stamp}.json"
    k = 1
    while path.exists():
        path, k = out / f"{RESULTS_PREFIX}{stamp}-{k}.json", k + 1
    kept = {k: v for k, v in results.items() if k != "samples"}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**kept, "recur": run}, indent=1, default=handle_non_serializable))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(f"# {run['model']}\n\n{markdown_table(results)}")
    return path


def latest_results(results_dir: Path) -> dict | None:
    """The newest results JSON `recur eval` wrote in a folder (for model cards), or None."""
    files = sorted(Path(results_dir).glob(f"{RESULTS_PREFIX}*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("model", help="a run dir, a checkpoint, an exported or transformers model folder")
    parser.add_argument("--tasks", help="comma-separated lm-eval task names (lambada_openai,wikitext,piqa,hellaswag "
                                        "run offline from --data-dir)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction below 1)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=None,
                        help="context for lm-eval's requests (default: the training seq_len when recur trained it)")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of task YAMLs (lm-eval's flag)")
    parser.add_argument("--data-dir", default=None, help="local files of the standard tasks (default ../shared/data "
                                                         "when it exists; layout in eval/tasks.py and the README)")
    parser.add_argument("--output-path", default=None, help="folder for the results (default: eval/ beside the model)")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside MODEL (a folder) to load")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", choices=["passkey", "needle", "ppl-by-position"], default=None,
                        help="a long-context probe instead of lm-eval tasks")
    parser.add_argument("--lengths", default="1024,4096,16384", help="probe lengths in tokens")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="probe depths (passkey, needle)")
    parser.add_argument("--trials", type=int, default=3, help="probe trials per length and depth")
    args = parser.parse_args(argv)
    if (args.tasks is None) == (args.probe is None):
        raise EvalError("give --tasks T1,T2,... or --probe passkey|needle|ppl-by-position")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else local_tasks.default_data_dir()
    if args.data_dir and not data_dir.is_dir():
        raise EvalError(f"--data-dir {data_dir}: no such folder")
    include = [Path(p).expanduser() for p in args.include_path]
    for path in include:
        if not path.is_dir():
            raise EvalError(f"--include-path {path}: no such folder")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks is not None:  # names and files are checked before the model loads (a typo costs no minute)
        if not tasks:
            raise EvalError("--tasks: no task names given")
        local = local_task_names(tasks, data_dir, include, strict=args.data_dir is not None)
        others = [t for t in tasks if t not in local]
        if others:
            task_manager(others, include)

    if args.probe is not None:
        from .probes import check_args

        check_args(args.lengths, args.depths, args.trials)  # before the model loads

    from .load import load

    model, tokenizer, source = load(args.model, args.gguf_file, args.device)
    out = Path(args.output_path).expanduser() if args.output_path else source.results_dir
    if args.probe is not None:
        from .probes import main_probe

        return main_probe(args, model, tokenizer, source, out, data_dir)
    max_length = args.max_length or source.seq_len
    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size, max_length=max_length, include_paths=include, data_dir=data_dir,
                       device=args.device)
    from lm_eval.utils import make_table

    print(make_table(results))
    run = {"model": str(source.path), "kind": source.kind, "tasks": tasks, "limit": args.limit,
           "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "max_length": max_length,
           "data_dir": str(data_dir) if data_dir else None, "seconds": round(time.perf_counter() - start, 1),
           "training": source.training}
    path = write_results(results, out, run)
    print(f"results in {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0
