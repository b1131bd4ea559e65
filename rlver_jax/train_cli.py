"""The command line of `python -m rlver_jax.train [--config FILE[:ARG]] [--config.key=value ...]
[--workdir DIR]`: flags, the compilation cache, and one-line errors around `train.train`.

With no flags it runs the embedded default (`configs/tiny.py`): a tiny random policy
learning against the TOY rule judge on CPU in a few minutes. Re-running the same command on
a workdir that holds checkpoints resumes from the latest one. It runs from any directory:
`--config` takes a file or a shipped config's name (`rlver`, `configs/rlver.py:ARG`), and
`--workdir` a local path or a gs:// URL.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlver_jax import config_files
from rlver_jax.cli_errors import config_error, one_line, parse_flags_or_exit


def _is_command() -> bool:
    """Whether this process is `python -m rlver_jax.train` (not a test importing us)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "rlver_jax.train"


if _is_command():
    config_files.prepare_config_argv()
try:
    # config_flags reads the overrides in sys.argv while the flag is defined.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", config_files.DEFAULT_CONFIG, "ml-collections config file "
        "(configs/*.py[:ARG]).", lock_config=True)
except (AttributeError, KeyError) as _e:
    if not _is_command():
        raise
    print(config_error(_e, sys.argv), file=sys.stderr)
    sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory (or gs:// URL) for "
                               "checkpoints, metrics.jsonl, TensorBoard events, dialogue "
                               "logs and plots.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join("~", ".cache", "rlver_jax", "xla"),
    "Persistent XLA compilation cache ('' disables): a second run of the same config "
    "skips most compilation.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and JAX log every checkpoint file operation at INFO; keep the console readable
    # (--verbosity=0 brings them back).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    if _CACHE.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from rlver_jax import distributed
    distributed.maybe_initialize()
    from rlver_jax.checkpoint import CheckpointError
    from rlver_jax.config_checks import ConfigError
    from rlver_jax.env.profiles import ProfileError
    from rlver_jax.metrics import TrackerError
    from rlver_jax.models import CheckpointFormatError
    from rlver_jax.train import TrainingError, train
    try:
        history = train(_CONFIG.value, _WORKDIR.value).history
    except (ConfigError, TrainingError, FileNotFoundError, ProfileError, CheckpointError,
            CheckpointFormatError, TrackerError) as e:
        # Logged below the console's WARNING level: stderr gets exactly one line.
        logging.info("%s", e)
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    if not history:
        print(f"nothing to do: {_WORKDIR.value} already holds the final step "
              f"({_CONFIG.value.total_steps}); pass another --workdir or a larger "
              "--config.total_steps to continue")
    else:
        first, last = history[0], history[-1]
        print(f"done: steps {first['step']}..{last['step']}, reward/mean "
              f"{first['reward/mean']:.3f} -> {last['reward/mean']:.3f}; "
              f"outputs in {_WORKDIR.value}")


def run() -> None:
    app.run(main, flags_parser=parse_flags_or_exit)
