"""SLURM: `recur submit`, `recur submit-eval`, `recur status`, the trainer's stops (a signal during a data wait
or an evaluation, the job's end time), Hub tokenizers, and real jobs on a one-node SLURM cluster that the
tests start (tests/slurm_cluster.py): 2 CPU tasks, a warning signal and `scontrol requeue` mid-run, a time
limit that runs out, evaluation job arrays. Each interrupted run ends with the losses of one that never
stopped, step for step."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import recur
from recur.train import slurm as jobs
from recur.train.stop import StopPolicy, job_end_time

from slurm_cluster import cluster, slurm  # noqa: F401  (fixtures)
from test_train import COMMON, finish, launch, metrics, train

TESTS = Path(__file__).resolve().parent
FAULTS = TESTS / "faults.py"
KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")


def recur_cli(*args, env=None, timeout=600):
    environ = {k: v for k, v in os.environ.items() if k != "RECUR_RUN_DIR_LOCK"}
    return subprocess.run([sys.executable, "-m", "recur.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def same(a, b):
    return [{k: r.get(k) for k in KEYS} for r in a if "loss" in r] == [{k: r.get(k) for k in KEYS} for r in b
                                                                       if "loss" in r]


# ----------------------------------------------------------------------------------------- submit: the script

BIG = ["gla-340m", "--nodes", "64", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00",
       "train.global_batch=512", "train.micro_batch=1"]


def test_dry_run_for_64_nodes_of_8_gpus(tmp_path, monkeypatch, capsys):
    """The directives, 512 tasks with one srun launch line and no torchrun, and the one line saying which Hub
    tokenizer would be fetched (offline); nothing written."""
    from recur.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["submit", *BIG, f"run_dir={run}", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    for expected in ("--nodes=64", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00",
                     "--signal=USR1@300", "--requeue", "--open-mode=append", f"--output={run}/logs/%x-%j.out",
                     f"--chdir={tmp_path}", "--job-name=recur-gla-340m"):
        assert f"#SBATCH {expected}" in directives, (expected, directives)
    (launch_line,) = [i for i, line in enumerate(out.splitlines()) if line.startswith("srun ")]
    command = " ".join(out.splitlines()[launch_line:launch_line + 2])
    assert "--output=\"$RUN_DIR/logs/%x-%j-rank%t.out\"" in command and "--open-mode=append" in command
    assert f"-m recur.cli train {run}/slurm/recipe.yaml resume=auto" in command
    code = [line for line in out.splitlines() if not line.lstrip().startswith("#")]
    assert not any(word in line for line in code for word in ("torchrun", "ssh", "pdsh"))
    assert "MASTER_ADDR=$(scontrol show hostnames" in out and "MASTER_PORT=$((20000 + (SLURM_JOB_ID + 7919 * ${SLURM_RESTART_COUNT:-0}) % 20000))" in out
    assert "512 task(s) on 64 node(s)" in err
    assert "tokenizer 'fla-hub/gla-340M-15B' would be fetched from the Hub" in err
    assert len([line for line in err.splitlines() if "would be fetched" in line]) == 1
    assert not run.exists()
    script = tmp_path / "x.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_cpu_tasks_and_a_template_of_ones_own(tmp_path, monkeypatch, capsys):
    from recur.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.sbatch").write_text("#!/bin/bash\n{{directives}}\necho {{nodes}} x {{tasks_per_node}} "
                                          "= {{world_size}}\nsrun {{python}} -m recur.cli train {{train_args}}\n")
    args = ["gla-tiny", "--gpus-per-node", "0", "--tasks-per-node", "2", "train.micro_batch=4",
            f"run_dir={tmp_path / 'run'}", "--dry-run"]
    assert main(["submit", *args, "--template", str(tmp_path / "mine.sbatch"), "--continue", "dependency",
                 "--sbatch-arg=--exclusive"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "--gpus-per-node" not in out and "echo 1 x 2 = 2" in out
    assert "#SBATCH --no-requeue" in out and "#SBATCH --exclusive" in out
    (tmp_path / "bad.sbatch").write_text("{{directives}}\n{{no_such_thing}}\n")
    assert main(["submit", *args, "--template", str(tmp_path / "bad.sbatch")]) == 2
    assert "unknown placeholder {{no_such_thing}}" in capsys.readouterr().err


FAKE_SBATCH = """#!/bin/sh
echo "$@" >> {calls}
echo "sbatch: error: invalid partition specified: nope" >&2
echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
exit 1
"""


@pytest.mark.parametrize("case", ["no sbatch", "unknown partition", "--nodes 0", "bad recipe", "batch split",
                                  "warning after the limit"])
def test_bad_input_is_one_line_exit_2_and_nothing_submitted(case, tmp_path, monkeypatch, capsys):
    from recur.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    if case != "no sbatch":
        (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(calls=calls))
        (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) if case == "no sbatch" else f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "run"
    args = {"no sbatch": [], "unknown partition": ["--partition", "nope"], "--nodes 0": ["--nodes", "0"],
            "bad recipe": ["train.lr=fast"], "batch split": ["--tasks-per-node", "3"],
            "warning after the limit": ["--time", "2", "--signal-before", "300"]}[case]
    code = main(["submit", "gla-tiny", "--gpus-per-node", "0", f"run_dir={run}", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    expected = {"no sbatch": "sbatch: not found on the PATH",
                "unknown partition": "sbatch refused the job: invalid partition specified: nope; Batch job submission "
                                     "failed: Invalid partition name specified; nothing submitted",
                "--nodes 0": "--nodes: must be at least 1, got 0", "bad recipe": "train.lr: expected float",
                "batch split": "train.global_batch: 8 is not divisible by world size 3",
                "warning after the limit": "--signal-before 300: not less than --time 2 (120 s)"}[case]
    assert expected in err[0], err[0]
    assert not run.exists()  # nothing written
    if case != "unknown partition":
        assert not calls.exists()  # nothing submitted


# ----------------------------------------------------------------------------------------- the job's bookkeeping

def test_what_a_job_does_when_recur_train_ends():
    failed = {"event": "end", "outcome": "failed"}
    stopped = {"event": "end", "outcome": "stopped"}
    assert jobs.decide(0, False, False, 4, 8, [], 2)[0] == "done"
    assert jobs.decide(75, False, False, 4, 8, [], 2) == ("continue", jobs.decide(75, False, False, 4, 8, [], 2)[1])
    assert "at step 8" in jobs.decide(75, False, False, 4, 8, [], 2)[1]
    # SIGTERM to the batch script before the limit: scancel or scontrol requeue; SLURM does the rest
    assert jobs.decide(75, True, False, 4, 8, [], 2)[0] == "none"
    assert jobs.decide(75, True, True, 4, 8, [], 2)[0] == "continue"  # ...at the time limit: continue
    assert jobs.decide(1, False, False, 4, 4, [], 2)[0] == "retry"
    assert jobs.decide(1, False, False, 4, 4, [stopped, failed], 2)[0] == "retry"
    action, message = jobs.decide(1, False, False, 4, 4, [stopped, failed, failed], 2)
    assert action == "give-up" and "3 attempts in a row failed" in message and "exited 1" in message
    # a stop without progress (a --time shorter than start-up) counts as a failed attempt
    assert jobs.decide(75, False, False, 4, 4, [failed, failed], 2)[0] == "give-up"
    assert jobs.decide(137, False, False, None, None, [], 0)[0] == "give-up"


def test_the_job_end_time_stops_a_run_by_itself():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)}
    try:
        assert job_end_time({"SLURM_JOB_END_TIME": "1700000000"}) == 1.7e9 and job_end_time({}) is None
        assert job_end_time({"SLURM_JOB_END_TIME": "Unknown"}) is None
        none = StopPolicy(5, 60, {})
        none.after_first_step(say=lambda *a: None)
        assert none.deadline is None and not none.local()
        stop = StopPolicy(5, 60, {"SLURM_JOB_END_TIME": str(time.time() + 60.4)})
        assert not stop.local()  # nothing before the first step of the job, whatever the clock says
        stop.after_first_step(say=lambda *a: None)
        assert not stop.local()
        time.sleep(0.6)  # the timer (SIGALRM) fires at the end time less the margin
        assert stop.local() and "end time" in stop.received and "stop_margin_s (60 s)" in stop.received
        said = []
        late = StopPolicy(5, 60, {"SLURM_JOB_END_TIME": str(time.time() + 10)})
        late.after_first_step(say=said.append)  # already within the margin: stops after this first step
        assert late.local() and "within train.stop_margin_s" in said[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_status_at_a_glance(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue, no sacct: the run dir's own records
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "manifest.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "recipe.yaml").write_text("train:\n  max_steps: 10\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 2, "loss": 5.0, "tokens": 512, "tokens_per_s": 256.0},
        {"step": 4, "loss": 4.5, "tokens": 1024, "tokens_per_s": 256.0, "val_loss": 4.75}]))
    jobs.record(run, "submitted", job="17", kind="train")
    jobs.record(run, "start", job="17", restart=0, step=None)
    jobs.record(run, "end", job="17", restart=0, exit=1, step=4, outcome="failed", action="give-up",
                message="giving up: 3 attempts in a row failed (last: recur train exited 1)")
    (run / "eval" / "step_00000004").mkdir(parents=True)
    (run / "eval" / "step_00000004" / "results_1.json").write_text(json.dumps(
        {"results": {"cats": {"alias": "cats", "acc,none": 0.5, "acc_stderr,none": 0.1, "perplexity,none": 12.5}}}))
    text = jobs.status_text(run)
    assert "17 train: ended (failed, exit 1); 1 start(s)" in text
    assert "GAVE UP: giving up: 3 attempts in a row failed" in text
    assert "progress: step 4 of 10 (40.0%), loss 4.5000, val_loss 4.7500, 256 tokens/s, 1,024 tokens, ETA 00:00:06" in text
    assert "checkpoints: step_00000004 (latest)" in text
    assert "| checkpoint | cats/acc | cats/perplexity |" in text and "| step_00000004 | 0.5000 | 12.5000 |" in text


# ----------------------------------------------------------------------------------------- Hub tokenizers

HUB_SCRIPT = """
import sys
from recur.data import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
print("loaded", len(tokenizer), tokenizer.eos_token)
"""


@pytest.mark.slow  # subprocesses importing transformers, a loopback Hub
def test_a_hub_tokenizer_is_fetched_once_then_read_from_the_cache(tmp_path):
    from fake_hub import FakeHub

    from recur.data.tokenizer import byte_tokenizer

    saved = tmp_path / "tok"
    byte_tokenizer().save_pretrained(saved)
    hub = FakeHub().start()
    try:
        hub.branches["org/tok"] = {}
        hub.commit("org/tok", "main", {p.name: p.read_bytes() for p in saved.iterdir()}, "tokenizer")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
        ranks = [subprocess.Popen([sys.executable, "-c", HUB_SCRIPT, "org/tok"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]  # two ranks at once
        for rank in ranks:
            out, err = rank.communicate(timeout=300)
            assert rank.returncode == 0 and "loaded 259 </s>" in out, err[-2000:]
        fetched = [path for method, path in hub.requests if method == "GET" and path.endswith("/tokenizer.json")]
        assert len(fetched) == 1, hub.requests  # one process fetched it; the other read the cache
        before = len(hub.requests)
        offline = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "org/tok"], env={**env, "HF_HUB_OFFLINE": "1"},
                                 capture_output=True, text=True, timeout=300)
        assert offline.returncode == 0 and "loaded 259" in offline.stdout and len(hub.requests) == before
    finally:
        hub.stop()
    # not cached and offline: `recur train --check` checks the rest and says in one line what would be fetched
    result = recur_cli("train", "mamba2-340m", "--check", f"run_dir={tmp_path / 'run'}",
                       "data.sources=[builtin:python-docs]", env={"HF_HOME": str(tmp_path / "empty")})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer 'EleutherAI/gpt-neox-20b' would be fetched from the Hub" in lines[0], lines
    assert "tokenizer: EleutherAI/gpt-neox-20b" in result.stdout
    # ...and a real run cannot start: one line, exit 2
    line = one_error_line(recur_cli("train", "mamba2-340m", f"run_dir={tmp_path / 'run'}",
                                    "data.sources=[builtin:python-docs]", env={"HF_HOME": str(tmp_path / "empty")}))
    assert "not in the Hugging Face cache" in line and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- stops inside a step

ARGS = ("nproc=1", "train.max_steps=8", "train.save_every=2", "eval_every=4", "eval_batches=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of ARGS (one process)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(run, *ARGS)
    return metrics(run)


def wait_for_file(process, path: Path, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, f"no {path} in {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_a_signal_during_a_long_data_wait_stops_at_once_and_resumes_exactly(reference, tmp_path):
    """The wait for step 5's data (the loader has already given a batch) ends at the signal, not after the
    10 minutes: the loader state from before the step is saved, so the resumed run trains on that batch."""
    run, marker = tmp_path / "run", tmp_path / "paused"
    process = launch(run, *ARGS, faults=["--pause-at", "5", "--marker", str(marker)])
    wait_for_file(process, marker)
    started = time.time()
    process.send_signal(signal.SIGTERM)
    code, out = finish(process)
    assert code == 75 and time.time() - started < 60, out[-3000:]
    assert "stopped by SIGTERM at step 4" in out
    out = train(run, *ARGS, "resume=auto")
    assert "resumed from" in out and "at step 4" in out
    assert same(metrics(run), reference)


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_a_signal_during_evaluation_ends_it_and_the_resumed_run_evaluates_that_step(reference, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "evaluating"
    process = launch(run, *ARGS, faults=["--slow-eval", "4", "--marker", str(marker)])
    wait_for_file(process, marker)
    process.send_signal(signal.SIGUSR1)
    code, out = finish(process)
    assert code == 75 and "stopped by SIGUSR1 at step 4" in out, out[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]  # step 4's line waits for its evaluation
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["pending_record"]["step"] == 4 and "val_loss" not in state["pending_record"]
    train(run, *ARGS, "resume=auto")
    assert same(metrics(run), reference) and "val_loss" in metrics(run)[3]


@pytest.mark.slow  # recur train / DeepSpeed in subprocesses
def test_the_job_end_time_checkpoints_before_it_and_the_run_resumes_exactly(reference, tmp_path):
    """SLURM_JOB_END_TIME less train.stop_margin_s already passed: one step, a checkpoint, exit 75."""
    run = tmp_path / "run"
    env = {"SLURM_JOB_END_TIME": str(int(time.time()) + 30)}
    code, out = finish(launch(run, *ARGS, "train.stop_margin_s=60", env=env))
    assert code == 75 and "stopped by the job's end time" in out and "within train.stop_margin_s" in out, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    train(run, *ARGS, "resume=auto")
    assert same(metrics(run), reference)


# ----------------------------------------------------------------------------------------- a real SLURM cluster

STEPS = 4
TINY = ["gla-tiny", "--gpus-per-node", "0", "--tasks-per-node", "2", f"train.max_steps={STEPS}",
        "train.warmup_steps=1", "train.save_every=2", "train.log_every=1", "train.global_batch=4",
        "train.micro_batch=2", "data.seq_len=64", "eval_every=3", "eval_batches=1", "log.progress=false",
        "log.tensorboard=false", "model.hidden_size=64", "model.intermediate_size=128"]


def submit(cluster, run, *args):
    result = recur_cli("submit", *TINY, f"run_dir={run}", *args, env=cluster.env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def squeue(cluster, job) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True,
                         env={**os.environ, **cluster.env}).stdout.strip()
    return out


def release_when_pending(cluster, job, timeout=120):
    """A requeued job waits ~2 minutes (its BeginTime) before SLURM starts it again: start it now."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if squeue(cluster, job).startswith("PENDING"):
            # slurmd revoked the killed run's credential, with a one-second clock: a new run allocated within the
            # same second is refused as "Job credential revoked" and ends there (SLURM's own 2-minute BeginTime
            # avoids this). Two seconds later is safe.
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env={**os.environ, **cluster.env},
                           capture_output=True)
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job} was not requeued in {timeout} s")


ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")


