"""The decoder layer's projections laid out for XLA:CPU: the MLP as one custom VJP for
training, and output-major weight copies for decode.

Shapes: B batch, T tokens, N = B * T, D hidden, F MLP width.

Same forward as the plain einsums (bit for bit); the custom backward exists for two
things autodiff does badly on CPU:

* Weight gradients. Autodiff's gate / up weight gradient dot(h, g) contracts T on dim 0 of
  both operands, and XLA lays the cotangent g out transposed for it, fusing the whole SiLU
  backward into a strided transposing loop (measured: 12% of a small-100m update step, as
  long as the layer's matmuls). Saving h transposed ([D, N], one cheap copy in the
  forward) makes both weight gradients plain [D, N] x [N, F] matmuls that read g in place.
* Residuals. Autodiff saves every intermediate of silu(gate) * up that its backward reads
  (the sigmoid, its mirror, silu(gate), the product) as [L, B, T, F] stacks of the layer
  scan: each is zero-filled, written layer by layer, copied into the backward loop and
  read back. Here only gate and up are saved, and the backward recomputes the rest
  elementwise (one exponential and a few multiplies per element). small-100m, B2, float32:
  XLA's temporary bytes of the update step fall from 5.0 to 3.3 GB at T = 2,048 and from
  2.0 to 1.6 GB at T = 512 (the latter with the state donated, as the Updater runs it).

The backward's terms are autodiff's, in its order (the logistic's derivative written
s * (1 - s), one exponential fewer per element than recomputing logistic(-x)); on XLA:CPU
the float32 gradients came out bit-identical to autodiff's of the plain einsums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlver_jax.sharding import constrain

_MLP_AXES = ("batch", "length", "mlp")


def _gated(gate, up):
    return constrain(jax.nn.silu(gate) * up, _MLP_AXES)


def _forward(h, w_gate, w_up, w_down):
    gate = jnp.einsum("BTD,DF->BTF", h, w_gate)
    up = jnp.einsum("BTD,DF->BTF", h, w_up)
    return jnp.einsum("BTF,FD->BTD", _gated(gate, up), w_down), gate, up


@jax.custom_vjp
def swiglu_mlp(h, w_gate, w_up, w_down):
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down: h [B, T, D], w_gate / w_up [D, F],
    w_down [F, D] -> [B, T, D]."""
    return _forward(h, w_gate, w_up, w_down)[0]


def _swiglu_fwd(h, w_gate, w_up, w_down):
    out, gate, up = _forward(h, w_gate, w_up, w_down)
    b, t, d = h.shape
    return out, (h.reshape(b * t, d).T, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(res, g):
    h_t, gate, up, w_gate, w_up, w_down = res
    d, n = h_t.shape
    b, t, _ = g.shape
    s = jax.nn.sigmoid(gate)
    silu = gate * s                    # jax.nn.silu's own expression, so s is shared
    # The down projection's gradients in autodiff's form: [D, F] then transposed.
    d_w_down = jnp.einsum("BTD,BTF->DF", g, constrain(silu * up, _MLP_AXES)).T
    d_gated = constrain(jnp.einsum("BTD,FD->BTF", g, w_down), _MLP_AXES)
    # silu(x) * up = x * s * up: autodiff's terms in its order, except that the logistic's
    # derivative s * logistic(-x) is s * (1 - s), one exponential fewer per element.
    d_silu = d_gated * up
    d_up = silu * d_gated
    d_gate = d_silu * s + (gate * d_silu) * (s * (1 - s))
    d_gate, d_up = d_gate.reshape(n, -1), d_up.reshape(n, -1)
    dh = (jnp.einsum("NF,DF->ND", d_gate, w_gate) + jnp.einsum("NF,DF->ND", d_up, w_up))
    return (dh.reshape(b, t, d).astype(h_t.dtype), jnp.dot(h_t, d_gate).astype(w_gate.dtype),
            jnp.dot(h_t, d_up).astype(w_up.dtype), d_w_down.astype(w_down.dtype))


swiglu_mlp.defvjp(_swiglu_fwd, _swiglu_bwd)


# ------------------------------------------------------------------ decode: output-major
# A decode step multiplies a few rows by every weight. As x [M, D] x W [D, O], XLA:CPU's
# matmul packs W first (read, write, read again): at 8 rows it ran 2-3x slower than one row
# (small-100m's [768, 2048] MLP weight: 13.8 vs 4.4 ms for twelve of them). As the
# output-major product W [O, D] x x^T -> [O, M] it streams W once, like a matrix-vector
# product: 4.9 ms at 8 rows, 3.6 ms at one. So decode reads fused, output-major copies of
# each layer's weights (`out_major_layer`, made once per set of weights, outside the step).
OUT_MAJOR_KEY = "qkv_out_major"  # present in a layer's weights: they are decode's copies


def out_major_dot(x, w, preferred_element_type=None):
    """x [..., D] times an output-major weight w [O, D] -> [..., O]."""
    rows = x.reshape(-1, x.shape[-1])
    y_om = jnp.einsum("MD,OD->OM", rows, w, preferred_element_type=preferred_element_type)
    # The barrier keeps XLA from folding the transpose into the dot, which would make it
    # the packed [M, D] x [D, O] product again.
    return jax.lax.optimization_barrier(y_om).T.reshape(*x.shape[:-1], w.shape[0])


def out_major_layer(p: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One layer's stacked-layout weights (`DecoderStack.param_specs` without the L axis)
    as decode's copies: q / k / v fused into one [(N + 2K) H, D] weight with one bias,
    gate / up into one [2F, D], o as [D, N H], down as [D, F]; the norms as they are."""
    d = p["q_kernel"].shape[0]
    qkv = [p[f"{name}_kernel"].reshape(d, -1) for name in "qkv"]
    return {
        "input_norm": p["input_norm"], "post_norm": p["post_norm"],
        OUT_MAJOR_KEY: jnp.concatenate(qkv, axis=1).T,
        "qkv_bias": jnp.concatenate([p[f"{name}_bias"].reshape(-1) for name in "qkv"]),
        "o_out_major": p["o_kernel"].reshape(-1, d).T,
        "gate_up_out_major": jnp.concatenate([p["gate_kernel"], p["up_kernel"]], axis=1).T,
        "down_out_major": p["down_kernel"].T,
    }


def qkv_out_major(h, w, num_heads: int, num_kv_heads: int):
    """q [B, T, N, H], k / v [B, T, K, H] from the fused output-major copy."""
    qkv = out_major_dot(h, w[OUT_MAJOR_KEY]) + w["qkv_bias"]
    hd = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    q, k, v = jnp.split(qkv, [num_heads * hd, (num_heads + num_kv_heads) * hd], axis=-1)
    return (q.reshape(*h.shape[:-1], num_heads, hd), k.reshape(*h.shape[:-1], num_kv_heads, hd),
            v.reshape(*h.shape[:-1], num_kv_heads, hd))


def swiglu_out_major(h, w):
    """`swiglu_mlp` from the fused output-major copies (decode: no gradient)."""
    gate, up = jnp.split(out_major_dot(h, w["gate_up_out_major"]), 2, axis=-1)
    return out_major_dot(_gated(gate, up), w["down_out_major"])
