"""The Relax pass that sends quantized matmul / conv2d groups to qie's scheduled PrimFuncs.

Groups recognised (each operand resolved through its binding):
1. ``quantize([add](OP(dequantize(x), dequantize(W)), dequantize(bias_int32)), y_scale, y_zp)``
   -> requantized u8/s8 output (QLinearMatMul / QLinearConv / QGemm / QDQ groups);
2. ``OP(dequantize(x), dequantize(W))`` left over -> float32 output (MatMulIntegerToFloat, DQ -> op);
3. ``OP([sub](astype(x, int32), zx), [sub](astype(W, int32), zw))`` with int32 output
   -> int32 output (MatMulInteger / ConvInteger).
OP is ``relax.matmul`` (x [..., K], W constant [K, N]) or ``relax.nn.conv2d`` (NCHW / OIHW, group 1
or depthwise, W constant). W and its zero point must be constants (they are packed at compile time);
``x``'s zero point is one value (it may be computed at run time, as DynamicQuantizeLinear does).
A group that does not fit is left to TVM's lowering and logged (logger ``qie_ep.tvm``), never guessed.
Group 1 runs before group 2 so that a matmul feeding a quantize becomes one requantizing kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .lowering import LOWERINGS, Group, Unsupported, _dtype, _shape, _static
from .schedules import gemm as tgemm
from .schedules.gemm import Epilogue
from .schedules.isa import Isa

log = logging.getLogger("qie_ep.tvm")
_QDTYPES = ("uint8", "int8")


@dataclass
class _Operand:
    data: relax.Expr
    zp: relax.Expr | None
    scale: relax.Expr | None = None
    axis: int = -1


def _op(name: str):
    return tvm.ir.Op.get(name)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, isa: Isa, phase: str, kernel_target=None, target=None):
        super().__init__(mod)
        self.isa, self.phase, self.kernel_target, self.target = isa, phase, kernel_target, target
        self.funcs: dict[str, list] = {}   # kernel name -> [(GlobalVar, PrimFunc)]
        self.rewritten = 0

    # -- binding resolution ---------------------------------------------------------------------
    def _resolve(self, e):
        seen = 0
        while isinstance(e, relax.Var) and seen < 64:
            b = self.lookup_binding(e)
            if b is None:
                break
            e, seen = b, seen + 1
        return e

    def _call(self, e, name: str):
        r = self._resolve(e)
        return r if isinstance(r, relax.Call) and r.op.same_as(_op(name)) else None

    def _const(self, e) -> np.ndarray | None:
        """The value of a constant, through astype / reshape / expand_dims / permute_dims / multiply."""
        r = self._resolve(e)
        if isinstance(r, tvm.ir.Constant):
            return r.value.numpy()
        if not isinstance(r, relax.Call) or not isinstance(r.op, tvm.ir.Op):
            return None
        name = r.op.name
        if name == "relax.multiply":
            x, y = self._const(r.args[0]), self._const(r.args[1])
            return None if x is None or y is None else np.multiply(x, y)
        if name not in ("relax.astype", "relax.reshape", "relax.expand_dims", "relax.permute_dims"):
            return None
        v = self._const(r.args[0])
        if v is None:
            return None
        if name == "relax.astype":
            return v.astype(str(r.attrs.dtype))
        if name == "relax.permute_dims":
            axes = None if r.attrs.axes is None else [int(a) for a in r.attrs.axes]
            return np.transpose(v, axes)
        sh = _shape(r)
        return v.reshape([int(d) for d in sh]) if sh is not None and all(_static(d) is not None for d in sh) else None

    def _dequant(self, e) -> _Operand | None:
        c = self._call(e, "relax.dequantize")
        if c is None:
            return None
        return _Operand(c.args[0], c.args[2], c.args[1], int(c.attrs.axis))

    def _transposed_dequant(self, e) -> _Operand | None:
        """``permute_dims(dequantize(W), [1, 0])`` of a 2-D constant W (a Gemm with transB = 1): the dequantize
        of W's transpose (its per-channel axis swapped), so the weights pack like a MatMul's."""
        t = self._call(e, "relax.permute_dims")
        if t is None:
            return None
        dq = self._dequant(t.args[0])
        axes = None if t.attrs.axes is None else [int(a) for a in t.attrs.axes]
        if dq is None or axes not in (None, [1, 0]) or len(_shape(dq.data) or []) != 2:
            return None
        return _Operand(relax.op.permute_dims(dq.data, [1, 0]), dq.zp, dq.scale, 1 - dq.axis % 2)

    def _widened(self, e) -> _Operand | None:
        """``[sub](astype(x, int32), zp)`` with x u8/s8."""
        zp = None
        sub = self._call(e, "relax.subtract")
        if sub is not None:
            e, zp = sub.args[0], sub.args[1]
        cast = self._call(e, "relax.astype")
        if cast is None or _dtype(cast.args[0]) not in _QDTYPES:
            return None
        if zp is not None:
            inner = self._call(zp, "relax.astype")
            zp = inner.args[0] if inner is not None else zp
        return _Operand(cast.args[0], zp)

    # -- helpers building Relax operands --------------------------------------------------------
    def _scalar_i32(self, zp, what: str) -> relax.Expr:
        if zp is None:
            return relax.const(np.zeros(1, np.int32))
        sh = _shape(zp)
        if sh is None or any(_static(d) != 1 for d in sh):
            raise Unsupported(f"{what} zero point must be one value, got shape {sh}")
        return relax.op.reshape(relax.op.astype(zp, "int32"), [1])

    def _fvec(self, e, n: int, per_channel: bool) -> relax.Expr:
        return relax.op.reshape(relax.op.astype(e, "float32"), [n if per_channel else 1])

    @staticmethod
    def _per_channel(scale_w, n: int, what: str) -> bool:
        sh = _shape(scale_w)
        size = 1 if sh is None or len(sh) == 0 else int(np.prod([_static(d) or -1 for d in sh]))
        if size not in (1, n):
            raise Unsupported(f"{what} scale has {size} elements for {n} channels")
        return size == n and n > 1

    def _weights(self, w: _Operand, n_axis: int):
        b = self._const(w.data)
        if b is None or b.dtype not in (np.uint8, np.int8):
            raise Unsupported("weights are not a uint8/int8 constant")
        zb = np.zeros(1, b.dtype) if w.zp is None else self._const(w.zp)
        if zb is None:
            raise Unsupported("weight zero point is not a constant")
        n = b.shape[n_axis]
        zb = np.asarray(zb).reshape(-1)
        if zb.size not in (1, n):
            raise Unsupported(f"weight zero point has {zb.size} elements for {n} channels")
        return b, zb

    def _emit(self, func: tirx.PrimFunc, args, out_shape, dtype) -> relax.Expr:
        name = str(func.attrs["global_symbol"])
        # Opaque to Relax's operator fusion: each qie PrimFunc stays its own call (FuseOps would otherwise
        # merge an unscheduled prep / epilogue into its neighbour and re-derive the buffers).
        func = func.with_attr("op_pattern", 8)
        if self.kernel_target is not None:
            func = func.with_attr("target", self.kernel_target)
        # Shared by name only where the PrimFunc is the same: a name that does not carry every parameter
        # of a kernel (two convs alike but for their padding once shared one kernel) gets a suffix instead.
        same = self.funcs.setdefault(name, [])
        gv = next((g for g, f in same if tvm_ffi.structural_equal(f, func)), None)
        if gv is None:
            gv = self.builder_.add_func(func, name if not same else f"{name}_{len(same)}")
            same.append((gv, func))
        return relax.call_tir(gv, args, relax.TensorType(out_shape, dtype))

    # -- the groups -----------------------------------------------------------------------------
    def visit_call_(self, call):  # noqa: D401 - PyExprMutator hook
        call = self.visit_expr_post_order(call)
        new = None
        try:
            if self.phase == "requant" and call.op.same_as(_op("relax.quantize")):
                new = self._quantize_group(call)
            elif self.phase == "float" and (call.op.same_as(_op("relax.matmul"))
                                            or call.op.same_as(_op("relax.nn.conv2d"))):
                new = self._group(call, None)
        except Unsupported as e:
            log.info("qie: %s left to TVM: %s", call.op.name, e)
        if new is None:
            return call
        self.rewritten += 1
        return new

    def _quantize_group(self, q):
        out_dtype = str(q.attrs.out_dtype)
        if out_dtype not in _QDTYPES:
            raise Unsupported(f"output dtype {out_dtype}")
        x = q.args[0]
        bias = None
        add = self._call(x, "relax.add")
        if add is not None:
            op_call = self._resolve(add.args[0])
            bias = add.args[1]
        else:
            op_call = self._resolve(x)
        if not isinstance(op_call, relax.Call) or not (
                op_call.op.same_as(_op("relax.matmul")) or op_call.op.same_as(_op("relax.nn.conv2d"))):
            return None
        return self._group(op_call, (q.args[1], q.args[2], out_dtype, bias))

    def _group(self, call, quant):
        x, w = call.args[0], call.args[1]
        xo, wo = self._dequant(x), self._dequant(w)
        if wo is None and call.op.same_as(_op("relax.matmul")):
            wo = self._transposed_dequant(w)
        integer = False
        if xo is None or wo is None:
            if quant is not None:
                return None
            xo, wo = self._widened(x), self._widened(w)
            if xo is None or wo is None or _dtype(call) != "int32":
                return None
            integer = True
        is_conv = call.op.same_as(_op("relax.nn.conv2d"))
        b, zb = self._weights(wo, 0 if is_conv else 1)
        a = xo.data
        if _dtype(a) not in _QDTYPES:
            raise Unsupported(f"activation dtype {_dtype(a)}")
        n = b.shape[0] if is_conv else b.shape[1]
        za = self._scalar_i32(xo.zp, "activation")
        if integer:
            epi_ops, per_channel, out, ibias = [], False, "int32", None
        else:
            if _shape(xo.scale) not in ([], [1]):
                raise Unsupported("activation scale must be one value")
            per_channel = self._per_channel(wo.scale, n, "weight")
            want_axis = 0 if is_conv else 1          # output channels: W's axis 0 (OIHW) or 1 ([K, N])
            if per_channel and wo.axis % b.ndim != want_axis:
                raise Unsupported(f"weight scale is per axis {wo.axis}, not per output channel (axis {want_axis})")
            prod = relax.op.multiply(relax.op.astype(xo.scale, "float32"), relax.op.astype(wo.scale, "float32"))
            ibias = None
            if quant is None:
                out = "float32"
                epi_ops = [self._fvec(prod, n, per_channel)]
            else:
                sy, zy, out, bias = quant
                if _shape(sy) not in ([], [1]):
                    raise Unsupported("output scale must be one value")
                ibias = self._int_bias(bias, n, xo.scale, wo.scale) if bias is not None else None
                if bias is not None and ibias is None:
                    return None     # the add stays a TVM op; the matmul itself becomes a float group
                mult = relax.op.divide(prod, relax.op.astype(sy, "float32"))
                epi_ops = [self._fvec(mult, n, per_channel)]
                if ibias is not None:
                    epi_ops.append(relax.const(ibias))
                epi_ops.append(self._scalar_i32(zy, "output"))
        sb_any = bool(np.any(np.asarray(zb, np.int32) + tgemm.shifts(self.isa, _dtype(a), str(b.dtype))[1]))
        epi = Epilogue(out, per_channel=per_channel, bias=ibias is not None, zb=sb_any)
        group = Group("conv2d" if is_conv else "matmul", call, a, b, zb, za, epi, epi_ops)
        for lowering in LOWERINGS:
            out = lowering.lower(self, group)
            if out is not None:
                return out
        raise Unsupported(f"{group.op} has no qie kernel family for ISA {self.isa.name}")

    def _int_bias(self, bias, n, sa, sb) -> np.ndarray | None:
        """The int32 bias of ``dequantize(bias, sa * sb)`` when its scale is exactly sa * sb[n]."""
        r = self._call(bias, "relax.reshape")
        dq = self._dequant(r.args[0] if r is not None else bias)
        if dq is None:
            return None
        c = self._const(dq.data)
        scale = self._const(dq.scale)
        sa_v, sb_v = self._const(sa), self._const(sb)
        if c is None or c.dtype != np.int32 or c.size != n or scale is None or sa_v is None or sb_v is None:
            return None
        if dq.zp is not None:
            z = self._const(dq.zp)
            if z is None or np.any(z != 0):
                return None
        want = (np.float32(np.asarray(sa_v, np.float32).reshape(-1)[0]) * np.asarray(sb_v, np.float32).reshape(-1))
        if not np.array_equal(np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,)),
                              np.broadcast_to(want.astype(np.float32), (n,))):
            return None
        return c.reshape(n).astype(np.int32)

def rewrite(mod: tvm.IRModule, isa: Isa, kernel_target=None, target=None) -> tvm.IRModule:
    """Apply the two phases (requantizing groups, then float / integer groups) to every Relax function.

    ``kernel_target``: compile qie's PrimFuncs for this target (``qie_ep.tvm.schedules.isa.kernel_target``).
    """
    total = 0
    for phase in ("requant", "float"):
        rw = _Rewriter(mod, isa, phase, kernel_target, target)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        mod = relax.transform.DeadCodeElimination()(rw.builder_.get())
        total += rw.rewritten
    # Scales, multipliers and zero points of static quantization are constants: fold them once here
    # rather than recompute them on every call.
    mod = relax.transform.FoldConstant()(mod)
    log.info("qie: %d quantized groups sent to qie kernels (%s)", total, isa.name)
    return mod
