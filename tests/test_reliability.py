"""What a run directory and its checkpoints guarantee: one owner at a time, the recipe kept when a
resume does not fit, verified checkpoints with a fallback from a damaged one, and one-line errors
(exit 2, nothing written) for bad run dirs, exports and conversions."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import COMMON, finish, launch, losses, metrics, train, wait_for_step

from recur.train.checkpoint import MANIFEST, Checkpointer, problems_with, published_tags, read_latest

pytestmark = pytest.mark.slow  # real training runs (DeepSpeed in one process)

SHORT = ("nproc=1", "train.max_steps=4", "train.save_every=2", "eval_every=0")


def recur(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if k != "RECUR_RUN_DIR_LOCK"}
    return subprocess.run([sys.executable, "-m", "recur.cli", *args], capture_output=True, text=True,
                          env={**environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A GLA run of 4 steps with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(run, *SHORT)
    return run


def copy_of(run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ----------------------------------------------------------------------------------------- one owner

def test_a_second_run_in_the_same_run_dir_fails_at_once_naming_the_first(tmp_path):
    run = tmp_path / "run"
    first = launch(run, "nproc=1", "train.max_steps=100000", "train.save_every=100000", "eval_every=0")
    try:
        wait_for_step(first, run, 1)
        second = recur("train", *COMMON, f"run_dir={run}", "nproc=1", "resume=auto")
        line = one_error_line(second)
        assert f"pid {first.pid} on host " in line and "in use by another run" in line
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the OS drops the lock with the process
        first.communicate()
    # not stale after a crash: the next run takes the directory over and continues it
    assert recur("train", *COMMON, f"run_dir={run}", "nproc=1", "resume=auto", "train.max_steps=2").returncode == 0


def test_the_lock_covers_the_processes_a_command_starts_for_itself(tmp_path):
    """recur train with nproc=2 holds the lock in the launching process; its torchrun workers are told
    so, and a second command is still refused."""
    from recur.train.rundir import RunDirBusy, RunDirLock

    run = tmp_path / "run"
    first = launch(run, "nproc=2", "train.max_steps=100000", "train.save_every=100000", "eval_every=0")
    try:
        wait_for_step(first, run, 1)
        with pytest.raises(RunDirBusy, match=f"pid {first.pid} on host"):
            RunDirLock(run).acquire()
    finally:
        first.send_signal(signal.SIGTERM)
        assert finish(first)[0] == 75


# ----------------------------------------------------------------------------------------- resume

def test_a_resume_that_does_not_fit_changes_nothing(saved_run, tmp_path):
    run = copy_of(saved_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = recur("train", "hgrn2-tiny", f"run_dir={run}", "resume=auto", "nproc=1", "data.seq_len=128")
    line = one_error_line(result)
    assert "does not fit checkpoint" in line and "model.type (recur_hgrn2 here, recur_gla saved)" in line
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # recipe.yaml, metrics.jsonl and the checkpoints as they were
    result = recur("train", *COMMON, f"run_dir={run}", "resume=auto", "nproc=1", "data.seq_len=64",
                   "model.hidden_size=32")
    line = one_error_line(result)
    assert "model.hidden_size (32 here, 64 saved)" in line and "data.seq_len (64 here, 128 saved)" in line


DAMAGE = {
    "truncated model file": lambda step: _truncate(step / "mp_rank_00_model_states.pt"),
    "empty trainer_state.json": lambda step: (step / "trainer_state.json").write_text(""),
    "missing optimizer file": lambda step: next(step.glob("*optim_states.pt")).unlink(),
    "truncated data state": lambda step: _truncate(step / "data_rank00000.pt"),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_manifest_finds_each_kind_of_damage(saved_run, tmp_path, damage):
    run = copy_of(saved_run, tmp_path)
    root = run / "checkpoints"
    assert published_tags(root) == ["step_00000002", "step_00000004"] and problems_with(root / "step_00000004") == []
    DAMAGE[damage](root / "step_00000004")
    assert problems_with(root / "step_00000004") and problems_with(root / "step_00000002") == []


def test_resume_auto_falls_back_from_a_damaged_latest_and_says_so(saved_run, tmp_path):
    run = copy_of(saved_run, tmp_path)
    DAMAGE["truncated model file"](run / "checkpoints" / "step_00000004")
    out = train(run, *SHORT, "resume=auto", "train.max_steps=6")
    assert "step_00000004 is damaged" in out and "resumed from step_00000002 instead" in out
    records = metrics(run)
    fallback = [r for r in records if r.get("event") == "resume_fallback"]
    assert fallback and fallback[0]["damaged"] == "step_00000004" and fallback[0]["resumed_from"] == "step_00000002"
    # steps 3 and 4 were computed again from step 2: the same losses as a run that never stopped
    reference = tmp_path / "reference"
    train(reference, *SHORT, "train.max_steps=6")
    assert losses(reference) == [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert read_latest(run / "checkpoints") == "step_00000006"


def test_resaving_the_step_latest_names_never_leaves_it_pointing_at_nothing(tmp_path):
    """The save goes to a new folder (step_N-1), `latest` moves, then the superseded folder goes."""
    root = tmp_path / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        (root / tag).mkdir(parents=True)
        (root / tag / MANIFEST).write_text(json.dumps({"step": 4, "files": {}}))
    (root / "latest").write_text("step_00000004")
    tmp = root / ".tmp-step_00000004"
    tmp.mkdir()
    (tmp / MANIFEST).write_text(json.dumps({"step": 4, "files": {}}))
    seen = []
    checkpointer = Checkpointer(root, env=None, keep=3)
    original = checkpointer._point_latest

    def point_latest(tag):  # when `latest` moves, both folders exist: it never names a missing one
        seen.append((read_latest(root), (root / read_latest(root)).is_dir(), (root / tag).is_dir()))
        original(tag)

    checkpointer._point_latest = point_latest
    assert checkpointer._publish(tmp, 4) == "step_00000004-1"
    assert seen == [("step_00000004", True, True)]
    assert read_latest(root) == "step_00000004-1" and published_tags(root) == ["step_00000002", "step_00000004-1"]


# ----------------------------------------------------------------------------------------- one line, nothing written

def test_run_dirs_that_cannot_be_used_are_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")
    for run_dir, words in ((a_file, "is a file"), ("/proc/recur-test/x", "cannot create")):
        line = one_error_line(recur("train", "gla-tiny", f"run_dir={run_dir}", "train.max_steps=2",
                                    "train.warmup_steps=0"))
        assert "run_dir" in line and words in line
    assert a_file.read_text() == "precious"


def test_a_source_without_text_writes_nothing_into_the_run_dir(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    run = tmp_path / "run"
    line = one_error_line(recur("train", "gla-tiny", f"run_dir={run}", "train.max_steps=2", "train.warmup_steps=0",
                                f"data.sources=[{tmp_path / 'empty.txt'}]"))
    assert "empty" in line and not run.exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused_before_anything_starts(value, tmp_path):
    line = one_error_line(recur("train", "gla-tiny", f"run_dir={tmp_path / 'run'}", f"train.lr={value}", "--check"))
    assert line.startswith("error: train.lr: must be a finite number")


def test_export_of_a_damaged_checkpoint_or_to_a_file_is_one_line(saved_run, tmp_path):
    run = copy_of(saved_run, tmp_path)
    DAMAGE["missing optimizer file"](run / "checkpoints" / "step_00000004")
    line = one_error_line(recur("export", str(run), str(tmp_path / "out")))
    assert "step_00000004 is damaged" in line and "newest intact checkpoint is" in line and "step_00000002" in line
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")
    assert "is a file" in one_error_line(recur("export", str(run / "checkpoints" / "step_00000002"), str(a_file)))
    assert a_file.read_text() == "precious"
    (run / "checkpoints" / "latest").write_text("")
    assert "does not name a checkpoint" in one_error_line(recur("export", str(run), str(tmp_path / "out2")))
