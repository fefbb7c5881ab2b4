"""Elementwise functions of one quantized tensor as 256-entry tables (a pass of qie's CPU pipeline).

After fusion, what a QDQ model leaves between its quantized layers is mostly functions of one u8/s8 tensor
into a u8/s8 tensor of the same shape (dequantize -> GELU / HardSwish / SiLU / clip -> quantize), whose
constants (scales, zero points) are folded into the PrimFunc. Each output element is then a function of
its input byte alone: 256 possible values. This pass evaluates such a function once at compile time on
inputs that hold every byte value (the unscheduled PrimFunc, each op's float32 result rounded as written,
i.e. ONNX's op-by-op semantics, with no FMA contraction across ops), checks on a second, permuted input
that the output really is a function of the byte alone (a transpose or any position-dependent op fails
the check and the function is left as it is), and replaces the call with a table lookup: on AVX-512 VBMI
four 64-byte table registers and two ``vpermi2b`` per 64 elements, elsewhere one load per element.
The lookup PrimFunc is shared by every table of the same shape and dtypes; the table is its argument.
"""
from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .schedules import isa as _isa

log = logging.getLogger("qie_ep.tvm")

QDTYPES = ("uint8", "int8")
MIN_ELEMENTS = 1024      # below this the function's own loop is as cheap as a lookup
VEC = 64                 # bytes per VBMI lookup
CHUNK = 64 * VEC         # elements per parallel task


def _buffers(f: tirx.PrimFunc):
    """The parameters as buffers (in TVM 0.27 a buffer parameter is the buffer itself), or None when one
    is a scalar (a symbolic size)."""
    return list(f.params) if all(hasattr(p, "shape") for p in f.params) else None


def _dims(buf) -> list[int | None] | None:
    """A buffer's dimensions: ints, None for a symbolic dimension (a plain variable), or None overall when
    some dimension is a compound expression."""
    out = []
    for d in buf.shape:
        if isinstance(d, tirx.IntImm):
            out.append(int(d.value))
        elif isinstance(d, tirx.Var):
            out.append(None)
        else:
            return None
    return out


def candidate(f) -> bool:
    """An unscheduled function of one u8/s8 tensor into a u8/s8 tensor of the same shape (static, or with
    plain symbolic dimensions such as a batch) whose blocks are all spatial."""
    if not isinstance(f, tirx.PrimFunc) or (f.attrs is not None and ("qie.kernel" in f.attrs
                                                                     or "tirx.is_scheduled" in f.attrs)):
        return False
    bufs = _buffers(f)
    if bufs is None or len(bufs) != 2 or any(str(b.dtype) not in QDTYPES for b in bufs):
        return False
    dims = [_dims(b) for b in bufs]
    if dims[0] is None or dims[0] != dims[1] or not all(
            a.same_as(b) for a, b in zip(bufs[0].shape, bufs[1].shape) if isinstance(a, tirx.Var)):
        return False
    if int(np.prod([d or 1 for d in dims[0]])) < MIN_ELEMENTS:     # symbolic dims counted as 1
        return False
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    try:
        infos = normalize_prim_func(s_tir.Schedule(f))
    except Exception:  # noqa: BLE001 - a function the analysis cannot read is not a table
        return False
    return bool(infos) and all(b.is_injective() for b in infos)


def table(f: tirx.PrimFunc) -> np.ndarray | None:
    """The function's 256 outputs (indexed by the input byte), or None when it is not a function of the
    byte alone (or cannot be run on this machine)."""
    bufs = _buffers(f)
    shape = [d or 1 for d in _dims(bufs[0])]          # symbolic dimensions probed at 1
    n = int(np.prod(shape))
    in_dt, out_dt = str(bufs[0].dtype), str(bufs[1].dtype)
    try:
        lib = tvm.tirx.build(tvm.IRModule({"main": f.without_attr("target").with_attr("global_symbol", "main")}),
                             target=tvm.target.Target({"kind": "llvm"}))
        outs = []
        probes = [np.arange(n) % 256, (np.arange(n) * 73 + 11) % 256]
        for idx in probes:
            x = tvm.runtime.tensor(idx.astype(np.uint8).view(in_dt).reshape(shape))
            o = tvm.runtime.tensor(np.zeros(shape, out_dt))
            lib["main"](x, o)
            outs.append(o.numpy().reshape(-1))
    except Exception as e:  # noqa: BLE001 - TVM raises builtin types; the function stays as it is
        log.info("qie: no table for an elementwise function (%s)", str(e).splitlines()[0] if str(e) else e)
        return None
    tbl = np.empty(256, out_dt)
    tbl[probes[0][:256]] = outs[0][:256]
    if not all(np.array_equal(tbl[p], o) for p, o in zip(probes, outs)):
        return None
    return tbl


