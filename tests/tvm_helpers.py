"""Helpers for the TVM tests: ISA parametrization, compiling ONNX models with and without qie."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import qie_ep.tvm as qtvm  # noqa: E402
from tvm_schedules import isa as tisa  # noqa: E402

HOST = tisa.host_target()
HOST_ISAS = set(tisa.host_isas())


def tvm_isa_params():
    return [pytest.param(i, marks=pytest.mark.skipif(i not in HOST_ISAS, reason=f"CPU lacks {i}"), id=i)
            for i in ("avx512vnni", "avxvnni", "avx2", "generic")]


def compile_model(model, qie=True, target=None, shape_dict=None):
    """(callable(feeds) -> list of numpy outputs, qie kernel names called) for an ONNX model; with
    ``shape_dict`` the inputs are fixed and the shape arithmetic folded (``fold_shapes``)."""
    target = target or HOST
    mod = qtvm.from_onnx(model, shape_dict=shape_dict, fold_shapes=shape_dict is not None)
    kernels = qtvm.kernel_calls(qtvm.rewrite_pass(target)(mod)) if qie else []
    pipe = qtvm.pipeline(target) if qie else "default"
    ex = tvm.compile(mod, target, relax_pipeline=pipe)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]

    def run(feeds):
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in names])
        outs = out if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]

    return run, kernels


def assert_within_fma(got, want, fbias):
    """Float epilogue ``float32(acc) * scale + bias``: LLVM (and nvcc, by default) contract it into one FMA,
    so the product is not rounded: the difference from the reference's two roundings is at most one
    rounding of the product plus one of the sum, ``ulp(|acc * scale|) + ulp(|y|)``."""
    import numpy as np
    prod = np.abs(want - fbias).astype(np.float32)
    bound = np.spacing(prod) + np.spacing(np.abs(want))
    assert np.all(np.abs(got - want) <= bound), "beyond one rounding of the product and of the sum"
