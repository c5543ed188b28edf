"""recur bench train: every model of the lineup builds and steps; ratios pair each recur model with its
peer and with Llama in the same run; a too-slow model is timed once and skipped at longer lengths."""
import json

import pytest

from recur.eval import bench_train
from recur.eval.harness import EvalError


def run(capsys, *args):
    assert bench_train.main([*args, "--width", "64", "--layers", "1", "--vocab", "64", "--steps", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_train_pairs_each_model_with_llama_and_its_peer(capsys):
    out = run(capsys, "--shapes", "1x64,2x32", "--models", "llama,mamba2-hf,recur_mamba2,recur_gla")
    rows = {(r["model"], r["batch"], r["seq_len"]): r for r in out["rows"]}
    assert len(rows) == 8 and out["matmul_peak_flops"] > 0
    for (model, b, t), r in rows.items():
        assert r["tokens_per_s"] > 0 and r["peak_mb"] >= 0 and not r["over_step_limit"]
        if model != "llama":
            assert r["vs_llama"] == pytest.approx(r["tokens_per_s"] / rows["llama", b, t]["tokens_per_s"])
    m = rows["recur_mamba2", 1, 64]
    assert m["vs_peer"] == pytest.approx(m["tokens_per_s"] / rows["mamba2-hf", 1, 64]["tokens_per_s"])
    assert m["mfu"] > 0 and rows["mamba2-hf", 1, 64]["mfu"] is None and rows["recur_gla", 1, 64]["vs_peer"] is None


def test_every_model_of_the_lineup_takes_a_step(capsys):
    names = list(bench_train.builders(64, 1, 64, 64))
    out = run(capsys, "--shapes", "1x64", "--models", ",".join(names))
    assert [r["model"] for r in out["rows"]] == names and all(r["tokens_per_s"] > 0 for r in out["rows"])


def test_a_model_over_the_step_limit_is_timed_once_and_skipped_after(capsys):
    """Its first step (which also measures memory, and is slower) took over the limit: one timed step after it."""
    out = run(capsys, "--shapes", "1x32,1x64", "--models", "recur_gla", "--max-step-seconds", "0")
    first, second = out["rows"]
    assert first["over_step_limit"] and "skipped" in second
    table = bench_train.format_table(out["rows"])
    assert "(1 step)" in table and "skipped" in table


def test_full_logits_too_times_each_recur_model_with_and_without_chunked_cross_entropy(capsys):
    out = run(capsys, "--shapes", "1x64", "--models", "llama,recur_gla", "--full-logits-too")
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows) == ["llama", "recur_gla", "recur_gla (full logits)"]  # the peers have no chunked loss
    gla, full = rows["recur_gla"], rows["recur_gla (full logits)"]
    assert full["tokens_per_s"] > 0 and "memory_vs_full_logits" in gla
    if full["peak_mb"]:  # (a tiny model's step may not grow resident memory at all)
        assert gla["memory_vs_full_logits"] == pytest.approx(gla["peak_mb"] / full["peak_mb"])
        assert "of full logits" in bench_train.format_table(out["rows"])


def test_bad_shapes_and_names_are_one_line_errors():
    with pytest.raises(EvalError, match="BxT"):
        bench_train.main(["--shapes", "2by3"])
    with pytest.raises(EvalError, match="unknown nope"):
        bench_train.main(["--models", "nope"])


def test_bench_decode_runs_lineup_models_at_several_batch_sizes(capsys):
    from recur.eval import bench_decode

    assert bench_decode.main(["llama", "recur_gla", "--prompts", "8,16", "--new-tokens", "2", "--batch", "1,2",
                              "--width", "64", "--layers", "1", "--vocab", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["batch"], r["prompt"]) for r in rows] == [
        (m, b, p) for m in ("llama", "recur_gla") for b in (1, 2) for p in (8, 16)]
    gla = [r for r in rows if r["model"] == "recur_gla"]
    assert len({r["cache_mb"] for r in gla if r["batch"] == 1}) == 1  # constant in the prompt length
    llama = [r for r in rows if r["model"] == "llama" and r["batch"] == 1]
    assert llama[1]["cache_mb"] > llama[0]["cache_mb"]
    assert all(r["warmup_s"] >= 0 for r in rows)


def test_bench_decode_compiles_only_the_models_that_offer_a_compiled_step(capsys):
    from recur.eval import bench_decode

    assert bench_decode.main(["llama", "recur_gla", "--prompts", "8", "--new-tokens", "1", "--compile-step",
                              "--width", "64", "--layers", "1", "--vocab", "64", "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == ["llama", "recur_gla"]


def test_a_model_whose_step_would_pass_the_limit_at_a_longer_length_is_skipped(capsys):
    out = run(capsys, "--shapes", "1x32,1x4096", "--models", "recur_gla", "--max-step-seconds", "0.01")
    first, second = out["rows"]
    if not first["over_step_limit"]:  # the short step fit in the limit: the long one is predicted not to
        assert second["skipped"] == "a step would take over 0.01 s"


def test_a_model_too_large_for_the_machine_fails_with_out_of_memory_not_a_kill():
    import torch

    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    with bench_train.memory_limit(torch.device("cpu")):
        with pytest.raises((torch.OutOfMemoryError, MemoryError, RuntimeError)) as error:
            torch.ones(total // 4, dtype=torch.float32)
    assert bench_train.out_of_memory(error.value) and not bench_train.out_of_memory(RuntimeError("shape mismatch"))
    torch.ones(1 << 20)  # the limit is lifted afterwards
    row = {}
    with bench_train.memory_limit(torch.device("cpu")), bench_train.skipped_when_out_of_memory(row):
        torch.ones(total // 4, dtype=torch.float32)
    assert row == {"skipped": "out of memory"}
    with pytest.raises(RuntimeError, match="shape mismatch"), bench_train.skipped_when_out_of_memory(row):
        raise RuntimeError("shape mismatch")
