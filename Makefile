# One command for the tests, one for the main job; each creates the virtual environment first.
#   make test    set up .venv with the pinned toolchain, build fastres (+ CUDA extension), run tests
#   make bench   same set-up, then `fastres bench`
#   make mutation  plant known bugs one at a time and check the default tests catch each
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/include/cuda_runtime.h),/usr/local/cuda,)
export CUDA_HOME

.PHONY: venv test test-all lint mutation bench bench-suite clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: requirements-dev.txt | $(BIN)/activate
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

# Rebuild the package (and the CUDA extension) when its build inputs change.
$(VENV)/.built: $(VENV)/.deps pyproject.toml $(wildcard setup.py) $(wildcard csrc/*)
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.built

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest tests -m "not slow" -q

test-all: venv
	$(BIN)/python -m pytest tests -q

# plant each bug of tests/mutation/plants.py in a scratch copy; fails if the tests miss one
mutation: venv
	$(BIN)/python tests/mutation/run.py

bench: venv
	$(BIN)/fastres bench

# the pytest-benchmark suites (a tiny CPU configuration without a GPU, so CI exercises them)
bench-suite: venv
	$(BIN)/python -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info fastres/_C*.so
