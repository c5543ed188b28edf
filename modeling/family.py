"""What a model family declares for the rest of recur, in its own folder.

Each subfolder of recur/modeling/ that defines `FAMILY = Family(...)` in its `__init__.py` is a
family. Registration with transformers' Auto classes, `recur convert`, the trainer (float32
parameters, FLOPs per token) and the generic tests iterate over these declarations, so adding a
family is adding a folder:

    FAMILY = Family(
        name="GLA", config=GLAConfig, model=GLAModel, causal_lm=GLAForCausalLM,
        mixing_flops=lambda config, seq_len: (..., "formula"),  # token mixing per token, forward
        converters=[Converter("fla GLA (fla-hub/gla-*)", model_type="gla", convert=from_fla)],
        signature="gk_proj",                                      # a tensor name only its checkpoints have
        tiny={"recur_gla": dict(vocab_size=101, hidden_size=48, ...)},
        bench={"recur_gla": BenchModel(lambda width, layers, vocab, max_len: GLAForCausalLM(...))},
    )

Parameters that must stay float32 (log-decays, rates) are the model class's own
`_keep_in_fp32_modules_strict`, which transformers' loading honours and the trainer checks.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Converter:
    """One official checkpoint layout a family reads: `convert(config_dict, state_dict) -> (config, state)`.

    A folder matches by its config.json's `model_type` (or by `matches(config_dict)` when the layout
    has none); a single file (no config) matches by its suffix and is converted with config {}.
    """

    name: str
    convert: Callable
    model_type: str | None = None
    matches: Callable[[dict], bool] | None = None
    file_suffixes: tuple[str, ...] = ()

    def reads_folder(self, config: dict) -> bool:
        if self.matches is not None:
            return self.matches(config)
        return self.model_type is not None and config.get("model_type") == self.model_type


BENCH_HEAD = 64  # head size of every model of `recur bench train` and `recur bench decode`'s lineup


@dataclass(frozen=True)
class BenchModel:
    """One model of the benchmarks' lineup: `build(width, layers, vocab, max_len)` with random weights and
    head size BENCH_HEAD. `peer` names the outside library's model it is timed against (built by
    `build_peer` with the same arguments), usually the very model recur converts from."""

    build: Callable
    peer: str | None = None
    build_peer: Callable | None = None


def bench_llama_config(width: int, layers: int, vocab: int, max_len: int):
    """The benchmarks' baseline transformer (transformers' Llama, SDPA attention) at the lineup's shape."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                       num_attention_heads=width // BENCH_HEAD, num_key_value_heads=width // BENCH_HEAD,
                       max_position_embeddings=max_len, tie_word_embeddings=False, attn_implementation="sdpa")


def converted(peer, convert: Callable, causal_lm: type, as_dict: bool = False):
    """recur's model converted from a peer model (`convert(config, state_dict)`): the same weights."""
    config, state = convert(peer.config.to_dict() if as_dict else peer.config, peer.state_dict())
    model = causal_lm(config)
    model.load_state_dict(state, strict=False)
    return model


@dataclass(frozen=True)
class Family:
    name: str  # as people write it: "Mamba-2", "Griffin / RecurrentGemma"
    config: type
    model: type
    causal_lm: type
    # forward FLOPs per token of the token mixing that has no weight of its own, summed over layers,
    # and the formula as text (train/flops.py adds 6N); None: not counted
    mixing_flops: Callable | None = None
    converters: list[Converter] = field(default_factory=list)
    signature: str | None = None  # a tensor-name fragment only this family's checkpoints carry
    tiny: dict[str, dict] = field(default_factory=dict)  # test configs: id -> config kwargs
    # `recur NAME ...` commands of the family's own: name -> (help, "module:function" taking argv)
    commands: dict[str, tuple[str, str]] = field(default_factory=dict)
    bench: dict[str, BenchModel] = field(default_factory=dict)  # benchmark lineup: id -> model

    @property
    def model_type(self) -> str:
        return self.config.model_type


def discover() -> dict[str, Family]:
    """model_type -> Family for every subpackage of recur.modeling that declares FAMILY."""
    import recur.modeling as package

    families = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.ispkg:
            family = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "FAMILY", None)
            if isinstance(family, Family):
                families[family.model_type] = family
    return families


def fp32_patterns(model) -> list[str]:
    """The model's `_keep_in_fp32_modules_strict` patterns (transformers collects them over submodules)."""
    return sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or [])


def fp32_parameter_names(model) -> list[str]:
    """Parameter names matched by the model's float32 patterns, as transformers' loading matches them
    (a regex search of each pattern, `*` a wildcard)."""
    patterns = fp32_patterns(model)
    if not patterns:
        return []
    regex = re.compile("|".join(p.replace("*", ".*") for p in patterns))
    return [n for n, _ in model.named_parameters() if regex.search(n)]


def tiny_configs() -> dict[str, tuple[str, dict]]:
    """Every family's test configs: id -> (model_type, kwargs). Ids are `model_type` or `model_type/variant`."""
    from . import FAMILIES

    return {name: (family.model_type, dict(kwargs)) for family in FAMILIES.values()
            for name, kwargs in family.tiny.items()}
