"""RWKV-6 "Finch" as a HuggingFace model: BlinkDL's x060 block on recur's kernels.

Block (ln0 on the embedding in block 0 only): x + TimeMix(LN1(x)), then h + ChannelMix(LN2(h)).
TimeMix interpolates each token with the previous one (token shift) by data-dependent amounts
(a low-rank tanh MLP gives the offsets for w, k, v, r, g), then per head
o_t = r_t (S_{t−1} + diag(u) k_tᵀ v_t),  S_t = diag(w_t) S_{t−1} + k_tᵀ v_t,
with the per-channel decay w = exp(−exp(time_decay + tanh(x_w D₁) D₂)) and bonus u = time_faaaa;
output GroupNorm(o) ⊙ silu(W_g x_g), then W_o. ChannelMix: σ(W_r x_r) ⊙ W_v relu(W_k x_k)².
The token-mix parameters and the decay are computed in float32 whatever the model dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import rwkv6 as rwkv6_recurrence
from ...kernels import rwkv6_step
from ..base import Layout, RecurrentForCausalLM, RecurrentModel, RecurrentPreTrainedModel
from ..layers import token_shift
from .configuration_rwkv6 import RWKV6Config


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def shift_skipping_pads(x, position_ids, pad, state):
    """`token_shift` in which pads are invisible: a token's previous one is the last non-pad before it.

    Each pad is first replaced by the last real token before it (or by the state), so the shift of
    the next real token and the state handed on are what they would be without the pads.
    """
    if pad is not None:
        B, T, D = x.shape
        history = torch.cat([x.new_zeros(B, 1, D) if state is None else state.to(x.dtype), x], 1)
        latest = (torch.arange(1, T + 1, device=x.device) * pad[..., 0].long()).cummax(1).values  # 0 = the state
        x = history.gather(1, latest.unsqueeze(-1).expand(B, T, D))
    return token_shift(x, position_ids, state)


def _lerp_inputs(x, position_ids, pad, states, name):
    """(x, x_{t−1} − x) in float32, and the shift state after x saved under `name`."""
    state = None if states is None else states.get(name)
    previous, new_state = shift_skipping_pads(x, position_ids, pad, state)
    if states is not None:
        states[name] = new_state
    x32 = x.float()
    return x32, previous.float() - x32


class RWKV6TimeMix(nn.Module):
    def __init__(self, config: RWKV6Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, A, R = config.hidden_size, config.attention_hidden_size, config.time_mix_low_rank_dim
        self.num_heads, self.head_size = config.num_heads, config.head_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * R))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, R, C))
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, config.time_decay_low_rank_dim))
        self.time_decay_w2 = nn.Parameter(torch.zeros(config.time_decay_low_rank_dim, A))
        self.time_faaaa = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, A, eps=config.group_norm_eps)

    def forward(self, x, position_ids, pad=None, cu_seqlens=None, states=None):
        B, T, _ = x.shape
        x32, delta = _lerp_inputs(x, position_ids, pad, states, "attn_shift")
        # data-dependent interpolation amounts, in the order w, k, v, r, g
        lora = torch.tanh((x32 + delta * self.time_maa_x.float()) @ self.time_maa_w1.float())
        offsets = torch.einsum("btfr,frc->fbtc", lora.unflatten(-1, (5, -1)), self.time_maa_w2.float())
        mus = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        xw, xk, xv, xr, xg = (x32 + delta * (mu.float() + m) for mu, m in zip(mus, offsets))

        heads = lambda t: t.view(B, T, self.num_heads, self.head_size)
        dtype = x.dtype
        r, k, v = heads(self.receptance(xr.to(dtype))), heads(self.key(xk.to(dtype))), heads(self.value(xv.to(dtype)))
        gate = F.silu(self.gate(xg.to(dtype)))
        decay = self.time_decay.float() + torch.tanh(xw @ self.time_decay_w1.float()) @ self.time_decay_w2.float()
        log_decay = heads(-decay.exp())
        if pad is not None:  # a pad adds nothing to the state and does not decay it
            k, log_decay = k * pad.unsqueeze(-1).to(k.dtype), log_decay * pad.unsqueeze(-1)
        state = None if states is None else states.get("wkv")
        if T == 1 and states is not None and cu_seqlens is None:  # decoding: one fused step, no chunk kernel
            o, final = rwkv6_step(r[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], self.time_faaaa.float(), state)
            o = o.unsqueeze(1)
        else:
            o, final = rwkv6_recurrence(r, k, v, log_decay, self.time_faaaa.float(), initial_state=state,
                                        output_final_state=states is not None, cu_seqlens=cu_seqlens)
        if states is not None:
            states["wkv"] = final
        o = F.group_norm(o.reshape(B * T, -1).float(), self.num_heads, self.ln_x.weight.float(),
                         self.ln_x.bias.float(), self.ln_x.eps).view(B, T, -1)
        return self.output(o.to(dtype) * gate)


class RWKV6ChannelMix(nn.Module):
    def __init__(self, config: RWKV6Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, F_ = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.zeros(C))
        self.time_maa_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x, position_ids, pad=None, states=None):
        x32, delta = _lerp_inputs(x, position_ids, pad, states, "ffn_shift")
        xk = (x32 + delta * self.time_maa_k.float()).to(x.dtype)
        xr = (x32 + delta * self.time_maa_r.float()).to(x.dtype)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)).square())


class RWKV6Block(GradientCheckpointingLayer):
    def __init__(self, config: RWKV6Config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        # BlinkDL normalises the embeddings once, inside the first block
        self.ln0 = LayerNorm(config.hidden_size, eps=eps) if layer_idx == 0 else None
        self.ln1 = LayerNorm(config.hidden_size, eps=eps)
        self.attn = RWKV6TimeMix(config, layer_idx)
        self.ln2 = LayerNorm(config.hidden_size, eps=eps)
        self.ffn = RWKV6ChannelMix(config, layer_idx)

    def forward(self, x, layout: Layout, states=None):
        if self.ln0 is not None:
            x = self.ln0(x)
        h = x + self.attn(self.ln1(x), *layout, states)
        return h + self.ffn(self.ln2(h), layout.position_ids, layout.pad, states)


def _orthogonal(weight, scale):
    """RWKV-LM's init: orthogonal with gain scale·sqrt(rows/cols) for tall matrices, zeros for scale 0."""
    if scale == 0:
        return init.zeros_(weight)
    rows, cols = weight.shape
    return init.orthogonal_(weight, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))


