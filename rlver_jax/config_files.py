"""`--config` files from any directory: the shipped configs by name, user files that build on
them.

The shipped configs are the top-level `configs` package (installed next to `rlver_jax`),
so a user's own config file can `from configs import base` wherever it lives. `--config`
accepts a file path (as before), or a shipped config by name: `rlver`, `rlver.py` or
`configs/rlver.py` (each with an optional `:ARG`) when no such file exists relative to the
working directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys

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


def prepare_config_argv() -> None:
    """What a CLI that takes `--config` does before defining the flag: make the shipped
    configs importable, resolve a shipped name in `sys.argv`, and stop with one line when the
    file does not exist."""
    ensure_configs_importable()
    sys.argv[:] = resolve_config_argv(sys.argv)
    if (missing := missing_config_error(sys.argv)) is not None:
        print(missing, file=sys.stderr)
        sys.exit(2)
