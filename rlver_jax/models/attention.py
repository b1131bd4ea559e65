"""Grouped-query attention over slot masks: one entry point, several implementations.

Shapes: B batch, T queries, S key slots, N query heads, K key/value heads, G = N // K,
H head dim; in the blockwise code Q is a query block, C a key block and R = G * Q the rows
of one KV head's block (the G query heads that share it, stacked).

The mask is never a [B, T, S] tensor: it is (key_valid [B, S], query_slots [B, T]); key slot
s is visible to query t iff key_valid[b, s] and s <= query_slots[b, t]. That covers the
slot cache's left padding, holes after a roll-back and rows of different lengths, and it
lets the blockwise implementation skip key blocks past a query block's last slot (decode
reads only the filled part of the cache) and key blocks before any row's first valid slot.

Implementations:
  reference  the 5-D einsum over a [B, T, S] mask: the test oracle, quadratic memory.
  blockwise  flash-style online softmax in plain JAX, at most [B, K, G * q_block, k_block]
             scores live; a custom VJP recomputes block scores from the saved logsumexp.
  xla        `jax.nn.dot_product_attention(implementation="xla")` with a [B, T, S] mask.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16).
  splash     the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu`), for a
             static causal layout (training, plain forward).
  auto       blockwise on CPU; cudnn on GPU when its constraints hold; splash on a
             single-device TPU program with a static causal layout; else blockwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rlver_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from rlver_jax.models.config import MASK_VALUE  # finite: masked logits never give inf - inf

DEFAULT_Q_BLOCK = 256
DEFAULT_K_BLOCK = 256
# One query row per KV head group: the scores are tiny whatever the key block, so the block
# only sets how far past the filled length a step reads and how many loop trips it takes.
DECODE_K_BLOCK = 128
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCK = 128


def check_implementation(name: str, where: str = "attention") -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{where}={name!r}: expected one of {IMPLEMENTATIONS}")
    return name


def _slots_2d(query_slots: jax.Array, batch: int, length: int) -> jax.Array:
    query_slots = jnp.asarray(query_slots, jnp.int32)
    return jnp.broadcast_to(query_slots, (batch, length))


def allowed_mask(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
    """[B, T, S] bool: the dense form of the slot rule (reference and library kernels)."""
    b, s = key_valid.shape
    slots = jnp.arange(s, dtype=jnp.int32)
    return key_valid[:, None, :] & (slots[None, None, :] <= query_slots[:, :, None])


def any_visible(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
    """[B, T] bool: the query sees at least one key (its first valid slot is <= its slot)."""
    s = key_valid.shape[1]
    first = jnp.where(key_valid.any(axis=1), jnp.argmax(key_valid, axis=1), s)
    return first[:, None] <= query_slots


# ------------------------------------------------------------------------ reference
def reference_attention(q, k, v, key_valid, query_slots):
    """Today's 5-D GQA einsum over the dense mask (test oracle)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    allowed = allowed_mask(key_valid, query_slots)
    q5 = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q5, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
    scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    return jnp.where(allowed.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


# ------------------------------------------------------------------------ blockwise
def _pad_axis(x, axis, size, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _key_block_range(key_valid, last_slot, k_block):
    """[start, stop) key blocks that can hold a visible key for queries up to `last_slot`:
    from the first block with any valid slot (over the batch) to the block of the last
    query slot. Scalars (the loop is shared by the batch)."""
    n_blocks = key_valid.shape[1] // k_block
    block_valid = key_valid.reshape(key_valid.shape[0], n_blocks, k_block).any(axis=(0, 2))
    start = jnp.argmax(block_valid).astype(jnp.int32)
    stop = jnp.clip(last_slot // k_block + 1, 0, n_blocks).astype(jnp.int32)
    return start, jnp.maximum(stop, start)


def _scores(q_rows, k_blk, one_query=False):
    """q_rows [B, K, R, H] . k_blk [B, C, K, H] -> f32 [B, K, R, C].

    For a decode step the matmul is degenerate (R = G rows) and XLA:CPU would first
    transpose every key block to put the K batch axis in front; as a broadcast multiply and
    reduction in the block's own [B, C, K, H] order the block is read once, in place, and
    only the small scores are transposed. `one_query`: q_block is 1 (R == G)."""
    if one_query:
        prod = (q_rows.astype(jnp.float32)[:, None, :, :, :]
                * k_blk.astype(jnp.float32)[:, :, :, None, :])        # [B, C, K, R, H]
        return jnp.transpose(prod.sum(axis=-1), (0, 2, 3, 1))
    return jnp.einsum("BKRH,BCKH->BKRC", q_rows, k_blk, preferred_element_type=jnp.float32)


def _weighted_values(p, v_blk, one_query=False):
    """p [B, K, R, C] . v_blk [B, C, K, H] -> f32 [B, K, R, H] (see `_scores`)."""
    if one_query:
        p_c = jnp.transpose(p, (0, 3, 1, 2))                           # [B, C, K, R]
        prod = p_c[..., None] * v_blk.astype(jnp.float32)[:, :, :, None, :]
        return prod.sum(axis=1)
    return jnp.einsum("BKRC,BCKH->BKRH", p.astype(v_blk.dtype), v_blk,
                      preferred_element_type=jnp.float32)


def _block_scores(q_rows, k_blk, valid_blk, slots_rows, k0, scale, one_query=False):
    """Masked float32 scores [B, K, R, C] of one (query block, key block) pair and its mask.

    q_rows [B, K, R, H]; k_blk [B, C, K, H]; valid_blk [B, C]; slots_rows [B, R] (each
    row's query slot); k0: the block's first slot.
    """
    s = _scores(q_rows, k_blk, one_query) * scale
    key_slots = k0 + jnp.arange(k_blk.shape[1], dtype=jnp.int32)
    mask = valid_blk[:, None, :] & (key_slots[None, None, :] <= slots_rows[:, :, None])
    return jnp.where(mask[:, None], s, MASK_VALUE), mask[:, None]


def _layout(q, kv, query_slots, q_block):
    """Pads T and S to whole blocks and stacks each KV head's G query heads as rows.

    Returns q_rows [B, nQ, K, G * Q, H], k/valid padded, slots_rows [B, nQ, G * Q].
    Padded queries get slot -1 (they see nothing), padded keys are invalid.
    """
    b, t, n, h = q.shape
    g = n // kv
    nq = -(-t // q_block)
    q = _pad_axis(q, 1, nq * q_block)
    slots = _pad_axis(query_slots, 1, nq * q_block, value=-1)
    q_rows = (q.reshape(b, nq, q_block, kv, g, h).transpose(0, 1, 3, 4, 2, 5)
              .reshape(b, nq, kv, g * q_block, h))
    slots_rows = jnp.broadcast_to(slots.reshape(b, nq, 1, q_block),
                                  (b, nq, g, q_block)).reshape(b, nq, g * q_block)
    return q_rows, slots_rows


def _unlayout(rows, b, t, n, h, kv, q_block):
    """[B, nQ, K, G * Q, H] -> [B, T, N, H] (inverse of `_layout` for queries)."""
    nq = rows.shape[1]
    g = n // kv
    out = rows.reshape(b, nq, kv, g, q_block, h).transpose(0, 1, 4, 2, 3, 5)
    return out.reshape(b, nq * q_block, n, h)[:, :t]


def _key_block(k, v, key_valid, layer, k0, k_block):
    """Keys, values [B, C, K, H] and validity [B, C] of the key block starting at slot k0.

    k, v are stacked [L, B, S, K, H] and `layer` picks one: a block is sliced straight
    out of the stacked cache, so decode never copies a whole layer's cache out of it.
    """
    def block(x):
        starts = (layer, 0, k0) + (0,) * (x.ndim - 3)
        return jax.lax.dynamic_slice(x, starts, (1,) + x.shape[1:2] + (k_block,)
                                     + x.shape[3:])[0]
    return block(k), block(v), jax.lax.dynamic_slice_in_dim(key_valid, k0, k_block, axis=1)


def _online_softmax_step(carry, s, mask, v_blk, one_query=False):
    """One key block of the online softmax: the running max m [B, K, R], normaliser l
    [B, K, R] and unnormalised output acc [B, K, R, H] updated with the block's masked
    scores s / mask [B, K, R, C] and values v_blk [B, C, K, H]."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=-1)
    pv = _weighted_values(p, v_blk, one_query)
    return m_new, l, acc * correction[..., None] + pv


def stacked_k_block(k_block: int, capacity: int) -> int:
    """The key block for a stacked cache of `capacity` slots: at most half of it, so there
    are two or more blocks. A single block spanning the whole cache is a loop-invariant
    slice: XLA hoists it and fuses the in-place cache update into it, which costs two
    copies of the whole stacked cache per layer."""
    if capacity > 1:
        k_block = min(k_block, capacity // 2)
    return max(1, min(k_block, capacity))


def _blockwise_forward(q_rows, k, v, key_valid, slots_rows, layer, k_block, scale,
                       one_query=False):
    """Online softmax over key blocks (k, v stacked [L, B, S, K, H], `layer` the one read).
    Returns out [B, nQ, K, R, H] f32 and lse [B, nQ, K, R] f32 (0 on rows that see
    nothing; their out is 0)."""
    b, nq, kv, r, h = q_rows.shape

    def one_query_block(args):
        qb, sb = args                                       # [B, K, R, H], [B, R]
        start, stop = _key_block_range(key_valid, jnp.max(sb), k_block)

        def body(j, carry):
            k0 = j * k_block
            k_blk, v_blk, valid_blk = _key_block(k, v, key_valid, layer, k0, k_block)
            s, mask = _block_scores(qb, k_blk, valid_blk, sb, k0, scale, one_query)
            return _online_softmax_step(carry, s, mask, v_blk, one_query)

        init = (jnp.full((b, kv, r), MASK_VALUE, jnp.float32),
                jnp.zeros((b, kv, r), jnp.float32), jnp.zeros((b, kv, r, h), jnp.float32))
        m, l, acc = jax.lax.fori_loop(start, stop, body, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out, lse

    out, lse = jax.lax.map(one_query_block, (jnp.moveaxis(q_rows, 1, 0),
                                             jnp.moveaxis(slots_rows, 1, 0)))
    return jnp.moveaxis(out, 0, 1), jnp.moveaxis(lse, 0, 1)


def _blockwise_backward(q_rows, k, v, key_valid, slots_rows, layer, out, lse, d_out,
                        k_block, scale):
    """Flash backward: per query block, recompute each visible key block's probabilities
    from the saved logsumexp; dq per block, dk / dv [B, S, K, H] of layer `layer`
    accumulated over query blocks."""
    b, nq, kv, r, h = q_rows.shape
    # D = rowsum(dO * O): the softmax Jacobian's correction term.
    delta = jnp.einsum("BQKRH,BQKRH->BQKR", d_out, out)

    def one_query_block(carry, args):
        dk, dv = carry
        qb, sb, lb, dob, db = args
        start, stop = _key_block_range(key_valid, jnp.max(sb), k_block)

        def body(j, inner):
            dq, dk, dv = inner
            k0 = j * k_block
            k_blk, v_blk, valid_blk = _key_block(k, v, key_valid, layer, k0, k_block)
            s, mask = _block_scores(qb, k_blk, valid_blk, sb, k0, scale)
            p = jnp.where(mask, jnp.exp(s - lb[..., None]), 0.0)           # [B, K, R, C]
            dv_blk = jnp.einsum("BKRC,BKRH->BCKH", p, dob)
            dp = jnp.einsum("BKRH,BCKH->BKRC", dob, v_blk.astype(jnp.float32))
            ds = p * (dp - db[..., None]) * scale
            dq = dq + jnp.einsum("BKRC,BCKH->BKRH", ds, k_blk.astype(jnp.float32))
            dk_blk = jnp.einsum("BKRC,BKRH->BCKH", ds, qb.astype(jnp.float32))
            add = lambda acc, blk: jax.lax.dynamic_update_slice_in_dim(
                acc, jax.lax.dynamic_slice_in_dim(acc, k0, k_block, axis=1) + blk, k0, axis=1)
            return dq, add(dk, dk_blk), add(dv, dv_blk)

        dq0 = jnp.zeros(qb.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(start, stop, body, (dq0, dk, dv))
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape[1:], jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_rows, slots_rows, lse, d_out, delta))
    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros, zeros), xs)
    return jnp.moveaxis(dq, 0, 1), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blockwise_core(q_rows, k, v, key_valid, slots_rows, layer, k_block, scale, one_query):
    out, _ = _blockwise_forward(q_rows, k, v, key_valid, slots_rows, layer, k_block, scale,
                                one_query)
    return out


def _blockwise_core_fwd(q_rows, k, v, key_valid, slots_rows, layer, k_block, scale,
                        one_query):
    out, lse = _blockwise_forward(q_rows, k, v, key_valid, slots_rows, layer, k_block,
                                  scale, one_query)
    return out, (q_rows, k, v, key_valid, slots_rows, layer, out, lse)


def _blockwise_core_bwd(k_block, scale, one_query, res, d_out):
    q_rows, k, v, key_valid, slots_rows, layer, out, lse = res
    dq, dk, dv = _blockwise_backward(q_rows, k, v, key_valid, slots_rows, layer, out, lse,
                                     d_out.astype(jnp.float32), k_block, scale)
    # Only the layer read has a gradient (training passes one layer: L == 1, a reshape).
    place = lambda full, grad: jax.lax.dynamic_update_index_in_dim(
        jnp.zeros(full.shape, full.dtype), grad.astype(full.dtype), layer, 0)
    return (dq.astype(q_rows.dtype), place(k, dk), place(v, dv), None, None, None)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def blockwise_attention(q, k, v, key_valid, query_slots, q_block=DEFAULT_Q_BLOCK,
                        k_block=None, layer=None):
    """Flash-style attention in plain JAX (see the module docstring). With `layer`, k and v
    are a stacked cache [L, B, S, K, H] and layer `layer` is read in place.
    k_block None: DECODE_K_BLOCK for one query, else DEFAULT_K_BLOCK."""
    b, t, n, h = q.shape
    if k_block is None:
        k_block = DECODE_K_BLOCK if t == 1 else DEFAULT_K_BLOCK
    if layer is None:
        k, v, layer = k[None], v[None], jnp.zeros((), jnp.int32)
    else:
        k_block = stacked_k_block(k_block, k.shape[2])
    s, kv = k.shape[2], k.shape[3]
    q_block = max(1, min(q_block, t))
    k_block = max(1, min(k_block, s))
    s_padded = -(-s // k_block) * k_block
    k, v = _pad_axis(k, 2, s_padded), _pad_axis(v, 2, s_padded)
    key_valid = _pad_axis(key_valid, 1, s_padded, value=False)
    q_rows, slots_rows = _layout(q, kv, query_slots, q_block)
    out = _blockwise_core(q_rows, k, v, key_valid, slots_rows, jnp.asarray(layer, jnp.int32),
                          k_block, 1.0 / math.sqrt(h), q_block == 1)
    return _unlayout(out, b, t, n, h, kv, q_block).astype(q.dtype)


# ------------------------------------------------------------------- library kernels
def _jax_nn_attention(q, k, v, key_valid, query_slots, implementation):
    """`jax.nn.dot_product_attention` with the dense mask ([B, 1, T, S] bool: far smaller
    than float32 scores, but quadratic; cuDNN's sequence-length arguments cannot express
    left padding or holes)."""
    allowed = allowed_mask(key_valid, query_slots)
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None],
                                       implementation=implementation)
    return jnp.where(allowed.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


def cudnn_supported(q, k) -> bool:
    """cuDNN flash attention's constraints: half precision, head dim a multiple of 8, <= 128."""
    h = q.shape[-1]
    return (q.dtype in CUDNN_DTYPES and k.dtype == q.dtype and h % 8 == 0 and h <= 128)


def splash_supported(q, k, causal_offset) -> bool:
    t, s = q.shape[1], k.shape[1]
    return (causal_offset is not None and t % SPLASH_BLOCK == 0 and s % SPLASH_BLOCK == 0)


def splash_kernel(t: int, s: int, group: int, causal_offset: int, interpret: bool = False):
    """The splash MQA kernel for one KV head's G query heads, causal with a static offset
    (query t sits at slot causal_offset + t)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    mask = masks.MultiHeadMask([masks.CausalMask((t, s), offset=causal_offset)] * group)
    return splash.make_splash_mqa_single_device(mask, interpret=interpret)


def splash_attention(q, k, v, key_valid, causal_offset, interpret=False):
    """Pallas splash attention: causal by static offset, key validity by segment ids
    (queries are segment 1, valid keys 1, invalid keys 0), vmapped over rows and KV heads
    (MQA kernel per KV head: K/V are never repeated)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    kernel = splash_kernel(t, s, g, causal_offset, interpret)
    scale = 1.0 / math.sqrt(h)
    q_heads = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, K, S, H]

    def one(qh, kh, vh, valid):                              # [G, T, H], [S, H], [S, H], [S]
        ids = splash_attention_kernel.SegmentIds(q=jnp.ones((t,), jnp.int32),
                                                 kv=valid.astype(jnp.int32))
        return kernel(qh, kh, vh, segment_ids=ids)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q_heads, k_heads, v_heads, key_valid)       # [B, K, G, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    slots = causal_offset + jnp.arange(t, dtype=jnp.int32)
    seen = any_visible(key_valid, jnp.broadcast_to(slots, (b, t)))
    return jnp.where(seen[:, :, None, None], out, 0).astype(q.dtype)


# ------------------------------------------------------------------------ entry point
def _single_device_program() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def resolve_implementation(implementation, q, k, causal_offset=None,
                           platform: str | None = None) -> str:
    """The implementation "auto" stands for on this backend and these shapes."""
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "gpu" and cudnn_supported(q, k):
        return "cudnn"
    # Splash is a Pallas kernel: under an SPMD mesh it needs a shard_map wrapper that this
    # module does not (yet) provide, so sharded programs keep the blockwise path.
    if (platform == "tpu" and splash_supported(q, k, causal_offset)
            and _single_device_program()):
        return "splash"
    return "blockwise"


def dot_product_attention(q, k, v, *, key_valid, query_slots, implementation="auto",
                          causal_offset: int | None = None, q_block: int = DEFAULT_Q_BLOCK,
                          k_block: int | None = None, layer: jax.Array | None = None):
    """q: [B, T, N, H]; k, v: [B, S, K, H] (GQA: N % K == 0); key_valid: [B, S] bool;
    query_slots: [T] or [B, T] int32, the slot index of each query.
    Key slot s is visible to query t iff key_valid[b, s] and s <= query_slots[..., t].
    Returns [B, T, N, H] in q's dtype; softmax in float32. Rows with no visible key return 0
    (never NaN).

    causal_offset: a static promise that query_slots == causal_offset + arange(T) (the
    plain forward: 0), which kernels with static masks (splash) need.
    q_block / k_block: the blockwise implementation's tile sizes (k_block None:
    DECODE_K_BLOCK for a single query, DEFAULT_K_BLOCK otherwise).
    layer: k and v are a stacked cache [L, B, S, K, H] and this (traced) layer is read;
    the blockwise implementation slices its key blocks out of the stack in place (a decode
    step then never copies a layer's cache), the others take the layer's slice first.
    """
    b, t, n, h = q.shape
    kv_shape = k.shape if layer is None else k.shape[1:]
    if (kv_shape[0] != b or v.shape != k.shape or len(kv_shape) != 4 or n % kv_shape[2]
            or kv_shape[3] != h):
        raise ValueError(f"dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape}: "
                         "expected q [B, T, N, H], k = v [B, S, K, H] (with `layer`: "
                         "[L, B, S, K, H]) with N % K == 0")
    if key_valid.shape != (b, kv_shape[1]):
        raise ValueError(f"dot_product_attention: key_valid {key_valid.shape}, expected "
                         f"{(b, kv_shape[1])}")
    query_slots = _slots_2d(query_slots, b, t)
    key_valid = key_valid.astype(bool)
    name = resolve_implementation(implementation, q, k, causal_offset)
    if name == "blockwise":
        return blockwise_attention(q, k, v, key_valid, query_slots, q_block, k_block, layer)
    if layer is not None:
        pick = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
        k, v = pick(k).astype(q.dtype), pick(v).astype(q.dtype)
    if name == "reference":
        return reference_attention(q, k, v, key_valid, query_slots)
    if name in ("xla", "cudnn"):
        return _jax_nn_attention(q, k, v, key_valid, query_slots, name)
    if causal_offset is None:
        raise ValueError("dot_product_attention: implementation='splash' needs a static "
                         "causal_offset (query_slots == causal_offset + arange(T))")
    return splash_attention(q, k, v, key_valid, causal_offset)