def flat_shape(shape) -> tuple[list, tirx.PrimExpr, bool, str]:
    """A PrimFunc argument's ``shape`` (ints, None for a symbolic dimension) as (its int64 dims, a variable
    for each symbolic one; the element count; whether that is static; the shape as a name suffix)."""
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    dims = [i64(d) if d is not None else tirx.Var(f"n{k}", "int64") for k, d in enumerate(shape)]
    n = i64(int(np.prod([d for d in shape if d is not None])))
    for d in dims:
        if isinstance(d, tirx.Var):
            n = n * d
    return dims, n, isinstance(n, tirx.IntImm), "x".join(str(d) if d is not None else "n" for d in shape)


def lookup_primfunc(shape, in_dt: str, out_dt: str, vbmi: bool) -> tirx.PrimFunc:
    """``O[i] = T[byte(X[i])]`` over a tensor of ``shape`` (ints, None for a symbolic dimension):
    (X, T[256], O)."""
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    dims, n, static, suffix = flat_shape(shape)
    name = f"qie_table_{in_dt}_{out_dt}_{suffix}"
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            x = T.arg("X", T.buffer(dims, in_dt))
            tb = T.arg("T", T.buffer((i64(256),), out_dt))
            o = T.arg("O", T.buffer(dims, out_dt))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xf = T.decl_buffer((n,), "uint8", data=x.data)
            of = T.decl_buffer((n,), "int8", data=o.data)
            ti = T.decl_buffer((i64(256),), "int8", data=tb.data)
            # Whole 64-byte vectors (VBMI), then the rest one element at a time; with a symbolic size
            # both loops are emitted (either may be empty), parallel where they can be long.
            nvec = n.value // VEC if static and vbmi else (n // VEC if vbmi else 0)
            if vbmi and (not static or nvec):
                v8 = f"int8x{VEC}"
                tabs = [ti.vload([i64(j * VEC)], v8) for j in range(4)]
                per = CHUNK // VEC
                groups = (nvec + per - 1) // per
                loop = T.parallel if not static or groups > 1 else T.serial
                with loop(i64(0), i64(groups) if isinstance(groups, int) else groups) as g:
                    with T.serial(i64(0), i64(per)) as j:
                        v = g * per + j
                        with T.If(v < nvec):
                            with T.Then():
                                idx = tirx.reinterpret(v8, xf.vload([v * VEC], f"uint8x{VEC}"))
                                lo = tirx.call_llvm_pure_intrin(v8, "llvm.x86.avx512.vpermi2var.qi.512",
                                                                tabs[0], idx, tabs[1])
                                hi = tirx.call_llvm_pure_intrin(v8, "llvm.x86.avx512.vpermi2var.qi.512",
                                                                tabs[2], idx, tabs[3])
                                neg = idx < tirx.Broadcast(tirx.const(0, "int8"), VEC)
                                T.buffer_store(of, tirx.Select(neg, hi, lo), [tirx.Ramp(v * VEC, i64(1), VEC)])
            start = i64(nvec * VEC) if isinstance(nvec, int) else nvec * VEC
            if not static or n.value > nvec * VEC:
                long_tail = not vbmi if not static else n.value - nvec * VEC >= 4 * CHUNK
                with (T.parallel if long_tail else T.serial)(start, n) as i:
                    T.buffer_store(of, ti[xf[i].astype("int64")], [i])
    return ib.get()


@mutator
class _Calls(PyExprMutator):
    def __init__(self, mod, tables: dict, lookups: dict):
        super().__init__(mod)
        self.tables, self.lookups = tables, lookups
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call):  # noqa: D401 - PyExprMutator hook
        call = self.visit_expr_post_order(call)
        if not call.op.same_as(self.call_tir) or not isinstance(call.args[0], relax.GlobalVar):
            return call
        name = call.args[0].name_hint
        if name not in self.tables:
            return call
        tbl, key = self.tables[name]
        if key not in self.lookups:
            self.lookups[key] = self.builder_.add_func(lookup_primfunc(*key), "qie_table")
        (x,) = call.args[1].fields
        return relax.call_tir(self.lookups[key], [x, relax.const(tbl)], call.ty_args[0])


def tables_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass (CPU targets): every ``candidate`` whose ``table`` exists becomes a lookup."""
    vbmi = _isa.has_features(target, ("avx512vbmi",)) if target.kind.name == "llvm" else False

    @tvm.transform.module_pass(opt_level=0, name="qie.Tables")
    def _pass(mod, _ctx):
        tables = {}
        for gv, f in mod.functions_items():
            if candidate(f):
                tbl = table(f)
                if tbl is not None:
                    b = _buffers(f)
                    tables[gv.name_hint] = (tbl, (tuple(_dims(b[0])), str(b[0].dtype), str(b[1].dtype), vbmi))
        if not tables:
            return mod
        rw = _Calls(mod, tables, {})
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        log.info("qie: %d elementwise functions as 256-entry tables", len(tables))
        return relax.transform.DeadCodeElimination()(rw.builder_.get())

    return _pass
