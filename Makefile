# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv, a tiny offline model, LoRA-trains it on the sample data (CPU, a few minutes)
#   make test         builds .venv, runs ruff (make lint), then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv quickstart lint test clean

venv: $(STAMP)

# torch is installed first, pinned, only where no torch is present: on this project's machines
# torch==2.13.0 resolves to a CPU wheel kept on local disk, while a bare requirement would pull a
# multi-GB CUDA build. (Elsewhere pip takes PyPI's default build; on a GPU machine install your CUDA
# torch first and this step is skipped.) The package itself declares only torch>=2.1.
#
# The test extra holds llama-cpp-python (tests/inference/test_gguf.py loads GGUF exports with llama.cpp). PyPI
# has it as source only: the first set-up compiles it (about 4 minutes on 2 cores; later set-ups take the
# wheel pip cached). LLAMA_CMAKE_ARGS builds a portable CPU library (no -march=native, so a cached wheel runs
# on any x86-64 machine) without the multimodal library the tests never load; a CMAKE_ARGS of your own wins.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import llama_cpp" 2>/dev/null || echo "set-up: building llama-cpp-python for the GGUF tests" \
	  "(first time only, about 4 minutes on 2 cores; pip caches the wheel)"
	CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc 2>/dev/null || echo 2)" \
	  $(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

quickstart: venv
	$(VENV)/bin/domaintune quickstart configs/quickstart.yaml

lint: venv
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
