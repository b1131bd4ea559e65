"""The copies of the sampling weights that unrolled (CPU) decode reads instead of the model's.

XLA:CPU copies each layer's slice of a stacked weight before its matmuls, every decode step,
so unrolled decode reads per-layer copies (`qwen2.unstack_layers`); and its batch > 1
matmul streams a [D, V] head faster than the tied [V, D] embedding, so a tied head is read
from a transposed copy. Both are made once per set of weights and kept until another set
comes: the policy's copies are made once per train step and serve every turn.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from rlver_jax.models.qwen2 import unstack_layers


class DecodeWeightCopies:
    """Per-layer decoder weights and a [D, V] tied head, cached by their sources' identity."""

    def __init__(self):
        self._unstack = jax.jit(unstack_layers)
        # (the stacked arrays, their per-layer copies) and (the embedding, its [D, V] copy):
        # holding the sources keeps their identity a valid key; new weights replace a pair.
        self._layers: tuple[tuple, Any] | None = None
        self._head: tuple[Any, Any] | None = None

    def layers(self, model: nnx.Module):
        stack = model.layers
        stacked = {name: getattr(stack, name).get_value() for name in
                   stack.param_specs(stack.config)}
        sources = tuple(stacked.values())
        if self._layers is None or any(a is not b for a, b in zip(self._layers[0], sources)):
            self._layers = None  # the old copies go before the new ones are made
            self._layers = (sources, self._unstack(stacked))
        return self._layers[1]

    def head(self, model: nnx.Module, batch: int):
        """None for one row (it reads the table as fast in place) and for an untied head
        (stored [D, V] already)."""
        if batch < 2 or model.lm_head is not None:
            return None
        table = model.embed.get_value()
        if self._head is None or self._head[0] is not table:
            self._head = None
            self._head = (table, table.T)
        return self._head[1]
