"""Titans' neural memory against plain references: a float64 token loop with autograd (the paper's
chunk rule), the gated delta rule (linear memory, η = 0), titans-pytorch with copied weights, and
itself split, decoded token by token and padded. The model-level checks (packing, generation,
save/load, learning) run for every variant in test_models.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from recur.kernels import gated_delta_rule, sliding_window_attention
from recur.modeling.titans import TitansConfig
from recur.modeling.titans.memory import NeuralMemory, memory_scan

ACT = {"gelu": F.gelu, "silu": F.silu}


def reference_memory(weights, k, v, q, lr, eta, alpha, chunk, activation="gelu"):
    """The paper's rule, one token at a time in float64: the gradient of ½‖M(k_t) − v_t‖² at the
    weights of the chunk start (autograd), S = η S − θ ∇, M = (1 − α) M + S, then read M(q_t)."""
    def mlp(ws, x):  # x [B, H, i]; ws [B, H, i, o]
        for n, w in enumerate(ws):
            x = torch.einsum("bhi,bhio->bho", ACT[activation](x) if n else x, w)
        return x

    W = [w.double() for w in weights]
    S = [torch.zeros_like(w) for w in W]
    reads = []
    for t in range(k.shape[1]):
        with torch.enable_grad():
            if t % chunk == 0:
                anchor = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
            loss = 0.5 * (mlp(anchor, k[:, t]) - v[:, t]).pow(2).sum()  # weights are per (b, h): per-row gradients
            grads = torch.autograd.grad(loss, anchor, create_graph=True)
        S = [eta[:, t, :, None, None] * s - lr[:, t, :, None, None] * g for s, g in zip(S, grads)]
        W = [(1 - alpha[:, t, :, None, None]) * w + s for w, s in zip(W, S)]
        reads.append(mlp(W, q[:, t]))
    return (torch.stack(reads, 1) if reads else None), W, S


def random_memory(B=2, T=7, H=2, K=6, depth=2, seed=0, hidden=10):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dims = [K] + [hidden] * (depth - 1) + [K]
    weights = [rand(B, H, i, o) / math.sqrt(i) for i, o in zip(dims, dims[1:])]
    k, q = F.normalize(rand(B, T, H, K), dim=-1), F.normalize(rand(B, T, H, K), dim=-1)
    v = rand(B, T, H, K)
    lr = 0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    eta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    alpha = 0.2 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    return weights, k, v, q, lr, eta, alpha


def ours(weights, k, v, q, lr, eta, alpha, chunk, activation="gelu"):
    zeros = [torch.zeros_like(w) for w in weights]
    return memory_scan(weights, zeros, k, v, q, lr, eta.log(), torch.log1p(-alpha), chunk, activation)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("depth,activation", [(1, "gelu"), (2, "gelu"), (3, "silu")])
def test_chunk_of_one_is_the_token_by_token_update(T, depth, activation):
    inputs = random_memory(T=T, depth=depth)
    reads, W, S = ours(*inputs, chunk=1, activation=activation)
    ref_reads, ref_W, ref_S = reference_memory(*inputs, chunk=1, activation=activation)
    torch.testing.assert_close(reads, ref_reads, atol=1e-10, rtol=1e-10)
    for a, b in zip(W + S, ref_W + ref_S):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_parallel_is_the_papers_chunk_rule(T, chunk, depth):
    inputs = random_memory(T=T, depth=depth, seed=T + chunk)
    reads, W, S = ours(*inputs, chunk=chunk)
    ref_reads, ref_W, ref_S = reference_memory(*inputs, chunk=chunk)
    torch.testing.assert_close(reads, ref_reads, atol=1e-10, rtol=1e-10)
    complete = T // chunk * chunk  # the returned state is the one after the last complete chunk
    _, ref_W, ref_S = reference_memory(inputs[0], *[x[:, :complete] for x in inputs[1:]], chunk=chunk)
    for a, b in zip(W + S, ref_W + ref_S):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_the_backward_matches_autograd_through_the_reference(activation):
    """The hand-written inner backward (activation slopes and their own backward included) is
    differentiated correctly."""
    weights, *rest = random_memory(T=9, depth=2, B=1)
    leaves = [x.requires_grad_() for x in weights + rest]
    weights, rest = leaves[:2], leaves[2:]
    reads, _, _ = ours(weights, *rest, chunk=4, activation=activation)
    ref_reads, _, _ = reference_memory(weights, *rest, chunk=4, activation=activation)
    torch.testing.assert_close(reads, ref_reads, atol=1e-10, rtol=1e-10)
    probe = torch.randn_like(reads)
    for a, b in zip(torch.autograd.grad((reads * probe).sum(), leaves),
                    torch.autograd.grad((ref_reads * probe).sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_linear_memory_without_momentum_is_the_gated_delta_rule():
    """M_t = (1 − α)M − θ kᵀ(kM − v) is gated_delta_rule with decay 1 − α, β = θ/(1 − α), v' = (1 − α)v."""
    weights, k, v, q, lr, _, alpha = random_memory(T=33, depth=1, B=2, H=3, K=8)
    no_eta = torch.full_like(lr, float("-inf"))
    zeros = [torch.zeros_like(weights[0])]
    reads, (W,), _ = memory_scan(weights, zeros, k, v, q, lr, no_eta, torch.log1p(-alpha), 1)
    keep = 1 - alpha
    for impl in ("naive", "chunk"):
        o, state = gated_delta_rule(q, k, v * keep[..., None], lr / keep, keep.log(), scale=1.0,
                                    initial_state=weights[0], output_final_state=True, impl=impl, chunk_size=8)
        err = (reads - o).abs().max().item()
        print(f"gated_delta_rule impl={impl}: max |error| {err:.2e}")
        assert err < 1e-10, err
        torch.testing.assert_close(W, state, atol=1e-10, rtol=1e-10)


