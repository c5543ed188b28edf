"""Cross-checks against an outside reference: fla's own pure-PyTorch `naive` ops, run on CPU.

fla's conventions, mapped explicitly: every fla decay is a log-decay like ours (`gk`, `g`, `w`),
`naive_recurrent_rwkv6` is head-first [B, H, T, K] and takes `scale` (RWKV-6 wants 1.0),
`naive_recurrent_gla` always scales by K^-0.5, states are [B, H, K, V] in both.
"""
import pytest
import torch

from recur import kernels
from recur.kernels.cases import make_case

pytest.importorskip("fla", reason="flash-linear-attention is not installed")

T = 77


def _case(name):
    case = make_case(name, T=T, H=3, K=16, V=12, dtype=torch.float32, seed=11)
    return case, list(case.inputs.values())


def _close(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.to(a.dtype), atol=2e-4, rtol=2e-4)


def test_gla_matches_fla_naive():
    from fla.ops.gla.naive import naive_recurrent_gla

    case, (q, k, v, g) = _case("gated_linear_attention")
    _close(kernels.gated_linear_attention(q, k, v, g, initial_state=case.state.float(), output_final_state=True,
                                          impl="chunk"),
           naive_recurrent_gla(q, k, v, g, initial_state=case.state.float(), output_final_state=True))


def test_scalar_decay_matches_fla_naive_simple_gla():
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    case, (q, k, v, g) = _case("scalar_decay_attention")
    _close(kernels.scalar_decay_attention(q, k, v, g, scale=1.0, initial_state=case.state.float(),
                                          output_final_state=True, impl="chunk"),
           naive_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=case.state.float(), output_final_state=True))


def test_rwkv6_matches_fla_naive():
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    case, (r, k, v, w) = _case("rwkv6")
    u = case.kwargs["bonus"].float()
    o, s = kernels.rwkv6(r, k, v, w, u, initial_state=case.state.float(), output_final_state=True, impl="chunk")
    head_first = [x.transpose(1, 2) for x in (r, k, v, w)]
    o_ref, s_ref = naive_recurrent_rwkv6(*head_first, u, scale=1.0, initial_state=case.state.float(),
                                         output_final_state=True)
    _close((o, s), (o_ref.transpose(1, 2), s_ref))


def test_diagonal_recurrence_matches_fla_naive_hgrn():
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    case, (x, g) = _case("diagonal_recurrence")
    h0 = case.state.float()
    _close(kernels.diagonal_recurrence(x, g, initial_state=h0, output_final_state=True, impl="chunk"),
           naive_recurrent_hgrn(x, g, initial_state=h0, output_final_state=True))


def test_gated_delta_rule_matches_fla_naive():
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    case, (q, k, v, beta, g) = _case("gated_delta_rule")
    _close(kernels.gated_delta_rule(q, k, v, beta, g, initial_state=case.state.float(), output_final_state=True,
                                    impl="chunk"),
           naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=case.state.float(),
                                            output_final_state=True))


def test_sliding_window_matches_fla_naive_attention():
    from fla.ops.attn.naive import naive_parallel_attn

    case, (q, k, v) = _case("sliding_window_attention")
    o, _ = kernels.sliding_window_attention(q, k, v, window=7, impl="chunk")
    ref = naive_parallel_attn(q, k, v, window_size=7)
    _close([o], [ref[0] if isinstance(ref, tuple) else ref])
