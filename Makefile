# Two entry points for a fresh clone: `make demo` and `make test`. Each sets up .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
# GSM8K is read from a local data directory when one is beside the checkout (no Hub here).
SHARED_DATA := $(abspath $(wildcard ../shared/data))
ifneq ($(SHARED_DATA),)
export S2T_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: install install-llamacpp demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,train,ray,lm-eval,serve]"
	touch $@

# The llama.cpp backend (--backend llama.cpp): llama-cpp-python builds from source, so it is opt-in
# (≈ 9 min on two free cores; 40+ min on one core of a busy machine here). CI builds it in .ci/llamacpp.
install-llamacpp: install
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(PY) -m pip install -q -e ".[llamacpp]"

demo: install
	$(VENV)/bin/s2t generate --problem gsm8k/test/0 --method greedy,s2t

test: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/pytest

format: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