def wait_until_done(run, timeout=900, cluster=None):
    """Until the run's last job records that it finished; with `cluster`, fails early when no job of the run
    is queued or running for a minute (a job that SLURM ended before its batch script ran records nothing)."""
    deadline, idle_since = time.time() + timeout, None
    while time.time() < deadline:
        ends = [r for r in jobs.read_records(run) if r.get("event") == "end"]
        if ends and ends[-1]["action"] in ("done", "give-up"):
            assert ends[-1]["action"] == "done", ends
            return jobs.read_records(run)
        submitted = [str(r["job"]) for r in jobs.read_records(run) if r.get("event") == "submitted"]
        if cluster is None or any(squeue(cluster, j).startswith(ACTIVE) for j in submitted):
            idle_since = None
        elif idle_since is None:
            idle_since = time.time()
        elif time.time() - idle_since > 60:
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((Path(run) / "logs").glob("*.out")))
    raise TimeoutError(f"the run in {run} did not finish (in {timeout} s, or no job of it left in the queue):\n"
                       f"{jobs.read_records(run)}\n{logs}")


def run_logs(run) -> str:
    """The end of every log of the run, for a failing assertion's message."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((Path(run) / "logs").glob("*.out")))


def wait_for_markers(run, count=2, timeout=600):
    deadline = time.time() + timeout
    while len(list(Path(run).glob("paused-*"))) < count:
        ends = [r for r in jobs.read_records(run) if r.get("event") == "end"]
        assert not ends, ends
        assert time.time() < deadline, "the ranks did not reach the pause"
        time.sleep(0.1)


def paused_template(tmp_path) -> Path:
    """The shipped template, with the ranks started through tests/faults.py: each waits at step 3's data until
    a signal ends the wait (once: a marker per rank)."""
    text = (recur.SLURM_DIR / "train.sbatch").read_text()
    line = '"$PYTHON" -m recur.cli train {{train_args}}'
    assert line in text
    template = tmp_path / "paused.sbatch"
    template.write_text(text.replace(line, f'"$PYTHON" {FAULTS} --pause-at 3 --marker "$RUN_DIR/paused-{{rank}}" '
                                           "-- {{train_args}}"))
    return template


@pytest.fixture(scope="module")
def slurm_reference(cluster, tmp_path_factory):
    """The tiny recipe on 2 CPU tasks, submitted and run to the end without interruption."""
    from slurm_cluster import LOCK
    import fcntl

    run = tmp_path_factory.mktemp("slurm-reference") / "run"
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.time()
        job = submit(cluster, run)
        records = wait_until_done(run, cluster=cluster)
        print(f"reference job {job}: {time.time() - started:.0f} s")
    return run, job, records


@pytest.mark.slow  # real SLURM jobs
def test_submit_runs_the_tiny_recipe_on_two_cpu_tasks(slurm, slurm_reference):
    run, job, records = slurm_reference
    assert [r["event"] for r in records] == ["submitted", "start", "end"] and records[-1]["outcome"] == "finished"
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1)) and "val_loss" in metrics(run)[2]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert {p.name for p in (run / "checkpoints" / f"step_{STEPS:08d}").glob("data_rank*")} == {
        "data_rank00000.pt", "data_rank00001.pt"}  # 2 ranks
    assert (run / "export" / "model.safetensors").exists() and (run / "recipe.yaml").exists()
    assert (run / "slurm" / "recipe.yaml").exists() and (run / "slurm" / "train.sbatch").exists()
    summary = (run / "slurm" / f"env-{job}-0.txt").read_text()
    assert "SLURM_NTASKS=2" in summary and "MASTER_PORT=" in summary
    log = (run / "logs" / f"recur-gla-tiny-{job}.out").read_text()
    assert f"recur: job {job} (restart 0) starts" in log and f"the run finished (step {STEPS})" in log
    rank0 = (run / "logs" / f"recur-gla-tiny-{job}-rank0.out").read_text()
    assert "run: 2 process(es) [slurm]" in rank0 and f"done: step {STEPS}" in rank0
    assert (run / "logs" / f"recur-gla-tiny-{job}-rank1.out").exists()
    status = recur_cli("status", str(run), env=slurm.env)
    assert status.returncode == 0, status.stderr
    assert f"{job} train: ended (finished, exit 0)" in status.stdout
    assert f"progress: step {STEPS} of {STEPS} (100.0%)" in status.stdout
    assert "checkpoints: step_00000002, step_00000004 (latest)" in status.stdout
    # a second submission to a run dir that holds checkpoints, without resume=auto: refused, nothing submitted
    line = one_error_line(recur_cli("submit", *TINY, f"run_dir={run}", env=slurm.env))
    assert "set resume=auto" in line
    # sbatch's own refusal, passed on in one line
    line = one_error_line(recur_cli("submit", *TINY, f"run_dir={run}-x", "--partition", "nope", env=slurm.env))
    assert "sbatch refused the job: " in line and "nothing submitted" in line


@pytest.mark.slow  # real SLURM jobs
def test_the_warning_signal_mid_run_checkpoints_requeues_and_resumes_exactly(slurm, slurm_reference, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, run, "--template", str(paused_template(tmp_path)), "export=false")
    wait_for_markers(run)
    status = recur_cli("status", str(run), env=slurm.env).stdout
    assert f"{job} train: running, " in status and "progress: step 2 of 4 (50.0%)" in status, status
    subprocess.run(["scancel", "--signal=USR1", job], env={**os.environ, **slurm.env}, check=True)
    release_when_pending(slurm, job)
    records = wait_until_done(run, cluster=slurm)
    ends = [r for r in records if r["event"] == "end"]
    assert [(e["exit"], e["outcome"], e["action"]) for e in ends] == [(75, "stopped", "continue"), (0, "finished", "done")], \
        run_logs(run)
    assert "requeued job" in ends[0]["message"]
    port = lambda restart: re.search(r"MASTER_PORT=(\d+)", (run / "slurm" / f"env-{job}-{restart}.txt").read_text())[1]
    assert port(0) != port(1)  # the requeued start does not meet the first start's sockets
    assert same(metrics(run), metrics(slurm_reference[0]))
    rank0 = (run / "logs" / f"recur-gla-tiny-{job}-rank0.out").read_text()
    assert "stopped by SIGUSR1 at step 2" in rank0 and "resumed from" in rank0  # one log, appended to
    log = (run / "logs" / f"recur-gla-tiny-{job}.out").read_text()
    assert "(restart 0) starts" in log and "(restart 1) starts" in log


@pytest.mark.slow  # real SLURM jobs
def test_scontrol_requeue_mid_run_resumes_exactly(slurm, slurm_reference, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, run, "--template", str(paused_template(tmp_path)), "export=false")
    wait_for_markers(run)
    subprocess.run(["scontrol", "requeue", job], env={**os.environ, **slurm.env}, check=True)
    release_when_pending(slurm, job)
    records = wait_until_done(run, cluster=slurm)
    ends = [r for r in records if r["event"] == "end"]
    assert [(e["outcome"], e["action"]) for e in ends] == [("ended by SLURM", "none"), ("finished", "done")]
    assert same(metrics(run), metrics(slurm_reference[0]))
    rank0 = (run / "logs" / f"recur-gla-tiny-{job}-rank0.out").read_text()
    assert "stopped by SIGTERM at step 2" in rank0
    log = (run / "logs" / f"recur-gla-tiny-{job}.out").read_text()
    assert "(restart 0) starts" in log and "(restart 1) starts" in log  # the requeue did not truncate the log


@pytest.mark.slow  # real SLURM jobs
def test_a_job_whose_time_runs_out_continues_in_a_new_job_and_finishes(slurm, slurm_reference, tmp_path):
    """--time 1 (a minute) and train.stop_margin_s 55: each job trains a step, saves before the limit and
    submits its follow-up (--continue dependency); no warning signal, the trainer's own clock does it."""
    run = tmp_path / "run"
    first = submit(slurm, run, "--time", "1", "--signal-before", "0", "--continue", "dependency",
                   "train.stop_margin_s=55", "export=false")
    records = wait_until_done(run, timeout=1200, cluster=slurm)
    starts = [r for r in records if r["event"] == "start"]
    ends = [r for r in records if r["event"] == "end"]
    assert len({s["job"] for s in starts}) >= 2 and starts[0]["job"] == first
    assert all(s["end_time"] for s in starts)  # each job knew its end time
    assert ends[0]["exit"] == 75 and ends[0]["outcome"] == "stopped" and "follow-up job" in ends[0]["message"]
    assert ends[-1]["outcome"] == "finished"
    rank0 = (run / "logs" / f"recur-gla-tiny-{first}-rank0.out").read_text()
    assert "stopped by the job's end time" in rank0
    assert same(metrics(run), metrics(slurm_reference[0]))


