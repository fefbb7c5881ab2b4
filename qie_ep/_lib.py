"""Locating and loading the compiled custom-op library (libqie_ort.so) through ctypes.

Python never calls the library for compute: it registers the library with ONNX Runtime and reads the
small C API it exports (ops, stats, ISA selection). The kernel-level entry points the tests and
benchmarks call are in a separate library, libqie_testing.so, built beside it in development builds.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.resources
import os
from pathlib import Path

LIB_NAME = "libqie_ort.so"


def library_path() -> str:
    """Absolute path of libqie_ort.so.

    Looked up in order: the ``QIE_LIBRARY`` environment variable, ``qie_ep/lib/`` next to this
    module, then the files of the installed ``qie`` distribution (so a source checkout on
    ``sys.path`` still finds the library that ``pip install .`` built).
    """
    env = os.environ.get("QIE_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"QIE_LIBRARY={env} does not exist")
        return str(Path(env).resolve())
    here = importlib.resources.files("qie_ep") / "lib" / LIB_NAME
    if here.is_file():
        return str(Path(str(here)).resolve())
    try:
        for f in importlib.metadata.files("qie") or []:
            if f.name == LIB_NAME:
                p = Path(str(f.locate())).resolve()
                if p.is_file():
                    return str(p)
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"{LIB_NAME} not found: build it with `pip install .` (or `make build`), or set QIE_LIBRARY")


@functools.cache
def lib() -> ctypes.CDLL:
    """The loaded library with argument types declared for every exported C function."""
    h = ctypes.CDLL(library_path())
    c = ctypes
    h.qie_stats_snapshot.argtypes = [c.c_char_p, c.c_size_t]
    h.qie_stats_snapshot.restype = c.c_size_t
    h.qie_stats_reset.argtypes = []
    h.qie_stats_reset.restype = None
    h.qie_ops.argtypes = [c.c_char_p, c.c_size_t]
    h.qie_ops.restype = c.c_size_t
    h.qie_active_isa.argtypes = []
    h.qie_active_isa.restype = c.c_char_p
    h.qie_isa_supported.argtypes = [c.c_char_p]
    h.qie_isa_supported.restype = c.c_int
    h.qie_force_isa.argtypes = [c.c_char_p]
    h.qie_force_isa.restype = c.c_int
    h.qie_isas.argtypes = []
    h.qie_isas.restype = c.c_char_p
    return h


EP_LIB_NAME = "libqie_ep.so"


def ep_library_path() -> str | None:
    """libqie_ep.so (the plugin execution provider) beside libqie_ort.so, or None when not built."""
    path = Path(library_path()).with_name(EP_LIB_NAME)
    return str(path) if path.is_file() else None


@functools.cache
def ep_lib() -> ctypes.CDLL | None:
    """The EP library as loaded by ONNX Runtime (dlopen returns the same instance), for its counters."""
    path = ep_library_path()
    if path is None:
        return None
    h = ctypes.CDLL(path)
    h.qie_ep_counters.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    h.qie_ep_counters.restype = None
    h.qie_ep_region_counters.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    h.qie_ep_region_counters.restype = None
    h.qie_ep_attention_counters.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    h.qie_ep_attention_counters.restype = None
    h.qie_ep_region_profile.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    h.qie_ep_region_profile.restype = ctypes.c_size_t
    h.qie_ep_region_profile_names.argtypes = []
    h.qie_ep_region_profile_names.restype = ctypes.c_char_p
    h.qie_ep_region_step_profile.argtypes = []
    h.qie_ep_region_step_profile.restype = ctypes.c_char_p
    h.qie_ep_reset.argtypes = []
    h.qie_ep_reset.restype = None
    h.qie_ep_active_isa.argtypes = []
    h.qie_ep_active_isa.restype = ctypes.c_char_p
    return h


TESTING_LIB_NAME = "libqie_testing.so"


@functools.cache
def testing_lib() -> ctypes.CDLL:
    """libqie_testing.so, beside libqie_ort.so: the same kernels behind kernel-level entry points (tests,
    benchmarks). Development builds only (CMake option QIE_BUILD_TESTING; `make build` sets it)."""
    path = Path(library_path()).with_name(TESTING_LIB_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the kernel-level tests need a development build "
                                "(`make build`, or cmake with -DQIE_BUILD_TESTING=ON)")
    h = ctypes.CDLL(str(path))
    c = ctypes
    p = c.c_void_p
    h.qie_test_gemm.argtypes = [c.c_char_p, c.c_size_t, c.c_size_t, c.c_size_t, p, c.c_int, p, c.c_int, p, c.c_int,
                                p, p, c.c_ssize_t, c.c_int, c.c_int, p, p, c.c_int32, p, c.c_int]
    h.qie_test_gemm.restype = c.c_int
    h.qie_test_conv.argtypes = [c.c_char_p, c.c_size_t, c.c_size_t, c.c_size_t, c.c_size_t, p, p, c.c_int, c.c_int32,
                                p, c.c_int, p, p, c.c_int, p, c.c_int32, p, c.c_int, p, c.c_size_t]
    h.qie_test_conv.restype = c.c_int
    h.qie_test_team.argtypes = [c.c_int, c.c_size_t, c.c_size_t, c.c_longlong]
    h.qie_test_team.restype = c.c_longlong
    h.qie_test_quantize_dynamic.argtypes = [c.c_char_p, p, c.c_size_t, p, p, p]
    h.qie_test_quantize_dynamic.restype = c.c_int
    h.qie_test_channel_lut.argtypes = [c.c_char_p, p, c.c_size_t, p, p, c.c_size_t, c.c_size_t, c.c_int]
    h.qie_test_channel_lut.restype = c.c_int
    h.qie_test_transpose_bytes.argtypes = [p, c.c_size_t, p, c.c_size_t, c.c_size_t, c.c_size_t]
    h.qie_test_transpose_bytes.restype = None
    h.qie_test_microkernel.argtypes = [c.c_char_p, p, p, p]
    h.qie_test_microkernel.restype = c.c_int
    h.qie_test_amx_foreign_config.argtypes = []
    h.qie_test_amx_foreign_config.restype = c.c_int
    h.qie_bench_vnni_peak_gops.argtypes = []
    h.qie_bench_vnni_peak_gops.restype = c.c_double
    h.qie_bench_amx_peak_gops.argtypes = []
    h.qie_bench_amx_peak_gops.restype = c.c_double
    return h
