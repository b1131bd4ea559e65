"""The models in a training workdir's checkpoints, as the other commands (export, evaluate)
read them.

What training writes: checkpoints live in `WORKDIR/checkpoints` (a
`rlver_jax.checkpoint.Checkpointer`); array items `policy_params` (the policy's
`nnx.state(model, nnx.Param)`), `policy_opt`, and optionally `critic_params`, `critic_opt`;
meta keys `policy_model` / `critic_model` (`Qwen2Config.to_hf_dict()` plus `param_dtype`,
`dtype` and `export_dtype`), `tokenizer` (a `load_chat_tokenizer` spec), `step` and `config`.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from rlver_jax import storage
from rlver_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from rlver_jax.models.config import Qwen2Config
from rlver_jax.models.qwen2 import Qwen2, Qwen2Critic
from rlver_jax.sharding import param_shardings

CHECKPOINT_SUBDIR = "checkpoints"
MODELS = {"policy": ("policy_params", "policy_model", Qwen2),
          "critic": ("critic_params", "critic_model", Qwen2Critic)}


class WorkdirError(ValueError):
    """The workdir or step cannot be read as asked; one line naming the path."""


def open_workdir(workdir: str | os.PathLike) -> Checkpointer:
    """A read-only `Checkpointer` on `WORKDIR/checkpoints`, with clear errors."""
    workdir = os.fspath(workdir)
    if not storage.path(workdir).is_dir():
        raise WorkdirError(f"workdir not found: {workdir}")
    ckpt_dir = storage.join(workdir, CHECKPOINT_SUBDIR)
    if not storage.path(ckpt_dir).is_dir():
        raise WorkdirError(f"no checkpoint directory in workdir {workdir} "
                           f"(expected {ckpt_dir}, written by training)")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    if ckpt.latest_step() is None:
        raise WorkdirError(f"no checkpoints in {ckpt_dir}")
    return ckpt


def config_from_meta(meta: dict, key: str, where: str) -> Qwen2Config:
    """The `Qwen2Config` stored under `meta[key]` (HF dict + param_dtype/dtype entries)."""
    if key not in meta:
        raise WorkdirError(f"{where}: meta has no {key!r} entry (has {sorted(meta)})")
    hf = dict(meta[key])
    overrides = {k: hf.pop(k) for k in ("param_dtype", "dtype") if k in hf}
    hf.pop("export_dtype", None)
    hf["_source"] = f"{where} meta[{key!r}]"
    return Qwen2Config.from_hf_dict(hf, **overrides)


def load_model_from_workdir(kind: str, workdir, step, mesh, rules=None
                            ) -> tuple[int, Qwen2Config, nnx.Module, dict]:
    """(step, config, model, meta) of the `kind` model (a key of MODELS) at `step`."""
    item, meta_key, cls = MODELS[kind]
    ckpt = open_workdir(workdir)
    try:
        step = ckpt.resolve_step(step)
        where = f"checkpoint step {step} in {ckpt.directory}"
        meta = ckpt.restore_meta(step)
        if item not in ckpt.items_at(step):
            raise WorkdirError(f"{where} has no {kind} ({item!r}); it has {ckpt.items_at(step)}")
        config = config_from_meta(meta, meta_key, where)
        abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        if mesh is None:
            shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        else:
            shardings = param_shardings(abstract_state, mesh, rules)
        target = abstract_like(abstract_state, shardings)
        _, restored, meta = ckpt.restore(step, targets={item: target})
    except CheckpointError as e:
        raise WorkdirError(str(e)) from e
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, restored[item])
    return step, config, model, meta


def load_policy_from_workdir(workdir: str | os.PathLike, step: int | None = None, mesh=None,
                             rules=None) -> tuple[Qwen2Config, Qwen2, dict]:
    """(config, policy model, meta) of a training checkpoint (default: the latest step).

    With `mesh`, the parameters land sharded by their logical axes (`rules`: the rule table,
    default `FSDP_TENSOR_RULES`); otherwise on the first local device.
    """
    _, config, model, meta = load_model_from_workdir("policy", workdir, step, mesh, rules)
    return config, model, meta


def load_critic_from_workdir(workdir: str | os.PathLike, step: int | None = None, mesh=None,
                             rules=None) -> tuple[Qwen2Config, Qwen2Critic, dict]:
    """(config, critic model, meta) of a training checkpoint that trained a critic."""
    _, config, model, meta = load_model_from_workdir("critic", workdir, step, mesh, rules)
    return config, model, meta
