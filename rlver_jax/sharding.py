"""Logical-axis sharding: names on parameters and activations, a rule table, meshes.

Every parameter carries `logical_axes` metadata (e.g. ``("embed", "mlp")``). A rule table
maps each logical name to mesh axes; `logical_to_spec` turns names into a `PartitionSpec`,
dropping mesh axes that do not divide the dimension (a 2-head KV projection on a 4-way
tensor axis stays replicated instead of failing to shard).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes (a name, a tuple of names, or None for replicated).
FSDP_TENSOR_RULES: dict[str, object] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
}
# Sampling keeps weights whole on each fsdp shard (no all-gather per decode step) and splits
# only over the tensor axis.
SAMPLING_RULES: dict[str, object] = {**FSDP_TENSOR_RULES, "embed": None}

_RULES: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "rlver_jax_logical_rules", default=FSDP_TENSOR_RULES)


@contextlib.contextmanager
def logical_rules(rules: Mapping[str, object]):
    """Sets the rule table used by `constrain` inside the block."""
    token = _RULES.set(dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Mapping[str, object]:
    return _RULES.get()


def _mesh_axes_of(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    if isinstance(rule, str):
        return (rule,)
    return tuple(rule)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None,
                    mesh_shape: Mapping[str, int], rules: Mapping[str, object] | None = None
                    ) -> P:
    """PartitionSpec for an array whose dimensions have the given logical names.

    Mesh axes of size 1, axes absent from the mesh, axes already used by an earlier
    dimension and axes that do not divide the dimension are dropped.
    """
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules "
                           f"(known: {sorted(rules)})")
        chosen = []
        size = 1
        for axis in _mesh_axes_of(rules.get(name) if name else None):
            n = mesh_shape.get(axis, 1)
            if n == 1 or axis in used:
                continue
            if shape is not None and shape[dim] % (size * n):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; one size may be -1 (the rest)."""
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise KeyError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape {sizes} must have {len(MESH_AXES)} entries {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {sizes} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, {len(devices)} available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def param_shardings(model_state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, object] | None = None):
    """A tree of NamedShardings matching `model_state`, from each variable's logical axes."""
    mesh_shape = dict(mesh.shape)

    def one(var):
        axes = getattr(var, "logical_axes", None)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if axes is None:
            spec = P()
        else:
            spec = logical_to_spec(axes, value.shape, mesh_shape, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, object] | None = None,
                   batch_size: int | None = None) -> NamedSharding:
    """Sharding of a [B, ...] array: batch over the data axes, the rest replicated."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, dict(mesh.shape), rules)
    return NamedSharding(mesh, spec)


def describe(tree) -> Iterable[tuple[str, tuple[int, ...], str]]:
    """(path, shape, spec) rows of a tree of arrays, for logs and the memory planner."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        yield jax.tree_util.keystr(path), tuple(np.shape(leaf)), str(spec)
