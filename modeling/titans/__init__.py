from .configuration_titans import TitansConfig
from .modeling_titans import TitansForCausalLM, TitansModel

__all__ = ["TitansConfig", "TitansModel", "TitansForCausalLM"]
