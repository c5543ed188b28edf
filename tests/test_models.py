"""Every recur model family as a transformers model: Auto classes, save/load, cached generation,
padding, packed documents, chunked prefill, gradient checkpointing, dtypes, torch.compile."""
import collections

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import recur  # noqa: F401  registers the families
from recur.modeling.family import tiny_configs

TINY = tiny_configs()  # every family's declared test configs: id -> (model_type, kwargs)
FAMILIES = sorted(TINY)
# Titans' attention variants take 5-20 s per generation or backward test on 2 CPU cores: in those tests they
# run in the slow tier (LMM, the memory alone, stays in the fast one; test_titans.py checks the memory fast).
SLOW_FAMILIES = ("recur_titans/mac", "recur_titans/mag", "recur_titans/mal")
FAMILIES_SLOW_MARKED = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f for f in FAMILIES]


def tiny_model(family, seed=0, **overrides):
    """family: an id of TINY (`model_type` or `model_type/variant`)."""
    torch.manual_seed(seed)
    model_type, settings = TINY[family]
    config = AutoConfig.for_model(model_type, **{**settings, **overrides})
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
    assert model.config.model_type == TINY[family][0]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_fields_mean_the_same_when_written_and_read(family):
    config = tiny_model(family).config
    again = type(config)(**config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.vocab_size = 97  # set after construction, as resize_token_embeddings does
    assert type(config)(**config.to_dict()).vocab_size == 97


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_after_resize_token_embeddings(family, tmp_path):
    model = tiny_model(family)
    model.resize_token_embeddings(97)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == model.config.vocab_size
    assert loaded.get_input_embeddings().num_embeddings == model.get_input_embeddings().num_embeddings >= 97
    x = ids(2, 9, vocab=97)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_in_bf16_keeps_the_declared_parameters_float32(family, tmp_path):
    """`_keep_in_fp32_modules_strict`: what the trainer checks is what transformers' loading keeps."""
    from recur.modeling.family import fp32_parameter_names

    tiny_model(family).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    keep = set(fp32_parameter_names(loaded))
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if name in keep else torch.bfloat16), name


@pytest.mark.parametrize("family", FAMILIES_SLOW_MARKED)
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


@pytest.mark.parametrize("family", FAMILIES_SLOW_MARKED)
def test_left_padded_batch_generates_what_each_prompt_does_alone(family):
    model = tiny_model(family)
    prompts = [ids(1, 3, seed=2), ids(1, 8, seed=3)]
    batch = torch.stack([torch.cat([torch.zeros(8 - p.shape[1], dtype=torch.long), p[0]]) for p in prompts])
    mask = (torch.arange(8) >= torch.tensor([[5], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        alone = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6, do_sample=False)
        new, expected = together[row, 8:].tolist(), alone[0, p.shape[1]:].tolist()
        # a row that ends early (eos) is padded while the other goes on
        assert new[:len(expected)] == expected and set(new[len(expected):]) <= {0}, (new, expected)


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
def test_training_loss_in_pieces_equals_the_full_logits_loss(family, monkeypatch):
    """In training the loss is taken 7 tokens at a time (never all the logits at once) and no logits come
    back; loss and gradients are those of the whole logits' cross entropy, packed documents included."""
    import recur.modeling.base as base

    model = tiny_model(family)
    monkeypatch.setattr(base, "LOSS_LOGITS", 7 * model.config.vocab_size)
    model.train()
    x = torch.cat([ids(1, 23, seed=3), ids(1, 23, seed=4)])
    positions = torch.cat([torch.arange(9), torch.arange(14)]).unsqueeze(0).repeat(2, 1)
    labels = x.clone()
    labels[1, :5] = -100
    out = model(x, position_ids=positions, labels=labels, use_cache=False)
    assert out.logits is None
    out.loss.backward()
    pieces = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = base.causal_lm_loss(model(x, position_ids=positions, use_cache=False).logits, labels, positions)
    full.backward()
    torch.testing.assert_close(out.loss, full, atol=1e-6, rtol=1e-6)
    assert pieces and all(torch.allclose(p.grad, pieces[n], atol=1e-6, rtol=1e-5)
                          for n, p in model.named_parameters() if p.grad is not None)
    none = torch.full_like(labels, -100)  # nothing scored: 0, not NaN (the trainer multiplies it by 0)
    assert model(x, labels=none, use_cache=False).loss.item() == 0
    # all in one piece: taken directly, the same loss
    monkeypatch.setattr(base, "LOSS_LOGITS", 1000 * model.config.vocab_size)
    one = model(x, position_ids=positions, labels=labels, use_cache=False)
    assert one.logits is None
    torch.testing.assert_close(one.loss, full, atol=1e-6, rtol=1e-6)
    assert model(x, labels=none, use_cache=False).loss.item() == 0


@pytest.mark.parametrize("family", FAMILIES_SLOW_MARKED)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """The trainer's build_model with train.activation_checkpointing on and off, the same weights: with it,
    every block's layers run again during backward and fewer tensors are saved; the gradients are the same."""
    from recur.train.engine import build_model
    from recur.train.recipe import Recipe, TrainConfig

    weights = tiny_model(family)
    x = ids(2, 20)
    grads, saved, rerun = [], [], []
    for checkpointing in (False, True):
        recipe = Recipe(model={"type": weights.config.model_type},
                        train=TrainConfig(activation_checkpointing=checkpointing))
        model = build_model(recipe, weights.config)
        model.load_state_dict(weights.state_dict())
        model.train()
        calls = [collections.Counter() for _ in model.model.layers]  # per block: layer calls in forward, backward
        phase = ["forward"]
        for block, counter in zip(model.model.layers, calls):
            for layer in block.modules():  # (the block's own hooks run outside the checkpoint, its layers' inside)
                if layer is not block:
                    layer.register_forward_pre_hook(lambda *_, counter=counter: counter.update(phase))
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            loss = model(x, labels=x, use_cache=False).loss
        phase[0] = "backward"
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        saved.append(len(packed))
        rerun.append([counter["backward"] for counter in calls])
    assert rerun[0] == [0] * len(rerun[0]) and all(n > 0 for n in rerun[1]), rerun  # recomputed in backward
    assert saved[1] < saved[0], saved
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


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_of_the_forward(family):
    """The whole forward is one graph for every family (no graph break: torch._dynamo.explain counts
    them, and fullgraph=True would refuse one), and the compiled logits equal eager's."""
    model = tiny_model(family)
    x = ids(2, 20)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, use_cache=False)
    where = [f"{r.user_stack[-1].name}: {r.reason.splitlines()[0]}" for r in explanation.break_reasons]
    print(f"\n{family}: {explanation.graph_break_count} graph breaks {sorted(set(where))}")
    assert explanation.graph_break_count == 0, where
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits)


@pytest.mark.slow
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
