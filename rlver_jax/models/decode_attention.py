"""Attention of one decode step (one query per row) over the stacked slot cache.

The same online softmax over key blocks as `attention.blockwise_attention` with one query
(the same operations in the same order, so the same numbers), with one difference: the
stacked cache [L, B, S, K, H] rides through the key-block loop's carry and comes back out.
A loop that only closes over the cache takes it as a read-only operand, and when the next
layer then writes its keys into that very buffer (decode over per-layer weights, an
unrolled layer loop), XLA:CPU copies the whole stacked cache into every layer's loop
instead; carried through, the loop's output is the buffer the next layer updates in place.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlver_jax.models import attention as attn
from rlver_jax.models.config import MASK_VALUE


def supported(q, k, implementation: str) -> bool:
    """Whether a step can take this path: one query, blockwise attention, and a capacity
    that splits into whole key blocks (padding the cache would copy it)."""
    if q.shape[1] != 1 or attn.resolve_implementation(implementation, q, k) != "blockwise":
        return False
    return k.shape[2] % attn.stacked_k_block(attn.DECODE_K_BLOCK, k.shape[2]) == 0


def decode_attention(q, k, v, *, key_valid, query_slots, layer):
    """q [B, 1, N, H]; k, v: the stacked cache [L, B, S, K, H], layer `layer` read;
    key_valid [B, S]; query_slots [B, 1] or [1]. Returns (out [B, 1, N, H] in q's dtype,
    k, v): the cache unchanged, to be used in place of the arguments."""
    b, t, n, h = q.shape
    s, kv = k.shape[2], k.shape[3]
    k_block = attn.stacked_k_block(attn.DECODE_K_BLOCK, s)
    key_valid = key_valid.astype(bool)
    q_rows, slots_rows = attn._layout(q, kv, attn._slots_2d(query_slots, b, t), 1)
    qb, sb = q_rows[:, 0], slots_rows[:, 0]                  # [B, K, G, H], [B, G]
    layer = jnp.asarray(layer, jnp.int32)
    scale = 1.0 / math.sqrt(h)
    start, stop = attn._key_block_range(key_valid, jnp.max(sb), k_block)

    def body(j, carry):
        *softmax, k, v = carry
        # Opaque to XLA, so it cannot forward the loop's unchanged cache around the loop.
        k, v = jax.lax.optimization_barrier((k, v))
        k0 = j * k_block
        k_blk, v_blk, valid_blk = attn._key_block(k, v, key_valid, layer, k0, k_block)
        s, mask = attn._block_scores(qb, k_blk, valid_blk, sb, k0, scale, True)
        return (*attn._online_softmax_step(softmax, s, mask, v_blk, True), k, v)

    r = qb.shape[2]
    init = (jnp.full((b, kv, r), MASK_VALUE, jnp.float32), jnp.zeros((b, kv, r), jnp.float32),
            jnp.zeros((b, kv, r, h), jnp.float32), k, v)
    _, l, acc, k, v = jax.lax.fori_loop(start, stop, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return attn._unlayout(out[:, None], b, t, n, h, kv, 1).astype(q.dtype), k, v
