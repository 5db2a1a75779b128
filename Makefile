# Two entry points for a fresh clone: `make demo` (set up, train a small SRU++ LM) and `make test`.
# Both create or reuse the local virtual environment in .venv; torch is pinned here to the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.srupp-installed

.PHONY: setup demo test lint bench wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard src/srupp/ops/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,compare,hf,onnx,plot]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m srupp demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -x --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.ops

# A wheel for any x86-64 (or aarch64) Linux: the kernel picks its instruction set at run time.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/srupp/ops/_sru_cpu*.so
