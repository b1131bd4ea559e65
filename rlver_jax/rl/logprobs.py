"""Log-probs and entropies of the LM head, in sequence chunks. Pure JAX.

Shapes: B = sequences, T = tokens, D = hidden size, V = vocabulary. The [B, T, V] float32
logits never exist whole (see `token_logprobs_and_entropy`). Sharding is the caller's: it
passes a `constrain` function rather than this module reading a global rule table.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
# (array, logical axis names per dimension) -> the array under a sharding constraint.
Constrain = Callable[[Array, Sequence[str | None]], Array]


def _logsumexp(z: Array) -> Array:
    """Stable logsumexp over the last axis, [..., V] -> [...].

    Plain max-shift form: `jax.nn.logsumexp` adds guards for all-(-inf) rows that these
    callers never produce, and they cost seconds of XLA compile time on CPU.
    """
    shift = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return shift[..., 0] + jnp.log(jnp.sum(jnp.exp(z - shift), axis=-1))


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of softmax(logits) over the last axis, in float32.

    H = logsumexp(z) - sum_v softmax(z)_v z_v.

    Logits of -inf (banned tokens) are allowed as long as one entry per row is finite.

    Args:
      logits: [..., V].

    Returns:
      [...] float32.
    """
    z = jnp.asarray(logits).astype(jnp.float32)
    lse = _logsumexp(z)
    probs = jnp.exp(z - lse[..., None])
    # where(): 0 * -inf would be NaN for banned tokens; their contribution is 0.
    return lse - jnp.sum(jnp.where(probs > 0, probs * z, 0.0), axis=-1)


def _chunk_logprobs_and_entropy(
    head_weight: Array, hidden: Array, targets: Array, temperature: Array, compute_dtype,
    constrain: Constrain | None = None, vocab_major: bool = False,
) -> tuple[Array, Array]:
    """One chunk: BCD,DV->BCV (BCD,VD->BCV if vocab_major) logits in float32, then logp at
    targets and entropy, [B, C]."""
    if constrain is not None:
        # On a mesh: rows stay split over the batch axes and the head is gathered over D
        # (the FSDP way). Left to itself, XLA splits the contraction over D like the stored
        # weight and reshards the activations by replicating them in full.
        hidden = constrain(hidden, ("batch", "length", None))
        head_weight = constrain(head_weight, ("vocab", None) if vocab_major else (None, "vocab"))
    logits = jnp.einsum(
        "BCD,VD->BCV" if vocab_major else "BCD,DV->BCV",
        hidden.astype(compute_dtype),
        head_weight.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    logits = logits / temperature
    lse = _logsumexp(logits)
    # One-hot select rather than a gather: its backward is elementwise instead of a
    # scatter, which compiles faster and maps well to TPU/GPU; the cost is V-sized
    # elementwise work, which the softmax already pays.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return target_logit - lse, entropy


def token_logprobs_and_entropy(
    hidden: Array,
    head_weight: Array,
    targets: Array,
    chunk_size: int = 1024,
    compute_dtype=None,
    temperature: float | Array = 1.0,
    constrain: Constrain | None = None,
    vocab_major: bool = False,
) -> tuple[Array, Array]:
    """Log-probs of `targets` and entropies from the LM head, without the full [B, T, V].

    The sequence is cut into chunks of `chunk_size` tokens (T is padded up to a multiple);
    a `lax.scan` runs one rematerialised (`jax.checkpoint`) chunk at a time, so at most a
    [B, chunk, V] float32 logits block is alive, in the forward and in the backward pass
    (the backward recomputes each chunk's logits from the saved inputs). Peak extra memory
    is about 3 * B * chunk * V * 4 bytes.

        logits[b, t] = hidden[b, t] @ head_weight / temperature     (float32 accumulation)
        logp[b, t]   = log_softmax(logits[b, t])[targets[b, t]]
        entropy[b,t] = H(softmax(logits[b, t]))

    Args:
      hidden: [B, T, D] final hidden states (after the final norm).
      head_weight: [D, V] LM-head matrix, or [V, D] with `vocab_major` (a tied embedding
        as stored: passing `embedding.T` instead costs XLA a copy of the whole table).
      targets: [B, T] int token ids (the next tokens; shift before calling).
      chunk_size: tokens per chunk (static).
      compute_dtype: dtype of the matmul inputs (e.g. bfloat16); default hidden.dtype. The
        accumulation and everything after it are float32.
      temperature: logits are divided by it (sampling temperature); may be traced.
      constrain: `(x, logical_axes) -> x`, the caller's sharding constraint by logical axis
        names (e.g. `rlver_jax.sharding.constrain`), applied to each chunk's hidden states
        and to the head; None: no constraint (one device, or XLA's choice).
      vocab_major: `head_weight` is [V, D].

    Returns:
      (logp, entropy), each [B, T] float32.
    """
    batch, length, _ = hidden.shape
    compute_dtype = hidden.dtype if compute_dtype is None else jnp.dtype(compute_dtype)
    chunk = max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    targets = jnp.asarray(targets, jnp.int32)
    if pad:
        # Padded tokens use target 0; their outputs are sliced away below.
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # Chunk-major layout for the scan: [N, B, C, D] and [N, B, C].
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
    temperature = jnp.asarray(temperature, jnp.float32)

    chunk_fn = jax.checkpoint(_chunk_logprobs_and_entropy, static_argnums=(4, 5, 6))

    def body(carry, xs):
        h_c, t_c = xs
        return carry, chunk_fn(head_weight, h_c, t_c, temperature, compute_dtype, constrain,
                               vocab_major)

    _, (logp, entropy) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
    entropy = entropy.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
    return logp, entropy
