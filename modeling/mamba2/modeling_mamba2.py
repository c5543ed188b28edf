"""Mamba-2 as a HuggingFace model: mamba_ssm's block layout on recur's kernels.

Block: x + Mixer(RMSNorm(x)), no MLP, the residual stream in float32. Mixer (mamba_ssm's
Mamba2, non-fused path): in_proj -> [z | xBC | dt]; xBC = silu(causal depthwise conv(xBC)) ->
x, B, C (B, C shared by the heads of a group); Δ = softplus(dt + dt_bias), A = −exp(A_log);
per head H_t = exp(Δ_t A) H_{t−1} + Δ_t x_t B_tᵀ, y_t = H_t C_t + D x_t; then
rmsnorm(y ⊙ silu(z)) per group and out_proj. The scan is `scalar_decay_attention` with
q = C, k = B, v = Δ·x, log-decay Δ·A and scale 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import scalar_decay_attention, scalar_decay_attention_step
from ..base import Layout, RecurrentForCausalLM, RecurrentModel, RecurrentPreTrainedModel
from ..layers import GatedRMSNorm, RMSNorm, ShortConvolution, document_positions
from .configuration_mamba2 import Mamba2Config


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.d_inner, self.num_heads, self.headdim = config.d_inner, config.num_heads, config.headdim
        self.ngroups, self.d_state, self.conv_dim = config.ngroups, config.d_state, config.conv_dim
        # config.chunk_size is mamba_ssm's GPU tile (256); the PyTorch path's [C, C] work per chunk makes
        # chunks of 64 about 3x faster there (BENCHMARKS.md), with the same result up to rounding
        self.dt_limit, self.chunk_size = config.dt_limit, min(config.chunk_size, 64)
        H = self.num_heads
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + H, bias=config.bias)
        self.conv1d = ShortConvolution(self.conv_dim, config.d_conv, bias=config.conv_bias, activation="silu")
        # Per-head SSM parameters; always used in float32 (A = −exp(A_log) in bf16 is far off).
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_inner, eps=config.norm_eps, group_size=self.d_inner // self.ngroups,
                                 norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.bias)

    def forward(self, x, position_ids=None, pad=None, cu_seqlens=None, states=None):
        B, T, _ = x.shape
        H, P, G, N = self.num_heads, self.headdim, self.ngroups, self.d_state
        # Pads: zero input (so the conv window sees the zeros a fresh sequence starts from) and Δ = 0
        # (so they neither write to nor decay the SSM state): left-padded rows equal their prompt alone.
        if pad is not None:
            x = x * pad.to(x.dtype)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], -1)
        if pad is not None:
            xBC = xBC * pad.to(xBC.dtype)
        conv_state = None if states is None else states.get("conv")
        xBC, conv_state = self.conv1d(xBC, document_positions(position_ids, pad, cu_seqlens), conv_state)
        if pad is not None:
            xBC = xBC * pad.to(xBC.dtype)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], -1)

        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        if pad is not None:
            dt = dt * pad
        A = -torch.exp(self.A_log.float())
        xs = xs.view(B, T, H, P)
        groups = lambda t: t.view(B, T, G, N)  # noqa: E731  (the kernel shares them over each group's heads)
        q, k, v, log_decay = groups(Cm), groups(Bm), (xs.float() * dt.unsqueeze(-1)).to(xs.dtype), dt * A
        state = None if states is None else states.get("recurrent")
        if T == 1 and states is not None and cu_seqlens is None:  # decoding: one fused step, no chunk kernel
            q, k = (t.repeat_interleave(H // G, dim=2) for t in (q, k))
            y, final = scalar_decay_attention_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state, scale=1.0)
            y = y.unsqueeze(1)
        else:
            y, final = scalar_decay_attention(q, k, v, log_decay, scale=1.0, initial_state=state,
                                              output_final_state=states is not None, cu_seqlens=cu_seqlens,
                                              chunk_size=self.chunk_size)
        if states is not None:
            states["conv"], states["recurrent"] = conv_state, final
        y = y.float() + self.D.float().unsqueeze(-1) * xs.float()
        y = self.norm(y.reshape(B, T, -1), z)
        return self.out_proj(y.to(x.dtype))


class Mamba2Block(GradientCheckpointingLayer):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = Mamba2Mixer(config)

    def forward(self, x, layout: Layout, states=None):
        residual = x.float() if self.residual_in_fp32 else x
        # the stream may be float32 while the weights are not: normalise in the weights' dtype, as mamba_ssm
        h = self.mixer(self.norm(x.to(self.norm.weight.dtype)), *layout, states)
        return residual + h


class Mamba2PreTrainedModel(RecurrentPreTrainedModel):
    config_class = Mamba2Config
    _no_split_modules = ["Mamba2Block"]
    # the per-head SSM parameters stay float32 when loading in bf16/fp16 (A = −exp(A_log) in bf16 is far off)
    _keep_in_fp32_modules_strict = ["mixer.A_log", "mixer.dt_bias", "mixer.D"]

    def _init_weights(self, module):
        """mamba_ssm's init: torch's default Linear/Conv1d init (biases 0), embeddings N(0, 0.02),
        A ~ U[A_init_range], Δ log-uniform in [dt_min, dt_max] stored through the inverse softplus,
        D = 1, out_proj ÷ √n_layer. transformers' init helpers skip tensors loaded from a checkpoint."""
        config = self.config
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, Mamba2Mixer):
            H, device = module.num_heads, module.A_log.device
            init.copy_(module.A_log, torch.empty(H, device=device).uniform_(*config.A_init_range).log())
            low, high = math.log(config.dt_min), math.log(config.dt_max)
            dt = torch.exp(torch.rand(H, device=device) * (high - low) + low).clamp(min=config.dt_init_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
            init.ones_(module.D)
            if config.rescale_prenorm_residual:  # children are initialised first: this overrides out_proj's
                weight = torch.empty_like(module.out_proj.weight)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                init.copy_(module.out_proj.weight, weight / math.sqrt(config.num_hidden_layers))
        else:
            super()._init_weights(module)


class Mamba2Model(RecurrentModel, Mamba2PreTrainedModel):
    def __init__(self, config: Mamba2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def final_norm(self, x):
        return self.norm_f(x.to(self.norm_f.weight.dtype))  # the residual stream may be float32


class Mamba2ForCausalLM(RecurrentForCausalLM, Mamba2PreTrainedModel):
    config_class = Mamba2Config
    base_model_class = Mamba2Model

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """As transformers resizes, padded to the config's multiple by default: transformers then sets
        vocab_size to the padded row count, which the model rebuilds as it is when loaded again."""
        if pad_to_multiple_of is None and self.config.pad_vocab_size_multiple > 1:
            pad_to_multiple_of = self.config.pad_vocab_size_multiple
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
