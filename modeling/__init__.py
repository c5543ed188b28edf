"""recur.modeling: HuggingFace-compatible recurrent language models.

Each family lives in its own folder and declares itself there (`FAMILY`, see family.py).
Importing this package finds them and registers each with transformers' Auto classes under its
own model type (`recur_gla`, `recur_mamba2`, ...), so they never clash with transformers' or
fla's registrations.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .family import Converter, Family, discover

FAMILIES: dict[str, Family] = discover()
for _family in FAMILIES.values():
    AutoConfig.register(_family.model_type, _family.config, exist_ok=True)
    AutoModel.register(_family.config, _family.model, exist_ok=True)
    AutoModelForCausalLM.register(_family.config, _family.causal_lm, exist_ok=True)

__all__ = ["FAMILIES", "Family", "Converter"]
