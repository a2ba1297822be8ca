# The README's two commands: `make demo` and `make test` (plus `make docs` for the API reference).
#
# `make test` runs the files of the suite in parallel, one pytest-xdist worker per core (each
# worker with one torch thread, tests/conftest.py); `--dist loadfile` keeps a file's shared fits
# in one worker.
#
# `make demo` installs only what the demo needs (torch and the base dependencies of
# pyproject.toml); `make test` adds the `dev` extra (pytest, transformers, peft, diffusers, the
# docs tools). pip prints what it collects and installs, so the first run is not silent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test docs install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build; everything
# installed after it sees torch as satisfied and leaves it alone.
$(BASE_STAMP): $(PY) pyproject.toml
	@echo "==> installing torch==2.13.0 (CPU wheel), then lightning_forget's base dependencies"
	$(PIP) install --progress-bar on torch==2.13.0
	$(PIP) install --progress-bar on -e .
	touch $(BASE_STAMP)

$(DEV_STAMP): $(BASE_STAMP) pyproject.toml
	@echo "==> installing the dev extra (pytest, transformers, peft, diffusers, docs tools)"
	$(PIP) install --progress-bar on -e ".[dev]"
	touch $(DEV_STAMP)

install: $(BASE_STAMP)

install-dev: $(DEV_STAMP)

demo: $(BASE_STAMP)
	$(PY) examples/demo.py

test: $(DEV_STAMP)
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile tests

docs: $(DEV_STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache site
