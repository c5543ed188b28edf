"""Titans (arXiv 2501.00663) as a HuggingFace model: the neural long-term memory (memory.py) as the
sequence mixer alone (LMM) or with attention as a gate (MAG), a layer (MAL) or context (MAC).

Pre-norm residual blocks: h = x + Mixer(RMSNorm(x)) (MAL adds h = h + SWA(RMSNorm(h))), then
out = h + SwiGLU(RMSNorm(h)). MAG and MAC combine attention output y and memory output m as
RMSNorm(y) ⊙ σ(RMSNorm(m)) (the paper's ⊗: both normalised with learned vectors, then a non-linearity).

Persistent memory (x̃ = P ‖ x) is learned key/value tokens in front of every attention window or MAC
segment; for the memory branch a fixed prefix would only move its starting weights, which are
learned already, so the memory does not see P.

Packed documents (position_ids restarting at 0) run one document per row inside each block, so the
memory starts every document from its learned weights with zero momentum and no attention or conv
window crosses a document start. The cache holds the memory weights and momentum, the open memory
chunk (≤ b − 1 tokens), the conv windows, the attention window (MAG, MAL) and, for MAC, the open
segment's inputs (≤ segment_len − 1 tokens) with everything as it was at the segment start (a call
of several tokens recomputes the open segment from there) and, for decoding one token at a time, the
open segment's attention keys and values and the memory after the last token. Constant memory.

No official Titans checkpoint exists, so there is no converter.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ...kernels import pack_to_padded, padded_to_pack
from ..base import Layout, RecurrentForCausalLM, RecurrentModel
from ..layers import RMSNorm, ShortConvolution, SwiGLU
from .attention import SegmentAttention, WindowAttention
from .configuration_titans import TitansConfig
from .memory import NeuralMemory, l2norm_heads, mlp_read, one_token_step
from .rows import realign, tail, unalign, window_before, write_slots


def _substate(states, prefix):
    """The entries of a layer's cache dict under `prefix`, without it (None when there are none)."""
    if states is None:
        return None
    return {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)} or None


def _store(states, prefix, state):
    if states is not None and state is not None:
        states.update({prefix + k: v for k, v in state.items()})


def _select(done, new, old):
    """Per row: `new` where done [B] else `old` (dicts of tensors or tuples of tensors)."""
    pick = lambda a, b: torch.where(done.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
    return {k: tuple(map(pick, new[k], old[k])) if isinstance(new[k], tuple) else pick(new[k], old[k]) for k in new}


class MemoryGate(nn.Module):
    """y ⊗ m = RMSNorm(y) ⊙ σ(RMSNorm(m))."""

    def __init__(self, config):
        super().__init__()
        self.y_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.m_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, y, m):
        return self.y_norm(y) * torch.sigmoid(self.m_norm(m))


class MemoryLayer(nn.Module):
    """LMM: the memory alone (also MAL's first sub-block)."""

    def __init__(self, config):
        super().__init__()
        self.memory = NeuralMemory(config)

    def forward(self, x, position_ids, keep=None, states=None):
        out, state = self.memory(x, keep, _substate(states, "memory."), want_state=states is not None)
        _store(states, "memory.", state)
        return out

    def settle(self, states):
        _store(states, "memory.", self.memory.settle(_substate(states, "memory.")))


class MemoryAsGate(nn.Module):
    """MAG: sliding-window attention with persistent memory, gated with the memory's read of the same input."""

    def __init__(self, config):
        super().__init__()
        self.attention = WindowAttention(config)
        self.memory = NeuralMemory(config)
        self.gate = MemoryGate(config)

    def forward(self, x, position_ids, keep=None, states=None):
        y = self.attention(x, position_ids, keep, states)
        m, state = self.memory(x, keep, _substate(states, "memory."), want_state=states is not None)
        _store(states, "memory.", state)
        return self.gate(y, m)

    settle = MemoryLayer.settle  # the same memory under the same prefix


