"""Random inputs for each recurrence, shared by the kernel tests and the kernel benchmark.

Each case builds the inputs of one public kernel function (float64 by default) with decays in a
realistic range, plus a random initial state, and knows how to call its single-step form.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from recur import kernels


@dataclasses.dataclass
class Case:
    name: str
    fn: callable  # fn(*inputs, initial_state=..., output_final_state=..., cu_seqlens=..., impl=...)
    inputs: dict  # name -> tensor [B, T, ...]
    kwargs: dict  # non-tensor arguments (scale, window, bonus, ...)
    state: object  # a random initial state

    def __call__(self, impl, inputs=None, state=None, cu_seqlens=None, **kw):
        inputs = self.inputs if inputs is None else inputs
        return self.fn(*inputs.values(), **self.kwargs, initial_state=state, output_final_state=True,
                       cu_seqlens=cu_seqlens, impl=impl, **kw)

    def slice(self, start, stop):
        return {n: x[:, start:stop] for n, x in self.inputs.items()}


def _decay(shape, dtype, strength=1.0):
    return F.logsigmoid(torch.randn(shape, dtype=dtype) + 2.0) * strength


def make_case(name, B=2, T=65, H=2, K=12, V=10, dtype=torch.float64, seed=0, window=7):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, dtype=dtype, generator=g)
    if name == "gated_linear_attention":
        inputs = dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K) * K**-0.5, v=rnd(B, T, H, V),
                      log_decay=_decay((B, T, H, K), dtype, 2.0))
        return Case(name, kernels.gated_linear_attention, inputs, {}, rnd(B, H, K, V))
    if name == "scalar_decay_attention":
        inputs = dict(q=rnd(B, T, H, K), k=rnd(B, T, H, K) * K**-0.5, v=rnd(B, T, H, V),
                      log_decay=_decay((B, T, H), dtype, 2.0))
        return Case(name, kernels.scalar_decay_attention, inputs, {}, rnd(B, H, K, V))
    if name == "rwkv6":
        inputs = dict(r=rnd(B, T, H, K), k=rnd(B, T, H, K) * K**-0.5, v=rnd(B, T, H, V),
                      log_decay=-torch.exp(rnd(B, T, H, K) - 1.0))
        return Case(name, kernels.rwkv6, inputs, dict(bonus=rnd(H, K)), rnd(B, H, K, V))
    if name == "gated_delta_rule":
        inputs = dict(q=rnd(B, T, H, K), k=F.normalize(rnd(B, T, H, K), dim=-1), v=rnd(B, T, H, V),
                      beta=torch.rand(B, T, H, dtype=dtype, generator=g), log_decay=_decay((B, T, H), dtype))
        return Case(name, kernels.gated_delta_rule, inputs, {}, rnd(B, H, K, V))
    if name == "diagonal_recurrence":
        D = H * K
        inputs = dict(x=rnd(B, T, D), log_decay=_decay((B, T, D), dtype, 2.0))
        return Case(name, kernels.diagonal_recurrence, inputs, {}, rnd(B, D))
    if name == "sliding_window_attention":
        Hk = 1 if H > 1 else H  # multi-query, as Griffin uses it
        state = (rnd(B, window - 1, Hk, K), rnd(B, window - 1, Hk, V),
                 # right-aligned valid entries, a different count per row (a cache still filling up)
                 torch.arange(window - 1).expand(B, -1) >= torch.arange(B).remainder(window).unsqueeze(1))
        inputs = dict(q=rnd(B, T, H, K), k=rnd(B, T, Hk, K), v=rnd(B, T, Hk, V))
        return Case(name, kernels.sliding_window_attention, inputs, dict(window=window), state)
    raise KeyError(name)


NAMES = ["gated_linear_attention", "scalar_decay_attention", "rwkv6", "gated_delta_rule", "diagonal_recurrence",
         "sliding_window_attention"]


def step(case: Case, inputs_t: dict, state, impl="auto"):
    """One decode step of `case` with the public *_step functions; inputs_t have no time dimension."""
    x = list(inputs_t.values())
    if case.name == "gated_linear_attention":
        return kernels.gated_linear_attention_step(*x, state, x[0].shape[-1] ** -0.5, impl=impl)
    if case.name == "scalar_decay_attention":
        return kernels.scalar_decay_attention_step(*x, state, x[0].shape[-1] ** -0.5, impl=impl)
    if case.name == "rwkv6":
        return kernels.rwkv6_step(*x, case.kwargs["bonus"], state, impl=impl)
    if case.name == "gated_delta_rule":
        return kernels.gated_delta_rule_step(*x, state, x[0].shape[-1] ** -0.5, impl=impl)
    if case.name == "diagonal_recurrence":
        return kernels.diagonal_recurrence_step(*x, state, impl=impl)
    if case.name == "sliding_window_attention":
        return kernels.sliding_window_attention_step(*x, state, x[0].shape[-1] ** -0.5, impl=impl)
    raise KeyError(case.name)
