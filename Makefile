# Fiddler reproduction: common tasks. `make help` lists them.
PYTHON ?= python3
TORCH_CPU_PIN := torch==2.13.0

.PHONY: help install test lint format demo reproduce reproduce-quick simulate llama-cpp carry bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -e 's/:.*## /\t/'

install:  ## install the project and its dev tools (keeps an existing torch; else the CPU wheel)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_CPU_PIN)
	$(PYTHON) -m pip install -e '.[dev]'

test:  ## run the test suite (CPU)
	$(PYTHON) -m pytest -q

lint:  ## ruff check and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## apply ruff's formatting and safe fixes
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

demo:  ## generate from the small preset on the CPU (random weights, Mixtral vocabulary)
	$(PYTHON) -m fiddler generate --model mixtral-small --device cpu --prompt "The capital of France is" --max-new-tokens 16

reproduce:  ## the paper's sweep (GPU host: Mixtral-8x7B at 24 GB; no GPU: functional sweep on the CPU)
	$(PYTHON) -m harness.reproduce

reproduce-quick:  ## a few-minute subset of `reproduce`
	$(PYTHON) -m harness.reproduce --quick

simulate:  ## the simulated reproduction on the paper's machines only (seconds)
	$(PYTHON) -m harness.reproduce --simulated-only

llama-cpp:  ## build llama.cpp (llama-server, llama-bench) into third_party/ from PyPI's llama-cpp-python sdist; CUDA=1 for GPU
	PYTHON=$(PYTHON) bash tools/build_llama_cpp.sh

carry:  ## .carry/ for the GPU host (no network there): the Mistral v1 tokenizer and llama.cpp's source
	mkdir -p .carry
	$(PYTHON) -c "import shutil; from fiddler.tokenizer import mistral_v1_path; shutil.copy(mistral_v1_path(), '.carry/tokenizer.model')"
	PYTHON=$(PYTHON) bash tools/build_llama_cpp.sh --pack-only

bench:  ## pytest-benchmark: every system's decode on a small model, the planner on new routings; JSON under results/benchmarks/
	mkdir -p results/benchmarks
	$(PYTHON) -m pytest tests/benchmarks -q --benchmark-only --benchmark-json=results/benchmarks/benchmarks.json
