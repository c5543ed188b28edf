"""RWKV-6: parity with BlinkDL's own `rwkv` package (ChatRWKV, RNN mode, fp32 on CPU), checkpoint
conversion from both public layouts, and a tiny model that learns from real text."""
import contextlib
import os
import re

import pytest
import torch

from recur.modeling.rwkv6 import RWKV6Config, RWKV6ForCausalLM, from_blinkdl, from_hf

C, HEAD, LAYERS, VOCAB, FFN, MIX_RANK, DECAY_RANK = 128, 64, 2, 97, 448, 32, 64


def blinkdl_state_dict(seed=0):
    """Random weights in BlinkDL's `.pth` names and shapes, in the ranges trained models have."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s, std=1.0: torch.randn(*s, generator=g) * std
    rand = lambda *s, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g)
    sd = {"emb.weight": randn(VOCAB, C), "ln_out.weight": 1 + randn(C, std=0.1), "ln_out.bias": randn(C, std=0.1),
          "head.weight": randn(VOCAB, C, std=C**-0.5)}
    for i in range(LAYERS):
        b = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + randn(C, std=0.1), randn(C, std=0.1)
        for name in ("x", "w", "k", "v", "r", "g"):
            sd[f"{b}att.time_maa_{name}"] = rand(1, 1, C)
        sd[f"{b}att.time_maa_w1"] = randn(C, 5 * MIX_RANK, std=0.1)
        sd[f"{b}att.time_maa_w2"] = randn(5, MIX_RANK, C, std=0.1)
        sd[f"{b}att.time_decay"] = rand(1, 1, C, lo=-6.0, hi=0.5)  # decays from 0.9975 to 0.19
        sd[f"{b}att.time_decay_w1"] = randn(C, DECAY_RANK, std=0.1)
        sd[f"{b}att.time_decay_w2"] = randn(DECAY_RANK, C, std=0.1)
        sd[f"{b}att.time_faaaa"] = randn(C // HEAD, HEAD, std=0.3)
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[f"{b}att.{name}.weight"] = randn(C, C, std=C**-0.5)
        sd[f"{b}att.ln_x.weight"], sd[f"{b}att.ln_x.bias"] = 1 + randn(C, std=0.1), randn(C, std=0.1)
        sd[f"{b}ffn.time_maa_k"], sd[f"{b}ffn.time_maa_r"] = rand(1, 1, C), rand(1, 1, C)
        sd[f"{b}ffn.key.weight"] = randn(FFN, C, std=C**-0.5)
        sd[f"{b}ffn.receptance.weight"] = randn(C, C, std=C**-0.5)
        sd[f"{b}ffn.value.weight"] = randn(C, FFN, std=FFN**-0.5)
    return sd


def hf_state_dict(blinkdl: dict) -> dict:
    """The same weights under `RWKV/v6-Finch-*-HF`'s names."""
    rename = [(r"^emb\.", "rwkv.embeddings."), (r"^blocks\.(\d+)\.ln0\.", r"rwkv.blocks.\1.pre_ln."),
              (r"^blocks\.(\d+)\.att\.", r"rwkv.blocks.\1.attention."),
              (r"^blocks\.(\d+)\.ffn\.", r"rwkv.blocks.\1.feed_forward."), (r"^blocks\.", "rwkv.blocks."),
              (r"^ln_out\.", "rwkv.ln_out.")]
    out = {}
    for key, value in blinkdl.items():
        for pattern, replacement in rename:
            key, hit = re.subn(pattern, replacement, key)
            if hit:
                break
        out[key] = value
    return out


HF_CONFIG = dict(model_type="rwkv6", attention_hidden_size=C, head_size=HEAD, head_size_divisor=8, hidden_size=C,
                 intermediate_size=None, layer_norm_epsilon=1e-5, num_hidden_layers=LAYERS, rescale_every=6,
                 tie_word_embeddings=False, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)


def load(config, state_dict):
    model = RWKV6ForCausalLM(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@contextlib.contextmanager
def rwkv_package_environment():
    """The `rwkv` package reads its switches at import and turns on TF32 globally: confine both."""
    saved_env = {k: os.environ.get(k) for k in ("RWKV_JIT_ON", "RWKV_CUDA_ON")}
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.backends.cudnn.benchmark)
    os.environ.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved_tf32
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def reference_logits(state_dict, tokens, path):
    """BlinkDL's `rwkv` package in RNN mode, one token at a time: [T, vocab] float32."""
    with rwkv_package_environment():
        rwkv_model = pytest.importorskip("rwkv.model")
        torch.save(state_dict, path)
        model = rwkv_model.RWKV(model=str(path), strategy="cpu fp32", verbose=False)
        assert model.version == 6.0
        state, logits = None, []
        for token in tokens:
            out, state = model.forward([token], state)
            logits.append(out.float())
    return torch.stack(logits)


