from .configuration_mamba2 import Mamba2Config
from .convert import from_transformers
from .modeling_mamba2 import Mamba2ForCausalLM, Mamba2Model

__all__ = ["Mamba2Config", "Mamba2Model", "Mamba2ForCausalLM", "from_transformers"]
