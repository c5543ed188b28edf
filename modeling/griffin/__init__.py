from .configuration_griffin import GriffinConfig
from .modeling_griffin import GriffinForCausalLM, GriffinModel

__all__ = ["GriffinConfig", "GriffinModel", "GriffinForCausalLM"]
