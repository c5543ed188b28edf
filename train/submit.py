"""`recur submit RECIPE --nodes N --gpus-per-node G ...` and `recur submit-eval RUN_DIR --tasks ...`: SLURM jobs.

`recur submit` checks the recipe as `recur train` does (keys, types, the batch split over the job's
world size, the tokenizer, which it fetches into the Hugging Face cache if it is a Hub id, the model,
the data sources, and a resume against the run dir's checkpoints), renders slurm/train.sbatch (or
--template FILE) and submits it with sbatch. The job runs the resolved recipe it wrote into
run_dir/slurm/recipe.yaml, always with resume=auto, so a requeued or follow-up job continues from
`latest`. `--dry-run` prints the script and writes and submits nothing. Bad input (no sbatch,
sbatch refusing the job, --nodes 0, a recipe that fails validation) is one line, exit 2, with
nothing submitted.

`recur submit-eval` submits a job array of `recur eval`, one task per checkpoint that has no results
for those tasks yet (the latest only, unless --every-checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from recur.config import UserError

from . import slurm

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
WARNING_SIGNALS = ("USR1", "TERM")  # the signals the trainer stops on


class SubmitError(UserError):
    pass


def template_path(name: str, given: str | None) -> Path:
    if given is None:
        import recur

        return recur.SLURM_DIR / name
    path = Path(given).expanduser()
    if not path.is_file():
        raise SubmitError(f"--template {given}: no such file")
    return path


def render(template: str, values: dict, where: str = "template") -> str:
    """Replace every {{name}}; a name with no value is an error naming the known ones."""
    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        raise SubmitError(f"{where}: unknown placeholder {{{{{unknown[0]}}}}} (known: {', '.join(sorted(values))})")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def directives(options: list[tuple[str, object]]) -> str:
    return "\n".join(f"#SBATCH --{key}" + ("" if value is True else f"={value}") for key, value in options
                     if value not in (None, False))


def sbatch(script: str, env=None) -> str:
    """Submit a script's text; returns the job id, or a one-line SubmitError with sbatch's own message."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch: not found on the PATH (run recur submit on a SLURM login node, or load its "
                          "module); nothing submitted")
    result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [re.sub(r"^sbatch: (error: )?", "", line.strip()) for line in result.stderr.splitlines() if line.strip()]
        raise SubmitError(f"sbatch refused the job: {'; '.join(lines) or f'exit {result.returncode}'}; nothing submitted")
    return result.stdout.strip().split(";")[0]


