# vidport: `make test`, `make demo`, `make bench` each create .venv when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPython 3.12 (ttnn has wheels for 3.10/3.12 only); pyenv provides it on the dev machines.
PYTHON ?= $(shell PYENV_VERSION=3.12.1 python3.12 -c 'import sys;print(sys.executable)' 2>/dev/null || command -v python3.12 || command -v python3.11 || command -v python3.10 || command -v python3)

.PHONY: venv test test-all demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	@echo "vidport: creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@if [ "$$(uname)" = "Darwin" ]; then $(PY) -m pip install -q "mlx==0.32.4"; else $(PY) -m pip install -q "mlx[cpu]==0.32.4"; fi
	@if $(PY) -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3,10),(3,12)) else 1)'; then \
		$(PY) -m pip install -q "ttnn==0.81.1"; \
	else echo "vidport: ttnn has no wheel for $$($(PY) --version); TTNN tests will be skipped"; fi
	$(PY) -m pip install -q --no-deps -e .
	@$(PY) -c 'from vidport.runtime import configure_cpu; print("vidport: MLX BLAS:", configure_cpu(malloc=False).blas)'
	@$(PY) -c 'from vidport.runtime import native; print("vidport: native CPU kernels:", "built" if native.load() else "off")'
	@touch $@

# CI (CI=true) runs every suite, the ones marked slow included; a local `make test` leaves those out
# (make test-all runs them too)
PYTEST_MARKS := $(if $(filter true 1 yes,$(CI)),-m "",)

test: venv
	$(PY) -m pytest -q --durations=30 $(PYTEST_MARKS)

test-all: venv
	$(PY) -m pytest -q -m ""

demo: venv
	$(PY) tests/demo.py --out demo-output

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf demo-output .pytest_cache
