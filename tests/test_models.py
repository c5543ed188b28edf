"""Every recur model family as a transformers model: Auto classes, save/load, cached generation,
padding, packed documents, chunked prefill, gradient checkpointing, dtypes, torch.compile."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import recur  # noqa: F401  registers the families

TINY = {
    "recur_gla": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_heads=2, gate_low_rank_dim=8,
                      intermediate_size=96),
    "recur_hgrn2": dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, expand_ratio=16, intermediate_size=96),
    "recur_mamba2": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, d_state=16, headdim=12, ngroups=2,
                         chunk_size=16),
    "recur_rwkv6": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, head_size=32, intermediate_size=128,
                        time_mix_low_rank_dim=8, time_decay_low_rank_dim=8),
    # window 6 < the longer test sequences, so the window cache is exercised
    "recur_griffin": dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, intermediate_size=64,
                          num_attention_heads=4, lru_width=64, attention_window_size=6, logits_soft_cap=30.0),
    "recur_griffin/hawk": dict(model_type="recur_griffin", vocab_size=101, hidden_size=48, num_hidden_layers=2,
                               intermediate_size=64, num_attention_heads=4, block_types=["recurrent"],
                               logits_soft_cap=0.0, embeddings_scale_by_sqrt_dim=False),
    # memory chunk 4, MAC segment 8, window 6: the test sequences cross several of each
    **{f"recur_titans/{variant}": dict(model_type="recur_titans", variant=variant, vocab_size=101, hidden_size=32,
                                       num_hidden_layers=2, num_heads=2, intermediate_size=64, memory_depth=2,
                                       memory_chunk_size=4, segment_len=8, attention_window_size=6,
                                       num_persistent_tokens=2)
       for variant in ("mac", "mag", "mal", "lmm")},
}
FAMILIES = sorted(TINY)


def tiny_model(family, seed=0, **overrides):
    """family: a key of TINY (a model type, or model_type/variant with the type in the entry)."""
    torch.manual_seed(seed)
    settings = {**TINY[family], **overrides}
    config = AutoConfig.for_model(settings.pop("model_type", family), **settings)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random gates, not the zero-ish init: decays and outputs then differ by position, which tests need.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(*shape, seed=1, vocab=101):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_and_save_load_round_trip(family, tmp_path):
    model = tiny_model(family)
    assert type(model).__name__.endswith("ForCausalLM")
    assert model.config.model_type == TINY[family].get("model_type", family)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_and_cache_stays_small(family):
    model = tiny_model(family)
    prompt = ids(2, 7)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False,
                              attention_mask=torch.ones_like(prompt))
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        short = model(prompt[:, :2], use_cache=True).past_key_values
        long = model(prompt, use_cache=True).past_key_values
    size = lambda cache: sum(t.numel() for layer in cache.layers for s in layer.states.values()
                             for t in (s if isinstance(s, tuple) else (s,)))
    assert size(short) == size(long) and long.get_seq_length() == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_what_each_prompt_does_alone(family):
    model = tiny_model(family)
    prompts = [ids(1, 3, seed=2), ids(1, 8, seed=3)]
    batch = torch.stack([torch.cat([torch.zeros(8 - p.shape[1], dtype=torch.long), p[0]]) for p in prompts])
    mask = (torch.arange(8) >= torch.tensor([[5], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        alone = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6, do_sample=False)
        assert torch.equal(together[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_prefill(family):
    model = tiny_model(family)
    x = ids(2, 15)
    with torch.no_grad():
        full = model(x, use_cache=True)
        first = model(x[:, :6], use_cache=True)
        second = model(x[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_documents_one_by_one(family):
    model = tiny_model(family)
    docs = [ids(1, n, seed=10 + n) for n in (5, 11, 1, 8)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, position_ids=positions, labels=packed, use_cache=False)
        alone = [model(d, use_cache=False).logits for d in docs]
    torch.testing.assert_close(out.logits, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    # the loss scores exactly the in-document predictions, as the documents one by one would
    losses = [torch.nn.functional.cross_entropy(l[0, :-1], d[0, 1:], reduction="sum") for l, d in zip(alone, docs)]
    expected = sum(losses) / sum(d.shape[1] - 1 for d in docs)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    # two rows of packed documents: the same as one row each
    rows = torch.cat([packed, packed.flip(1)])
    with torch.no_grad():
        both = model(rows, position_ids=torch.cat([positions, positions.flip(1)]), use_cache=False).logits
    torch.testing.assert_close(both[0], out.logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        x = ids(2, 20)
        model(x, labels=x, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_close_to_fp32(family):
    model = tiny_model(family)
    x = ids(2, 30)
    with torch.no_grad():
        reference = model(x, use_cache=False).logits
        low = model.to(torch.bfloat16)(x, use_cache=False).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_of_the_forward(family):
    model = tiny_model(family)
    x = ids(2, 20)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_layer_model_learns_real_text(family):
    """50 AdamW steps on English text that ships with Python (the reference manual): the loss falls."""
    from recur.data.sources import python_docs

    text = "\n\n".join(python_docs()).encode()
    data = torch.frombuffer(bytearray(text[:200_000]), dtype=torch.uint8).long()
    model = tiny_model(family, vocab_size=256, num_hidden_layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=g)
        batch = torch.stack([data[s:s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"{family}: loss {first:.2f} -> {last:.2f}"
