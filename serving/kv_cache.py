"""A KV cache that decodes without copying itself every step.

``transformers``' ``DynamicCache`` concatenates each new token's keys and values onto the whole
cache, so a decode step copies ``B x T`` positions of every layer (at 64 rows and 1024 positions
that copy is most of the step on a CPU). :class:`RoomyCache` keeps each layer's keys and values in
a buffer with room to grow: a step writes one position in place and the model sees a view of the
positions written. The buffer grows by a quarter (at least 256 positions) when full, so copies are
rare. Rows leave with :meth:`RoomyLayer.batch_select_indices`; :meth:`RoomyCache.trim_left` drops
leading positions no row attends to (left padding) without a copy.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

GROW_MIN = 256  # positions added at least when a buffer is full


class RoomyLayer(DynamicLayer):
    """One layer's keys and values ``(B, H, T, D)``: views of the first ``T`` positions of a buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self._n, key_states.shape[-2]
        if self._k is None or n + t > self._k.shape[-2]:
            cap = n + t + max(GROW_MIN, (n + t) // 4)
            k = key_states.new_empty(key_states.shape[:2] + (cap, key_states.shape[-1]))
            v = value_states.new_empty(value_states.shape[:2] + (cap, value_states.shape[-1]))
            if n:
                k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
            self._k, self._v = k, v
        self._k[:, :, n:n + t] = key_states
        self._v[:, :, n:n + t] = value_states
        self._n = n + t
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._n:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def trim_left(self, positions: int) -> None:
        """Drop the first ``positions`` positions (the buffer keeps its storage; no copy)."""
        if self.is_initialized and self._n and positions:
            self._k, self._v = self._k[:, :, positions:], self._v[:, :, positions:]
            self._n -= positions
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and tokens_to_remove:
            self._n = self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._n:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._views()


class RoomyCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`RoomyLayer`: the same keys and values, written in place."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=RoomyLayer)

    def trim_left(self, positions: int) -> None:
        """Drop the first ``positions`` positions of every layer (columns of left padding)."""
        for layer in self.layers:
            layer.trim_left(positions)
