"""A Llama-family transformer whose attention is linearized (Liger, arXiv 2503.01496, and relatives).

Every layer keeps the teacher's block (RMSNorm, q/k/v/o projections with their biases and Qwen3's
q/k norms, the MLP) and its weights; what changes is the token mixing of each attention:

- liger-gla: Liger Attention. out = w · SWA + (1 − w) · GLA, in float32. SWA is softmax attention
  over the last `window` keys (plus `sinks` first keys) with the teacher's q, k (RoPE) and v. GLA
  is the gated recurrence S_t = diag(α_t) S_{t−1} + φ(k_t)ᵀ v_t, o_t = φ(q_t) S_t with
  φ = softmax over the head dimension, no RoPE, and the gate from the key projection with no new
  parameter: log α = logsigmoid(k) / 16 per key channel, shared by the query heads of a GQA group.
- liger-hgrn2: the same with HGRN2's recurrence: α = σ(k), the key replaced by 1 − α.
  (`normalize`: the recurrence divided by φ(q)·Σ α-decayed φ(k), a weighted mean of values like the
  window's; Liger has no denominator, which leaves its untrained output far from the teacher's.)
- gated-deltanet: S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t with L2-normalised q, k (no RoPE),
  α per head from the mean of logsigmoid(k) / 16 over the head's key channels, β = σ(W_β x) from a new
  zero-initialised projection (or a fixed value).
- learn_window_weight: w becomes a parameter per query head, σ(window_mix), starting at window_weight
  (not in Liger: from w = 0.9 the untrained student is as good as the window alone, and training
  decides how much each head takes from the recurrence).
- window-only: the SWA alone (the training-free baseline, window + sinks).
- layers in `keep_attention_layers` stay the teacher's softmax attention.

Decoding caches the window's keys and values (and sinks) plus the recurrent state, so cached
generation equals the full forward (Liger's released code drops the window cache) and memory stays
constant in the prompt length for every linearized layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from ...kernels import (
    gated_delta_rule,
    gated_delta_rule_step,
    gated_linear_attention,
    gated_linear_attention_step,
    sliding_window_attention,
    sliding_window_attention_step,
)
from ..base import Layout, RecurrentForCausalLM, RecurrentModel
from .configuration_liger import LigerConfig


class LigerAttention(nn.Module):
    def __init__(self, config: LigerConfig, layer_idx: int):
        super().__init__()
        D, H, Hk, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        lin = config.linearization
        self.kind, self.heads, self.kv_heads, self.head_dim = config.layer_kind(layer_idx), H, Hk, Dh
        self.sinks, self.gate_normalizer, self.beta = lin["sinks"], lin["gate_normalizer"], lin["beta"]
        self.normalize = lin["normalize"] and self.kind in ("liger-gla", "liger-hgrn2")
        self.window_weight = 1.0 if self.kind in ("attention", "window-only") else lin["window_weight"]
        if lin["learn_window_weight"] and self.window_weight < 1:  # new: w = σ(window_mix), one per query head
            self.window_mix = nn.Parameter(torch.empty(H))
        # a kept layer attends as the teacher did: its own sliding window, or the whole context
        teacher_window = config.teacher_windows[layer_idx] or config.max_position_embeddings
        self.window = teacher_window if self.kind == "attention" else lin["window"]
        if self.kind == "attention":
            self.sinks = 0
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hk * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hk * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's channels before RoPE
            self.q_norm, self.k_norm = LlamaRMSNorm(Dh, config.rms_norm_eps), LlamaRMSNorm(Dh, config.rms_norm_eps)
        if self.kind == "gated-deltanet" and self.beta == "learned":
            self.b_proj = nn.Linear(D, H, bias=True)  # new: zero-initialised, β = σ(0) = 0.5 at first
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, x, layout: Layout, states=None):
        B, T, _ = x.shape
        H, Hk, Dh = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh)
        k_raw = self.k_proj(x).view(B, T, Hk, Dh)
        v = self.v_proj(x).view(B, T, Hk, Dh)
        q, k = (self.q_norm(q), self.k_norm(k_raw)) if hasattr(self, "q_norm") else (q, k_raw)
        valid = None if layout.pad is None else layout.pad[..., 0] > 0
        decoding = states is not None and T == 1 and layout.cu_seqlens is None
        window = self.window_branch(q, k, v, layout, valid, states, decoding)
        if self.window_weight == 1:
            out = window
        else:
            w = torch.sigmoid(self.window_mix.float())[:, None] if hasattr(self, "window_mix") else self.window_weight
            out = window * w + self.recurrent_branch(q, k, k_raw, v, x, layout, valid, states, decoding) * (1 - w)
        return self.o_proj(out.to(x.dtype).reshape(B, T, H * Dh))

    def window_branch(self, q, k, v, layout, valid, states, decoding):
        """Softmax attention over the last `window` keys (and the sinks), RoPE on q and k, in float32."""
        cos, sin = self.rotary(v, layout.position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        state = None if states is None else states.get("window")
        # With a cache, a sink or padding, the sink-aware path (its state has the sink slots): the plain
        # path (fla's kernel on GPU) serves training.
        general = states is not None or self.sinks or valid is not None
        key_valid = (valid if valid is not None else torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
                     ) if general else None
        scale = self.head_dim ** -0.5
        if decoding and state is not None:
            o, final = sliding_window_attention_step(q[:, 0], k[:, 0], v[:, 0], state, scale, key_valid=key_valid[:, 0])
            o = o.unsqueeze(1)
        else:
            o, final = sliding_window_attention(q, k, v, self.window, scale=scale, initial_state=state,
                                                output_final_state=states is not None, cu_seqlens=layout.cu_seqlens,
                                                sinks=self.sinks, key_valid=key_valid)
        if states is not None:
            states["window"] = final
        return o.float()

    def recurrent_branch(self, q, k, k_raw, v, x, layout, valid, states, decoding):
        """The gated recurrence, its gate taken from the key projection (before RoPE and q/k norms)."""
        B, T, H, Dh = q.shape
        group = H // self.kv_heads
        heads = lambda t: t.repeat_interleave(group, dim=2) if group > 1 else t  # GQA: one key head per group
        log_gate = F.logsigmoid(k_raw.float())
        if self.kind == "gated-deltanet":
            q_f, k_f = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
            log_decay = log_gate.mean(-1) / self.gate_normalizer  # [B, T, Hk]: one decay per head
            beta = (torch.sigmoid(self.b_proj(x).float()) if self.beta == "learned"
                    else torch.full((B, T, H), float(self.beta), device=x.device))
        else:
            q_f = q.float().softmax(-1)
            if self.kind == "liger-gla":
                k_f, log_decay = k.float().softmax(-1), log_gate / self.gate_normalizer
            else:  # liger-hgrn2: α = σ(k), the key is 1 − α
                k_f, log_decay = -torch.expm1(log_gate), log_gate
        v_f = v.float()
        if valid is not None:  # a pad adds nothing to the state and does not decay it
            keep = valid.float()
            k_f, v_f = k_f * keep[..., None, None], v_f * keep[..., None, None]
            log_decay = log_decay * keep.view(B, T, *([1] * (log_decay.dim() - 2)))
            if self.kind == "gated-deltanet":
                beta = beta * keep[..., None]
        if self.normalize:  # one more value channel of ones: its output is the denominator φ(q)·z
            v_f = torch.cat([v_f, torch.ones_like(v_f[..., :1]) if valid is None else keep[..., None, None].expand(
                *v_f.shape[:3], 1)], -1)
        k_f, v_f, log_decay = heads(k_f), heads(v_f), heads(log_decay)
        state = None if states is None else states.get("recurrent")
        if self.kind == "gated-deltanet":
            if decoding and state is not None:
                o, final = gated_delta_rule_step(q_f[:, 0], k_f[:, 0], v_f[:, 0], beta[:, 0], log_decay[:, 0], state)
                o = o.unsqueeze(1)
            else:
                o, final = gated_delta_rule(q_f, k_f, v_f, beta, log_decay, initial_state=state,
                                            output_final_state=states is not None, cu_seqlens=layout.cu_seqlens)
        elif decoding and state is not None:
            o, final = gated_linear_attention_step(q_f[:, 0], k_f[:, 0], v_f[:, 0], log_decay[:, 0], state, scale=1.0)
            o = o.unsqueeze(1)
        else:
            o, final = gated_linear_attention(q_f, k_f, v_f, log_decay, scale=1.0, initial_state=state,
                                              output_final_state=states is not None, cu_seqlens=layout.cu_seqlens)
        if states is not None:
            states["recurrent"] = final
        o = o.float()
        return o[..., :-1] / o[..., -1:].clamp(min=1e-6) if self.normalize else o


class LigerBlock(GradientCheckpointingLayer):
    """The teacher's decoder layer, names included (so LoRA targets and weights carry over)."""

    def __init__(self, config: LigerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LigerAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, layout: Layout, states=None):
        h = x + self.self_attn(self.input_layernorm(x), layout, states)
        return h + self.mlp(self.post_attention_layernorm(h))


class LigerModel(RecurrentModel):
    config_class = LigerConfig
    _no_split_modules = ["LigerBlock"]

    def __init__(self, config: LigerConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LigerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # (transformers' init helpers leave tensors loaded from a checkpoint alone)
        if isinstance(module, LlamaRotaryEmbedding):  # its buffers are not saved: transformers' own rule fills them
            PreTrainedModel._init_weights(self, module)
        elif isinstance(module, LlamaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LigerAttention):
            if hasattr(module, "b_proj"):
                init.zeros_(module.b_proj.weight)
                init.zeros_(module.b_proj.bias)
            if hasattr(module, "window_mix"):  # σ(window_mix) = the configured window_weight at first
                w = module.window_weight
                init.constant_(module.window_mix, math.log(w / (1 - w)))


class LigerForCausalLM(RecurrentForCausalLM):
    config_class = LigerConfig
    base_model_class = LigerModel
    _no_split_modules = ["LigerBlock"]
