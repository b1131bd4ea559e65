"""`--config` files from any directory: the shipped configs by name, user files that build on
them.

The shipped configs are the top-level `configs` package (installed next to `rlver_jax`),
so a user's own config file can `from configs import base` wherever it lives. `--config`
accepts a file path (as before), or a shipped config by name: `rlver`, `rlver.py` or
`configs/rlver.py` (each with an optional `:ARG`) when no such file exists relative to the
working directory.

It also holds the config keys generated from a settings dataclass: the simulator's knobs
(`config.simulator.overrides`), one per `SimulatorSettings` field, read back by
`simulator_overrides`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from rlver_jax.env.simulator import SimulatorSettings

# The shipped configs sit next to the package: in a checkout and in site-packages alike.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_DIR = os.path.join(PACKAGE_PARENT, "configs")
DEFAULT_CONFIG = os.path.join(SHIPPED_DIR, "tiny.py")


def ensure_configs_importable() -> None:
    """Makes `import configs` find the shipped package when nothing else provides one (an
    editable install made before `configs` was packaged maps `rlver_jax` only)."""
    if importlib.util.find_spec("configs") is None and os.path.isdir(SHIPPED_DIR):
        sys.path.append(PACKAGE_PARENT)


def resolve_config_arg(value: str) -> str:
    """A `--config` value with a shipped name turned into its file path; paths that exist
    (and anything unknown, for ml_collections to report) pass through unchanged."""
    file, sep, arg = value.partition(":")
    if os.path.exists(file):
        return value
    name = file.removeprefix("configs/")
    name = name if name.endswith(".py") else name + ".py"
    shipped = os.path.join(SHIPPED_DIR, name)
    if os.sep not in name and os.path.isfile(shipped):
        return shipped + sep + arg
    return value


def shipped_names() -> list[str]:
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(n[:-3] for n in os.listdir(SHIPPED_DIR)
                  if n.endswith(".py") and not n.startswith("_"))


def missing_config_error(argv: list[str], flag: str = "config") -> str | None:
    """One line naming a `--config` file that does not exist (after name resolution), or
    None; ml_collections would raise a multi-line OSError for it."""
    for i, a in enumerate(argv):
        value = (a.split("=", 1)[1] if a.startswith(f"--{flag}=") else
                 argv[i + 1] if a == f"--{flag}" and i + 1 < len(argv) else None)
        if value is not None and not os.path.isfile(value.partition(":")[0]):
            return (f"error: --{flag}={value}: no such config file (pass a path or a "
                    f"shipped config: {', '.join(shipped_names())})")
    return None


def resolve_config_argv(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with the `--config` value (either `--config=V` or `--config V`) resolved."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve_config_arg(a.split("=", 1)[1])
        elif a == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve_config_arg(out[i + 1])
    return out


def checked_config_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """What a CLI that takes `--config` does with its argv before defining the flag: make
    the shipped configs importable and resolve a shipped name; returns the new argv and
    the one-line error for a file that does not exist (None when it does)."""
    ensure_configs_importable()
    argv = resolve_config_argv(argv)
    return argv, missing_config_error(argv)


def prepare_config_argv() -> None:
    """`checked_config_argv` on `sys.argv`, stopping with the error line (exit 2)."""
    sys.argv[:], missing = checked_config_argv(sys.argv)
    if missing is not None:
        print(missing, file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------ simulator knobs
# A knob of an optional setting (delta_clamp, end_below, ...: None in SimulatorSettings)
# set to this turns it off; an unset knob (None) keeps the difficulty preset's value.
OFF = "off"
# What "off" was written as before it had a name; refused so that an old command line
# does not silently become a bound of -1.
_FORMER_OFF = -1


def _optional_base(hint) -> type | None:
    """X for an `X | None` type hint, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return None


def _knob_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (value type, whether it can be off), in the dataclass's order."""
    hints = typing.get_type_hints(SimulatorSettings)
    out = {}
    for field in dataclasses.fields(SimulatorSettings):
        hint = hints[field.name]
        base = _optional_base(hint)
        out[field.name] = ((base, True) if base is not None
                           else (typing.get_origin(hint) or hint, False))
    return out


def simulator_knobs() -> ml_collections.ConfigDict:
    """`config.simulator.overrides`: one unset knob per `SimulatorSettings` field.

    A knob whose setting may be None takes a value or "off" (so it is typed `object` for
    ml_collections, which parses the command line as a Python literal or a string).
    """
    return ml_collections.ConfigDict({
        name: placeholder(object if optional else kind)
        for name, (kind, optional) in _knob_types().items()})


def simulator_overrides(knobs: Mapping[str, Any] | ml_collections.ConfigDict,
                        where: str = "config.simulator.overrides") -> dict[str, Any]:
    """The knobs that are set, as `SimulatorSettings` fields ("off" -> None).

    Raises ValueError naming `where.KEY` for an unknown knob, a value of the wrong type
    ("off" included, where the setting cannot be off), or the former -1 convention.
    """
    if hasattr(knobs, "to_dict"):
        knobs = knobs.to_dict()
    kinds = _knob_types()
    out = {}
    for name, value in knobs.items():
        if value is None:
            continue
        if name not in kinds:
            raise ValueError(f"{where}.{name}: not a simulator setting; known: "
                             f"{', '.join(kinds)}")
        kind, optional = kinds[name]
        if optional and value == OFF:
            out[name] = None
            continue
        if optional and value == _FORMER_OFF and not isinstance(value, bool):
            raise ValueError(f"{where}.{name}={_FORMER_OFF}: write {OFF!r} to turn it off")
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            expected = kind.__name__ + (f" or {OFF!r}" if optional else "")
            raise ValueError(f"{where}.{name}={value!r}: expected {expected}")
        out[name] = value
    return out
