from .configuration_rwkv6 import RWKV6Config
from .convert import from_blinkdl, from_hf
from .modeling_rwkv6 import RWKV6ForCausalLM, RWKV6Model

__all__ = ["RWKV6Config", "RWKV6Model", "RWKV6ForCausalLM", "from_blinkdl", "from_hf"]
