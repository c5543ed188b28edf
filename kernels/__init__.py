"""recur.kernels: the recurrences behind every recur model, one function each.

    gated_linear_attention   GLA, HGRN2, Liger        S = diag(e^g) S + kᵀv, o = scale·qS
    scalar_decay_attention   Mamba-2 (SSD), RetNet    same, one decay per head
    rwkv6                    RWKV-6                   o = r(S + diag(u)kᵀv), then S = diag(e^w) S + kᵀv
    gated_delta_rule         Titans, Gated DeltaNet   S = e^g (I − βkᵀk) S + βkᵀv
    diagonal_recurrence      Griffin, HGRN            h = e^a ⊙ h + x
    rg_lru                   Griffin                  gated, normalised diagonal recurrence
    sliding_window_attention Griffin, Liger, Titans   softmax over the last `window` keys

Each returns (output, final_state) and takes impl="auto"|"naive"|"chunk"|"triton",
initial_state, output_final_state and cu_seqlens. The `*_step` functions advance a state by one
token for decoding.
"""
from .naive import delta_rule_step as gated_delta_rule_step
from .naive import diagonal_step as diagonal_recurrence_step
from .naive import gla_step as gated_linear_attention_step
from .naive import rwkv6_step
from .naive import scalar_decay_step as scalar_decay_attention_step
from .naive import window_step as sliding_window_attention_step
from .ops import (
    diagonal_recurrence,
    gated_delta_rule,
    gated_linear_attention,
    rg_lru,
    rwkv6,
    scalar_decay_attention,
    sliding_window_attention,
)

__all__ = [
    "gated_linear_attention", "scalar_decay_attention", "rwkv6", "gated_delta_rule", "diagonal_recurrence", "rg_lru",
    "sliding_window_attention", "gated_linear_attention_step", "scalar_decay_attention_step", "rwkv6_step",
    "gated_delta_rule_step", "diagonal_recurrence_step", "sliding_window_attention_step",
]