CATS = ("task: cats\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {items}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{{{text.split(' ')[:-1]|join(' ')}}}}\"\n"
        "doc_to_target: \"{{{{' '+text.split(' ')[-1]}}}}\"\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")


@pytest.mark.slow  # real SLURM jobs, lm-eval
def test_submit_eval_runs_an_array_over_the_checkpoints_and_status_shows_the_results(slurm, slurm_reference,
                                                                                    tmp_path):
    run = slurm_reference[0]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) + "\n"
                                               for i in range(3)))
    (tasks / "cats.yaml").write_text(CATS.format(items=tasks / "items.jsonl"))
    args = ["submit-eval", str(run), "--tasks", "cats", "--every-checkpoint", "--gpus", "0", "--include-path",
            str(tasks), "--limit", "2"]
    dry = recur_cli(*args, "--dry-run", env=slurm.env)
    assert dry.returncode == 0 and "#SBATCH --array=0-1" in dry.stdout and "TAGS=(step_00000002 step_00000004)" in dry.stdout
    result = recur_cli(*args, env=slurm.env)
    assert result.returncode == 0, result.stderr[-2000:]
    job = re.search(r"submitted job array (\d+)", result.stdout).group(1)
    deadline = time.time() + 900
    while squeue(slurm, job) and time.time() < deadline:
        time.sleep(1)
    for tag in ("step_00000002", "step_00000004"):
        (saved,) = (run / "eval" / tag).glob("results_*.json")
        assert "cats" in json.loads(saved.read_text())["results"]
    status = recur_cli("status", str(run), env=slurm.env)
    assert "| checkpoint | cats/acc |" in status.stdout and "| step_00000004 |" in status.stdout, status.stdout
    again = recur_cli(*args, env=slurm.env)  # every checkpoint has its results: nothing to submit
    assert again.returncode == 0 and "nothing to evaluate" in again.stdout
    line = one_error_line(recur_cli("submit-eval", str(run), "--tasks", "no_such_task_xyz", env=slurm.env))
    assert "unknown task" in line


