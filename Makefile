# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv with the runtime only, a tiny offline model, LoRA-trains it on the sample data
#                     (CPU, a few minutes)
#   make test         adds the test extra to .venv (and compiles llama-cpp-python once), runs ruff and mypy (make lint),
#                     builds the docs site (make docs), then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: the runtime (what `domaintune` needs) and the test extra on top. The quickstart waits only for the
# first: the test extra (lm-eval with datasets/pandas/scipy/scikit-learn, pytest, ruff, hypothesis, reportlab,
# gguf, and a llama-cpp-python compile) was most of a fresh clone's quickstart time.
RUNTIME_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: venv venv-test quickstart lint docs test clean

venv: $(RUNTIME_STAMP)
venv-test: $(STAMP)

# torch is installed first, pinned, only where no torch is present: on this project's machines
# torch==2.13.0 resolves to a CPU wheel kept on local disk, while a bare requirement would pull a
# multi-GB CUDA build. (Elsewhere pip takes PyPI's default build; on a GPU machine install your CUDA
# torch first and this step is skipped.) The package itself declares only torch>=2.1.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(RUNTIME_STAMP)

# The test extra holds llama-cpp-python (tests/inference/test_gguf.py loads GGUF exports with llama.cpp). PyPI
# has it as source only: the first set-up compiles it (about 4 minutes on 2 cores; later set-ups take the
# wheel pip cached). LLAMA_CMAKE_ARGS turns off -march=native and the multimodal library the tests never load.
# With GGML_NATIVE=OFF, llama.cpp's x86 build still turns on AVX2, FMA, F16C and BMI2 (x86-64-v3: Intel
# Haswell / AMD Zen and later), so the library, and a wheel pip cached from it, NEEDS AVX2: on an older x86 CPU
# build it without them, once, bypassing the cached wheel:
#   PIP_NO_CACHE_DIR=1 make test LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_AVX2=OFF \
#     -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF"
# (slower GGUF tests). A CMAKE_ARGS of your own wins over LLAMA_CMAKE_ARGS.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
$(STAMP): $(RUNTIME_STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || echo "set-up: building llama-cpp-python for the GGUF tests" \
	  "(first time only, about 4 minutes on 2 cores; pip caches the wheel; the build needs an AVX2 CPU, see Makefile)"
	CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc 2>/dev/null || echo 2)" \
	  $(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

quickstart: $(RUNTIME_STAMP)
	$(VENV)/bin/domaintune quickstart configs/quickstart.yaml

# ruff, then mypy over src/domaintune (the package ships py.typed; settings in pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench docs
	$(VENV)/bin/mypy

# The docs site (mkdocs.yml, docs/) into build/site. --strict: a broken link, a page missing from the nav or a nav
# entry without its page fails the build. docs/hooks.py regenerates the reference pages from the code each time.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# Two or more worker processes (pytest-xdist, one per core), each test file on one worker (its module fixtures built
# once): most tests wait on a subprocess or run one torch thread, so a 2-core machine runs the suite in about 0.6 of
# the serial time. `.venv/bin/python -m pytest tests/...` runs serially, as usual.
test: lint docs
	$(PY) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
