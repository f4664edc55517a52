"""The running batch's KV cache: a DynamicCache whose layers append into spare room."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A cache layer that appends into spare room instead of concatenating.

    ``DynamicLayer`` copies its whole cache (``torch.cat``) on every decode
    step: at 8 rows of 500 tokens that copy was half the step's time. Here
    ``keys``/``values`` are views of a larger buffer and a step writes one
    column. Whoever replaces ``keys`` (merging newcomers, dropping rows or
    padding) just makes the next update adopt the new tensor into a fresh buffer.
    """

    _spare_min = 256  # columns of room added when the buffer is full

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not self._owns_views() or new > self._key_buffer.shape[-2]:
            self._regrow(old, new, key_states)
        self._key_buffer[:, :, old:new] = key_states
        self._value_buffer[:, :, old:new] = value_states
        self.keys, self.values = self._key_buffer[:, :, :new], self._value_buffer[:, :, :new]
        return self.keys, self.values

    def _owns_views(self) -> bool:
        buffer = self._key_buffer
        return (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[0] == buffer.shape[0]
            and self.keys.stride() == buffer.stride()
        )

    def _regrow(self, old: int, new: int, like: torch.Tensor) -> None:
        shape = list(like.shape)
        shape[-2] = new + max(self._spare_min, new // 2)
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if old:
            keys[:, :, :old], values[:, :, :old] = self.keys, self.values
        self._key_buffer, self._value_buffer = keys, values


class GrowingCache(DynamicCache):
    """A :class:`DynamicCache` of :class:`GrowingLayer` (what the running batch decodes with)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    @classmethod
    def holding(cls, cache: Cache) -> "GrowingCache":
        """A growing copy of ``cache`` (a prefix-tuning adapter's virtual tokens)."""
        grown = cls()
        for index, layer in enumerate(cache.layers):
            grown.update(layer.keys, layer.values, index)
        return grown