def _init_time_mix(m: RWKV6TimeMix, num_layers: int):
    C, A = m.time_maa_x.numel(), m.time_decay.numel()
    depth = m.layer_idx / max(num_layers - 1, 1)  # 0 → 1 through the layers
    shallowness = 1.0 - m.layer_idx / num_layers  # 1 → almost 0
    ddd = torch.arange(C, dtype=torch.float32) / C
    mix = 1.0 - ddd.pow(shallowness)
    for name, value in (("x", mix), ("w", mix), ("k", mix), ("v", 1.0 - (ddd.pow(shallowness) + 0.3 * depth)),
                        ("r", 1.0 - ddd.pow(0.5 * shallowness)), ("g", 1.0 - ddd.pow(0.5 * shallowness))):
        init.copy_(getattr(m, f"time_maa_{name}"), value)
    init.zeros_(m.time_maa_w1)
    init.uniform_(m.time_maa_w2, -0.01, 0.01)
    n = torch.arange(A, dtype=torch.float32) / max(A - 1, 1)
    init.copy_(m.time_decay, -6 + 5 * n.pow(0.7 + 1.3 * depth))  # decays from ≈0.9975 to ≈0.69
    init.zeros_(m.time_decay_w1)
    init.uniform_(m.time_decay_w2, -0.01, 0.01)
    zigzag = 0.1 * ((torch.arange(A) + 1) % 3 - 1)
    init.copy_(m.time_faaaa, (depth * (1 - n) + zigzag).view_as(m.time_faaaa))
    for linear, scale in ((m.receptance, 1.0), (m.key, 0.1), (m.value, 1.0), (m.gate, 0.1), (m.output, 0.0)):
        _orthogonal(linear.weight, scale)
    init.constant_(m.ln_x.weight, ((1 + m.layer_idx) / num_layers) ** 0.7)
    init.zeros_(m.ln_x.bias)


def _init_channel_mix(m: RWKV6ChannelMix, num_layers: int):
    C = m.time_maa_k.numel()
    mix = 1.0 - (torch.arange(C, dtype=torch.float32) / C).pow(1.0 - m.layer_idx / num_layers)
    init.copy_(m.time_maa_k, mix)
    init.copy_(m.time_maa_r, mix)
    for linear, scale in ((m.key, 1.0), (m.receptance, 0.0), (m.value, 0.0)):
        _orthogonal(linear.weight, scale)


class RWKV6PreTrainedModel(RecurrentPreTrainedModel):
    config_class = RWKV6Config
    _no_split_modules = ["RWKV6Block"]
    # the decay, bonus and mixing parameters stay float32 when loading in bf16/fp16
    _keep_in_fp32_modules_strict = ["attn.time_", "ffn.time_"]

    def _init_weights(self, module):
        # RWKV-LM's init (`RWKV_Tmix_x060`, `generate_init_weight`). Children are visited before their
        # parents, so the mixers override the generic init of their linear layers; the head is recognised
        # by identity (transformers skips modules without parameters of their own, like the LM class).
        L = self.config.num_hidden_layers
        if isinstance(module, RWKV6TimeMix):
            _init_time_mix(module, L)
        elif isinstance(module, RWKV6ChannelMix):
            _init_channel_mix(module, L)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -1e-4, 1e-4)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif module is getattr(self, "lm_head", None) and not self.config.tie_word_embeddings:
            V, C = module.weight.shape
            init.orthogonal_(module.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        else:
            super()._init_weights(module)


class RWKV6Model(RecurrentModel, RWKV6PreTrainedModel):
    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RWKV6Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)  # BlinkDL's ln_out
        self.post_init()


class RWKV6ForCausalLM(RecurrentForCausalLM, RWKV6PreTrainedModel):
    config_class = RWKV6Config
    base_model_class = RWKV6Model
