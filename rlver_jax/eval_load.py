"""What an evaluation plays with: the profiles, the policy (a training workdir's checkpoint
or an HF directory) and the simulated user, each failing with one `EvaluateError` line
that names the path."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import SHIPPED, ProfileError, load_profiles, profiles_path
from rlver_jax.eval_report import EvaluateError


def resolve_profiles(spec: str, max_dialogues: int = 0) -> tuple[list, str]:
    """A shipped set name or a jsonl path -> (profiles, description). Errors name the file
    (and the line, for a bad record)."""
    try:
        path = profiles_path(spec)
        profiles = load_profiles(path)
    except FileNotFoundError as e:
        raise EvaluateError(str(e)) from e
    except ProfileError as e:
        raise EvaluateError(f"bad profiles file: {e}") from e
    except OSError as e:
        raise EvaluateError(f"cannot read profiles file {path}: {e}") from e
    total = len(profiles)
    if max_dialogues and max_dialogues > 0:
        profiles = profiles[:max_dialogues]
    name = spec if spec in SHIPPED else path
    return profiles, f"{name}: {len(profiles)} of {total}"


def model_dir(spec: str, what: str) -> str:
    """A local directory for `spec`: itself, or a hub id resolved through the HF cache."""
    from rlver_jax.model_source import ModelSourceError, resolve_model_dir
    try:
        return resolve_model_dir(spec, what=what)
    except ModelSourceError as e:
        raise EvaluateError(str(e)) from e


def _load_hf_model(hf_dir: str, dtype: str, mesh, rules, what: str):
    from rlver_jax.models import CheckpointFormatError, load_hf
    from rlver_jax.models.hf_io import stored_dtype
    hf_dir = model_dir(hf_dir, what)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise EvaluateError(f"{what} directory {hf_dir} has no config.json")
    try:
        return load_hf(hf_dir, dtype or stored_dtype(hf_dir), mesh, rules)
    except (CheckpointFormatError, FileNotFoundError, KeyError, ValueError) as e:
        raise EvaluateError(f"cannot load {what} from {hf_dir}: {e}") from e


def load_tokenizer(spec: str, what: str):
    from rlver_jax.tokenizer import load_chat_tokenizer
    try:
        return load_chat_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        key = "config.tokenizer" if what == "policy" else f"config.{what}.tokenizer"
        raise EvaluateError(f"cannot load the {what} tokenizer {spec!r}: {e}; set "
                            f"{key}") from e


@dataclasses.dataclass
class LoadedPolicy:
    model: Any
    config: Any
    tokenizer: Any
    source: dict[str, Any]
    train_config: dict[str, Any]


def load_policy(workdir: str | None, step: int | None, hf_model: str | None,
                tokenizer: str | None, dtype: str | None, mesh=None, rules=None
                ) -> LoadedPolicy:
    """The policy (and its tokenizer) from a training workdir or an HF directory."""
    if bool(workdir) == bool(hf_model):
        raise EvaluateError("pass exactly one of --workdir and --hf_model")
    if workdir:
        from rlver_jax.workdir_models import WorkdirError, load_policy_from_workdir
        try:
            config, model, meta = load_policy_from_workdir(workdir, step, mesh=mesh, rules=rules)
        except WorkdirError as e:
            raise EvaluateError(str(e)) from e
        if dtype and dtype != config.param_dtype:
            import jax
            from flax import nnx
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x.astype(dtype), state)
            model = nnx.merge(graphdef, state)
            config = config.replace(param_dtype=dtype, dtype=dtype)
        spec = tokenizer or meta.get("tokenizer")
        if not spec:
            raise EvaluateError(f"the checkpoint in {workdir} names no tokenizer; set "
                                "config.tokenizer")
        tok = load_tokenizer(spec, "policy")
        train_config = meta.get("config") or {}
        source = {"kind": "workdir", "workdir": os.fspath(workdir),
                  "step": int(meta.get("step", step if step is not None else -1)),
                  "tokenizer": tok.spec, "dtype": config.param_dtype}
        return LoadedPolicy(model, config, tok, source, train_config)
    config, model = _load_hf_model(hf_model, dtype, mesh, rules, "HF model")
    tok = load_tokenizer(tokenizer or hf_model, "policy")
    source = {"kind": "hf", "hf_model": os.fspath(hf_model), "tokenizer": tok.spec,
              "dtype": config.param_dtype}
    return LoadedPolicy(model, config, tok, source, {})


def _random_model_host(config, seed: int):
    """A random-weight Qwen2 filled from numpy (norm scales 1, the rest N(0, 0.02)).

    For smoke-test simulators only: `create_model`'s jitted initialiser compiles for tens
    of seconds on a small CPU, which would dominate a two-dialogue run.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rlver_jax.models import Qwen2
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _with_simulator(c, **changes):
    """A copy of config `c` with these `simulator` keys changed."""
    out = c.copy_and_resolve_references()
    for key, value in changes.items():
        out.simulator[key] = value
    return out


def build_user(c, kind: str, settings: sim.SimulatorSettings, tokenizer, layout):
    """(user, source): the TOY `RuleUser`, or an `LLMUser` of `config.simulator` (an HF
    directory, loaded as `rlver_jax.build` loads it for training, or a random-weight preset)
    that reads with `tokenizer`. `layout` is a `build.Layout` (its mesh None: one device)."""
    from rlver_jax import build
    from rlver_jax.env.users import LLMUser, RuleUser
    if kind == "rule":
        return RuleUser(settings), {"kind": "rule"}
    s = c.simulator
    if s.hf_dir:
        from rlver_jax.models import CheckpointFormatError
        from rlver_jax.models.hf_io import stored_dtype
        path = model_dir(s.hf_dir, "config.simulator.hf_dir")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise EvaluateError(f"simulator model directory {path} has no config.json")
        try:
            # `tokenizer`: the policy's or the simulator's own, resolved by the caller.
            resolved = _with_simulator(c, kind="llm", dtype=s.dtype or stored_dtype(path),
                                       tokenizer="")
            user = build.build_user(resolved, tokenizer, layout, settings)
        except (build.ConfigError, CheckpointFormatError, FileNotFoundError, KeyError,
                ValueError) as e:
            raise EvaluateError(f"cannot load simulator model from {path}: {e}") from e
        return user, {"kind": "llm", "hf_dir": s.hf_dir}
    if not s.preset:
        raise EvaluateError("an LLM simulator needs config.simulator.hf_dir (or "
                            "config.simulator.preset for a random-weight smoke test)")
    from rlver_jax.models import PRESETS, create_model
    from rlver_jax.sampling import Sampler
    if s.preset not in PRESETS:
        raise EvaluateError(f"config.simulator.preset={s.preset!r}: not one of "
                            f"{sorted(PRESETS)}")
    try:
        config = build.model_config(_with_simulator(c, dtype=s.dtype or "float32").simulator,
                                    tokenizer, "simulator")
    except build.ConfigError as e:
        raise EvaluateError(str(e)) from e
    model = (_random_model_host(config, c.seed + 1) if layout.mesh is None else
             create_model(config, c.seed + 1, mesh=layout.mesh, rules=layout.sampling_rules))
    user = LLMUser(settings, model, tokenizer, Sampler(model, mesh=layout.mesh),
                   build.simulator_sampling(c))
    return user, {"kind": "llm", "preset": s.preset, "random_weights": True}
