"""The attention entry point: every CPU-runnable implementation against the reference einsum
(values and gradients, masks with holes, left padding and rows of different lengths), the
blockwise path's memory at 4k tokens, backend selection, and the splash kernel in Pallas
interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models import attention as attn
from rlver_jax.models.config import Qwen2Config


def random_qkv(rng, batch, queries, slots, heads, kv_heads, head_dim, dtype=jnp.float32):
    q = jnp.asarray(rng.normal(size=(batch, queries, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, slots, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, slots, kv_heads, head_dim)), dtype)
    return q, k, v


def slot_case(rng, batch, queries, slots, heads, kv_heads, head_dim, dtype=jnp.float32):
    """Random q, k, v and a slot mask like the sampler's cache: row 0 left padded, row 1
    with a hole (a rolled-back turn) and a shorter history, the last row seeing no key
    for its first queries; queries are the last `queries` slots (row 1: earlier ones)."""
    q, k, v = random_qkv(rng, batch, queries, slots, heads, kv_heads, head_dim, dtype)
    valid = rng.random((batch, slots)) > 0.2
    valid[0, :slots // 3] = False
    valid[1, slots // 4: slots // 2] = False
    valid[-1, :slots - queries // 2] = False
    query_slots = np.tile(np.arange(slots - queries, slots), (batch, 1))
    query_slots[1] -= slots // 8
    return q, k, v, jnp.asarray(valid), jnp.asarray(query_slots, jnp.int32)


def value_and_grads(implementation, q, k, v, key_valid, query_slots, **blocks):
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        out = attn.dot_product_attention(q, k, v, key_valid=key_valid,
                                         query_slots=query_slots,
                                         implementation=implementation, **blocks)
        return jnp.sum(weights * out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return out, grads


@pytest.mark.parametrize("queries", [1, 23])
@pytest.mark.parametrize("implementation,blocks", [
    ("blockwise", {"q_block": 8, "k_block": 16}),   # several blocks, ragged last block
    ("blockwise", {}),                              # the defaults: one block here
    ("xla", {}),
])
def test_matches_reference_values_and_grads(implementation, blocks, queries):
    q, k, v, valid, slots = slot_case(np.random.default_rng(0), 3, queries, 70, 4, 2, 8)
    want, want_grads = value_and_grads("reference", q, k, v, valid, slots)
    got, got_grads = value_and_grads(implementation, q, k, v, valid, slots, **blocks)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")
    # Rows that see no key (the last row's first queries) are 0, not an average.
    np.testing.assert_array_equal(got[-1, :1], 0)


def test_one_dimensional_query_slots_and_bf16():
    rng = np.random.default_rng(2)
    q, k, v, valid, _ = slot_case(rng, 2, 16, 48, 4, 1, 16, jnp.bfloat16)
    slots = jnp.arange(32, 48, dtype=jnp.int32)
    run = jax.jit(lambda implementation, **blocks: attn.dot_product_attention(
        q, k, v, key_valid=valid, query_slots=slots, implementation=implementation, **blocks),
        static_argnames=("implementation", "q_block", "k_block"))
    got = run("blockwise", q_block=4, k_block=8)
    want = run("reference")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)


def _temp_bytes(length, valid, blocks):
    q = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attn.dot_product_attention(
            q, k, v, key_valid=valid[:, :length], query_slots=jnp.arange(length),
            implementation="blockwise", **blocks) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_4k_tokens_with_holes_memory_linear_and_values():
    """Forward + backward at 4,096 tokens: scratch grows ~linearly (a [T, S] score tensor
    would grow 16x from 1,024), and sampled query rows match the reference einsum."""
    rng = np.random.default_rng(3)
    length = 4096
    valid = rng.random((1, length)) > 0.1
    valid[0, :300] = False                       # left padding
    valid[0, 2000:2600] = False                  # a hole
    valid = jnp.asarray(valid)
    blocks = {"q_block": 256, "k_block": 256}
    small, large = _temp_bytes(1024, valid, blocks), _temp_bytes(length, valid, blocks)
    assert large <= 5 * small, (small, large)

    q, k, v = random_qkv(rng, 1, length, length, 4, 2, 16)
    got = attn.dot_product_attention(q, k, v, key_valid=valid, query_slots=jnp.arange(length),
                                     implementation="blockwise", **blocks)
    rows = np.array([0, 299, 300, 1999, 2300, 2600, 4095])
    want = attn.dot_product_attention(q[:, rows], k, v, key_valid=valid,
                                      query_slots=jnp.asarray(rows[None], jnp.int32),
                                      implementation="reference")
    np.testing.assert_allclose(got[:, rows], want, atol=1e-5, rtol=0)


def test_auto_picks_per_backend():
    f32 = jnp.zeros((1, 256, 4, 128), jnp.float32)
    bf16 = f32.astype(jnp.bfloat16)
    kv16 = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    pick = attn.resolve_implementation
    assert pick("auto", f32, f32[:, :, :2], platform="cpu") == "blockwise"
    assert pick("auto", bf16, kv16, platform="gpu") == "cudnn"
    assert pick("auto", f32, f32[:, :, :2], platform="gpu") == "blockwise"
    assert pick("auto", bf16, kv16, causal_offset=0, platform="tpu") == "splash"
    assert pick("auto", bf16, kv16, causal_offset=None, platform="tpu") == "blockwise"
    assert pick("auto", bf16[:, :100], kv16, causal_offset=0, platform="tpu") == "blockwise"
    assert pick("xla", bf16, kv16, platform="tpu") == "xla"


def test_bad_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention='flash': expected one of"):
        Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, attention="flash")
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="implementation='splash' needs a static"):
        attn.dot_product_attention(q, q[:, :, :1], q[:, :, :1], key_valid=jnp.ones((1, 4), bool),
                                   query_slots=jnp.arange(4), implementation="splash")


def test_splash_interpret_matches_reference():
    """The TPU splash kernel, run by Pallas' interpreter on CPU (forward only: its backward
    interprets in ~10 s): causal by offset, left padding and a hole by segment ids."""
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 1, 128, 128, 2, 1, 32)
    valid = np.ones((1, 128), bool)
    valid[0, :30] = False
    valid[0, 100:120] = False
    valid = jnp.asarray(valid)
    got = attn.splash_attention(q, k, v, valid, causal_offset=0, interpret=True)
    want = attn.reference_attention(q, k, v, valid, jnp.arange(128)[None])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_decode_reads_only_filled_key_blocks():
    """A decode query at the cache's write index never reads key blocks past it: NaN in
    the unfilled slots (from the next block on) would poison any read of them."""
    rng = np.random.default_rng(5)
    q, k, v, valid, _ = slot_case(rng, 2, 1, 64, 4, 2, 8)
    index = 20
    valid = valid.at[:, index + 1:].set(False)
    slots = jnp.full((2, 1), index, jnp.int32)
    want = attn.reference_attention(q, k, v, valid, slots)
    poison = lambda x: x.at[:, 32:].set(jnp.nan)          # blocks 2, 3 of 16 slots
    got = attn.dot_product_attention(q, poison(k), poison(v), key_valid=valid,
                                     query_slots=slots, implementation="blockwise",
                                     k_block=16)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["blockwise", "reference"])
def test_stacked_cache_reads_one_layer_in_place(implementation):
    """With `layer`, k / v are a stacked [L, B, S, K, H] cache and only that layer is read
    (NaN in the other layers would poison the output); a decode query (one row, the
    broadcast-multiply block path) and a short chunk both match the reference."""
    rng = np.random.default_rng(6)
    for queries in (1, 5):
        q, k, v, valid, slots = slot_case(rng, 3, queries, 64, 6, 2, 8)
        want = attn.reference_attention(q, k, v, valid, slots)
        stack = lambda x: jnp.stack([jnp.full_like(x, jnp.nan), x, jnp.full_like(x, jnp.nan)])
        got = jax.jit(lambda q, k, v, layer: attn.dot_product_attention(
            q, k, v, key_valid=valid, query_slots=slots, implementation=implementation,
            layer=layer))(q, stack(k), stack(v), jnp.int32(1))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_decode_step_copies_no_cache():
    """A compiled decode step updates the stacked KV cache in place: no HLO copy of cache
    size (as scan inputs / outputs, or with one key block spanning the cache, XLA:CPU
    copied it once or twice per layer and step), over the layer scan and over per-layer
    weights; the latter also slices no weights out of a stack."""
    from flax import nnx
    from rlver_jax.models import create_model
    from rlver_jax.sampling import Sampler

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                         num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    model = create_model(config, 0)
    sampler = Sampler(model, decode_layers="unrolled")
    batch, capacity, new = 2, 64, 8
    cache = jax.eval_shape(lambda: sampler._new_cache(batch, capacity))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(batch))
    shape = ",".join(map(str, cache.k.shape))
    mlp = f"[{config.hidden_size},{config.intermediate_size}]"
    for layers in (None, sampler.decode_layer_weights(model)):
        compiled = sampler._decode.lower(
            nnx.state(model), cache, jax.ShapeDtypeStruct((batch, config.vocab_size),
                                                          jnp.float32),
            jnp.ones((batch,), bool), keys, jnp.int32(new), jnp.full((8,), -1, jnp.int32),
            jnp.float32(0), jnp.int32(0), jnp.float32(1), layers,
            max_new_bucket=new).compile()
        lines = compiled.as_text().splitlines()
        copies = [line for line in lines if f"[{shape}]" in line and " copy(" in line]
        assert not copies, copies
        weight_slices = [line for line in lines if "dynamic-slice" in line
                         and f"f32{mlp}" in line.split("=", 1)[-1][:24]]
        assert bool(weight_slices) == (layers is None), weight_slices
