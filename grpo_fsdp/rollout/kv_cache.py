"""A KV cache preallocated to its final length, for `HFEngine`'s decode loop.

transformers' `DynamicCache` grows by concatenation: every decode step allocates the whole cache
again and copies it, so a 64-token rollout copies the prompt's keys and values 64 times per layer
(and, on CPU, page-faults fresh memory each time: the first rollout measured 0.36 s of `cat` in
a 1.0 s generate call of the tiny model, later ones 0.14 s). `StaticCache` avoids the copies but
hands attention the full preallocated length every step and cannot drop finished rows.

`PreallocatedLayer` keeps one buffer [B, H, capacity, D] per layer, writes each step's keys and
values in place and returns views of the filled part, so attention sees exactly the tokens so
far, as with `DynamicCache`; dropping finished rows is one gather of the kept rows.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose tensors live in buffers of `capacity` positions, filled in place."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"PreallocatedLayer: {self.length} + {n} positions exceed the capacity {self.capacity}")
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self.keys, self.values

    @property
    def keys(self) -> torch.Tensor:  # [B, H, length, D], a view
        return self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__ and reset assign None
        if value is not None:  # offloading and beam reordering replace the tensors: not supported here
            raise NotImplementedError("PreallocatedLayer: its tensors cannot be replaced; use batch_select_indices")
        self.length = 0

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:  # offloading and beam reordering replace the tensors: not supported here
            raise NotImplementedError("PreallocatedLayer: its tensors cannot be replaced; use batch_select_indices")
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove)) if tokens_to_remove < 0 else min(self.length, tokens_to_remove)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (any order, repeats allowed). One gather of whole rows: cheaper than gathering the
        filled part into a fresh buffer (a temporary and a second copy), and the unfilled tail is short by then."""
        if self.is_initialized:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))


def preallocated_cache(config: PretrainedConfig, capacity: int) -> Cache:
    """One `PreallocatedLayer` per decoder layer; models with sliding-window layers get a `DynamicCache`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if any(t != "full_attention" for t in layer_types):
        return DynamicCache(config=config)
    return Cache(layers=[PreallocatedLayer(capacity) for _ in layer_types])
