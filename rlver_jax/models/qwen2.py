"""Qwen2 / Qwen2.5 decoder in Flax NNX, with a slot-based KV cache.

Shapes: B batch, T query length, S key slots (cache capacity or T), D hidden, N query
heads, K key/value heads, G = N // K query heads per KV head, H head dim, F MLP width,
V vocabulary, L layers.

The decoder layers' weights are stacked along a leading L axis and the forward pass is a
`lax.scan` over them, so compile time does not grow with depth.

The KV cache is a row of *slots* shared by the batch: every call writes its T tokens into
slots [index, index + T) of all rows, and a per-row validity mask marks which slots hold
real tokens. Rows may therefore hold left padding or holes (a shorter turn appended to a
longer one); positions are tracked per row, so holes change nothing numerically. Slot
order is time order, which makes the causal rule "slot <= query slot".
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlver_jax.models import decode_attention, projections
from rlver_jax.models.attention import dot_product_attention
from rlver_jax.models.config import Qwen2Config
from rlver_jax.sharding import constrain


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences.

    k, v: [L, B, S, K, H]; valid: [B, S] bool (slot holds a real token);
    index: [] int32, next slot to write (same for all rows);
    next_position: [B] int32, rotary position of the row's next real token.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(config: Qwen2Config, batch_size: int, capacity: int,
               dtype: Any | None = None) -> KVCache:
    """An empty cache of `capacity` slots for `batch_size` rows."""
    shape = (config.num_layers, batch_size, capacity, config.num_kv_heads,
             config.resolved_head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch_size, capacity), bool),
        index=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, cast back to the input dtype before the scale (as HF Qwen2)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin: [B, T, H] in float32 for integer positions [B, T]."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)                                  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)                     # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] by the (half-split) rotary embedding of Qwen2 / Llama."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def decoder_layer(config: Qwen2Config, p: dict[str, jax.Array], x: jax.Array,
                  cos: jax.Array, sin: jax.Array, key_valid: jax.Array,
                  query_slots: jax.Array, kv: tuple[jax.Array, jax.Array] | None,
                  write_index: jax.Array | None, layer: jax.Array | None = None):
    """One pre-norm decoder block.

    x: [B, T, D]. Without a cache (`kv` None) keys are this call's own T tokens. With a
    cache, `kv` is every layer's stacked (k, v) [L, B, S, K, H]; this layer's new keys are
    written in place at [layer, :, write_index : write_index + T) and attention reads the
    layer out of the stack (no per-layer slice, update and re-stack of the cache).
    key_valid [B, S] and query_slots [B, T] are the slot mask (see models/attention.py).
    Returns (x, the updated stacked (k, v) or None).
    """
    dtype = config.jnp_dtype
    # No-ops when the weights are already in the compute dtype (the sampler's copy).
    w = {name: value.astype(dtype) for name, value in p.items()}
    out_major = projections.OUT_MAJOR_KEY in p  # decode's copies (`out_major_layer`)
    h = rms_norm(x, p["input_norm"], config.rms_norm_eps)
    if out_major:
        q, k, v = projections.qkv_out_major(h, w, config.num_heads, config.num_kv_heads)
    else:
        q = jnp.einsum("BTD,DNH->BTNH", h, w["q_kernel"]) + w["q_bias"]
        k = jnp.einsum("BTD,DKH->BTKH", h, w["k_kernel"]) + w["k_bias"]
        v = jnp.einsum("BTD,DKH->BTKH", h, w["v_kernel"]) + w["v_bias"]
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    if kv is None:
        keys, values, new_kv, layer = k, v, None, None
    else:
        k_cache, v_cache = kv
        zero = jnp.zeros((), jnp.int32)
        at = (layer, zero, write_index, zero, zero)
        keys = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        values = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        new_kv = (keys, values)
    if kv is not None and decode_attention.supported(q, keys, config.attention):
        attn, keys, values = decode_attention.decode_attention(
            q, keys, values, key_valid=key_valid, query_slots=query_slots, layer=layer)
        new_kv = (keys, values)
    else:
        attn = dot_product_attention(q, keys, values, key_valid=key_valid,
                                     query_slots=query_slots, implementation=config.attention,
                                     causal_offset=0 if kv is None else None, layer=layer)
    b, t, n, hd = attn.shape
    if out_major:
        x = x + projections.out_major_dot(attn.reshape(b, t, n * hd), w["o_out_major"])
    else:
        # As one [N * H, D] matmul: over the two contracted axes XLA:CPU transposes the
        # weight (every call) instead of the small activation.
        x = x + jnp.einsum("BTE,ED->BTD", attn.reshape(b, t, n * hd),
                           w["o_kernel"].reshape(n * hd, -1))
    x = constrain(x, ("batch", "length", "embed"))

    h = rms_norm(x, p["post_norm"], config.rms_norm_eps)
    if out_major:
        x = x + projections.swiglu_out_major(h, w)
    else:
        x = x + projections.swiglu_mlp(h, w["gate_kernel"], w["up_kernel"], w["down_kernel"])
    x = constrain(x, ("batch", "length", "embed"))
    return x, new_kv


class DecoderStack(nnx.Module):
    """All decoder layers, weights stacked on a leading L axis."""

    # name -> (shape given config, logical axes, initializer kind)
    @staticmethod
    def param_specs(c: Qwen2Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
        L, D, N, K, H, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                            c.resolved_head_dim, c.intermediate_size)
        return {
            "input_norm": ((L, D), ("layers", "norm"), "ones"),
            "q_kernel": ((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
            "q_bias": ((L, N, H), ("layers", "heads", "head_dim"), "zeros"),
            "k_kernel": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "k_bias": ((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
            "v_kernel": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "v_bias": ((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros"),
            "o_kernel": ((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
            "post_norm": ((L, D), ("layers", "norm"), "ones"),
            "gate_kernel": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "up_kernel": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "down_kernel": ((L, F, D), ("layers", "mlp", "embed"), "normal"),
        }

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        inits = {"ones": nnx.initializers.ones, "zeros": nnx.initializers.zeros,
                 "normal": nnx.initializers.normal(config.initializer_range)}
        for name, (shape, axes, kind) in self.param_specs(config).items():
            value = inits[kind](rngs.params(), shape, config.jnp_param_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=axes))

    def weights(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.param_specs(self.config)}

    def __call__(self, x, cos, sin, key_valid, query_slots, cache: KVCache | None,
                 layer_weights: tuple[dict[str, jax.Array], ...] | None = None):
        """`layer_weights`: every layer's weights as separate arrays (`unstack_layers`);
        then the layers run as an unrolled Python loop over them instead of a scan over the
        stacked weights (see `unstack_layers` for why decode on CPU wants that)."""
        config = self.config
        layer = functools.partial(decoder_layer, config)
        if config.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[config.remat])

        if layer_weights is not None:
            if len(layer_weights) != config.num_layers:
                raise ValueError(f"DecoderStack: {len(layer_weights)} layer_weights, expected "
                                 f"num_layers={config.num_layers}")
            kv = None if cache is None else (cache.k, cache.v)
            index = None if cache is None else cache.index
            for i, p in enumerate(layer_weights):
                x, kv = layer(p, x, cos, sin, key_valid, query_slots, kv, index,
                              None if cache is None else jnp.asarray(i, jnp.int32))
            return x, kv

        if cache is None:
            def body(h, p):
                h, _ = layer(p, h, cos, sin, key_valid, query_slots, None, None)
                return h, None
            x, _ = jax.lax.scan(body, x, self.weights())
            return x, None

        # The stacked cache rides in the carry, so every layer updates it in place
        # (as scan inputs / outputs it would be sliced and re-stacked every call).
        def body_cached(carry, p):
            h, k, v, layer_index = carry
            h, (k, v) = layer(p, h, cos, sin, key_valid, query_slots, (k, v), cache.index,
                              layer_index)
            return (h, k, v, layer_index + 1), None
        init = (x, cache.k, cache.v, jnp.zeros((), jnp.int32))
        (x, k, v, _), _ = jax.lax.scan(body_cached, init, self.weights())
        return x, (k, v)


def unstack_layers(stacked: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], ...]:
    """Per-layer weight dicts from the stacked [L, ...] ones (`DecoderStack.weights()`).

    A scan over stacked weights slices each layer's weights out of the stack with a
    dynamic-slice, and XLA:CPU's matmul cannot read such a slice in place: it copies every
    layer's weights before its matmuls, every call. A prefill amortises that over its
    tokens; a decode step at batch 8 of a 100M model spent about a third of its time on
    it. Separate arrays (made once, outside the decode program) are read in place.
    """
    layers = {len(w) for w in stacked.values()}
    if len(layers) != 1:
        raise ValueError(f"unstack_layers: stacked weights disagree on the layer count "
                         f"({sorted(layers)})")
    return tuple({name: w[i] for name, w in stacked.items()} for i in range(layers.pop()))


class Qwen2(nnx.Module):
    """Qwen2 causal LM: `model(input_ids)` -> float32 logits [B, T, V].

    Args of the forward pass:
      input_ids: [B, T] int.
      attention_mask: [B, T], 1 on real tokens (left padding allowed). Default all ones.
      positions: [B, T] rotary positions; default counts real tokens (0 on padding).
      cache: a KVCache to extend; then the call returns (logits, new_cache).
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, with_lm_head: bool = True):
        self.config = config
        c = config
        normal = nnx.initializers.normal(c.initializer_range)
        self.embed = nnx.Param(normal(rngs.params(), (c.vocab_size, c.hidden_size),
                                      c.jnp_param_dtype), logical_axes=("vocab", "embed"))
        self.layers = DecoderStack(c, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), c.jnp_param_dtype),
                                    logical_axes=("norm",))
        if with_lm_head and not c.tie_word_embeddings:
            self.lm_head = nnx.Param(normal(rngs.params(), (c.hidden_size, c.vocab_size),
                                            c.jnp_param_dtype), logical_axes=("embed", "vocab"))
        else:
            self.lm_head = None

    def head_weight(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding when tied)."""
        if self.lm_head is not None:
            return self.lm_head[...]
        return self.embed[...].T

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None, cache: KVCache | None = None,
                      layer_weights: tuple[dict[str, jax.Array], ...] | None = None):
        """Final-normed hidden states [B, T, D] (compute dtype) and the updated cache.
        `layer_weights` (optional): the decoder weights per layer (`unstack_layers`), used
        instead of the stacked ones."""
        c = self.config
        b, t = input_ids.shape
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else attention_mask.astype(bool))
        offset = 0 if cache is None else cache.next_position[:, None]
        if positions is None:
            positions = offset + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        cos, sin = rotary_tables(positions, c.resolved_head_dim, c.rope_theta)

        # The attention mask as the slot rule (models/attention.py): key slot s is visible
        # to query t iff it holds a real token and s <= t's slot. Never a [B, T, S] tensor.
        if cache is None:
            key_valid, query_slots = mask, jnp.arange(t, dtype=jnp.int32)
        else:
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            key_valid, query_slots = valid, cache.index + jnp.arange(t, dtype=jnp.int32)

        # The table is gathered over its embed split before the lookup (FSDP style), so the
        # backward scatters batch-split gradients into it; XLA's own choice would replicate
        # the whole [B, T, D] gradient on every device to match the table's split.
        table = constrain(self.embed[...], ("vocab", None))
        x = table.astype(c.jnp_dtype)[input_ids]
        x = constrain(x, ("batch", "length", "embed"))
        x, kv = self.layers(x, cos, sin, key_valid, query_slots, cache, layer_weights)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)

        if cache is None:
            return x, None
        new_cache = KVCache(
            k=kv[0], v=kv[1], valid=valid, index=cache.index + t,
            next_position=cache.next_position + mask.sum(axis=1, dtype=jnp.int32))
        return x, new_cache

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]."""
        w = self.head_weight().astype(self.config.jnp_dtype)
        return jnp.einsum("BTD,DV->BTV", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None,
                 cache: KVCache | None = None, layer_weights=None):
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache,
                                               layer_weights)
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)


