# Every target bootstraps .venv from the pinned set in setup.cfg when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_SUITE ?= quick

.PHONY: venv train test bench clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m rlver_jax.train --workdir runs/tiny $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run --suite $(BENCH_SUITE)

clean-venv:
	rm -rf $(VENV)
