"""The copies of the sampling weights that unrolled (CPU) decode reads instead of the model's.

XLA:CPU copies each layer's slice of a stacked weight before its matmuls, every decode step,
so unrolled decode reads per-layer copies (`qwen2.unstack_layers`); and its matmul of a few
rows streams an output-major weight [O, D] once where it packs an input-major [D, O] one
first (`projections.out_major_dot`), so each layer's copies are fused and output-major
(`projections.out_major_layer`) and the head is read as [V, D]: a tied head is the
embedding table itself, an untied [D, V] one gets a transposed copy. All are made once per
set of weights and kept until another set comes: the policy's copies are made once per
train step and serve every turn.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from rlver_jax.models.projections import out_major_layer
from rlver_jax.models.qwen2 import unstack_layers


def _decode_layers(stacked: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], ...]:
    return tuple(out_major_layer(p) for p in unstack_layers(stacked))


class DecodeWeightCopies:
    """Per-layer output-major decoder weights and a [V, D] head, cached by their sources'
    identity."""

    def __init__(self):
        self._copy_layers = jax.jit(_decode_layers)
        # (the stacked arrays, their per-layer copies) and (the head's source, [V, D]):
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
            self._layers = (sources, self._copy_layers(stacked))
        return self._layers[1]

    def head(self, model: nnx.Module):
        """The output projection as [V, D]: the tied table in place, or a copy of lm_head.T."""
        if model.lm_head is None:
            return model.embed.get_value()
        source = model.lm_head.get_value()
        if self._head is None or self._head[0] is not source:
            self._head = None
            self._head = (source, source.T)
        return self._head[1]
