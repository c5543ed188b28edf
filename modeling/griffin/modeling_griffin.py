"""Griffin / Hawk (RecurrentGemma) as a HuggingFace model on recur's RG-LRU and window-attention kernels.

Residual block h = x + Temporal(RMSNorm(x)), out = h + GeGLU(RMSNorm(h)), RMSNorm with (1 + scale).
Temporal is the recurrent block, W_out(RG-LRU(Conv1D(W_x x)) ⊙ gelu(W_y x)), or local multi-query
attention with RoPE on the first part of each head. Embedding scaled by sqrt(D) (rounded to bf16, as
RecurrentGemma), tied head, logits soft-capped: cap·tanh(logits / cap).

Padding (attention_mask zeros) changes no state: recurrent inputs are zeroed and the decay set to 1,
and pad keys get a −1e6 logit through one extra query/key channel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import rg_lru, sliding_window_attention, sliding_window_attention_step
from ..base import Layout, RecurrentForCausalLM, RecurrentModel
from ..layers import RMSNorm, ShortConvolution, document_positions
from .configuration_griffin import GriffinConfig

_PAD_LOGIT = -1e6


class GriffinRGLRU(nn.Module):
    """The RG-LRU's parameters: Λ and the block-diagonal gates (W [H, L/H, L/H], input index first)."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        H, L = config.num_attention_heads, config.lru_width
        self.num_heads, self.block_width = H, L // H
        self.recurrent_param = nn.Parameter(torch.zeros(L))
        self.input_gate_weight = nn.Parameter(torch.zeros(H, L // H, L // H))
        self.input_gate_bias = nn.Parameter(torch.zeros(H, L // H))
        self.recurrent_gate_weight = nn.Parameter(torch.zeros(H, L // H, L // H))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(H, L // H))

    def gate(self, u, weight, bias):
        blocks = u.unflatten(-1, (self.num_heads, self.block_width))
        return (torch.einsum("...hi,hij->...hj", blocks, weight.to(u.dtype)) + bias.to(u.dtype)).flatten(-2)

    def forward(self, u, reset, pad=None, state=None, output_final_state=False):
        gate_x = self.gate(u, self.input_gate_weight, self.input_gate_bias)
        gate_a = self.gate(u, self.recurrent_gate_weight, self.recurrent_gate_bias)
        if pad is not None:  # decay 1 (σ(−1e4) = 0), input 0: the state passes a pad unchanged
            gate_a = gate_a.masked_fill(pad == 0, -1e4)
        return rg_lru(u, gate_a, gate_x, self.recurrent_param, reset=reset, initial_state=state,
                      output_final_state=output_final_state)


class GriffinRecurrentBlock(nn.Module):
    def __init__(self, config: GriffinConfig):
        super().__init__()
        D, L = config.hidden_size, config.lru_width
        self.linear_y = nn.Linear(D, L)
        self.linear_x = nn.Linear(D, L)
        self.linear_out = nn.Linear(L, D)
        self.conv_1d = ShortConvolution(L, config.conv1d_width, bias=True, activation=None)
        self.rg_lru = GriffinRGLRU(config)

    def forward(self, x, layout: Layout, states=None):
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u = self.linear_x(x)
        pad = layout.pad
        if pad is not None:
            u = u * pad.to(u.dtype)
        u, conv_state = self.conv_1d(u, document_positions(*layout), None if states is None else states.get("conv"))
        if pad is not None:
            u = u * pad.to(u.dtype)
        reset = layout.position_ids == 0
        if pad is not None:
            reset = reset & (pad[..., 0] > 0)
        h, final = self.rg_lru(u, reset, pad, None if states is None else states.get("recurrent"),
                               output_final_state=states is not None)
        if states is not None:
            states["conv"], states["recurrent"] = conv_state, final
        return self.linear_out(h * y)


def rotary(x, position_ids, dim, theta):
    """RoPE (rotate-half) on the first `dim` channels of x [B, T, H, K]; the rest pass through."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], -1)[:, :, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    half = torch.cat([-rot[..., dim // 2:], rot[..., :dim // 2]], -1)
    return torch.cat([rot * cos + half * sin, rest], -1)


class GriffinAttention(nn.Module):
    """Local multi-query attention over the last `attention_window_size` keys (itself included)."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.window = config.attention_window_size
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factor)
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=True)

    def forward(self, x, layout: Layout, states=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = rotary(q, layout.position_ids, self.rotary_dim, self.rope_theta)
        k = rotary(k, layout.position_ids, self.rotary_dim, self.rope_theta)
        state = None if states is None else states.get("window")
        pad = layout.pad
        if pad is not None:  # one more channel: 1 in every query, −1e6 in a pad key, 0 in a real one
            q = torch.cat([q, q.new_ones(B, T, self.num_heads, 1)], -1)
            k = torch.cat([k, ((1 - pad.to(k.dtype)) * _PAD_LOGIT)[..., None].expand(B, T, self.num_kv_heads, 1)], -1)
            if state is not None:
                state = (torch.cat([state[0], state[0].new_zeros(*state[0].shape[:-1], 1)], -1), *state[1:])
        scale = self.head_dim ** -0.5
        if T == 1 and state is not None and layout.cu_seqlens is None:  # decoding: one step over the cache
            o, final = sliding_window_attention_step(q[:, 0], k[:, 0], v[:, 0], state, scale=scale)
            o = o.unsqueeze(1)
        else:
            o, final = sliding_window_attention(q, k, v, self.window, scale=scale, initial_state=state,
                                                output_final_state=states is not None, cu_seqlens=layout.cu_seqlens)
        if states is not None:
            keys, values, valid = final
            if pad is not None:
                keys, m = keys[..., :self.head_dim], min(valid.shape[1], T)
                if m:
                    valid = valid.clone()
                    valid[:, valid.shape[1] - m:] &= pad[:, T - m:, 0] > 0
            states["window"] = (keys, values, valid)
        return self.o_proj(o.reshape(B, T, -1))


class GriffinMLP(nn.Module):
    """GeGLU with biases: down(gelu_tanh(gate(x)) · up(x))."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, F_), nn.Linear(D, F_), nn.Linear(F_, D)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GriffinBlock(GradientCheckpointingLayer):
    def __init__(self, config: GriffinConfig, block_type: str):
        super().__init__()
        self.block_type = block_type
        self.temporal_pre_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0)
        self.temporal_block = (GriffinAttention if block_type == "attention" else GriffinRecurrentBlock)(config)
        self.channel_pre_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0)
        self.mlp_block = GriffinMLP(config)

    def forward(self, x, layout: Layout, states=None):
        h = x + self.temporal_block(self.temporal_pre_norm(x), layout, states)
        return h + self.mlp_block(self.channel_pre_norm(h))


class GriffinModel(RecurrentModel):
    config_class = GriffinConfig
    _no_split_modules = ["GriffinBlock"]
    _keep_in_fp32_modules_strict = ["rg_lru.recurrent_param"]  # Λ: a = σ(Λ)^(c·r) near 1

    def __init__(self, config: GriffinConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GriffinBlock(config, t) for t in config.layers_block_type)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=1.0)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, GriffinRGLRU):  # deepmind: a0 = σ(−Λ)... area-uniform in [0.9, 0.999]
            u = torch.empty_like(module.recurrent_param, dtype=torch.float32).uniform_(0.9 ** 2, 0.999 ** 2)
            log_a0 = 0.5 * u.log()
            with torch.no_grad():
                module.recurrent_param.copy_(torch.log(torch.expm1(-log_a0)))
            for w in (module.input_gate_weight, module.recurrent_gate_weight):
                nn.init.normal_(w, std=module.block_width ** -0.5)
            nn.init.zeros_(module.input_gate_bias)
            nn.init.zeros_(module.recurrent_gate_bias)
        elif isinstance(module, ShortConvolution):
            nn.init.normal_(module.conv.weight, std=math.sqrt(config.w_init_variance_scale / module.kernel_size))
            nn.init.zeros_(module.conv.bias)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if self.config.embeddings_scale_by_sqrt_dim:  # RecurrentGemma rounds sqrt(D) to bf16
            normalizer = torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.bfloat16)
            inputs_embeds = inputs_embeds * normalizer.to(inputs_embeds.dtype)
        return super().forward(None, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                               cache=cache)


class GriffinForCausalLM(RecurrentForCausalLM):
    config_class = GriffinConfig
    base_model_class = GriffinModel
    _no_split_modules = ["GriffinBlock"]

    def logits(self, hidden):
        logits = self.lm_head(hidden)
        cap = self.config.logits_soft_cap
        return torch.tanh(logits / cap) * cap if cap else logits
