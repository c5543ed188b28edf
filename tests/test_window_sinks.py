"""sliding_window_attention with attention sinks and a key mask, against a dense float64 oracle:
the chunk and loop paths, segments chained through the state, single steps, packed sequences and
gradients, on ragged shapes."""
import itertools

import pytest
import torch

from recur.kernels import sliding_window_attention, sliding_window_attention_step


def dense(q, k, v, window, sinks, valid, scale):
    """Query t sees key j <= t when j is valid and inside the window (j > t - window) or among the
    sequence's first `sinks` valid keys, counted once; a padding query sees only itself."""
    B, T, H, K = q.shape
    group = H // k.shape[2]
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        first = [j for j in range(T) if valid[b, j]][:sinks]
        for t in range(T):
            seen = [j for j in range(t + 1) if j == t and not valid[b, t] or
                    valid[b, j] and (j > t - window or j in first)]
            for h in range(H):
                scores = torch.stack([q[b, t, h] @ k[b, j, h // group] for j in seen]) * scale
                out[b, t, h] = (scores.softmax(0).unsqueeze(1) * v[b, seen, h // group]).sum(0)
    return out


def inputs(B=2, T=23, H=4, Hk=2, K=8, V=6, pads=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, dtype=torch.float64, generator=g) for h, d in ((H, K), (Hk, K), (Hk, V)))
    valid = torch.ones(B, T, dtype=torch.bool)
    if pads:  # left padding in row 0, holes in row 1
        valid[0, :5] = False
        valid[1, [7, 12, 13]] = False
    return q, k, v, valid


@pytest.mark.parametrize("window, sinks, pads", list(itertools.product([1, 4, 30], [0, 1, 3], [False, True])))
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_matches_the_dense_oracle_whole_split_and_stepped(window, sinks, pads, impl):
    q, k, v, valid = inputs(pads=pads)
    T, scale = q.shape[1], q.shape[-1] ** -0.5
    reference = dense(q, k, v, window, sinks, valid, scale)
    common = dict(window=window, sinks=sinks, impl=impl, output_final_state=True, chunk_size=5)
    whole, _ = sliding_window_attention(q, k, v, key_valid=valid, **common)
    torch.testing.assert_close(whole, reference)
    first, state = sliding_window_attention(q[:, :9], k[:, :9], v[:, :9], key_valid=valid[:, :9], **common)
    second, state = sliding_window_attention(q[:, 9:20], k[:, 9:20], v[:, 9:20], key_valid=valid[:, 9:20],
                                             initial_state=state, **common)
    outs = [first, second]
    for t in range(20, T):
        o, state = sliding_window_attention_step(q[:, t], k[:, t], v[:, t], state, key_valid=valid[:, t])
        outs.append(o.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outs, 1), reference)
    assert state[3].shape[1] == sinks and state[0].shape[1] == window - 1  # constant-size cache


def test_without_sinks_or_a_mask_it_is_the_plain_window():
    q, k, v, _ = inputs(pads=False)
    plain, plain_state = sliding_window_attention(q, k, v, 6, output_final_state=True)
    masked, masked_state = sliding_window_attention(q, k, v, 6, key_valid=torch.ones(q.shape[:2], dtype=torch.bool),
                                                    output_final_state=True)
    torch.testing.assert_close(masked, plain)
    for a, b in zip(masked_state[:3], plain_state):
        torch.testing.assert_close(a, b)


def test_packed_sequences_equal_each_alone_with_gradients():
    q, k, v, valid = inputs(B=1, T=30, pads=False)
    valid[0, [3, 17]] = False
    cu = torch.tensor([0, 11, 12, 30])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    packed, state = sliding_window_attention(*leaves, 5, sinks=2, key_valid=valid, cu_seqlens=cu,
                                             output_final_state=True, chunk_size=4)
    packed.pow(2).sum().backward()
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = [x[:, a:b].detach().clone().requires_grad_() for x in (q, k, v)]
        o, s = sliding_window_attention(*alone, 5, sinks=2, key_valid=valid[:, a:b], output_final_state=True,
                                        impl="naive")
        o.pow(2).sum().backward()
        torch.testing.assert_close(packed[:, a:b], o)
        for leaf, x in zip(leaves, alone):
            torch.testing.assert_close(leaf.grad[:, a:b], x.grad)
        for part, expected in zip(state, s):
            torch.testing.assert_close(part[n:n + 1], expected)
