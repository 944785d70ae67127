# Two entry points for a fresh Debian machine (as root): `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONFIG ?= mirror.toml

.PHONY: serve test lint bench system-deps clean image

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/mirror serve --config $(CONFIG)

system-deps:
	bash tests/install-system-deps.sh

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check mirror tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: system-deps $(VENV)/.dev-installed
	$(VENV)/bin/ruff check mirror tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -ra

# The OCI image (packaging/build-image.sh): Debian packages and PyPI wheels, no base image.
image: system-deps $(VENV)/.installed
	bash packaging/build-image.sh

bench: system-deps $(VENV)/.dev-installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) cache .pytest_cache .mypy_cache .ruff_cache