class Qwen2Critic(nnx.Module):
    """The value model: the Qwen2 backbone plus a scalar head, `critic(ids)` -> [B, T] f32."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Qwen2(config, rngs=rngs, with_lm_head=False)
        # A zero head makes the first value estimates 0, a neutral baseline.
        self.value_kernel = nnx.Param(jnp.zeros((config.hidden_size,), jnp.float32),
                                      logical_axes=("embed",))
        self.value_bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, input_ids, attention_mask=None, positions=None):
        hidden, _ = self.backbone.hidden_states(input_ids, attention_mask, positions)
        return (jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), self.value_kernel[...])
                + self.value_bias[...])


def create_model(config: Qwen2Config, seed: int = 0, *, mesh=None, rules=None,
                 cls=Qwen2, **kwargs):
    """Builds a randomly initialised model inside `jax.jit`.

    Eager initialisation of a real-size model is slow and materialises every weight on
    the default device; jitting the init with `out_shardings` from the parameters' logical
    axes builds each shard directly where it lives.
    """
    from rlver_jax.sharding import param_shardings

    def build():
        return cls(config, rngs=nnx.Rngs(seed), **kwargs)

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None
    if mesh is not None:
        out_shardings = param_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def init_state():
        return nnx.state(build())

    return nnx.merge(graphdef, init_state())


def critic_from_policy(policy: Qwen2, config: Qwen2Config | None = None) -> Qwen2Critic:
    """A critic whose backbone holds a copy of the policy's current weights (cast to
    `config.param_dtype`; default the policy's config) and a zero head."""
    config = policy.config if config is None else config
    critic = nnx.eval_shape(lambda: Qwen2Critic(config, rngs=nnx.Rngs(0)))
    backbone_state = nnx.state(policy)
    critic_state = nnx.state(critic)
    values = {}
    for path, var in nnx.to_flat_state(critic_state):
        if path[0] == "backbone":
            src = backbone_state
            for key in path[1:]:
                src = src[key]
            values[path] = jnp.array(src[...], dtype=var.dtype, copy=True)
        else:
            values[path] = jnp.zeros(var.shape, var.dtype)
    for path, var in nnx.to_flat_state(critic_state):
        var.set_value(values[path]) if hasattr(var, "set_value") else setattr(var, "value", values[path])
    nnx.update(critic, critic_state)
    return critic


def compute_dtype_copy(model: nnx.Module) -> nnx.Module:
    """The model with every floating-point parameter cast to its compute dtype
    (`config.dtype`): what sampling reads. Float32 masters make a new, half-size copy;
    when the parameters are already stored in the compute dtype the arrays are shared."""
    graphdef, state = nnx.split(model)
    dtype = model.config.jnp_dtype
    cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      and x.dtype != dtype else x)
    return nnx.merge(graphdef, jax.tree.map(cast, state))


def count_params(config: Qwen2Config, with_lm_head: bool = True) -> int:
    """Parameter count from abstract shapes (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0), with_lm_head=with_lm_head))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return int(sum(leaf.size for leaf in leaves))
