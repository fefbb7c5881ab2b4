"""DynamicQuantizeLinear's range as one vectorized pass (a pass of qie's CPU pipeline).

qie's frontend writes DynamicQuantizeLinear with Relax operators (``frontend.DynamicQuantizeLinear``):
``lo = minimum(0, min(x))``, ``hi = maximum(0, max(x))``, ``scale = where(hi - lo == 0, 1, (hi - lo) / 255)``,
``zp = quantize(-lo, scale, 0)``, then ``quantize(x, scale, zp)``. Legalized, that is two whole-tensor
reductions, each one scalar loop with a single min / max dependency chain (~4 cycles an element: 30 us on a
15 x 1536 activation, 24 of them in a dynamically quantized MiniLM) and four scalar functions, six VM calls
before the quantize. This pass replaces the scale and zero point with one call of ``range_primfunc``: both
reductions in one read of ``x`` with eight 16-lane accumulators (min and max are exact in any order, so the
result is the reductions' own), then the same scalar formulas. ``NaN`` in ``x`` gives what the scalar loops
gave only per lane (they gave a position-dependent value too: ORT's MLAS as well).
"""
from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .lowering import _dtype, _shape, _static
from .tables import flat_shape

log = logging.getLogger("qie_ep.tvm")

LANES = 16        # float32 lanes per accumulator (two ymm or one zmm register: LLVM splits as the target needs)
ACCS = 4          # accumulators per reduction (min and max: eight vectors, independent chains)


def _i64(v):
    return tirx.IntImm("int64", v)


