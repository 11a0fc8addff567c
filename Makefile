# Entry points of the README's Quickstart. Every target installs what it needs first, so each
# works on a fresh machine: torch is pinned before anything that depends on it, or pip would
# pull a CUDA build of several GB.
#
# A system Python that pip may not install into (Debian/Ubuntu, PEP 668) gets a virtual
# environment in $(VENV): tools/environment.py says which interpreter the targets use.
PYTHON ?= python3
VENV ?= .venv
PY = $(shell $(PYTHON) tools/environment.py $(VENV))
PIP = $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup run demo test check bench bench-smoke clean

setup:
	@$(PYTHON) tools/environment.py $(VENV) > /dev/null
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.24"
	$(PIP) install -q --no-build-isolation -e ".[test,dali,weights,export,tensorboard]"

run: setup
	$(PY) -m fasttl run

demo: setup
	$(PY) -m fasttl info
	$(PY) examples/distill_step.py

test: setup
	$(PY) -m pytest tests -q

# The edit-test loop: the suite without the tests marked slow (tests/conftest.py: SLOW_MODULES).
check: setup
	$(PY) -m pytest tests -q -m "not slow"

bench-smoke: setup
	$(PY) -m pytest benchmarks --benchmark-only --quick -q
	$(PY) -m fasttl bench distill adam --quick

bench: setup
	$(PY) -m fasttl bench all --json benchmarks/results/all-cpu.json --plot benchmarks/results/all-cpu.png

clean:
	rm -rf build *.egg-info .pytest_cache  # $(VENV) is kept: remove it by hand
