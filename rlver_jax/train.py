"""`python -m rlver_jax.train [--config FILE[:ARG]] [--config.key=value ...] [--workdir DIR]`

With no flags it runs the embedded default (`configs/tiny.py`): a tiny random policy
learning against the TOY rule judge on CPU in a few minutes. Re-running the same command on
a workdir that holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "ml-collections config file (configs/*.py[:ARG]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, "
                               "metrics.jsonl, TensorBoard events, dialogue logs and plots.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and JAX log every checkpoint file operation at INFO; keep the console readable
    # (--verbosity=0 brings them back).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from rlver_jax import distributed
    distributed.maybe_initialize()
    from rlver_jax.trainer import ConfigError, Trainer, TrainingError
    try:
        trainer = Trainer(_CONFIG.value, _WORKDIR.value)
        history = trainer.run()
    except (ConfigError, TrainingError, FileNotFoundError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if history:
        first, last = history[0], history[-1]
        print(f"done: steps {first['step']}..{last['step']}, reward/mean "
              f"{first['reward/mean']:.3f} -> {last['reward/mean']:.3f}; "
              f"outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
