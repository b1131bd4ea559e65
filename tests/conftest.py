"""Test setup: CPU only, 8 fake devices for sharding tests, float32 matmuls, a persistent
compilation cache shared by the test processes and their subprocesses, and the slowest test
files collected first (for pytest-xdist's scheduling)."""

import os
from pathlib import Path

# Compile time dominates tiny-model tests on CPU: cheaper LLVM passes cut it by ~25%, and
# the persistent cache lets every later process (subprocess CLIs, the second run of a
# resume test) reuse programs instead of compiling them again.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"

# Must precede the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS, FAKE_DEVICES_FLAG) if f)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def single_device_env() -> dict:
    """The environment for a subprocess that should see one CPU device."""
    flags = os.environ["XLA_FLAGS"].replace(FAKE_DEVICES_FLAG, "").strip()
    return {**os.environ, "XLA_FLAGS": flags, "PYTHONUNBUFFERED": "1"}


# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder: whole files go
# to the two workers in collection order, the next file to whichever worker runs low. The
# files below go first, longest first (seconds: one pytest process on a busy 2-core machine),
# so that the files left for the end are short and both workers finish together. A file
# whose tests take more than ~15 s belongs in this list.
SLOWEST_FILES_FIRST = (
    "test_sampler.py",             # ~100 s
    "test_train_default_run.py",   # ~90 s: the 40-step default command
    "test_multihost.py",           # ~80 s: 2-process trainings, a resume
    "test_train_cli.py",           # ~75 s: the train command end to end, SIGTERM, errors
    "test_sharding.py",            # ~65 s
    "test_train_resume.py",        # ~55 s: PPO killed, resumed and exported
    "test_evaluate.py",            # ~55 s
    "test_update.py",              # ~45 s
    "test_rollout.py",             # ~45 s
    "test_storage.py",             # ~45 s: train, resume, export, evaluate through gs://
    "test_model_parity.py",        # ~45 s
    "test_plan.py",                # ~40 s
    "test_numerics.py",            # ~35 s
    "test_train.py",               # ~30 s
    "test_attention.py",           # ~20 s
    "test_losses.py",              # ~15 s
    "test_critic.py",              # ~15 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    # A stable sort: every other file keeps its collection order, after these.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch
