"""Logical-axis sharding: names on parameters and activations, rule tables, meshes.

Every parameter carries `logical_axes` metadata (e.g. ``("embed", "mlp")``). A rule table
maps each logical name to mesh axes; `logical_to_spec` turns names into a `PartitionSpec`,
dropping mesh axes that do not divide the dimension (a 2-head KV projection on a 4-way
tensor axis stays replicated instead of failing to shard).

Rule presets (`RULE_PRESETS`, chosen by `config.mesh.rules`): `fsdp` (pure FSDP),
`fsdp_tensor` (FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`) and
`sampling` (weights replicated over `fsdp`, split over `tensor` only: decoding one token
at a time cannot amortise an all-gather of every weight per step). `reshard` moves a tree
between layouts device to device.

What comes from flax and what does not: the table in force lives in flax's own logical-axis
rule context (`nnx.logical_axis_rules`, as `(logical name, mesh axes)` pairs), so flax code
sees the same table. Resolving names to a `PartitionSpec` stays here, because flax's
resolvers (`nnx.get_partition_spec`, `flax.linen.logical_to_mesh_axes`, and the eager
sharding of variables created with `nnx.with_partitioning`) rename axes without looking at
the array: they neither drop a mesh axis that does not divide the dimension nor skip size-1
axes, so the 2-head KV projection above would fail to shard on a 4-way tensor axis. For the
same reason parameters carry our `logical_axes` metadata rather than flax's `out_sharding`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
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
# Pure FSDP (ZeRO-3 style): every weight is split along its embedding dimension over all
# model-parallel devices and gathered layer by layer; no tensor-parallel matmuls. A tensor
# axis of size > 1 is folded into the FSDP split rather than left idle.
FSDP_RULES: dict[str, object] = {
    **FSDP_TENSOR_RULES,
    "batch": ("data", "fsdp", "tensor"),
    "vocab": None, "heads": None, "kv_heads": None, "mlp": None,
    "embed": ("fsdp", "tensor"),
}
# Sampling keeps weights whole on each fsdp shard (no all-gather per decode step) and splits
# only over the tensor axis.
SAMPLING_RULES: dict[str, object] = {**FSDP_TENSOR_RULES, "embed": None}

RULE_PRESETS: dict[str, dict[str, object]] = {
    "fsdp": FSDP_RULES,
    "fsdp_tensor": FSDP_TENSOR_RULES,
    "sampling": SAMPLING_RULES,
}


def get_rules(rules: str | Mapping[str, object] | None = None,
              base: str = "fsdp_tensor") -> dict[str, object]:
    """A rule table from a preset name, or a mapping of overrides on top of `base`.

    Config values arrive as ml_collections objects: tuples may come back as lists, so
    entries are normalised to None, a name or a tuple of names.
    """
    if rules is None:
        rules = base
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise KeyError(f"unknown sharding rules {rules!r}; known: {sorted(RULE_PRESETS)}")
        return dict(RULE_PRESETS[rules])
    table = dict(RULE_PRESETS[base])
    for name, axes in dict(rules).items():
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
        for axis in _mesh_axes_of(axes):
            if axis not in MESH_AXES:
                raise KeyError(f"rule {name!r} -> {axes!r}: unknown mesh axis {axis!r}; "
                               f"expected one of {MESH_AXES}")
        table[name] = axes
    return table


def logical_rules(rules: Mapping[str, object]):
    """Sets the rule table used by `constrain` inside the block (flax's rule context)."""
    return nnx.logical_axis_rules(tuple(dict(rules).items()))


def current_rules() -> Mapping[str, object]:
    """The table of the innermost `logical_rules` block; `FSDP_TENSOR_RULES` outside any
    (flax's context is per thread and starts empty)."""
    return dict(flax_spmd.get_logical_axis_rules()) or FSDP_TENSOR_RULES


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
    shape_in = list(sizes)
    devices = list(jax.devices() if devices is None else devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {sizes} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in shape_in and math.prod(sizes) < len(devices):
        # A fully specified smaller mesh uses the first devices (a sub-mesh, e.g. one
        # device of a host for a tiny run).
        devices = devices[:math.prod(sizes)]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, {len(devices)} available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_sharding(leaf, mesh: Mesh, mesh_shape: Mapping[str, int],
                   rules: Mapping[str, object] | None) -> NamedSharding:
    axes = getattr(leaf, "logical_axes", None) if _is_variable(leaf) else None
    if axes is None:
        return NamedSharding(mesh, P())
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh_shape, rules))


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, object] | None = None):
    """NamedShardings for any tree that holds nnx Variables (concrete or abstract).

    Variables with `logical_axes` metadata are sharded by the rule table; every other leaf
    (step counters, optimiser scalars) is replicated. Optax keeps the Variable wrappers of
    the parameters in its moment trees, so a whole `TrainState` (params + Adam mu / nu)
    gets the parameters' layout with one call. The result has a `NamedSharding` in place
    of each Variable: a tree prefix of `tree`, as `jax.jit(out_shardings=...)` accepts.
    """
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(lambda leaf: _leaf_sharding(leaf, mesh, mesh_shape, rules), tree,
                        is_leaf=_is_variable)


def param_shardings(model_state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, object] | None = None):
    """A tree of NamedShardings matching `model_state`, from each variable's logical axes."""
    return tree_shardings(model_state, mesh, rules)


def _leaf_shardings(tree, shardings):
    """`shardings` (a prefix tree from `tree_shardings`) expanded to one per array leaf."""
    return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda _: sharding, sub),
                        shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: inputs for `jit(...).lower(...)` that allocate
    nothing (the memory planner compiles real programs on them)."""
    full = _leaf_shardings(tree, shardings)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, full)


def _identity(tree):
    return tree


def reshard(tree, shardings, *, donate: bool = False):
    """Moves arrays to another layout on the same devices, device to device.

    A jitted identity with `out_shardings`: XLA emits the all-gathers / slices between the
    two layouts, and unlike a host `device_get` / `device_put` it works when the arrays span
    several processes. With `donate`, the source buffers are freed (a training-layout copy
    that is not needed while sampling).
    """
    full = _leaf_shardings(tree, shardings)
    fn = jax.jit(_identity, out_shardings=full, donate_argnums=(0,) if donate else ())
    return fn(tree)


def sampling_model(model: nnx.Module, mesh: Mesh,
                   rules: str | Mapping[str, object] | None = "sampling") -> nnx.Module:
    """A view of `model` whose weights live in the sampling layout (a resharded copy).

    Use it with `Sampler(model, mesh=mesh)` inside `logical_rules(get_rules("sampling"))`
    so that the KV cache and activation constraints follow the same table.
    """
    rules = get_rules(rules)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, reshard(state, tree_shardings(state, mesh, rules)))


def bytes_per_device(tree) -> int:
    """The largest per-device footprint of a tree of arrays or sharded ShapeDtypeStructs."""
    everywhere = 0    # unsharded leaves: whole on every device
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            everywhere += int(np.prod(leaf.shape)) * itemsize
            continue
        nbytes = int(np.prod(sharding.shard_shape(leaf.shape))) * itemsize
        for device in sharding.device_set:
            totals[device] = totals.get(device, 0) + nbytes
    return everywhere + max(totals.values(), default=0)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, object] | None = None,
                   batch_size: int | None = None) -> NamedSharding:
    """Sharding of a [B, ...] array: batch over the data axes, the rest replicated."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, dict(mesh.shape), rules)
    return NamedSharding(mesh, spec)