def active_jobs(run_dir: Path) -> dict[str, dict]:
    """Jobs this run dir recorded that squeue still shows (pending or running)."""
    jobs = [str(r["job"]) for r in slurm.read_records(run_dir) if r.get("event") == "submitted"]
    states = slurm.queue_states(jobs) if shutil.which("squeue") else {}
    return {j: s for j, s in states.items() if s["state"] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING",
                                                               "COMPLETING", "SUSPENDED", "RESIZING")}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partition", help="sbatch --partition")
    parser.add_argument("--account", help="sbatch --account")
    parser.add_argument("--qos", help="sbatch --qos")
    parser.add_argument("--time", help="sbatch --time, e.g. 24:00:00 (the job continues itself after it)")
    parser.add_argument("--constraint", help="sbatch --constraint (node features)")
    parser.add_argument("--cpus-per-task", type=int, help="sbatch --cpus-per-task (and OMP_NUM_THREADS)")
    parser.add_argument("--job-name", help="sbatch --job-name (default recur-<recipe> / recur-eval-<run>)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="another sbatch option, e.g. --sbatch-arg=--exclusive or --sbatch-arg=--mem=0")
    parser.add_argument("--template", help="a batch script template of your own, with the same placeholders")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")


def _extra(args) -> list[tuple[str, object]]:
    out = []
    for arg in args.sbatch_arg:
        key, sep, value = arg.lstrip("-").partition("=")
        if not key:
            raise SubmitError(f"--sbatch-arg {arg!r}: expected an sbatch option like --exclusive or --mem=0")
        out.append((key, value if sep else True))
    return out


# ----------------------------------------------------------------------------------------- recur submit

def time_limit_seconds(text: str | None) -> int | None:
    """sbatch --time in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None for none or unlimited (or a form
    sbatch itself will judge)."""
    if not text or text.strip().lower() in ("unlimited", "infinite", "-1"):
        return None
    days, _, rest = text.strip().rpartition("-") if "-" in text else ("0", "", text.strip())
    try:
        parts = [int(x) for x in rest.split(":")]
        days = int(days or 0)
    except ValueError:
        return None
    if "-" in text:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts[:3]
    return ((days * 24 + h) * 60 + m) * 60 + sec


def check_counts(args) -> None:
    if args.nodes < 1:
        raise SubmitError(f"--nodes: must be at least 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node: must be 0 (CPU nodes) or more, got {args.gpus_per_node}")
    if args.tasks_per_node is not None and args.tasks_per_node < 1:
        raise SubmitError(f"--tasks-per-node: must be at least 1, got {args.tasks_per_node}")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise SubmitError(f"--tasks-per-node {args.tasks_per_node}: one task runs per GPU, so it is --gpus-per-node "
                          f"({args.gpus_per_node}); leave it out")
    if args.max_retries < 0:
        raise SubmitError(f"--max-retries: must be 0 or more, got {args.max_retries}")
    if args.signal_before < 0:
        raise SubmitError(f"--signal-before: must be 0 (no warning signal) or more seconds, got {args.signal_before}")
    limit = time_limit_seconds(args.time)
    if limit is not None and args.signal_before >= limit:
        raise SubmitError(f"--signal-before {args.signal_before}: not less than --time {args.time} ({limit} s), so the "
                          "warning would come at the start; give a smaller --signal-before (0: none)")


def validate(args):
    """The recipe, checked as `recur train` checks it, for the job's world size; (recipe, notes, tokenizer)."""
    from .checkpoint import CheckpointError, published_tags, resolve
    from .recipe import load_recipe
    from .rundir import check_fits
    from .trainer import preflight, tokenizer_fingerprint

    tasks = args.tasks_per_node or args.gpus_per_node or 1
    world = args.nodes * tasks
    recipe = load_recipe(args.recipe, args.overrides, world_size=world)
    recipe.run_dir = str(Path(recipe.run_dir).expanduser().resolve())
    notes = []
    tokenizer, config = preflight(recipe, make_dir=False, offline=notes if args.dry_run else None)
    root = Path(recipe.run_dir) / "checkpoints"
    if published_tags(root):
        if recipe.resume is None:
            raise CheckpointError(f"{root} already holds checkpoints: set resume=auto to continue the run, or choose "
                                  "another run_dir")
        if not notes:  # (a stand-in tokenizer cannot be compared with the saved one)
            try:
                checkpoint = Path(*resolve(root))
            except CheckpointError:
                checkpoint = None
            if checkpoint is not None:
                check_fits(checkpoint, config, tokenizer_fingerprint(tokenizer), recipe.data.seq_len, world,
                           lora=recipe.train.lora, trainable=recipe.train.trainable)
    return recipe, notes, world, tasks


def job_name(args, recipe) -> str:
    return args.job_name or f"recur-{Path(recipe.source.split(' with ')[0]).stem}"


def render_train(args, recipe, tasks: int, cwd: str) -> str:
    run_dir = Path(recipe.run_dir)
    name = job_name(args, recipe)
    options = [("job-name", name), ("nodes", args.nodes), ("ntasks-per-node", tasks),
               ("gpus-per-node", args.gpus_per_node or None), ("cpus-per-task", args.cpus_per_task),
               ("partition", args.partition), ("account", args.account), ("qos", args.qos), ("time", args.time),
               ("constraint", args.constraint), ("chdir", cwd), ("output", f"{run_dir}/logs/%x-%j.out"),
               ("open-mode", "append"),  # a requeued job appends to its log instead of truncating it
               ("signal", f"{args.signal}@{args.signal_before}" if args.signal_before else None),
               ("requeue" if args.continue_mode == "requeue" else "no-requeue", True), *_extra(args)]
    values = {
        "directives": directives(options), "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(sys.executable), "helper": shlex.quote(str(Path(slurm.__file__).resolve())),
        "srun_options": f"--kill-on-bad-exit=0 --wait={args.srun_wait}",
        "train_args": f"{shlex.quote(str(run_dir / 'slurm' / 'recipe.yaml'))} resume=auto",
        "continue_mode": args.continue_mode, "max_retries": args.max_retries, "job_name": name,
        "nodes": args.nodes, "tasks_per_node": tasks, "gpus_per_node": args.gpus_per_node,
        "world_size": args.nodes * tasks, "recipe": shlex.quote(recipe.source),
    }
    path = template_path("train.sbatch", args.template)
    return render(path.read_text(), values, f"template {path}")


def submit_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur submit", description="Submit a recipe to SLURM: validated as "
                                     "recur train does, then one task per GPU with srun, continuing itself after "
                                     "preemption and time limits.")
    parser.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (e.g. gla-340m)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. run_dir=/shared/runs/x")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: one per GPU; "
                                                                          "on CPU nodes 1)")
    parser.add_argument("--continue", dest="continue_mode", choices=["requeue", "dependency"], default="requeue",
                        help="after a stop (exit 75): requeue this job (default), or submit a follow-up job that "
                             "depends on it (where requeue is not allowed)")
    parser.add_argument("--max-retries", type=int, default=2, help="attempts in a row that may fail (another exit "
                                                                    "than 0 or 75) before the run gives up")
    parser.add_argument("--signal", choices=WARNING_SIGNALS, default="USR1", help="the warning signal before the "
                        "time limit (TERM where something else on the nodes uses USR1)")
    parser.add_argument("--signal-before", type=int, default=300, help="seconds before the time limit (0: none)")
    parser.add_argument("--srun-wait", type=int, default=120, help="srun --wait: seconds the other tasks get after "
                        "one ends (a crashed rank does not leave the rest hanging)")
    _common(parser)
    args = parser.parse_intermixed_args(argv)
    check_counts(args)
    recipe, notes, world, tasks = validate(args)
    run_dir = Path(recipe.run_dir)
    cwd = os.getcwd()
    script = render_train(args, recipe, tasks, cwd)
    if args.dry_run:
        print(script, end="")
        if notes:
            print(f"offline (HF_HUB_OFFLINE=1), not checked: {'; '.join(notes)}", file=sys.stderr)
        print(f"dry run: {world} task(s) on {args.nodes} node(s); nothing written or submitted", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        sbatch(script)  # raises the one-line error
    busy = active_jobs(run_dir)
    if busy:
        job, state = next(iter(busy.items()))
        raise SubmitError(f"run_dir {run_dir} already has job {job} ({state['state'].lower()}): wait for it, scancel "
                          "it, or choose another run_dir; nothing submitted")
    from .rundir import RunDirLock, make_run_dir

    if run_dir.is_dir():
        RunDirLock(run_dir).acquire().release()  # a run in it now (recur train on this host): one line
    created = [p for p in (run_dir, run_dir / "slurm", run_dir / "logs") if not p.exists()]
    make_run_dir(run_dir)
    for folder in created[1:]:
        folder.mkdir(exist_ok=True)  # logs/: sbatch opens the job's log there when the job starts
    files = (run_dir / "slurm" / "recipe.yaml", run_dir / "slurm" / "train.sbatch")
    before = {path: path.read_bytes() if path.exists() else None for path in files}
    recipe.write(run_dir / "slurm" / "recipe.yaml")  # (written before sbatch: the job may start at once)
    tmp = run_dir / "slurm" / ".train.sbatch.tmp"
    tmp.write_text(script)
    os.replace(tmp, run_dir / "slurm" / "train.sbatch")
    try:
        job = sbatch(script)
    except SubmitError:  # leave the run dir as it was
        for path, old in before.items():
            path.unlink() if old is None else path.write_bytes(old)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    slurm.record(run_dir, "submitted", job=job, kind="train", nodes=args.nodes, tasks=world,
                 recipe=recipe.source, continue_mode=args.continue_mode)
    name = job_name(args, recipe)
    print(f"submitted job {job}: {world} task(s) on {args.nodes} node(s)\n"
          f"  run dir:   {run_dir}\n"
          f"  job log:   {run_dir}/logs/{name}-{job}.out\n"
          f"  rank logs: {run_dir}/logs/{name}-{job}-rank<k>.out\n"
          f"  status:    recur status {run_dir}")
    return 0


# ----------------------------------------------------------------------------------------- recur submit-eval

def evaluated(run_dir: Path, tag: str, tasks: list[str]) -> bool:
    """Whether run_dir/eval/<tag> has a results file that covers every task."""
    for path in (run_dir / "eval" / tag).glob("results_*.json"):
        try:
            done = set(json.loads(path.read_text()).get("results", {}))
        except (OSError, ValueError):
            continue
        if set(tasks) <= done:
            return True
    return False


def submit_eval_main(argv=None) -> int:
    from .checkpoint import published_tags, read_latest

    parser = argparse.ArgumentParser(prog="recur submit-eval", description="Submit recur eval of a run's "
                                     "checkpoints as a SLURM job array (one task per checkpoint not yet evaluated).")
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (as recur eval)")
    parser.add_argument("--every-checkpoint", action="store_true", help="every kept checkpoint, not only the latest")
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--include-path", action="append", default=[])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per array task (0: evaluate on CPU)")
    _common(parser)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser().resolve()
    root = run_dir / "checkpoints"
    tags = published_tags(root)
    if not tags:
        raise SubmitError(f"{run_dir}: no checkpoints to evaluate (not a run dir, or nothing saved yet)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SubmitError("--tasks: no task names given")
    if args.gpus < 0:
        raise SubmitError(f"--gpus: must be 0 or more, got {args.gpus}")
    include = [Path(p).expanduser().resolve() for p in args.include_path]
    for path in include:
        if not path.is_dir():
            raise SubmitError(f"--include-path {path}: no such folder")
    from recur.eval import tasks as local_tasks
    from recur.eval.harness import local_task_names, task_manager

    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else local_tasks.default_data_dir()
    if args.data_dir and not data_dir.is_dir():
        raise SubmitError(f"--data-dir {data_dir}: no such folder")
    local = local_task_names(tasks, data_dir, include, strict=args.data_dir is not None)
    others = [t for t in tasks if t not in local]
    if others:
        task_manager(others, include)  # an unknown task: one line with the close matches
    chosen = tags if args.every_checkpoint else [read_latest(root) or tags[-1]]
    todo = [t for t in chosen if not evaluated(run_dir, t, tasks)]
    if not todo:
        print(f"nothing to evaluate: {', '.join(chosen)} already {'have' if len(chosen) > 1 else 'has'} results for "
              f"{', '.join(tasks)} in {run_dir / 'eval'}")
        return 0
    eval_args = ["--tasks", ",".join(tasks), "--device", "cuda" if args.gpus else "cpu"]
    for flag, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot),
                        ("--batch-size", args.batch_size), ("--data-dir", data_dir if args.data_dir else None)):
        if value is not None:
            eval_args += [flag, str(value)]
    for path in include:
        eval_args += ["--include-path", str(path)]
    name = args.job_name or f"recur-eval-{run_dir.name}"
    options = [("job-name", name), ("array", f"0-{len(todo) - 1}"), ("nodes", 1), ("ntasks", 1),
               ("gpus", args.gpus or None), ("cpus-per-task", args.cpus_per_task), ("partition", args.partition),
               ("account", args.account), ("qos", args.qos), ("time", args.time), ("constraint", args.constraint),
               ("chdir", os.getcwd()), ("output", f"{run_dir}/logs/%x-%A_%a.out"), ("open-mode", "append"),
               *_extra(args)]
    values = {"directives": directives(options), "run_dir": shlex.quote(str(run_dir)),
              "python": shlex.quote(sys.executable), "tags": " ".join(todo),
              "eval_args": " ".join(shlex.quote(a) for a in eval_args), "job_name": name, "count": len(todo)}
    path = template_path("eval.sbatch", args.template)
    script = render(path.read_text(), values, f"template {path}")
    if args.dry_run:
        print(script, end="")
        print(f"dry run: {len(todo)} array task(s) ({', '.join(todo)}); nothing submitted", file=sys.stderr)
        return 0
    (run_dir / "logs").mkdir(exist_ok=True)
    job = sbatch(script)
    slurm.record(run_dir, "submitted", job=job, kind="eval", checkpoints=todo, tasks=tasks)
    print(f"submitted job array {job}: {len(todo)} task(s), one per checkpoint ({', '.join(todo)})\n"
          f"  results: {run_dir}/eval/<checkpoint>/results_*.json\n"
          f"  logs:    {run_dir}/logs/{name}-{job}_<k>.out\n"
          f"  status:  recur status {run_dir}")
    return 0
