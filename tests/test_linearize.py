"""recur linearize: Llama-family teachers (built with transformers' own classes: Llama, Mistral, Qwen2
with q/k/v biases, Qwen3 with q/k norms and head_dim != hidden/heads, grouped-query attention) into
recur_liger students. The window alone reproduces the teacher; chunked, step-by-step and cached
decoding agree; the converted folder saves, loads and refuses bad input."""
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from recur.modeling.liger.configuration_liger import METHODS
from recur.modeling.liger.convert import from_teacher

COMMON = dict(vocab_size=113, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
TEACHERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q, k, v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 16, "tie_word_embeddings": True})),
}


def teacher(kind, seed=0):
    torch.manual_seed(seed)
    model = TEACHERS[kind]().eval()
    with torch.no_grad():  # biases and norms away from their init, so dropping one would show
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def ids(*shape, seed=1):
    return torch.randint(0, COMMON["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_the_window_alone_at_least_as_long_as_the_input_is_the_teacher(kind):
    model = teacher(kind)
    student, config = from_teacher(model, method="window-only", window=64)
    c = model.config
    assert (config.head_dim, config.num_key_value_heads) == (getattr(c, "head_dim", None) or 12, 2)
    x = ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(student(x, use_cache=False).logits, model(x).logits, atol=2e-5, rtol=2e-5)
    # the same through liger-gla with its recurrent branch off (window weight 1)
    student, _ = from_teacher(model, method="liger-gla", window=64, window_weight=1.0)
    with torch.no_grad():
        torch.testing.assert_close(student(x, use_cache=False).logits, model(x).logits, atol=2e-5, rtol=2e-5)


def test_the_config_comes_from_the_teacher_never_from_defaults():
    model = teacher("qwen3")
    _, config = from_teacher(model, method="gated-deltanet", window=8, sinks=2, keep_attention_layers=[2])
    c = model.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    assert config.head_dim == 16 != c.hidden_size // c.num_attention_heads and config.qk_norm
    assert config.rope_parameters == c.rope_parameters and config.tie_word_embeddings
    assert [config.layer_kind(i) for i in range(3)] == ["gated-deltanet", "gated-deltanet", "attention"]
    assert config.linearization["teacher"]["model_type"] == "qwen3"
    _, qwen2 = from_teacher(teacher("qwen2"))
    assert (qwen2.qkv_bias, qwen2.o_bias) == (True, False)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_equals_step_by_step_equals_cached_generation(method):
    student, _ = from_teacher(teacher("llama"), method=method, window=5, sinks=2, keep_attention_layers=[1])
    with torch.no_grad():
        for p in student.parameters():  # (gated-deltanet's new beta projection away from zero)
            p.add_(torch.randn_like(p) * 0.02)
    x = ids(2, 23)
    with torch.no_grad():
        full = student(x, use_cache=False).logits
        cache_out = student(x[:, :9], use_cache=True)
        rest = student(x[:, 9:], past_key_values=cache_out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(torch.cat([cache_out.logits, rest], 1), full, atol=1e-5, rtol=1e-5)
        cache = student(x[:, :5], use_cache=True).past_key_values
        steps = [student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(5, 23)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=1e-5)
    prompt = x[:, :12]
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(student.generate(prompt, **kw), student.generate(prompt, use_cache=False, **kw))
    # memory stays constant in the prompt length for the linearized layers
    size = lambda c, layer: sum(t.numel() for s in c.layers[layer].states.values() for t in (s if isinstance(s, tuple) else (s,)))
    with torch.no_grad():
        short, long = student(x[:, :6], use_cache=True).past_key_values, student(x, use_cache=True).past_key_values
    assert size(short, 0) == size(long, 0) and size(short, 2) == size(long, 2)


def test_a_learned_window_weight_starts_at_the_fixed_one_and_trains(tmp_path):
    model = teacher("llama")
    fixed, _ = from_teacher(model, method="liger-gla", window=5, sinks=2, window_weight=0.9, normalize=True)
    learned, _ = from_teacher(model, method="liger-gla", window=5, sinks=2, window_weight=0.9, normalize=True,
                              learn_window_weight=True)
    mix = learned.model.layers[0].self_attn.window_mix
    assert mix.shape == (COMMON["num_attention_heads"],)
    torch.testing.assert_close(torch.sigmoid(mix), torch.full_like(mix, 0.9))
    x = ids(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(learned(x, use_cache=False).logits, fixed(x, use_cache=False).logits)
        mix.copy_(torch.tensor([-3.0, 0.0, 1.0, 4.0]))  # each head its own weight: cached still equals full
        full = learned(x, use_cache=False).logits
        cache_out = learned(x[:, :9], use_cache=True)
        rest = learned(x[:, 9:], past_key_values=cache_out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(torch.cat([cache_out.logits, rest], 1), full, atol=1e-5, rtol=1e-5)
    learned(x, labels=x).loss.backward()
    assert mix.grad is not None and mix.grad.abs().sum() > 0
    learned.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(again.model.layers[0].self_attn.window_mix, mix)
    with torch.no_grad():
        torch.testing.assert_close(again(x, use_cache=False).logits, full)


def test_cli_writes_a_folder_that_loads_and_refuses_bad_input(tmp_path):
    model = teacher("qwen3")
    model.save_pretrained(tmp_path / "teacher")
    from recur.data import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "teacher")
    run = lambda *a: subprocess.run([sys.executable, "-m", "recur.cli", "linearize", *a], capture_output=True,
                                    text=True, timeout=300)
    result = run(str(tmp_path / "teacher"), str(tmp_path / "student"), "--to", "liger-gla", "--window", "16",
                 "--sinks", "2", "--keep-attention-layers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 kept as attention, 2 liger-gla" in result.stdout
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.model_type == "recur_liger" and (tmp_path / "student" / "tokenizer.json").exists()
    x = ids(1, 20)
    reference, _ = from_teacher(model, method="liger-gla", window=16, sinks=2, keep_attention_layers=[0])
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, reference(x).logits)

    def one_line(*args):
        r = run(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
        return lines[0]

    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
                    ).save_pretrained(gpt2)
    assert "'gpt2' model" in one_line(str(gpt2), str(tmp_path / "a"))
    assert "window" in one_line(str(tmp_path / "teacher"), str(tmp_path / "b"), "--window", "0")
    assert "window" in one_line(str(tmp_path / "teacher"), str(tmp_path / "c"), "--window", "100000")
    assert "out of range" in one_line(str(tmp_path / "teacher"), str(tmp_path / "d"), "--keep-attention-layers", "3")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    assert "GGUF" in one_line(str(tmp_path / "junk.gguf"), str(tmp_path / "e"))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_align_objective_matches_each_layer_on_the_teachers_inputs():
    """Attention transfer: zero when the student's window reproduces the teacher (window >= T, no
    recurrence), positive for Liger's mix, packed documents kept apart, gradients only in the student."""
    from types import SimpleNamespace

    from recur.train.objectives import Align

    model = teacher("llama")
    x = ids(2, 24)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two packed documents per row
    batch = {"input_ids": x, "position_ids": positions, "labels": x}
    exact, _ = from_teacher(model, method="window-only", window=64)
    loss, _ = Align(model)(SimpleNamespace(module=exact), batch)
    assert loss.item() < 1e-10
    student, _ = from_teacher(model, method="liger-gla", window=4)
    align = Align(teacher("llama"))  # (a fresh teacher: hooks are per instance)
    loss, _ = align(SimpleNamespace(module=student), batch)
    loss.backward()
    assert loss.item() > 1e-7 and student.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert student.model.embeddings.weight.grad is None  # layers learn on the teacher's inputs alone
    first, _ = align(SimpleNamespace(module=student), {k: v[:, :10] for k, v in batch.items()})
    second, _ = align(SimpleNamespace(module=student), {"input_ids": x[:, 10:], "position_ids": positions[:, 10:],
                                                        "labels": x[:, 10:]})
    torch.testing.assert_close(loss.detach(), (first * 10 + second * 14).detach() / 24, rtol=1e-5, atol=1e-7)


def test_the_linearize_recipes_validate_against_a_real_student(tmp_path):
    from recur import RECIPES_DIR
    from recur.train.recipe import load_recipe

    student, _ = from_teacher(teacher("llama"), method="gated-deltanet")
    student.save_pretrained(tmp_path / "student")
    names = sorted(p.stem for p in (RECIPES_DIR / "linearize").glob("*.yaml") if not p.stem.startswith("_"))
    assert {"liger", "liger-distill", "align", "gated-deltanet"} <= set(names)
    for name in names:
        extra = [f"train.teacher={tmp_path / 'student'}"] if name in ("liger-distill", "align") else []
        recipe = load_recipe(f"linearize/{name}", [f"model.from={tmp_path / 'student'}", "data.tokenizer=byte",
                                                   f"run_dir={tmp_path / 'run'}", *extra])
        assert recipe.model["type"] == "recur_liger" and recipe.train.lora["r"] == 8


@pytest.mark.slow  # two recur train runs (DeepSpeed start-up)
def test_align_then_lora_fine_tuning_through_recur_train(tmp_path):
    """Stage 1 (align) then stage 2 (Liger's LoRA) with the shipped recipes: the losses fall and the
    export is a plain recur_liger folder with the LoRA merged."""
    import json

    from recur.data import byte_tokenizer

    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": 320})).eval()
    big.save_pretrained(tmp_path / "teacher")
    byte_tokenizer().save_pretrained(tmp_path / "teacher")
    from recur.modeling.liger.linearize import linearize

    linearize(str(tmp_path / "teacher"), str(tmp_path / "student"), "liger-gla", window=8)
    common = ["train.max_steps=6", "train.log_every=1", "train.micro_batch=2", "train.global_batch=2",
              "data.seq_len=64", "log.progress=false", "eval_every=0", "train.lr=1.0e-2"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "recur.cli", "train", *a, *common], capture_output=True,
                                    text=True, timeout=600)
    stage1 = run("linearize/align", f"run_dir={tmp_path / 'align'}", f"model.from={tmp_path / 'student'}",
                 f"data.tokenizer={tmp_path / 'student'}", f"train.teacher={tmp_path / 'teacher'}")
    assert stage1.returncode == 0, stage1.stdout[-2000:] + stage1.stderr[-2000:]
    stage2 = run("linearize/liger", f"run_dir={tmp_path / 'lora'}", f"model.from={tmp_path / 'align' / 'export'}",
                 f"data.tokenizer={tmp_path / 'student'}")
    assert stage2.returncode == 0, stage2.stdout[-2000:] + stage2.stderr[-2000:]
    for stage in ("align", "lora"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert losses[-1] < losses[0], (stage, losses)
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    assert export.config.model_type == "recur_liger" and not (tmp_path / "lora" / "export" / "adapter_config.json").exists()
