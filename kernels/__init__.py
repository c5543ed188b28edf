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
token for decoding (per-step tensors [B, H, ...]; impl="auto"|"naive"|"triton": fla's fused
recurrent kernels on CUDA, the PyTorch step elsewhere). `pack_to_padded` / `padded_to_pack`
convert a packed batch (cu_seqlens) to padded rows and back.
"""
if __name__ == "kernels":
    # The repository root is the package `recur`, so with the root on sys.path (`python -m ...` run in a
    # checkout) `import kernels` finds this folder instead of Hugging Face's `kernels` package, which
    # transformers imports when it is installed. Hand such an import over to that package.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root, _path = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), list(_sys.path)
    _sys.path[:] = [p for p in _path if _os.path.abspath(p or ".") != _root]
    del _sys.modules[__name__]
    try:
        _sys.modules[__name__] = _importlib.import_module(__name__)
    finally:
        _sys.path[:] = _path
else:
    from ._common import pack_to_padded, padded_to_pack
    from .ops import (
        diagonal_recurrence,
        diagonal_recurrence_step,
        gated_delta_rule,
        gated_delta_rule_step,
        gated_linear_attention,
        gated_linear_attention_step,
        rg_lru,
        rwkv6,
        rwkv6_step,
        scalar_decay_attention,
        scalar_decay_attention_step,
        sliding_window_attention,
        sliding_window_attention_step,
    )

    __all__ = [
        "gated_linear_attention", "scalar_decay_attention", "rwkv6", "gated_delta_rule", "diagonal_recurrence", "rg_lru",
        "sliding_window_attention", "gated_linear_attention_step", "scalar_decay_attention_step", "rwkv6_step",
        "gated_delta_rule_step", "diagonal_recurrence_step", "sliding_window_attention_step", "pack_to_padded",
        "padded_to_pack",
    ]
