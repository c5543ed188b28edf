"""Configuration of a linearized transformer (`recur_liger`): the teacher's architecture plus how its
attention was turned into a gated recurrence.

Every size comes from the teacher's config (`from_teacher`), never from class defaults (Liger's
released code builds its config from Llama-2 defaults and fails on Llama-3). `linearization`:

    method: liger-gla        # liger-gla | liger-hgrn2 | gated-deltanet | window-only
    window: 64               # sliding-window softmax attention over the last `window` keys (RoPE, teacher q/k/v)
    sinks: 0                 # the first N tokens stay visible to the window (StreamingLLM / LoLA)
    window_weight: 0.5       # output = w · window + (1 − w) · recurrence (Liger: 0.5; window-only: 1)
    learn_window_weight: false # w = σ(a parameter per query head) starting at window_weight (not in Liger)
    normalize: false         # liger-gla / liger-hgrn2: divide the recurrence by φ(q)·Σ α-decayed φ(k), so it
                             # is a weighted mean of values like the window's (Liger: false, no denominator)
    keep_attention_layers: [] # these layers stay the teacher's softmax attention (a hybrid)
    gate_normalizer: 16.0    # liger-gla: log α = logsigmoid(k) / 16 per key channel (Liger)
    beta: learned            # gated-deltanet: β = σ(W_β x), W_β new and zero (β = 0.5 at first), or a number
    teacher: {...}           # where it came from (model_type, path), for the record
"""
from transformers import PretrainedConfig

METHODS = ("liger-gla", "liger-hgrn2", "gated-deltanet", "window-only")
TEACHER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_LINEARIZATION = {"method": "liger-gla", "window": 64, "sinks": 0, "window_weight": 0.5,
                         "learn_window_weight": False, "normalize": False, "keep_attention_layers": [],
                         "gate_normalizer": 16.0, "beta": "learned", "teacher": {}}


class LigerConfig(PretrainedConfig):
    model_type = "recur_liger"

    def __init__(self, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=None, hidden_act="silu",
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_parameters=None, qkv_bias=False,
                 o_bias=False, mlp_bias=False, qk_norm=False, teacher_windows=None, linearization=None,
                 initializer_range=0.02, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                 use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act, self.max_position_embeddings, self.rms_norm_eps = hidden_act, max_position_embeddings, rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.qkv_bias, self.o_bias, self.mlp_bias, self.qk_norm = qkv_bias, o_bias, mlp_bias, qk_norm
        # the teacher's own sliding window per layer (None: full attention), for the layers kept as attention
        self.teacher_windows = list(teacher_windows) if teacher_windows is not None else [None] * num_hidden_layers
        self.linearization = {**DEFAULT_LINEARIZATION, **(linearization or {})}
        self.initializer_range, self.use_cache = initializer_range, use_cache
        self._check()
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self):
        lin = self.linearization
        if lin["method"] not in METHODS:
            raise ValueError(f"linearization.method {lin['method']!r} is not one of {', '.join(METHODS)}")
        if not isinstance(lin["window"], int) or not 1 <= lin["window"] <= self.max_position_embeddings:
            raise ValueError(f"linearization.window must be between 1 and the teacher's context "
                             f"{self.max_position_embeddings}, got {lin['window']!r}")
        if not isinstance(lin["sinks"], int) or lin["sinks"] < 0:
            raise ValueError(f"linearization.sinks must be an int >= 0, got {lin['sinks']!r}")
        if not 0 <= lin["window_weight"] <= 1:
            raise ValueError(f"linearization.window_weight must be in [0, 1], got {lin['window_weight']!r}")
        if lin["learn_window_weight"] and not 0 < lin["window_weight"] < 1:
            raise ValueError(f"linearization.learn_window_weight starts from window_weight, which must then be "
                             f"strictly between 0 and 1, got {lin['window_weight']!r}")
        bad = [i for i in lin["keep_attention_layers"] if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"linearization.keep_attention_layers: {bad} out of range (the teacher has "
                             f"{self.num_hidden_layers} layers, 0-{self.num_hidden_layers - 1})")
        if lin["beta"] != "learned" and not (isinstance(lin["beta"], (int, float)) and 0 < lin["beta"] <= 2):
            raise ValueError(f"linearization.beta must be 'learned' or a number in (0, 2], got {lin['beta']!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")

    def layer_kind(self, i: int) -> str:
        """'attention' for a kept softmax-attention layer, else the linearization method."""
        return "attention" if i in self.linearization["keep_attention_layers"] else self.linearization["method"]

    @classmethod
    def from_teacher(cls, teacher_config, **linearization) -> "LigerConfig":
        """The student's config from a Llama-family teacher's (a transformers config object)."""
        kind = teacher_config.model_type
        if kind not in TEACHER_TYPES:
            raise ValueError(f"the teacher is a {kind!r} model; recur linearize reads Llama-family models "
                             f"({', '.join(TEACHER_TYPES)}; SmolLM2 and Llama 2/3 are 'llama')")
        heads = teacher_config.num_attention_heads
        head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // heads
        bias = bool(getattr(teacher_config, "attention_bias", False))
        windows = [_teacher_window(teacher_config, i) for i in range(teacher_config.num_hidden_layers)]
        return cls(
            vocab_size=teacher_config.vocab_size, hidden_size=teacher_config.hidden_size, intermediate_size=teacher_config.intermediate_size,
            num_hidden_layers=teacher_config.num_hidden_layers, num_attention_heads=heads,
            num_key_value_heads=getattr(teacher_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            hidden_act=teacher_config.hidden_act, max_position_embeddings=teacher_config.max_position_embeddings,
            rms_norm_eps=teacher_config.rms_norm_eps, rope_parameters=dict(teacher_config.rope_parameters),
            qkv_bias=True if kind == "qwen2" else bias, o_bias=False if kind == "qwen2" else bias,
            mlp_bias=bool(getattr(teacher_config, "mlp_bias", False)), qk_norm=kind == "qwen3", teacher_windows=windows,
            tie_word_embeddings=teacher_config.tie_word_embeddings, bos_token_id=teacher_config.bos_token_id,
            eos_token_id=teacher_config.eos_token_id, pad_token_id=teacher_config.pad_token_id,
            linearization={**linearization, "teacher": {"model_type": kind, **linearization.get("teacher", {})}})


def _teacher_window(teacher_config, layer: int):
    """The teacher's sliding window of one layer (Mistral: every layer; Qwen2/3: the sliding_attention
    layers), or None for full attention."""
    window = getattr(teacher_config, "sliding_window", None)
    if not window:
        return None
    if teacher_config.model_type == "mistral":
        return window
    types = getattr(teacher_config, "layer_types", None)
    return window if types is not None and types[layer] == "sliding_attention" else None
