"""What every recur causal LM shares: weight init, generation settings, document layout, loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from .layers import GatedRMSNorm, RMSNorm


class RecurrentPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True  # generate() must not try assisted decoding: a recurrent state cannot roll back

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
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