def tiny_memory(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(hidden_size=16, num_heads=2, head_dim=6, memory_depth=2, memory_chunk_size=4, memory_max_lr=0.5,
                    memory_conv_size=3)
    memory = NeuralMemory(TitansConfig(**{**settings, **overrides})).double()
    memory.reset_parameters()
    with torch.no_grad():
        for p in memory.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return memory


@pytest.mark.parametrize("momentum", [True, False])
def test_module_split_anywhere_and_decoding_equal_the_full_run(momentum):
    memory = tiny_memory(use_momentum=momentum)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    full, _ = memory(x)
    for cut in (1, 5, 8, 13):
        first, state = memory(x[:, :cut], want_state=True)
        second, _ = memory(x[:, cut:], state=state)
        torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-10, rtol=1e-10)
    state, steps = None, []
    for t in range(x.shape[1]):
        out, state = memory(x[:, t:t + 1], state=state, want_state=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)
    assert all(s.shape[1] == 3 for s in state["pending"])  # b − 1 slots, whatever the length


def test_pads_are_skipped_and_a_padded_row_is_its_document_alone():
    memory = tiny_memory()
    short, long_ = torch.randn(1, 6, 16, dtype=torch.float64), torch.randn(1, 11, 16, dtype=torch.float64)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, 16, dtype=torch.float64), short], 1), long_])
    keep = torch.arange(11) >= torch.tensor([[5], [0]])
    out, state = memory(batch, keep, want_state=True)
    for row, (x, n) in enumerate(((short, 6), (long_, 11))):
        alone, alone_state = memory(x, want_state=True)
        torch.testing.assert_close(out[row, 11 - n:], alone[0], atol=1e-10, rtol=1e-10)
        nxt = torch.randn(1, 3, 16, dtype=torch.float64)  # and both go on the same way
        a, _ = memory(nxt, state=alone_state)
        b, _ = memory(nxt, state={k: tuple(t[row:row + 1] for t in s) if isinstance(s, tuple) else s[row:row + 1]
                                  for k, s in state.items()})
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert (out[0, :5] == 0).all()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 4])
def test_matches_titans_pytorch_neural_memory(depth, chunk):
    """titans-pytorch with per-token gates (chunk_size=1) and the anchor moving every b tokens
    (batch_size=b) is the paper's rule; its loss is mean((M(k) − v)²), so θ is scaled by 2/d, and its
    qk-RMSNorm is √d·(1 + γ) times our L2 normalisation. Conv taps are set to the identity."""
    titans = pytest.importorskip("titans_pytorch")
    from titans_pytorch.memory_models import MemoryMLP

    d, max_lr = 16, 0.3
    torch.manual_seed(0)
    theirs = titans.NeuralMemory(dim=d, chunk_size=1, batch_size=chunk, heads=1, dim_head=d,
                                 model=MemoryMLP(d, depth=depth, expansion_factor=2.0), pre_rmsnorm=False,
                                 qk_rmsnorm=True, activation=torch.nn.SiLU(), mem_model_norm_add_residual=False,
                                 default_step_transform_max_lr=max_lr, momentum=True).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mine = NeuralMemory(TitansConfig(hidden_size=d, num_heads=1, head_dim=d, memory_depth=depth,
                                     memory_expansion=2.0, memory_chunk_size=chunk, memory_max_lr=max_lr * 2 / d,
                                     memory_conv_size=4)).double()
    with torch.no_grad():
        for ours_lin, their_lin in ((mine.q_proj, theirs.to_queries[0]), (mine.k_proj, theirs.to_keys[0]),
                                    (mine.v_proj, theirs.to_values[0]), (mine.lr_proj, theirs.to_adaptive_step[0]),
                                    (mine.momentum_proj, theirs.to_momentum[0]),
                                    (mine.decay_proj, theirs.to_decay_factor[0])):
            ours_lin.weight.copy_(their_lin.weight)
            if ours_lin.bias is not None:
                ours_lin.bias.copy_(their_lin.bias)
        for conv in (mine.q_conv, mine.k_conv, mine.v_conv):
            conv.conv.weight.zero_()
            conv.conv.weight[..., -1] = 1.0
        mine.q_norm_weight.copy_(d ** 0.5 * (1 + theirs.q_norm.gamma.flatten()))
        mine.k_norm_weight.copy_(d ** 0.5 * (1 + theirs.k_norm.gamma.flatten()))
        for w, their_w in zip(mine.initial_weights, theirs.memory_model_parameters):
            w.copy_(their_w)
    x = torch.randn(2, 21, d, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = theirs(x)
        reads, _ = mine.retrieve(x)
    err = (reads.flatten(-2) - expected).abs().max().item()
    print(f"titans-pytorch depth {depth} chunk {chunk}: max |error| {err:.2e}")
    assert err < 1e-10, err


@pytest.mark.parametrize("T,window", [(1, 4), (7, 4), (33, 8), (5, 16)])
def test_window_attention_is_the_kernels_window_plus_persistent_keys(T, window):
    from recur.modeling.titans.attention import window_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, T, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(2, T, dtype=torch.bool)
    none = torch.zeros(0, 3, 8, dtype=torch.float64)
    cut = T // 2  # chained through the window cache
    first, cache = window_attention(q[:, :cut], k[:, :cut], v[:, :cut], valid[:, :cut], window, none, none)
    second, _ = window_attention(q[:, cut:], k[:, cut:], v[:, cut:], valid[:, cut:], window, none, none, cache)
    expected, _ = sliding_window_attention(q, k, v, window, impl="naive")
    torch.testing.assert_close(torch.cat([first, second], 1), expected, atol=1e-12, rtol=1e-12)
    # persistent keys: one softmax over them and the window
    pk, pv = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, _ = window_attention(q, k, v, valid, window, pk, pv)
    scores = torch.einsum("bthk,phk->bthp", q, pk) * 8 ** -0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    local = torch.einsum("bthk,bshk->bths", q, k).mul(8 ** -0.5).masked_fill(~((j <= i) & (j > i - window))[:, None], -torch.inf)
    probs = torch.cat([scores, local], -1).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("bthp,phv->bthv", probs[..., :2], pv)
                               + torch.einsum("bths,bshv->bthv", probs[..., 2:], v), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_state_after_the_last_token_of_ragged_rows(depth):
    """memory_scan's `current`: (weights, momentum) after each row's last real token, inside an open
    chunk or at a chunk's end, which decoding steps on from."""
    weights, k, v, q, lr, eta, alpha = random_memory(B=3, T=13, depth=depth, seed=5)
    zeros = [torch.zeros_like(w) for w in weights]
    lengths = torch.tensor([13, 6, 8])
    *_, (now_w, now_s) = memory_scan(weights, zeros, k, v, q, lr, eta.log(), torch.log1p(-alpha), 4,
                                     lengths=lengths, current=True)
    for row, n in enumerate(lengths.tolist()):
        one = lambda t: t[row:row + 1, :n]  # noqa: E731
        _, ref_w, ref_s = reference_memory([w[row:row + 1] for w in weights], *map(one, (k, v, q, lr, eta, alpha)), 4)
        for a, b in zip(now_w + now_s, ref_w + ref_s):
            torch.testing.assert_close(a[row:row + 1], b, atol=1e-10, rtol=1e-10)


def tiny_left_padded(variant):
    """A float64 two-layer model (memory chunk 4, MAC segment 8, window 6) and a batch of 2 × 30 token
    ids whose first row is left-padded by 3, so the rows sit at different places in chunks and segments."""
    from recur.modeling.titans import TitansForCausalLM

    torch.manual_seed(0)
    config = TitansConfig(variant=variant, vocab_size=101, hidden_size=32, num_hidden_layers=2, num_heads=2,
                          intermediate_size=64, memory_depth=2, memory_chunk_size=4, segment_len=8,
                          attention_window_size=6, num_persistent_tokens=2)
    model = TitansForCausalLM(config).double().eval()
    x = torch.randint(0, 101, (2, 30))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    return model, x, mask


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_decoding_steps_and_chunks_in_any_mix_equal_the_full_run(variant, monkeypatch):
    """One-token steps (the cached keys/values and the memory's own recurrence) mixed with chunked
    prefill, on a left-padded batch whose rows sit at different places in their segments and chunks,
    give the full run's logits (float64); the single-token paths are really taken."""
    from recur.modeling.titans import memory as memory_module
    from recur.modeling.titans import modeling_titans

    steps = []
    for cls in (memory_module.NeuralMemory, modeling_titans.MemoryAsContext):
        original = cls.step
        monkeypatch.setattr(cls, "step", lambda self, *a, _f=original, **k: steps.append(1) or _f(self, *a, **k))
    model, x, mask = tiny_left_padded(variant)
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        alone = model(x[:1, 3:]).logits
        cache, outs, at = None, [], 0
        for n in [5, 1, 1, 1, 1, 1, 1, 7, 1, 1, 9, 1]:
            out = model(x[:, at:at + n], attention_mask=mask[:, :at + n], past_key_values=cache, use_cache=True)
            cache, at = out.past_key_values, at + n
            outs.append(out.logits)
    pieces = torch.cat(outs, 1)
    torch.testing.assert_close(pieces[1], full[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(pieces[0, 3:], full[0, 3:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(full[0, 3:], alone[0], atol=1e-10, rtol=1e-10)
    assert len(steps) == 9 * 2 * (2 if variant == "mac" else 1)  # 9 one-token calls, 2 layers


def test_the_compiled_decoding_step_is_the_eager_one(monkeypatch):
    """compile_decode_step runs each layer's one-token step through torch.compile and settles closed
    chunks and segments outside it: the logits of steps and chunks in any mix, on a left-padded batch
    crossing chunk and segment boundaries, are the eager ones (float64; RoPE's angles are float32, as
    in transformers, and the compiled code rounds them differently: 5e-10 here, 1e-15 with float64
    angles), and the compiled path is taken. MAC only: compiling costs 10-40 s per variant."""
    variant = "mac"
    from recur.modeling.titans import modeling_titans

    calls = []
    compiled = modeling_titans._compiled_run
    monkeypatch.setattr(modeling_titans, "_compiled_run", lambda: calls.append(1) or compiled())
    model, x, mask = tiny_left_padded(variant)
    logits = {}
    for flag in (False, True):
        model.config.compile_decode_step = flag
        with torch.no_grad():
            cache, outs, at = None, [], 0
            for n in [5] + [1] * 12 + [7] + [1] * 6:
                out = model(x[:, at:at + n], attention_mask=mask[:, :at + n], past_key_values=cache, use_cache=True)
                cache, at = out.past_key_values, at + n
                outs.append(out.logits)
        logits[flag] = torch.cat(outs, 1)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-8, rtol=1e-8)
    assert len(calls) == 18 * 2  # 18 one-token calls, 2 layers
