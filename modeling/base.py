"""What every recur causal LM shares: weight init, generation settings, document layout, loss."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import RecurrentCache
from .layers import GatedRMSNorm, RMSNorm

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`
# (the old name is deprecated until 6.0); recur accepts both and fills whichever field this version has.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_output(output_class, cache, **fields):
    """output_class(..., cache=cache) under this transformers' name for the field."""
    return output_class(**fields, **{CACHE_FIELD: cache})


class RecurrentPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True  # generate() must not try assisted decoding: a recurrent state cannot roll back

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers saves, plus the model's code and `auto_map` (loadable without recur)."""
        from pathlib import Path

        from .remote_code import write_code

        if type(self).__module__.startswith("recur."):  # (loaded as remote code, transformers copies it)
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            self.config.auto_map = write_code(self, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RecurrentCache

    def _init_weights(self, module):
        # post_init() runs this over every module; family-specific parameters override it in their own class
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            nn.init.constant_(module.weight, 0.0 if getattr(module, "offset", 0.0) else 1.0)


def sequence_layout(shape, attention_mask=None, position_ids=None, past_length=0):
    """How the tokens of a batch [B, T] relate, for the recurrent layers.

    Returns (position_ids [B, T], pad [B, T, 1] float mask or None, cu_seqlens or None):
    - a 2-D attention_mask marks padding (left or right): pads become no-ops in every layer;
    - position_ids that restart at 0 mark packed documents: the batch is flattened to one row
      with cu_seqlens at every restart, so no state crosses a document boundary.
    """
    B, T = shape
    pad = None
    if attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.all():
        mask = attention_mask[:, -T:]
        pad = mask.unsqueeze(-1).float()
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + T).expand(B, T)
        return position_ids, pad, None
    restarts = position_ids == 0
    if pad is not None or past_length or not restarts[:, 1:].any():
        return position_ids, pad, None
    starts = restarts.clone()
    starts[:, 0] = True
    flat = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([flat, flat.new_tensor([B * T])])
    return position_ids, None, cu_seqlens


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None):
    """Next-token cross entropy; the prediction across a document boundary (next position 0) is not scored."""
    targets = next_token_targets(labels, position_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def next_token_targets(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, T-1]: the token each prediction scores, -100 where it crosses a document boundary."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    return targets


LOSS_LOGITS = 2 ** 25  # float32 logits per piece of the training loss (128 MB)


def loss_piece_tokens(vocab_size: int) -> int:
    """Tokens per piece of the training loss: as many as LOSS_LOGITS logits hold (8192 for a vocabulary of
    4096, 655 for 51200), so a loss that fits is taken in one piece and not recomputed."""
    return max(1, LOSS_LOGITS // vocab_size)


def chunked_causal_lm_loss(hidden: torch.Tensor, head, labels: torch.Tensor, position_ids: torch.Tensor | None,
                           chunk: int) -> torch.Tensor:
    """`causal_lm_loss(head(hidden), ...)` without the [B, T, vocab] float32 logits: `chunk` tokens at a
    time, each piece's logits recomputed in the backward (not kept). 0, not NaN, when nothing is scored."""
    from torch.utils.checkpoint import checkpoint

    targets = next_token_targets(labels, position_ids).flatten()
    h = hidden[:, :-1].flatten(0, 1)
    scored = (targets != -100).sum().clamp(min=1)
    if h.shape[0] <= chunk:  # one piece: nothing to save by recomputing it
        return _loss_sum(h, targets, head) / scored
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for at in range(0, h.shape[0], chunk):
        total = total + checkpoint(_loss_sum, h[at:at + chunk], targets[at:at + chunk], head, use_reentrant=False)
    return total / scored


def _loss_sum(hidden, targets, head):
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")


class Layout(NamedTuple):
    """What the blocks need to know about the tokens besides their values (see `sequence_layout`).

    When packed, tensors are flattened to one row: position_ids [1, B·T] and cu_seqlens set.
    """

    position_ids: torch.Tensor
    pad: torch.Tensor | None
    cu_seqlens: torch.Tensor | None


class RecurrentModel(RecurrentPreTrainedModel):
    """Embeddings → blocks → final norm, with the cache and the document layout handled once for
    every family. A family's __init__ builds `embeddings`, `layers` and `norm`; each block is
    called as block(x, layout, states, **extra) with `states` its dict in the cache (or None)."""

    def block_inputs(self) -> list[dict]:
        """Extra keyword arguments per block (e.g. HGRN2's lower bounds); none by default."""
        return [{} for _ in self.layers]

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def final_norm(self, x):
        return self.norm(x)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:  # as transformers does: a cache for inference, none for training
            use_cache = self.config.use_cache and not self.training
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = RecurrentCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        position_ids, pad, cu_seqlens = sequence_layout(x.shape[:2], attention_mask, position_ids, past)
        if cache is not None and cu_seqlens is not None:
            raise ValueError("packed documents (position_ids restarting at 0) cannot be run with a cache")
        shape = x.shape
        if cu_seqlens is not None:
            x, position_ids = x.reshape(1, -1, shape[-1]), position_ids.reshape(1, -1)
        layout = Layout(position_ids.to(x.device), pad, cu_seqlens)
        for i, (block, extra) in enumerate(zip(self.layers, self.block_inputs())):
            x = block(x, layout, None if cache is None else cache.states(i), **extra)
        x = self.final_norm(x).reshape(shape)
        if cache is not None:
            cache.advance(shape[1])
        return cache_output(BaseModelOutputWithPast, cache, last_hidden_state=x)


class RecurrentForCausalLM(RecurrentPreTrainedModel, GenerationMixin):
    """The family's `base_model_class` plus an LM head (tied to the embeddings if the config says so)."""

    base_model_class: type[RecurrentModel]
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        # as many outputs as embedding rows (a family may pad its vocabulary, as Mamba-2 does)
        self.lm_head = nn.Linear(config.hidden_size, self.model.get_input_embeddings().num_embeddings, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' generate, after checking the prompt: an empty one, or ids without an
        embedding row, would otherwise fail deep inside (an IndexError in the embedding, a CUDA assert)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if torch.is_tensor(ids) and not ids.is_floating_point():
            if ids.numel() == 0 and kwargs.get("inputs_embeds") is None:
                raise ValueError(f"generate: the prompt is empty (input_ids of shape {list(ids.shape)}); "
                                 "give at least one token per row")
            rows = self.get_input_embeddings().num_embeddings
            low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
            if low < 0 or high >= rows:
                sizes = f"vocab_size {self.config.vocab_size}" + (
                    f", the embedding has {rows} rows" if rows != self.config.vocab_size else "")
                raise ValueError(f"generate: input_ids holds token id {low if low < 0 else high}, "
                                 f"outside [0, {rows}) ({sizes})")
        return super().generate(inputs, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         cache=cache)
        hidden = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        if labels is not None and self.training and torch.is_grad_enabled() and not logits_to_keep:
            # training: the loss without holding the whole sequence's logits (fla's models do the same
            # with their fused linear cross entropy); no logits come back
            return cache_output(CausalLMOutputWithPast, getattr(out, CACHE_FIELD), logits=None,
                                loss=chunked_causal_lm_loss(hidden, self.logits, labels, position_ids,
                                                           loss_piece_tokens(self.config.vocab_size)))
        logits = self.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, position_ids)
        return cache_output(CausalLMOutputWithPast, getattr(out, CACHE_FIELD),
                            loss=loss, logits=logits)

    def logits(self, hidden):
        """The LM head (a family may post-process, e.g. Griffin's soft-cap)."""
        return self.lm_head(hidden)
