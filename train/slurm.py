"""SLURM: what a run's batch jobs record in its run dir, what a job does when `recur train` ends, and `recur status`.

    run_dir/slurm/
      train.sbatch        # the batch script `recur submit` rendered (a follow-up job submits it again)
      recipe.yaml         # the recipe as submitted, resolved
      jobs.jsonl          # one line per event: submitted, start, end (exit code, step, what was done next)
      env-<job>-<n>.txt   # each start's environment: host, nodes, SLURM_* variables, python, GPUs
    run_dir/logs/
      <name>-<job>.out        # the batch script's own lines (appended to across requeues)
      <name>-<job>-rank<k>.out  # each rank's output

The batch script calls this file twice, as a script (`python .../recur/train/slurm.py job-start RUN_DIR`,
then `job-end`): standard library only, so the bookkeeping costs no torch import. After `recur train`
ends, `job-end` decides (`decide`, a pure function):

- exit 0: the run is finished;
- exit 75 (stopped by a signal or the job's end time, checkpoint saved), or SIGTERM to the batch
  script at the time limit: the run continues: `scontrol requeue` of this job (the default), or a
  follow-up job that depends on this one (`--continue dependency`, where requeue is not allowed;
  also the fallback when requeue fails);
- SIGTERM to the batch script before the time limit (scancel, scontrol requeue, preemption): nothing
  (SLURM cancels the job, or requeues it itself);
- any other exit (a crash, a node failure, a start-up error), or a stop that made no progress: a
  retry as above, up to `--max-retries` such attempts in a row; then the job gives up and says so,
  in its log and in `recur status`.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # run by path (the batch script): this folder is no place to import from
    sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

EXIT_STOPPED = 75  # train/trainer.py's: stopped by a signal after saving a checkpoint
JOBS = "jobs.jsonl"
TAG = re.compile(r"step_(\d+)(?:-\d+)?")


class SlurmError(ValueError):
    """A SLURM command failed; the message is one line (recur's command line prints it, exit 2)."""


# ----------------------------------------------------------------------------------------- the run dir's records

def slurm_dir(run_dir) -> Path:
    return Path(run_dir) / "slurm"


def record(run_dir, event: str, **fields) -> dict:
    """Append one event to run_dir/slurm/jobs.jsonl (one short line, appended: jobs of one run never overlap)."""
    entry = {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields}
    folder = slurm_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / JOBS, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_jsonl(path: Path) -> list[dict]:
    """Every complete line of a JSON-lines file (a line cut short by a kill is skipped); [] if it is missing.
    (train/metrics.py's read_metrics does the same for metrics.jsonl; this file stays standard library only.)"""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_records(run_dir) -> list[dict]:
    return read_jsonl(slurm_dir(run_dir) / JOBS)


def latest_step(run_dir) -> int | None:
    """The step of the checkpoint `latest` names (without reading the checkpoint), or None."""
    try:
        tag = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------- job start and end

def environment_summary(environ=None) -> str:
    env = os.environ if environ is None else environ
    lines = [f"host: {socket.gethostname()}", f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             f"python: {sys.executable} ({platform.python_version()})", f"platform: {platform.platform()}"]
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
            lines.append("gpus:\n  " + "\n  ".join(gpus.splitlines()))
        except (OSError, subprocess.SubprocessError):
            pass
    keys = sorted(k for k in env if k.startswith(("SLURM_", "MASTER_", "NCCL_", "CUDA_", "OMP_", "HF_", "TORCH_")))
    lines += ["environment:"] + [f"  {k}={env[k]}" for k in keys]
    return "\n".join(lines) + "\n"


def job_start(run_dir, environ=None) -> dict:
    """At the start of each run of the batch script: the environment summary, and a `start` event."""
    env = os.environ if environ is None else environ
    job, restart = env.get("SLURM_JOB_ID", "?"), int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    path = slurm_dir(run_dir) / f"env-{job}-{restart}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(environment_summary(env))
    entry = record(run_dir, "start", job=job, restart=restart, nodes=env.get("SLURM_JOB_NODELIST"),
                   tasks=env.get("SLURM_NTASKS"), step=latest_step(run_dir), end_time=env.get("SLURM_JOB_END_TIME"))
    print(f"recur: job {job} (restart {restart}) starts at step {entry['step'] or 0} on {entry['nodes']}; "
          f"environment in {path}", flush=True)
    return entry


def decide(exit_code: int, terminated: bool, at_time_limit: bool, step_before: int | None,
           step_after: int | None, history: list[dict], max_retries: int) -> tuple[str, str]:
    """(action, message): action is 'done', 'continue', 'retry', 'none' (SLURM ends or requeues the job
    itself) or 'give-up'. `history`: this run's earlier `end` events, oldest first."""
    if exit_code == 0 and not terminated:
        return "done", f"the run finished (step {step_after})"
    if terminated and not at_time_limit:
        return "none", (f"the batch script got SIGTERM before the time limit (scancel, scontrol requeue or "
                        f"preemption; recur train exited {exit_code}): SLURM cancels this job or requeues it itself")
    progressed = step_after is not None and (step_before is None or step_after > step_before)
    if (exit_code == EXIT_STOPPED or terminated) and progressed:
        why = "at the time limit" if terminated else "stopped by a signal or the job's end time"
        return "continue", f"{why} at step {step_after}, checkpoint saved: the run continues"
    failures = 1
    for entry in reversed(history):
        if entry.get("outcome") != "failed":
            break
        failures += 1
    what = (f"recur train exited {exit_code}" if exit_code not in (0, EXIT_STOPPED)
            else f"recur train exited {exit_code} without progress (still at step {step_after or 0})")
    if failures > max_retries:
        return "give-up", (f"giving up: {failures} attempts in a row failed (last: {what}); not resubmitting "
                           f"(--max-retries {max_retries}). Read the rank logs, fix the cause, then submit again")
    return "retry", f"{what}: attempt {failures} of {max_retries + 1} failed, retrying"


def clean_environment(environ=None) -> dict:
    """This environment without the job's own SLURM_* variables (a follow-up job must not inherit them)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def continue_job(job: str, mode: str, script: str, run_dir) -> str:
    """Requeue this job, or submit a follow-up that starts when it ends; returns what was done."""
    if mode == "requeue":
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            return f"requeued job {job}"
        problem = (result.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"recur: scontrol requeue {job} failed ({problem}); submitting a follow-up job instead", flush=True)
    result = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", script], capture_output=True,
                            text=True, env=clean_environment())
    if result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmError(f"sbatch of the follow-up job failed: {problem}")
    new = result.stdout.strip().split(";")[0]
    record(run_dir, "submitted", job=new, kind="train", via=f"follow-up of {job}")
    return f"submitted follow-up job {new} (after {job})"


def job_end(run_dir, exit_code: int, terminated: bool, mode: str, max_retries: int, script: str,
            environ=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `scontrol requeue` of this job signals the batch step: finish
    env = os.environ if environ is None else environ
    job, restart = env.get("SLURM_JOB_ID", "?"), int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    records = read_records(run_dir)
    starts = [r for r in records if r.get("event") == "start" and r.get("job") == job and r.get("restart") == restart]
    step_before = starts[-1].get("step") if starts else None
    step_after = latest_step(run_dir)
    end_time = env.get("SLURM_JOB_END_TIME", "")
    at_limit = bool(end_time.isdigit() and time.time() >= int(end_time) - 30)
    history = [r for r in records if r.get("event") == "end"]
    action, message = decide(exit_code, terminated, at_limit, step_before, step_after, history, max_retries)
    outcome = {"done": "finished", "continue": "stopped", "none": "ended by SLURM", "retry": "failed",
               "give-up": "failed"}[action]
    done = None
    if action in ("continue", "retry"):
        try:
            done = continue_job(job, mode, script, run_dir)
        except SlurmError as e:
            message, action = f"{message}; but {e}", "give-up"
    record(run_dir, "end", job=job, restart=restart, exit=exit_code, step=step_after, outcome=outcome,
           action=action, message=message + (f"; {done}" if done else ""))
    print(f"recur: job {job} (restart {restart}): {message}" + (f"; {done}" if done else ""), flush=True)
    return 1 if action == "give-up" else 0


# ----------------------------------------------------------------------------------------- recur status

def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def queue_states(jobs: list[str]) -> dict[str, dict]:
    """job id -> {state, elapsed, limit, reason} from squeue (pending and running jobs), then sacct (ended
    ones, where accounting is on); jobs neither knows are left out."""
    found = {}
    if not jobs:
        return found
    out = _run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i|%T|%M|%l|%R"])
    for line in (out or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            found[parts[0]] = {"state": parts[1], "elapsed": parts[2], "limit": parts[3], "reason": parts[4]}
    rest = [j for j in jobs if j not in found]
    if rest:
        out = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(rest), "-o", "JobID,State,Elapsed,Timelimit,ExitCode"])
        for line in (out or "").splitlines():
            parts = line.strip().split("|")
            if len(parts) == 5 and parts[0] in rest:
                found[parts[0]] = {"state": parts[1], "elapsed": parts[2], "limit": parts[3],
                                   "reason": f"exit {parts[4]}"}
    return found


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


def progress_line(run_dir, max_steps: int | None) -> str:
    records = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    if not records:
        return "progress: no metrics yet"
    last = records[-1]
    step, tokens_per_s = last["step"], last.get("tokens_per_s") or 0
    text = f"progress: step {step:,}"
    if max_steps:
        text += f" of {max_steps:,} ({100 * step / max_steps:.1f}%)"
    text += f", loss {last['loss']:.4f}"
    if "val_loss" in last or any("val_loss" in r for r in records):
        text += f", val_loss {next(r['val_loss'] for r in reversed(records) if 'val_loss' in r):.4f}"
    text += f", {tokens_per_s:,.0f} tokens/s, {last.get('tokens', 0):,} tokens"
    if max_steps and step < max_steps and tokens_per_s > 0 and step > 0:
        per_step = last.get("tokens", 0) / step
        text += f", ETA {_duration((max_steps - step) * per_step / tokens_per_s)} of training"
    return text


def _max_steps(run_dir) -> int | None:
    for name in ("recipe.yaml", "slurm/recipe.yaml"):
        path = Path(run_dir) / name
        if path.exists():
            match = re.search(r"^  max_steps: (\d+)$", path.read_text(), re.M)
            if match:
                return int(match.group(1))
    return None


def checkpoints_line(run_dir) -> str:
    root = Path(run_dir) / "checkpoints"
    tags = sorted((p.name for p in root.iterdir() if TAG.fullmatch(p.name) and (p / "manifest.json").exists()),
                  key=lambda t: int(TAG.fullmatch(t).group(1))) if root.is_dir() else []
    if not tags:
        return "checkpoints: none"
    try:
        latest = (root / "latest").read_text().strip()
    except OSError:
        latest = None
    size = sum(f.stat().st_size for f in (root / tags[-1]).rglob("*") if f.is_file())
    return (f"checkpoints: {', '.join(t + (' (latest)' if t == latest else '') for t in tags)} in {root} "
            f"({size / 1e6:,.1f} MB each)")


def evaluation_table(run_dir) -> list[str]:
    """One row per checkpoint that `recur submit-eval` evaluated (run_dir/eval/<tag>/results_*.json)."""
    folder = Path(run_dir) / "eval"
    rows, metrics = [], []
    for sub in sorted(folder.iterdir(), key=lambda p: p.name) if folder.is_dir() else []:
        files = sorted(sub.glob("results_*.json"), key=lambda p: p.stat().st_mtime)
        if not sub.is_dir() or not TAG.fullmatch(sub.name) or not files:
            continue
        try:
            results = json.loads(files[-1].read_text()).get("results", {})
        except ValueError:
            continue
        values = {}
        for task, entries in sorted(results.items()):
            for key, value in entries.items():
                metric, comma, filtered = key.partition(",")
                if comma and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                    name = f"{task}/{metric}" + ("" if filtered in ("", "none") else f" ({filtered})")
                    values[name] = value
                    if name not in metrics:
                        metrics.append(name)
        rows.append((sub.name, values))
    if not rows:
        return []
    lines = ["| checkpoint | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for tag, values in rows:
        lines.append(f"| {tag} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in metrics) + " |")
    return lines


def status_text(run_dir) -> str:
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    lines = [f"run: {run_dir}"]
    jobs = []
    for r in records:
        if r.get("event") == "submitted" and r.get("job") not in jobs:
            jobs.append(str(r["job"]))
    if jobs:
        states = queue_states(jobs)
        lines.append("jobs:")
        for job in jobs:
            kind = next((r.get("kind", "train") for r in records if r.get("job") == job and r["event"] == "submitted"),
                        "train")
            ends = [r for r in records if r.get("event") == "end" and r.get("job") == job]
            known = states.get(job)
            if known:
                where = (f"{known['state'].lower()}, {known['elapsed']} of {known['limit']}"
                         + (f", {known['reason']}" if known["reason"] and known["reason"] not in ("None",) else ""))
            elif ends:
                where = f"ended ({ends[-1].get('outcome')}, exit {ends[-1].get('exit')})"
            else:
                where = "not known to squeue or sacct"
            restarts = len([r for r in records if r.get("event") == "start" and r.get("job") == job])
            lines.append(f"  {job} {kind}: {where}" + (f"; {restarts} start(s)" if restarts else ""))
    ends = [r for r in records if r.get("event") == "end"]
    if ends:
        last = ends[-1]
        lines.append(f"last job end: job {last.get('job')} (restart {last.get('restart')}), exit {last.get('exit')}: "
                     f"{last.get('message')}")
        if last.get("action") == "give-up":
            lines.append(f"GAVE UP: {last.get('message')}")
    lines.append(progress_line(run_dir, _max_steps(run_dir)))
    lines.append(checkpoints_line(run_dir))
    logs = sorted((run_dir / "logs").glob("*.out")) if (run_dir / "logs").is_dir() else []
    if logs:
        lines.append(f"logs: {run_dir / 'logs'} ({len(logs)} files, newest {max(logs, key=lambda p: p.stat().st_mtime).name})")
    table = evaluation_table(run_dir)
    if table:
        lines += ["evaluations:"] + table
    return "\n".join(lines)


def status_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur status", description="What a run is doing: its SLURM jobs, the "
                                     "last step, loss, tokens/s and ETA, its checkpoints and evaluations.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        from recur.config import UserError

        raise UserError(f"{run_dir}: no such run dir")
    print(status_text(run_dir))
    return 0


# ----------------------------------------------------------------------------------------- the batch script's calls

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="slurm.py", description="recur's batch-script bookkeeping")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("job-start")
    start.add_argument("run_dir")
    end = sub.add_parser("job-end")
    end.add_argument("run_dir")
    end.add_argument("--exit-code", type=int, required=True)
    end.add_argument("--terminated", type=int, default=0)
    end.add_argument("--continue", dest="mode", choices=["requeue", "dependency"], default="requeue")
    end.add_argument("--max-retries", type=int, default=2)
    end.add_argument("--script", required=True)
    args = parser.parse_args(argv)
    if args.command == "job-start":
        job_start(args.run_dir)
        return 0
    return job_end(args.run_dir, args.exit_code, bool(args.terminated), args.mode, args.max_retries, args.script)


def quote(value) -> str:
    return shlex.quote(str(value))


if __name__ == "__main__":
    sys.exit(main())
