# Every target bootstraps .venv from the pinned set in setup.cfg when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_SUITE ?= quick

.PHONY: venv train test bench bench-peers clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m rlver_jax.train --workdir runs/tiny $(TRAIN_ARGS)

# Files in collection order, which tests/conftest.py starts with the slowest ones.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run --suite $(BENCH_SUITE)

# Optional peer: Tunix's sampler in a venv of its own (it pins safetensors<0.8).
TUNIX_VENV := benchmarks/.venv-tunix

bench-peers: $(TUNIX_VENV)/.installed

$(TUNIX_VENV)/.installed:
	test -x $(TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/pip install --quiet --disable-pip-version-check google-tunix==0.1.7
	touch $@

clean-venv:
	rm -rf $(VENV)
