"""GLA as a HuggingFace model: fla's layer and block layout on recur's kernels.

Block: x + GLA(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)). Token mixing per head:
S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, o_t = K^−½ q_t S_t, with the per-key-channel gate
g = logsigmoid(W₂W₁x + b) / 16 (low rank 16); output RMSNorm(o) ⊙ swish(W_g x), then o_proj.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import gated_linear_attention, gated_linear_attention_step
from ..base import Layout, RecurrentForCausalLM, RecurrentModel
from ..layers import GatedRMSNorm, RMSNorm, SwiGLU
from .configuration_gla import GLAConfig


class GLAAttention(nn.Module):
    def __init__(self, config: GLAConfig):
        super().__init__()
        D, H = config.hidden_size, config.num_heads
        self.num_heads, self.normaliser = H, config.gate_logit_normalizer
        key_dim, value_dim = int(D * config.expand_k), int(D * config.expand_v)
        self.head_k, self.head_v = key_dim // H, value_dim // H
        self.q_proj = nn.Linear(D, key_dim, bias=False)
        self.k_proj = nn.Linear(D, key_dim, bias=False)
        self.v_proj = nn.Linear(D, value_dim, bias=False)
        self.g_proj = nn.Linear(D, value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(D, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, D, bias=False)
        self.g_norm = GatedRMSNorm(self.head_v, eps=config.norm_eps, norm_before_gate=True)

    def forward(self, x, pad=None, cu_seqlens=None, states=None):
        B, T, _ = x.shape
        heads = lambda t, d: t.view(B, T, self.num_heads, d)
        q, k, v = heads(self.q_proj(x), self.head_k), heads(self.k_proj(x), self.head_k), heads(self.v_proj(x), self.head_v)
        log_decay = heads(F.logsigmoid(self.gk_proj(x).float()) / self.normaliser, self.head_k)
        if pad is not None:  # a pad adds nothing to the state and does not decay it
            k, v, log_decay = (t * pad.unsqueeze(-1).to(t.dtype) for t in (k, v, log_decay))
        state = None if states is None else states.get("recurrent")
        if T == 1 and states is not None and cu_seqlens is None:  # decoding: one fused step, no chunk kernel
            o, final = gated_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state)
            o = o.unsqueeze(1)
        else:
            o, final = gated_linear_attention(q, k, v, log_decay, initial_state=state,
                                              output_final_state=states is not None, cu_seqlens=cu_seqlens)
        if states is not None:
            states["recurrent"] = final
        o = self.g_norm(o, heads(self.g_proj(x), self.head_v))
        return self.o_proj(o.reshape(B, T, -1))


class GLABlock(GradientCheckpointingLayer):
    def __init__(self, config: GLAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GLAAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, layout: Layout, states=None):
        h = x + self.attn(self.attn_norm(x), layout.pad, layout.cu_seqlens, states)
        return h + self.mlp(self.mlp_norm(h))


class GLAModel(RecurrentModel):
    config_class = GLAConfig
    _no_split_modules = ["GLABlock"]

    def __init__(self, config: GLAConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GLABlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()


class GLAForCausalLM(RecurrentForCausalLM):
    config_class = GLAConfig
    base_model_class = GLAModel
    _no_split_modules = ["GLABlock"]
