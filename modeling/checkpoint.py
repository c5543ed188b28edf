"""Checks shared by the checkpoint converters: the right family, every tensor accounted for."""
from __future__ import annotations

# Tensor-name fragments of architectures recur does not convert, checked before the families'
# own signatures (Mamba-1 also has A_log); a plain transformer's q_proj is checked last, since
# linear-attention layers have one too.
_OTHERS_FIRST = {"mixer.x_proj": "Mamba-1", "mixer.dt_proj": "Mamba-1", "time_mix_": "RWKV (v4/v5)"}
_OTHERS_LAST = {"self_attn.": "a Transformer", "q_proj": "a transformer or linear-attention model"}


def _signatures() -> dict[str, str]:
    from . import FAMILIES

    families = {f.signature: f.name for f in FAMILIES.values() if f.signature}
    return {**_OTHERS_FIRST, **families, **_OTHERS_LAST}


def guess_family(names) -> str:
    return guess_family_and_keys(names)[0]


def guess_family_and_keys(names) -> tuple[str, list[str]]:
    """The architecture a checkpoint's tensor names look like, and the names that gave it away."""
    names = list(names)
    for marker, family in _signatures().items():
        hits = sorted(n for n in names if marker in n)
        if hits:
            return family, hits
    return "an unknown architecture", []


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
