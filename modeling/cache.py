"""A constant-size cache for recurrent models, in transformers' Cache API.

Each layer keeps a dict of named state tensors (recurrent state, conv window, token-shift, ...)
whose size does not depend on the sequence length, plus the number of tokens it has seen, which
`generate()` asks for (a cache of linear-attention layers alone must still report a length).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class RecurrentLayer(CacheLayerMixin):
    def __init__(self):
        super().__init__()
        self.states: dict[str, object] = {}
        self.seen = 0

    def lazy_initialization(self, key_states=None, value_states=None):
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise NotImplementedError("a recurrent layer keeps states, not keys and values: use RecurrentCache.states")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.states.clear()
        self.seen = 0

    def _map(self, fn):
        self.states = {n: tuple(fn(t) for t in s) if isinstance(s, tuple) else fn(s) for n, s in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])


class RecurrentCache(Cache):
    """cache.states(layer_idx) is that layer's dict; cache.advance(n) counts n more tokens."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[RecurrentLayer() for _ in range(num_layers)])

    def states(self, layer_idx: int) -> dict:
        return self.layers[layer_idx].states

    def advance(self, tokens: int) -> None:
        for layer in self.layers:
            layer.seen += tokens