class MemoryAsContext(nn.Module):
    """MAC, segment by segment (eqs. 21–25): h = M_{segment start}(q(x)); y = Attn(P ‖ h ‖ x) causal
    over both; store y in the memory; out = y ⊗ M_t(y), M_t read token by token (its update included)."""

    def __init__(self, config):
        super().__init__()
        H, K = config.num_heads, config.head_dim
        self.segment_len, self.num_heads, self.activation = config.segment_len, H, config.memory_activation
        self.memory = NeuralMemory(config)
        self.context_q_proj = nn.Linear(config.hidden_size, H * K, bias=False)
        self.context_q_conv = ShortConvolution(H * K, config.memory_conv_size, bias=False, activation="silu")
        self.context_q_norm_weight = nn.Parameter(torch.ones(H * K))
        self.attention = SegmentAttention(config)
        self.gate = MemoryGate(config)

    def _query(self, u, weights, x):
        """h = M(q(x)) through `weights`, from the conv output u [B, T, H·K]."""
        q = l2norm_heads(u.to(weights[0].dtype), self.context_q_norm_weight, self.num_heads)
        return self.memory.output(mlp_read(weights, q, self.activation), x)

    def forward(self, x, position_ids, keep=None, states=None):
        if states is not None and "step_kv" in states and one_token_step(x, keep, states):
            return self.step(x, states)
        B, C = x.shape[0], self.segment_len
        opened = None if states is None or "context" not in states else [states["context"]]
        xs, lengths, index = realign([x], keep, opened, None if opened is None else states["context_count"])
        xs = xs[0]
        if lengths is None:
            lengths = torch.full((B,), xs.shape[1], dtype=torch.long, device=x.device)
        # everything as it was at the start of the first segment here
        memory = _substate(states, "memory.") or self.memory.initial_state(B, x.device)
        conv = None if states is None else states.get("context_conv")
        if conv is None:
            conv = x.new_zeros(B, self.context_q_conv.kernel_size - 1, self.context_q_proj.out_features)
        running, window, outs, kvs = memory, conv, [], []  # running, window: after each row's last token
        for start in range(0, xs.shape[1], C):
            seg = xs[:, start:start + C]
            valid = start + torch.arange(seg.shape[1], device=x.device) < lengths[:, None]
            inputs = self.context_q_proj(seg) * valid[..., None].to(seg.dtype)
            u, new_conv = self.context_q_conv(inputs, None, conv)
            y, kv = self.attention(seg, self._query(u, memory["weights"], seg), valid)
            in_segment = (lengths - start).clamp(0, seg.shape[1])
            m, new_memory = self.memory(y, valid, memory, want_state=True, lengths=in_segment,
                                        current=states is not None)
            outs.append(self.gate(y, m))
            kvs.append(kv)
            if states is not None:
                here = lengths > start  # rows with tokens in this segment
                running = _select(here, new_memory, running)
                ends = window_before(conv, inputs, in_segment, conv.shape[1])
                window = torch.where(here[:, None, None], ends, window)
            done = lengths >= start + C  # rows whose segment closed: their next one starts from here
            memory = _select(done, new_memory, memory)  # (its open chunk is empty: C is a multiple of b)
            conv = torch.where(done[:, None, None], new_conv, conv)
        out = unalign(torch.cat(outs, 1), index, keep)
        if states is not None:
            (rest,), count = tail([xs], lengths, C, C - 1)
            segment_kv, _ = tail([torch.cat(t, 2).transpose(1, 2) for t in zip(*kvs)], lengths, C, C)  # [B, C, H, K]
            k_h, k_x, v_h, v_x = (t.transpose(1, 2) for t in segment_kv)
            pk, pv = self.attention.persistent_kv(B, k_h.dtype)
            step_kv = (torch.cat([pk, k_h, k_x], 2), torch.cat([pv, v_h, v_x], 2))  # [B, H, N_p + 2C, K]
            states.update(context=rest, context_count=count, context_conv=conv, step_conv=window, step_kv=step_kv)
            _store(states, "memory.", memory)
            _store(states, "running.", running)
        return out

    def step(self, x, states):
        """One token per row from the cache: h from the segment-start weights, attention against the
        open segment's cached keys and values, the memory's own step; O(segment) memory, O(1) passes."""
        C = self.segment_len
        position = states["context_count"]  # the token's place in its segment
        u, conv = self.context_q_conv(self.context_q_proj(x), None, states["step_conv"])
        y, step_kv = self.attention.step(x, self._query(u, states["memory.weights"], x), position, states["step_kv"])
        m, running = self.memory(y, None, _substate(states, "running."), want_state=True)
        states.update(context=write_slots([states["context"]], position, [x[:, 0]])[0], step_conv=conv, step_kv=step_kv,
                      context_count=torch.where(position + 1 == C, 0, position + 1))
        _store(states, "running.", running)
        if not torch.compiler.is_compiling():  # compiled, the step has no branch on the data: the caller settles
            self.settle(states)
        return self.gate(y, m)

    def settle(self, states):
        """Rows whose segment just filled (count 0) start the next one from the running memory and conv
        window (and the running memory's own chunk settles); a no-op elsewhere."""
        running = self.memory.settle(_substate(states, "running."))
        if running is None:
            return
        _store(states, "running.", running)
        closed = states["context_count"] == 0  # also right after a prefill that ended a segment: equal there
        if closed.any():
            states["context_conv"] = torch.where(closed[:, None, None], states["step_conv"], states["context_conv"])
            _store(states, "memory.", _select(closed, running, _substate(states, "memory.")))


