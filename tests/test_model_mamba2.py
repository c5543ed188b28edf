"""Mamba-2 (recur_mamba2): parity with transformers' Mamba2ForCausalLM (its torch path is the CPU
reference), checkpoint conversion and its refusals, mamba_ssm's init, and a short training run.
The generic behaviour (cache, padding, packing, save/load, compile) is in test_models.py."""
import math

import pytest
import torch
import transformers

from recur.modeling.mamba2 import Mamba2Config, Mamba2ForCausalLM, Mamba2Model, from_transformers

# What recur.modeling does for every family (repeated here so this file does not depend on it; exist_ok).
# Needed: our class shares transformers' name `Mamba2Config`, and an unregistered config would make
# AutoModelForCausalLM build transformers' Mamba2ForCausalLM from it.
transformers.AutoConfig.register(Mamba2Config.model_type, Mamba2Config, exist_ok=True)
transformers.AutoModel.register(Mamba2Config, Mamba2Model, exist_ok=True)
transformers.AutoModelForCausalLM.register(Mamba2Config, Mamba2ForCausalLM, exist_ok=True)

VOCAB = 100  # not a multiple of 16: the converted model must keep the checkpoint's vocabulary as it is


def hf_mamba2(n_groups: int, tie: bool, seed: int = 0):
    """A small random transformers Mamba2ForCausalLM, every config field set (its defaults are Codestral's)."""
    config = transformers.Mamba2Config(
        hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=n_groups, expand=2, conv_kernel=4,
        chunk_size=64, vocab_size=VOCAB, num_hidden_layers=2, use_conv_bias=True, use_bias=False,
        layer_norm_epsilon=1e-5, residual_in_fp32=True, time_step_min=1e-3, time_step_max=0.1,
        time_step_floor=1e-4, time_step_limit=(0.0, float("inf")), tie_word_embeddings=tie,
        norm_before_gate=False, rms_norm=True, hidden_act="silu", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(config).eval()
    # Random parameters, not the near-identity init: strong and weak decays (Δ from 0.02 to 1.3,
    # A in [1, 16]), non-unit norms and D, so every term of the mixer shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):
                p.uniform_(-4, 1)
            elif name.endswith("mixer.D"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


def converted(hf):
    config, state_dict = from_transformers(hf.config, hf.state_dict())
    model = Mamba2ForCausalLM(config).eval()
    model.load_state_dict(state_dict)  # strict: every tensor named and shaped as ours
    return model


@pytest.mark.parametrize("n_groups,tie", [(1, True), (2, False)])
def test_logits_and_greedy_generation_match_transformers(n_groups, tie):
    hf = hf_mamba2(n_groups, tie)
    ours = converted(hf)
    assert ours.config.vocab_size == VOCAB and ours.config.tie_word_embeddings == tie
    for T in (1, 37, 200):  # one token, a partial chunk, several chunks
        x = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected, got = hf(x, use_cache=False).logits, ours(x, use_cache=False).logits
        assert (got - expected).abs().max() <= 1e-4, f"T={T}"
    # transformers' cache (conv window + SSM state, single-step path) against ours
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    expected, got = hf.generate(prompt, **kwargs), ours.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max() for a, b in zip(got.logits, expected.logits)) <= 1e-4


def test_prefill_in_pieces_shorter_than_the_conv_equals_one_prefill():
    """The conv window (d_conv − 1 = 3 inputs) and the SSM state carry over pieces of 2, 1 and 34 tokens."""
    model = converted(hf_mamba2(2, False))
    x = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x, use_cache=True)
        cache, pieces = None, []
        for a, b in ((0, 2), (2, 3), (3, 37)):
            out = model(x[:, a:b], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits, atol=1e-5, rtol=1e-5)
    for got, expected in zip(cache.layers, full.past_key_values.layers):
        assert got.states.keys() == {"conv", "recurrent"} and expected.states["recurrent"].dtype == torch.float32
        torch.testing.assert_close(got.states["recurrent"], expected.states["recurrent"], atol=1e-5, rtol=1e-5)


def test_mamba_ssm_names_and_config_convert_the_same():
    """mamba_ssm's checkpoints name the embedding `backbone.embedding` and use their own config.json."""
    hf = hf_mamba2(1, True)
    c = hf.config
    mamba_ssm_config = dict(
        d_model=c.hidden_size, d_intermediate=0, n_layer=c.num_hidden_layers, vocab_size=VOCAB, rms_norm=True,
        residual_in_fp32=True, pad_vocab_size_multiple=1, tie_embeddings=True,
        ssm_cfg=dict(layer="Mamba2", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand,
                     headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size))
    state_dict = {k.replace("embeddings.", "embedding."): v for k, v in hf.state_dict().items()}
    config, ours = from_transformers(mamba_ssm_config, state_dict)
    _, reference = from_transformers(hf.config, hf.state_dict())
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert (config.num_heads, config.ngroups, config.d_state) == (8, 1, 16)


def test_convert_refuses_missing_extra_and_foreign_tensors():
    hf = hf_mamba2(1, False)
    state_dict = hf.state_dict()
    missing = {k: v for k, v in state_dict.items() if k != "backbone.layers.1.mixer.A_log"}
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): backbone\.layers\.1\.mixer\.A_log"):
        from_transformers(hf.config, missing)
    extra = {**state_dict, "backbone.layers.0.mixer.x_bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\): backbone\.layers\.0\.mixer\.x_bias"):
        from_transformers(hf.config, extra)
    untied = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}  # the config says untied
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        from_transformers(hf.config, untied)
    wrong_shape = {**state_dict, "backbone.layers.0.mixer.D": torch.ones(9)}
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.D \[9\] != \[8\]"):
        from_transformers(hf.config, wrong_shape)
    rwkv = {"blocks.0.att.time_maa_x": torch.zeros(1, 1, 8), "blocks.0.att.key.weight": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match=r"RWKV-6 .*blocks\.0\.att\.time_maa_x"):
        from_transformers(hf.config, rwkv)
    mamba1 = {"backbone.layers.0.mixer.x_proj.weight": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match="Mamba-1"):
        from_transformers(hf.config, mamba1)
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        from_transformers({**hf.config.to_dict(), "model_type": "mamba"}, state_dict)


def test_paper_init_after_from_config():
    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=4, d_state=16, headdim=8)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, Mamba2ForCausalLM) and model.lm_head.weight is model.model.embeddings.weight
    for layer in model.model.layers:
        mixer = layer.mixer
        A, dt = mixer.A_log.exp(), torch.nn.functional.softplus(mixer.dt_bias)
        assert A.min() >= 1 and A.max() <= 16 and A.std() > 1  # U[1, 16], not transformers' arange
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        # kaiming-uniform bound 1/√fan_in, then ÷ √n_layer
        bound = 1 / math.sqrt(config.d_inner) / math.sqrt(config.num_hidden_layers)
        assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.9 * bound
    assert abs(model.model.embeddings.weight.std() - 0.02) < 0.002


@pytest.mark.slow  # trains a model for many steps
def test_tiny_model_learns_english_text():
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).encode("ascii", "ignore")
    data = torch.tensor(list(text[:200_000]), dtype=torch.long)
    torch.manual_seed(0)
    # chunk 32 on CPU: strong decays summed over longer chunks reach float32's denormals, which are slow
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, d_state=16, headdim=16, chunk_size=32)
    assert config.vocab_size == 256
    model = Mamba2ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last) and last < first - 1.2, (first, last)  # ln 256 = 5.5 -> about 2.5
