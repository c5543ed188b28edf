"""Checks shared by the checkpoint converters: the right family, every tensor accounted for."""
from __future__ import annotations

# A tensor name that only one family's checkpoints carry, to name the family of a wrong checkpoint.
_SIGNATURES = {
    "time_maa": "RWKV-6", "time_mix_": "RWKV (v4/v5)", "A_log": "Mamba-2 / Mamba", "gk_proj": "GLA",
    "f_proj": "HGRN2", "lower_bounds": "HGRN2", "rg_lru": "Griffin / RecurrentGemma",
    "recurrent_param": "Griffin / RecurrentGemma", "q_proj": "a transformer or linear-attention model",
}


def guess_family(names) -> str:
    for marker, family in _SIGNATURES.items():
        if any(marker in n for n in names):
            return family
    return "an unknown architecture"


def require_family(names, marker: str, family: str) -> None:
    """Refuse a checkpoint that lacks the tensors every `family` checkpoint has."""
    if not any(marker in n for n in names):
        raise ValueError(f"not a {family} checkpoint (no '{marker}' tensors): it looks like {guess_family(names)}")


def check_tensors(expected, got, source: str) -> None:
    """Every expected tensor present and nothing else, or one error naming the differences."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        show = lambda names: ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        parts = ([f"missing {show(missing)}"] if missing else []) + ([f"unexpected {show(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source} checkpoint does not match the architecture: " + "; ".join(parts))
