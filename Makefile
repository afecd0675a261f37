# The two commands: `make demo` runs the demo station, `make test` runs lint, types and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a range would pull the newest CUDA build (gigabytes). The [train]
	# extra pins the same version, so this CPU wheel satisfies it.
	$(PY) -m pip install -q torch==2.13.0
	# [dev] = the station runtime + [train], [plots], [opcua] + test, lint and packaging tools.
	# A station needs none of it: `pip install .` (README, "Station install").
	$(PY) -m pip install -q -e '.[dev]'
	# The tritonserver binary for the triton engine's tests, without the wheel's numpy<2 pin
	# (it constrains PyTriton's Python API, which defectd does not use).
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(VENV)/bin/defectd demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
