"""Helpers for the TVM tests: ISA parametrization, compiling ONNX models with and without qie."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import qie_ep.tvm as qtvm  # noqa: E402, F401  (the tests take it from here)
from qie_ep.tvm.schedules import isa as tisa  # noqa: E402

HOST = tisa.host_target()
HOST_ISAS = set(tisa.host_isas())


def tvm_isa_params():
    return [pytest.param(i, marks=pytest.mark.skipif(i not in HOST_ISAS, reason=f"CPU lacks {i}"), id=i)
            for i in ("avx512vnni", "avxvnni", "avx2", "generic")]


def compile_model(model, qie=True, target=None, shape_dict=None):
    """(callable(feeds) -> list of numpy outputs, qie kernel names called) for an ONNX model; with
    ``shape_dict`` the inputs are fixed and the shape arithmetic folded (``fold_shapes``)."""
    from qie_ep.tvm.runner import compile_onnx
    c = compile_onnx(model, target or HOST, qie=qie, shape_dict=shape_dict)
    return c.run, c.kernels


def assert_within_fma(got, want, fbias):
    """Float epilogue ``float32(acc) * scale + bias``: LLVM (and nvcc, by default) contract it into one FMA,
    so the product is not rounded: the difference from the reference's two roundings is at most one
    rounding of the product plus one of the sum, ``ulp(|acc * scale|) + ulp(|y|)``."""
    prod = np.abs(want - fbias).astype(np.float32)
    bound = np.spacing(prod) + np.spacing(np.abs(want))
    assert np.all(np.abs(got - want) <= bound), "beyond one rounding of the product and of the sum"
