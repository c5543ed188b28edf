"""HGRN2 as a HuggingFace model: fla's layer and block layout on recur's GLA kernel.

Per head (K = V = expand_ratio): forget gate λ = lb + (1 − lb)·σ(W_f x) in log space, key 1 − λ,
query swish(W_q x), value W_i x; S_t = diag(λ_t) S_{t−1} + (1 − λ_t)ᵀ i_t, o_t = K^−½ q_t S_t;
out = W_o RMSNorm(o). The lower bounds lb rise with depth: a model-level parameter [L, D] turned
into lb_l = Σ_{j≤l} softmax_j − softmax_0 (so layer 0 has none).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import gated_linear_attention, gated_linear_attention_step
from ..base import Layout, RecurrentForCausalLM, RecurrentModel
from ..layers import RMSNorm, SwiGLU
from .configuration_hgrn2 import HGRN2Config


class HGRN2Attention(nn.Module):
    def __init__(self, config: HGRN2Config):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.expand_ratio
        self.q_proj = nn.Linear(D, D, bias=False)
        self.f_proj = nn.Linear(D, D, bias=False)
        self.i_proj = nn.Linear(D, D, bias=False)
        self.g_norm = RMSNorm(D, eps=config.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x, pad=None, cu_seqlens=None, states=None, lower_bound=None):
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, self.head_dim)
        log_forget = F.logsigmoid(self.f_proj(x).float())
        if lower_bound is not None:  # λ = lb + (1 − lb)·σ(f), kept in log space
            log_forget = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + log_forget)
        key = -torch.expm1(log_forget)  # 1 − λ
        q, i = F.silu(self.q_proj(x)), self.i_proj(x)
        if pad is not None:  # a pad adds nothing to the state and does not decay it
            key, i, log_forget = key * pad, i * pad.to(i.dtype), log_forget * pad
        q, key, i, log_forget = heads(q), heads(key.to(q.dtype)), heads(i), heads(log_forget)
        state = None if states is None else states.get("recurrent")
        if T == 1 and states is not None and cu_seqlens is None:  # decoding: one fused step, no chunk kernel
            o, final = gated_linear_attention_step(q[:, 0], key[:, 0], i[:, 0], log_forget[:, 0], state)
            o = o.unsqueeze(1)
        else:
            o, final = gated_linear_attention(q, key, i, log_forget, initial_state=state,
                                              output_final_state=states is not None, cu_seqlens=cu_seqlens)
        if states is not None:
            states["recurrent"] = final
        return self.o_proj(self.g_norm(o.reshape(B, T, -1)))


class HGRN2Block(GradientCheckpointingLayer):
    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = HGRN2Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, layout: Layout, states=None, lower_bound=None):
        h = x + self.attn(self.attn_norm(x), layout.pad, layout.cu_seqlens, states, lower_bound)
        return h + self.mlp(self.mlp_norm(h))


class HGRN2Model(RecurrentModel):
    config_class = HGRN2Config
    _no_split_modules = ["HGRN2Block"]
    _keep_in_fp32_modules_strict = ["lower_bounds"]  # the forget gates' floors, a softmax over layers

    def __init__(self, config: HGRN2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size))
        self.layers = nn.ModuleList(HGRN2Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self and self.config.use_lower_bound:
            nn.init.zeros_(self.lower_bounds)  # fla's init: equal logits, bounds rising evenly with depth

    def block_inputs(self):
        if not self.config.use_lower_bound:
            return super().block_inputs()
        weights = self.lower_bounds.float().softmax(0)
        bounds = weights.cumsum(0) - weights[0]
        return [{"lower_bound": bounds[i] if i else None} for i in range(len(self.layers))]


class HGRN2ForCausalLM(RecurrentForCausalLM):
    config_class = HGRN2Config
    base_model_class = HGRN2Model
    _no_split_modules = ["HGRN2Block"]