@pytest.mark.slow  # real SLURM jobs
def test_a_job_that_keeps_failing_is_retried_then_gives_up_saying_so(slurm, tmp_path):
    """A crash at start-up (exit 3 before training): --max-retries 1 means two attempts, then no more."""
    text = (recur.SLURM_DIR / "train.sbatch").read_text()
    template = tmp_path / "crash.sbatch"
    template.write_text(text.replace('"$PYTHON" -m recur.cli train {{train_args}}', '"$PYTHON" -c "raise SystemExit(3)"'))
    run = tmp_path / "run"
    job = submit(slurm, run, "--template", str(template), "--continue", "dependency", "--max-retries", "1")
    deadline = time.time() + 300
    while not [r for r in jobs.read_records(run) if r.get("action") == "give-up"]:
        assert time.time() < deadline, jobs.read_records(run)
        time.sleep(0.5)
    ends = [r for r in jobs.read_records(run) if r["event"] == "end"]
    assert [(e["exit"], e["action"]) for e in ends] == [(3, "retry"), (3, "give-up")]
    assert "2 attempts in a row failed (last: recur train exited 3)" in ends[-1]["message"]
    time.sleep(2)
    assert not squeue(slurm, ends[-1]["job"])  # nothing more was submitted
    log = (run / "logs" / f"recur-gla-tiny-{ends[-1]['job']}.out").read_text()
    assert "giving up: 2 attempts in a row failed" in log
    status = recur_cli("status", str(run), env=slurm.env).stdout
    assert "GAVE UP: giving up: 2 attempts in a row failed" in status and f"{job} train: ended (failed, exit 3)" in status
