"""recur.modeling: HuggingFace-compatible recurrent language models.

Importing it registers each family with transformers' Auto classes under its own model type
(`recur_gla`, `recur_hgrn2`, `recur_mamba2`, `recur_rwkv6`, `recur_griffin`, `recur_titans`), so they never clash with transformers' or fla's registrations.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .gla import GLAConfig, GLAForCausalLM, GLAModel
from .griffin import GriffinConfig, GriffinForCausalLM, GriffinModel
from .hgrn2 import HGRN2Config, HGRN2ForCausalLM, HGRN2Model
from .mamba2 import Mamba2Config, Mamba2ForCausalLM, Mamba2Model
from .rwkv6 import RWKV6Config, RWKV6ForCausalLM, RWKV6Model
from .titans import TitansConfig, TitansForCausalLM, TitansModel

FAMILIES = [
    (GLAConfig, GLAModel, GLAForCausalLM),
    (HGRN2Config, HGRN2Model, HGRN2ForCausalLM),
    (Mamba2Config, Mamba2Model, Mamba2ForCausalLM),
    (RWKV6Config, RWKV6Model, RWKV6ForCausalLM),
    (GriffinConfig, GriffinModel, GriffinForCausalLM),
    (TitansConfig, TitansModel, TitansForCausalLM),
]
for _config, _model, _lm in FAMILIES:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
