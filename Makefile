# Entry points of the README's Quickstart. Every target installs what it needs first, so each
# works on a fresh machine: torch is pinned before anything that depends on it, or pip would
# pull a CUDA build of several GB.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup run demo test bench bench-smoke clean

setup:
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.24"
	$(PIP) install -q --no-build-isolation -e ".[test,dali,weights,export,tensorboard]"

run: setup
	$(PYTHON) -m fasttl run

demo: setup
	$(PYTHON) -m fasttl info
	$(PYTHON) examples/distill_step.py

test: setup
	$(PYTHON) -m pytest tests -q

bench-smoke: setup
	$(PYTHON) -m pytest benchmarks --benchmark-only --quick -q
	$(PYTHON) -m fasttl bench distill adam --quick

bench: setup
	$(PYTHON) -m fasttl bench all --json benchmarks/results/all-cpu.json --plot benchmarks/results/all-cpu.png

clean:
	rm -rf build *.egg-info .pytest_cache
