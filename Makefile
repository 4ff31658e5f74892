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
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
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
