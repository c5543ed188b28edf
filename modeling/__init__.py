"""recur.modeling: HuggingFace-compatible recurrent language models.

Importing it registers each family with transformers' Auto classes under its own model type
(`recur_gla`, `recur_hgrn2`, ...), so they never clash with transformers' or fla's registrations.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .gla import GLAConfig, GLAForCausalLM, GLAModel
from .hgrn2 import HGRN2Config, HGRN2ForCausalLM, HGRN2Model

for _config, _model, _lm in [(GLAConfig, GLAModel, GLAForCausalLM), (HGRN2Config, HGRN2Model, HGRN2ForCausalLM)]:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
