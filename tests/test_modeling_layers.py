"""Shared model layers: normalisations against their formulas, sequence layers against torch's
convolution, packed documents against separate runs, and chunked/step-wise runs against one pass."""
import pytest
import torch
import torch.nn.functional as F

from recur.modeling.layers import GatedRMSNorm, RMSNorm, ShortConvolution, SwiGLU, token_shift


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_rms_norm_and_griffin_offset():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.weight)
    griffin = RMSNorm(8, eps=1e-6, offset=1.0).double()
    torch.testing.assert_close(griffin(x), x / rms)  # zero-initialised scale: (1 + 0)
    assert RMSNorm(8)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_by_groups(norm_before_gate):
    x, z = torch.randn(2, 4, 12, dtype=torch.float64), torch.randn(2, 4, 12, dtype=torch.float64)
    norm = GatedRMSNorm(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate).double()
    torch.nn.init.normal_(norm.weight)
    y = x if norm_before_gate else x * F.silu(z)
    groups = y.view(2, 4, 3, 4)
    y = (groups / (groups.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).view(2, 4, 12) * norm.weight
    expected = y * F.silu(z) if norm_before_gate else y
    torch.testing.assert_close(norm(x, z), expected)


def test_swiglu_matches_llama_mlp_and_the_formula():
    """SwiGLU against transformers' LlamaMLP with the same weights, and against
    W_down (g / (1 + exp(-g)) * W_up x), g = W_gate x, written out in float64."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = SwiGLU(6, 10).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    llama = LlamaMLP(LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=1, num_key_value_heads=1,
                                 hidden_act="silu", mlp_bias=False)).double()
    llama.load_state_dict(mlp.state_dict())  # the same names: gate_proj, up_proj, down_proj
    torch.testing.assert_close(mlp(x), llama(x))
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    expected = (gate / (1 + torch.exp(-gate)) * up) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


def _conv():
    torch.manual_seed(0)
    return ShortConvolution(10, kernel_size=4).double()


def test_short_convolution_matches_torch_conv1d():
    conv, x = _conv(), torch.randn(2, 9, 10, dtype=torch.float64)
    y, state = conv(x)
    expected = F.silu(conv.conv(x.transpose(1, 2))[..., :9].transpose(1, 2))
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(state, x[:, -3:])


def test_short_convolution_keeps_packed_documents_apart():
    conv = _conv()
    docs = [torch.randn(1, n, 10, dtype=torch.float64) for n in (2, 5, 1, 7)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    y, _ = conv(packed, positions)
    torch.testing.assert_close(y, torch.cat([conv(d)[0] for d in docs], 1))


def test_short_convolution_chunked_and_stepwise_equal_one_pass():
    conv, x = _conv(), torch.randn(2, 11, 10, dtype=torch.float64)
    positions = torch.arange(11).expand(2, -1)
    full, final = conv(x, positions)
    a, state = conv(x[:, :2], positions[:, :2])  # shorter than the kernel: the state must still be right
    b, state = conv(x[:, 2:], positions[:, 2:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    state, steps = None, []
    for t in range(11):
        y, state = conv(x[:, t:t + 1], positions[:, t:t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    torch.testing.assert_close(state, final)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_short_convolution_gradients(packed, bias):
    """The hand-written backward: against finite differences, for the input, the state, the weight and
    the bias, with and without packed documents."""
    torch.manual_seed(0)
    conv = ShortConvolution(5, kernel_size=4, bias=bias).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]]) if packed else None
    params = [p for p in (conv.conv.weight, conv.conv.bias) if p is not None]

    def run(x, state, *weights):
        return torch.func.functional_call(conv, dict(zip(["conv.weight", "conv.bias"], weights)),
                                          (x, positions, state))[0]

    assert torch.autograd.gradcheck(run, (x, state, *params))


def test_short_convolution_without_positions_equals_with_them_in_one_sequence():
    """position_ids that only count up (one sequence per row) change nothing: callers may leave them out."""
    conv, x = _conv(), torch.randn(2, 9, 10, dtype=torch.float64)
    state = torch.randn(2, 3, 10, dtype=torch.float64)
    for past, history in ((0, None), (1, None), (5, state)):
        positions = torch.arange(past, past + 9).expand(2, -1)
        torch.testing.assert_close(conv(x, positions, history)[0], conv(x, None, history)[0])


def test_token_shift_packed_chunked_and_stepwise():
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    shifted, last = token_shift(x, positions)
    expected = torch.cat([torch.zeros(1, 1, 4), x[:, :-1]], 1).double()
    expected[:, [0, 3, 5]] = 0  # document starts see nothing before them
    torch.testing.assert_close(shifted, expected)
    torch.testing.assert_close(last, x[:, -1:])
    a, state = token_shift(x[:, :3], positions[:, :3])
    b, _ = token_shift(x[:, 3:], positions[:, 3:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), shifted)