@pytest.fixture(scope="module")
def weights():
    return blinkdl_state_dict()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (130,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def reference(weights, tokens, tmp_path_factory):
    return reference_logits({k: v.clone() for k, v in weights.items()}, tokens,
                            tmp_path_factory.mktemp("rwkv6") / "RWKV-x060-tiny.pth")


@pytest.mark.slow  # the `reference` fixture runs BlinkDL's package token by token, ~25 s
@pytest.mark.parametrize("T", [1, 40, 130])
def test_logits_match_blinkdl_rwkv_package(weights, tokens, reference, T):
    config, converted = from_blinkdl(weights)
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads, config.intermediate_size) == \
        (C, LAYERS, C // HEAD, FFN)
    model = load(config, converted)
    with torch.no_grad():
        ours = model(torch.tensor([tokens[:T]]), use_cache=False).logits[0]
    assert (ours - reference[:T]).abs().max() <= 1e-4


@pytest.mark.slow  # the `reference` fixture, ~25 s
def test_decoding_token_by_token_matches_blinkdl_rwkv_package(weights, tokens, reference):
    model = load(*from_blinkdl(weights))
    cache, logits = None, []
    steps = [tokens[:8], tokens[8:16]] + [[t] for t in tokens[16:40]]  # chunked prefill, then decoding
    with torch.no_grad():
        for step in steps:
            out = model(torch.tensor([step]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0])
    assert (torch.cat(logits) - reference[:40]).abs().max() <= 1e-4


def test_pads_anywhere_leave_every_state_untouched(weights, tokens):
    """A run of pads inside the prompt and another at its end: the wkv and both token-shift states skip them."""
    model = load(*from_blinkdl(weights))
    x = torch.tensor([tokens[:20]])
    pads = lambda n: torch.zeros(1, n, dtype=torch.long)
    padded = torch.cat([x[:, :7], pads(3), x[:, 7:12], pads(2)], 1)
    mask = torch.ones_like(padded)
    mask[:, 7:10] = mask[:, 15:] = 0
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(padded, attention_mask=mask, use_cache=True)
        rest = model(x[:, 12:], attention_mask=torch.cat([mask, torch.ones(1, 8, dtype=torch.long)], 1),
                     past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(out.logits[0, mask[0].bool()], full[0, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[:, 12:], atol=1e-5, rtol=1e-5)


def test_hf_layout_gives_the_same_model(weights, tokens):
    config, converted = from_hf(HF_CONFIG, hf_state_dict(weights))
    reference_config, reference_weights = from_blinkdl(weights)
    assert config.to_dict() == reference_config.to_dict()
    x = torch.tensor([tokens[:40]])
    with torch.no_grad():
        assert torch.equal(load(config, converted)(x).logits, load(reference_config, reference_weights)(x).logits)


def test_conversion_refuses_missing_and_unexpected_tensors(weights):
    incomplete = {k: v for k, v in weights.items() if k != "blocks.1.att.time_decay_w2"}
    with pytest.raises(ValueError, match=r"missing blocks\.1\.att\.time_decay_w2"):
        from_blinkdl(incomplete)
    with pytest.raises(ValueError, match=r"unexpected blocks\.0\.att\.time_state"):
        from_blinkdl({**weights, "blocks.0.att.time_state": torch.zeros(2, 64, 64)})
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.key\.weight has shape \[480, 128\], expected \[448, 128\]"):
        from_blinkdl({**weights, "blocks.1.ffn.key.weight": torch.zeros(FFN + 32, C)})
    with pytest.raises(ValueError, match=r"blocks\.0\.att\.time_faaaa has shape \[128\], expected \[heads, "):
        from_blinkdl({**weights, "blocks.0.att.time_faaaa": torch.zeros(C)})
    hf = hf_state_dict(weights)
    del hf["rwkv.blocks.0.pre_ln.bias"]
    with pytest.raises(ValueError, match=r"missing rwkv\.blocks\.0\.pre_ln\.bias"):
        from_hf(HF_CONFIG, hf)
    with pytest.raises(ValueError, match=r"config hidden_size = 256 but the tensors give 128"):
        from_hf({**HF_CONFIG, "hidden_size": 256}, hf_state_dict(weights))


def test_conversion_refuses_other_families_and_the_other_layout(weights):
    mamba2 = {"backbone.embeddings.weight": torch.zeros(VOCAB, C), "backbone.layers.0.mixer.A_log": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"not a RWKV-6 checkpoint .* looks like Mamba-2"):
        from_blinkdl(mamba2)
    rwkv5 = {k.replace("time_maa", "time_mix"): v for k, v in weights.items()}
    with pytest.raises(ValueError, match=r"not a RWKV-6 checkpoint .* looks like RWKV \(v4/v5\)"):
        from_blinkdl(rwkv5)
    with pytest.raises(ValueError, match=r"unexpected backbone\.layers\.0\.mixer\.A_log"):
        from_blinkdl({**weights, "backbone.layers.0.mixer.A_log": torch.zeros(4)})
    with pytest.raises(ValueError, match="use from_blinkdl"):
        from_hf(HF_CONFIG, weights)
    with pytest.raises(ValueError, match="use from_hf"):
        from_blinkdl(hf_state_dict(weights))


@pytest.mark.slow  # trains a model for many steps
def test_tiny_model_learns_english_text():
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics.values()).encode("utf-8")[:200_000]))
    torch.manual_seed(0)
    config = RWKV6Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, head_size=32, intermediate_size=128,
                         time_mix_low_rank_dim=16, time_decay_low_rank_dim=16)
    model = RWKV6ForCausalLM(config).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch, length, losses = 8, 64, []
    for _ in range(50):
        starts = torch.randint(0, len(data) - length, (batch,))
        x = torch.stack([data[s:s + length] for s in starts.tolist()])
        loss = model(x, labels=x, use_cache=False).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    last = sum(losses[-5:]) / 5
    assert losses[0] > 5.0 and last < losses[0] - 2.0, (losses[0], last)  # from ≈ ln 256 to well below