_MIXERS = {"lmm": MemoryLayer, "mal": MemoryLayer, "mag": MemoryAsGate, "mac": MemoryAsContext}


class TitansBlock(GradientCheckpointingLayer):
    def __init__(self, config: TitansConfig):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.config, self.variant = config, config.variant
        self.mixer_norm = RMSNorm(D, eps=eps)
        self.mixer = _MIXERS[config.variant](config)
        if config.variant == "mal":
            self.attention_norm = RMSNorm(D, eps=eps)
            self.attention = WindowAttention(config)
        self.mlp_norm = RMSNorm(D, eps=eps)
        self.mlp = SwiGLU(D, config.intermediate_size)

    def forward(self, x, layout: Layout, states=None):
        if layout.cu_seqlens is not None:  # packed documents: one row each (no cache when packed)
            cu = layout.cu_seqlens.to(x.device)
            rows = pack_to_padded(x, cu)
            N, L = rows.shape[:2]
            keep = torch.arange(L, device=x.device) < (cu[1:] - cu[:-1])[:, None]
            out = self._run(rows, torch.arange(L, device=x.device).expand(N, L), keep, None)
            return padded_to_pack(out, cu)
        keep = None if layout.pad is None else layout.pad[..., 0] > 0
        if self.config.compile_decode_step and one_token_step(x, keep, states):  # decoding, compiled
            h = _compiled_run()(self, x, layout.position_ids, None, states)
            self.mixer.settle(states)  # a chunk or segment that just closed: a branch on the data, kept outside
            return h
        return self._run(x, layout.position_ids, keep, states)

    def _run(self, x, position_ids, keep, states):
        h = x + self.mixer(self.mixer_norm(x), position_ids, keep, states)
        if self.variant == "mal":
            h = h + self.attention(self.attention_norm(h), position_ids, keep, states)
        return h + self.mlp(self.mlp_norm(h))


@functools.cache
def _compiled_run():
    """TitansBlock._run under torch.compile, for decoding (one shared function: the layers share its graphs)."""
    return torch.compile(TitansBlock._run, dynamic=False, fullgraph=True)  # a graph break is an error, not slow


class TitansModel(RecurrentModel):
    config_class = TitansConfig
    _no_split_modules = ["TitansBlock"]

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(TitansBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NeuralMemory):
            module.reset_parameters()
        elif isinstance(module, (WindowAttention, SegmentAttention)):
            nn.init.normal_(module.persistent)  # unit scale, like the normalised inputs beside them
        elif isinstance(module, MemoryAsContext):
            nn.init.ones_(module.context_q_norm_weight)


class TitansForCausalLM(RecurrentForCausalLM):
    config_class = TitansConfig
    base_model_class = TitansModel
    _no_split_modules = ["TitansBlock"]
