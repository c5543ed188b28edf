from .configuration_hgrn2 import HGRN2Config
from .modeling_hgrn2 import HGRN2ForCausalLM, HGRN2Model

__all__ = ["HGRN2Config", "HGRN2Model", "HGRN2ForCausalLM"]