def range_primfunc(shape) -> tirx.PrimFunc:
    """``(X, S, Z)``: ``S = scale`` (float32 scalar), ``Z = zero point`` (uint8 scalar) of DynamicQuantizeLinear
    over ``X`` (float32 of ``shape``; None for a symbolic dimension), as qie's frontend writes them."""
    dims, n, static, suffix = flat_shape(shape)
    name = f"qie_dynamic_range_{suffix}"
    block = LANES * ACCS
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            x = T.arg("X", T.buffer(dims, "float32"))
            s = T.arg("S", T.buffer((), "float32"))
            z = T.arg("Z", T.buffer((), "uint8"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "qie.kernel": name})
            # A root block: TVM's RewriteDataflowReshape inspects every one-input call_tir's PrimFunc and
            # expects one.
            with T.sblock("root"):
                xf = T.decl_buffer((n,), "float32", data=x.data)
                # Accumulators start at 0: the reductions then give min(0, min x) and max(0, max x) directly.
                acc = T.decl_buffer((_i64(2 * block),), "float32")     # [lo x ACCS vectors, hi x ACCS vectors]

                def vec(buf, at):
                    return tirx.BufferLoad(buf, [tirx.Ramp(at, _i64(1), LANES)])

                def put(buf, value, at):
                    T.buffer_store(buf, value, [tirx.Ramp(at, _i64(1), LANES)])

                def fold(at, accs):
                    v = vec(xf, at)
                    for a in accs:
                        lo, hi = _i64(a * LANES), _i64(block + a * LANES)
                        put(acc, tirx.min(vec(acc, lo), v), lo)
                        put(acc, tirx.max(vec(acc, hi), v), hi)

                with T.serial(_i64(0), _i64(2 * ACCS)) as a:
                    put(acc, tirx.Broadcast(zero, LANES), a * LANES)
                with T.serial(_i64(0), n // block) as i:
                    for a in range(ACCS):
                        fold(i * block + a * LANES, [a])
                # The rest: whole vectors, then one vector ending at n (it overlaps; min / max do not mind), or
                # one element at a time when x is shorter than a vector.
                rest = n // block * block
                if not static or n.value % block:
                    with T.serial(_i64(0), (n - rest) // LANES) as j:
                        fold(rest + j * LANES, [0])
                    with T.If(n >= LANES):
                        with T.Then():
                            fold(n - LANES, [1])
                        with T.Else():
                            with T.serial(_i64(0), n) as i:
                                T.buffer_store(acc, tirx.min(acc[0], xf[i]), [_i64(0)])
                                T.buffer_store(acc, tirx.max(acc[block], xf[i]), [_i64(block)])
                lo, hi = acc[0], acc[block]
                for a in range(1, block):
                    lo, hi = tirx.min(lo, acc[a]), tirx.max(hi, acc[block + a])
                lo, hi = T.bind(lo), T.bind(hi)
                span = T.bind(hi - lo)
                scale = T.bind(tirx.Select(span == zero, tirx.const(1.0, "float32"), span / tirx.const(255.0, "float32")))
                T.buffer_store(s, scale, [])
                q = tirx.nearbyint(lo * tirx.const(-1.0, "float32") / scale)
                T.buffer_store(z, tirx.Cast("uint8", tirx.max(tirx.min(q, tirx.const(255.0, "float32")), zero)), [])
    return ib.get().with_attr("op_pattern", 8)


def _op(name: str):
    return tvm.ir.Op.get(name)


def _fconst(e, value: float) -> bool:
    return isinstance(e, tvm.ir.Constant) and e.value.numpy().size == 1 and float(e.value.numpy().reshape(-1)[0]) == value


@mutator
class _Ranges(PyExprMutator):
    """``where(span == 0, 1, span / 255)`` and ``quantize(-lo, that, 0)`` of one ``x`` -> the two outputs of
    one ``range_primfunc`` call."""

    def __init__(self, mod, kernel_target):
        super().__init__(mod)
        self.kernel_target = kernel_target
        self.funcs: dict = {}      # shape key -> GlobalVar
        self.calls: list = []      # (x, the call's tuple var)
        self.rewritten = 0

    def _resolve(self, e):
        while isinstance(e, relax.Var):
            b = self.lookup_binding(e)
            if b is None:
                break
            e = b
        return e

    def _call(self, e, name: str, nargs: int):
        r = self._resolve(e)
        ok = isinstance(r, relax.Call) and r.op.same_as(_op(name)) and len(r.args) == nargs
        return r if ok else None

    def _bound(self, e, op: str, reduce: str):
        """x of ``op(0, reduce(x))`` (a whole-tensor min / max)."""
        c = self._call(e, op, 2)
        if c is None or not _fconst(c.args[0], 0.0):
            return None
        r = self._call(c.args[1], reduce, 1)
        if r is None or r.attrs.axis is not None or r.attrs.keepdims:
            return None
        return r.args[0]

    def _x_of_span(self, span):
        sub = self._call(span, "relax.subtract", 2)
        if sub is None:
            return None
        x_hi, x_lo = self._bound(sub.args[0], "relax.maximum", "relax.max"), self._bound(sub.args[1], "relax.minimum", "relax.min")
        return x_hi if x_hi is not None and x_lo is not None and x_hi.same_as(x_lo) else None

    def _range_call(self, x):
        for seen, t in self.calls:
            if seen.same_as(x):
                return t
        shape = _shape(x) if isinstance(x.ty, relax.TensorType) else None
        if shape is None or _dtype(x) != "float32":
            return None
        dims = [_static(d) for d in shape]
        if any(d is None and not isinstance(v, tirx.Var) for d, v in zip(dims, shape)):
            return None      # a compound symbolic size: left to TVM's lowering
        key = tuple(dims)
        if key not in self.funcs:
            f = range_primfunc(key)
            if self.kernel_target is not None:
                f = f.with_attr("target", self.kernel_target)
            self.funcs[key] = self.builder_.add_func(f, str(f.attrs["global_symbol"]))
        t = self.builder_.emit(relax.call_tir(self.funcs[key], [x], [relax.TensorType([], "float32"),
                                                                      relax.TensorType([], "uint8")]))
        self.calls.append((x, t))
        return t

    def visit_call_(self, call):  # noqa: D401 - PyExprMutator hook
        call = self.visit_expr_post_order(call)
        new = None
        if call.op.same_as(_op("relax.where")) and len(call.args) == 3:
            new = self._scale(call)
        elif call.op.same_as(_op("relax.quantize")):
            new = self._zero_point(call)
        if new is None:
            return call
        self.rewritten += 1
        return new

    def _scale(self, call):
        cond, one, div = call.args
        eq, dv = self._call(cond, "relax.equal", 2), self._call(div, "relax.divide", 2)
        if eq is None or dv is None or not _fconst(one, 1.0) or not _fconst(eq.args[1], 0.0) \
                or not _fconst(dv.args[1], 255.0):
            return None
        x = self._x_of_span(eq.args[0])
        if x is None or not x.same_as(self._x_of_span(dv.args[0])):
            return None
        t = self._range_call(x)
        return None if t is None else relax.TupleGetItem(t, 0)

    def _zero_point(self, call):
        neg, scale, zp = call.args
        if str(call.attrs.out_dtype) != "uint8" or not isinstance(zp, tvm.ir.Constant) or np.any(zp.value.numpy() != 0):
            return None
        n = self._call(neg, "relax.negative", 1)
        x = self._bound(n.args[0], "relax.minimum", "relax.min") if n is not None else None
        s = self._resolve(scale)
        if x is None or not isinstance(s, relax.TupleGetItem) or s.index != 0:
            return None
        t = next((t for seen, t in self.calls if seen.same_as(x)), None)
        return relax.TupleGetItem(t, 1) if t is not None and s.tuple_value.same_as(t) else None


def dynamic_range_pass(kernel_target=None) -> tvm.transform.Pass:
    """The pass (CPU targets): every DynamicQuantizeLinear range qie's frontend wrote becomes one call."""

    @tvm.transform.module_pass(opt_level=0, name="qie.DynamicRange")
    def _pass(mod, _ctx):
        rw = _Ranges(mod, kernel_target)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        if not rw.rewritten:
            return mod
        log.info("qie: %d dynamic quantization ranges in one pass each", len(rw.calls))
        return relax.transform.DeadCodeElimination()(rw.builder_.get())

    return _pass
