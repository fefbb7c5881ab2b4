"""Compile an ONNX model with TVM (with or without qie's pipeline) and run it on numpy feeds.

The one "ONNX -> Relax -> ``tvm.compile`` -> VirtualMachine" path behind ``qie compare``'s ``tvm+qie``
host, ``bench/tvm.py`` and the TVM tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np
import tvm

from . import from_onnx, isa_for, kernel_calls, pipeline, rewrite_pass
from .schedules import isa as _isa


@dataclass
class Compiled:
    """``run(feeds) -> list of numpy outputs``; ``call(feeds)``: the VM's own result, not copied to numpy
    (benchmarks); the qie kernels the module calls (one name per call site, empty without qie), the
    target and compile time."""
    run: Callable
    call: Callable = None
    kernels: list = field(default_factory=list)
    target: object = None
    compile_s: float = 0.0

    def info(self) -> dict:
        return {"compile_s": self.compile_s, "target": str(self.target), "isa": isa_for(self.target),
                "qie_kernels": len(self.kernels), "kernel_names": sorted(set(self.kernels))}


def fixed_shapes(feeds: list[dict]) -> dict:
    """Input shapes identical in every feed (TVM then compiles static shapes); others stay symbolic."""
    out = {}
    for name in feeds[0]:
        shapes = {tuple(f[name].shape) for f in feeds}
        if len(shapes) == 1:
            out[name] = list(shapes.pop())
    return out


def compile_onnx(model, target=None, qie: bool = True, shape_dict: dict | None = None, fold_shapes: bool | None = None,
                 cache_inputs: bool = False) -> Compiled:
    """Import ``model`` (a ModelProto) and compile it for ``target`` (the host CPU by default) with qie's
    pipeline (``qie``) or TVM's default. ``shape_dict`` fixes input shapes; ``fold_shapes`` (default: when
    every input's shape is fixed, by ``shape_dict`` or the model) folds the shape arithmetic. ``cache_inputs``: a feed dict becomes
    device tensors once and is reused by identity (benchmarks: a deployment keeps its tensors)."""
    target = target or _isa.host_target()
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    t0 = time.perf_counter()
    mod = from_onnx(model, shape_dict=shape_dict, fold_shapes=fold_shapes)
    kernels = kernel_calls(rewrite_pass(target)(mod)) if qie else []
    ex = tvm.compile(mod, target, relax_pipeline=pipeline(target) if qie else "default")
    dev = tvm.cpu() if target.kind.name == "llvm" else tvm.device(target.kind.name, 0)
    fn = tvm.relax.VirtualMachine(ex, dev)["main"]
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    cache: dict = {}

    def tensors(feeds):
        if not cache_inputs:
            return [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in names]
        key = id(feeds)
        if key not in cache:
            cache[key] = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in names]
        return cache[key]

    def call(feeds):
        return fn(*tensors(feeds))

    def run(feeds):
        out = call(feeds)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    return Compiled(run, call, kernels, target, time.perf_counter() - t0)
