"""qie for TVM: ONNX import for quantized ops, and a Relax pipeline that runs them on qie's kernels.

    mod = qie_ep.tvm.from_onnx(model)                      # TVM's importer + the quantized ops it lacks
    ex = tvm.compile(mod, target, relax_pipeline=qie_ep.tvm.pipeline(target))

``pipeline(target)`` = qie's rewrite (quantized matmul / conv2d groups -> qie's scheduled PrimFuncs)
followed by the pipeline ``tvm.compile`` would use by default for that target. Relay and
``relay.build`` were removed from TVM in 0.20; ``tvm.compile`` is their successor.
This package (with its ``schedules``) is the only place qie imports TVM.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .schedules import isa as _isa

from .frontend import from_onnx
from .rewrite import Unsupported, rewrite

__all__ = ["from_onnx", "pipeline", "rewrite_pass", "kernel_calls", "isa_for", "Unsupported"]


def _target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def isa_for(target) -> str:
    """The qie kernel family ``target`` gets (``QIE_TVM_ISA`` forces one)."""
    return _isa.for_target(_target(target)).name


def rewrite_pass(target) -> tvm.transform.Pass:
    """qie's Relax pass alone: quantized groups -> calls to qie's scheduled PrimFuncs."""
    t = _target(target)
    isa = _isa.for_target(t)
    ktarget = _isa.kernel_target(t) if t.kind.name == "llvm" else None

    @tvm.transform.module_pass(opt_level=0, name="qie.RewriteQuantized")
    def _rewrite(mod, _ctx):
        return rewrite(mod, isa, ktarget, t)

    return _rewrite


def _default(target: tvm.target.Target) -> tvm.transform.Pass:
    """What ``tvm.compile(..., relax_pipeline="default")`` runs for this target."""
    if "gpu" in target.keys:
        try:
            return relax.get_default_pipeline(target)
        except (ValueError, AttributeError):
            pass
    return relax.get_pipeline("default")


def pipeline(target, fast_math: bool = True) -> tvm.transform.Pass:
    """The one change for a TVM user: ``tvm.compile(mod, target, relax_pipeline=pipeline(target))``.

    qie's rewrite, then (``fast_math``) TVM's FastMathTransform on the float ops left (erf, exp, tanh,
    softmax become polynomial approximations instead of scalar libm calls: MiniLM's GELU erf was its largest
    cost; relative error ~1e-6, bounded in tests/tvm/test_tvm_graphs.py), then TVM's default pipeline.
    """
    t = _target(target)
    passes = [rewrite_pass(t)] + ([relax.transform.FastMathTransform()] if fast_math else []) + [_default(t)]
    return tvm.transform.Sequential(passes, name="qie.pipeline")


def kernel_calls(mod: tvm.IRModule) -> list[str]:
    """Names of the qie kernels a (rewritten) module calls, one entry per call site."""
    names = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            gv = e.args[0]
            f = mod[gv]
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "qie.kernel" in f.attrs:
                names.append(str(f.attrs["qie.kernel"]))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return names
