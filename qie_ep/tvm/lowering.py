"""Kernel families as lowering rules, in the manner of TVM's dlight: each takes a matched quantized group
and returns the Relax calls of its PrimFuncs, or None when it does not apply (another ISA kind, another
op). ``rewrite.py`` only matches groups and tries ``LOWERINGS`` in order; it has no target branches.

A rule that applies but cannot take the group (layout, dynamic shapes, grouped conv) raises
``Unsupported`` with the reason, and the group is left to TVM.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx

from .schedules import conv as tconv
from .schedules import gemm as tgemm
from .schedules import matmul as tmatmul
from .schedules.gemm import Epilogue


class Unsupported(Exception):
    """A group qie leaves to TVM; the message says why."""


def _dtype(e) -> str:
    return e.ty.dtype.dtype


def _shape(e):
    sh = e.ty.shape
    if sh is None or not hasattr(sh, "values"):
        return None
    return list(sh.values)


def _static(v) -> int | None:
    return int(v) if isinstance(v, tirx.IntImm) else None


@dataclass
class Group:
    """A matched quantized group: ``op`` ("matmul" or "conv2d") of activation ``a`` (u8/s8, zero point
    ``za`` as a [1] int32 expression) with constant weights ``b`` (matmul [K, N], conv OIHW) and their zero
    points ``zb``, written through ``epi`` with the operands ``epi_ops``; ``call`` is the matched op."""
    op: str
    call: relax.Call
    a: relax.Expr
    b: np.ndarray
    zb: np.ndarray
    za: relax.Expr
    epi: Epilogue
    epi_ops: list


def _rows(sh):
    """The GEMM's rows: the product of every dimension of A but the last (symbolic ones stay symbolic)."""
    m = sh[0]
    for d in sh[1:-1]:
        m = m * d
    return m


def _matmul_operands(g: Group):
    sh = _shape(g.a)
    if sh is None or len(sh) < 2 or g.b.ndim != 2:
        raise Unsupported("matmul needs A with a known rank >= 2 and 2-D constant weights")
    k, n = g.b.shape
    if _static(sh[-1]) != k:
        raise Unsupported(f"A's last dimension {sh[-1]} is not K={k}")
    a2 = relax.op.reshape(g.a, [_rows(sh), k]) if len(sh) != 2 else g.a
    return sh, k, n, a2


def _unflatten(out, sh, n):
    return relax.op.reshape(out, sh[:-1] + [n]) if len(sh) != 2 else out


class X86Matmul:
    """matmul on the x86 (and generic) GEMM kernels: weights packed for the tuned register tile."""

    def lower(self, rw, g: Group):
        if g.op != "matmul" or rw.isa.kind == "cuda":
            return None
        sh, k, n, a2 = _matmul_operands(g)
        spec = tmatmul.MatmulSpec(_dtype(g.a), str(g.b.dtype), k, n, g.epi)
        dims = [_static(d) for d in sh[:-1]]
        m_static = int(np.prod(dims)) if all(d is not None for d in dims) else None
        tile = tmatmul.tile_for(spec, rw.isa, m_static)
        packed = tgemm.pack_weights(g.b, g.zb, rw.isa, tile)
        args = [a2, relax.const(packed.packed), relax.const(packed.colsum), g.za]
        if g.epi.zb:
            args.append(relax.const(packed.zb))
        out = rw._emit(tmatmul.scheduled(spec, rw.isa, tile), args + g.epi_ops, [_rows(sh), n], g.epi.out)
        return _unflatten(out, sh, n)


class CudaMatmul:
    """matmul on CUDA (dp4a or IMMA): prep (shift to s8, pad; dp4a: four bytes to a word) -> qie's core
    -> [rowsum] -> epilogue."""

    def lower(self, rw, g: Group):
        if g.op != "matmul" or rw.isa.kind != "cuda":
            return None
        from .schedules import cuda as tcuda

        sh, k, n, a2 = _matmul_operands(g)
        spec = tmatmul.MatmulSpec(_dtype(g.a), str(g.b.dtype), k, n, g.epi)
        packed, colsum, zbs, kp, np_ = tcuda.pack_weights(g.b, g.zb, rw.isa)
        sa, _ = tgemm.shifts(rw.isa, spec.a_dtype, spec.b_dtype)
        m = _rows(sh)
        core = tcuda.scheduled_core(kp, np_, rw.isa, rw.target)
        prep = tcuda.prep_primfunc(spec.a_dtype, k, kp, rw.isa)
        bind = rw.builder_.emit
        if rw.isa.name == "cuda_dp4a":
            mt = (m + 63) // 64
            ap = bind(rw._emit(prep, [a2, relax.prim_value(mt)], [mt * 64, kp // 4], "int32"))
            acc = bind(rw._emit(core, [ap, relax.const(packed), relax.prim_value(mt)], [mt * 64, np_], "int32"))
        else:
            ap = bind(rw._emit(prep, [a2], [m, kp], "int8"))
            acc = bind(rw._emit(core, [ap, relax.const(packed)], [m, np_], "int32"))
        args = [acc, relax.const(colsum), g.za]
        if g.epi.zb:
            rowsum = rw._emit(tcuda.rowsum_primfunc(spec.a_dtype, k, sa), [a2], [m], "int32")
            args += [relax.const(zbs), bind(rowsum)]
        name = spec.kernel_name(rw.isa, tgemm.Tile(64, 1)).replace("qie_matmul_", "qie_epilogue_")
        out = rw._emit(tcuda.epilogue_primfunc(k, n, np_, g.epi, sa, name), args + g.epi_ops, [m, n], g.epi.out)
        return _unflatten(out, sh, n)


class X86Conv2d:
    """conv2d (NCHW / OIHW, group 1, depthwise, or up to 4 groups as one dense kernel; static C and H, any
    width) on the x86 (and generic) conv kernels."""

    def lower(self, rw, g: Group):
        if g.op != "conv2d" or rw.isa.kind == "cuda":
            return None
        at, x, w, zw, epi = g.call.attrs, g.a, g.b, g.zb, g.epi
        if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            raise Unsupported("conv2d layout other than NCHW/OIHW")
        sh = _shape(x)
        if sh is None or len(sh) != 4 or any(_static(d) is None for d in sh[1:3]):
            raise Unsupported("conv2d input needs static C and H")
        c, h = (int(d) for d in sh[1:3])
        # A symbolic width (a text line's length): the kernel takes any width through its own variable.
        wd = _static(sh[3]) if _static(sh[3]) is not None else tirx.Var("width", "int64")
        oc, cg, kh, kw = w.shape
        pads = [int(p) for p in at.padding]
        pads = pads * 2 if len(pads) == 2 else pads
        groups = int(at.groups)
        if groups != 1 and not groups == c == oc:
            return self._dense_groups(rw, g, groups, c, oc)
        spec = tconv.ConvSpec(_dtype(x), str(w.dtype), c, oc, h, wd, (kh, kw), tuple(int(s) for s in at.strides),
                              tuple(pads), tuple(int(d) for d in at.dilation), groups, epi)
        oh, ow = dataclasses.replace(spec, width=sh[3]).out_hw if spec.symbolic else spec.out_hw
        if spec.depthwise:
            spec = tconv.ConvSpec(**{**spec.__dict__, "epi": Epilogue(epi.out, epi.per_channel, epi.bias, False)})
            args = [x, relax.const(tconv.pack(spec, rw.isa, w, zw)), g.za]
            func = tconv.scheduled(spec, rw.isa)
        else:
            tile = tconv.tile_for(spec, rw.isa)
            packed = tconv.pack(spec, rw.isa, w, zw, tile)
            args = [x, relax.const(packed.packed), relax.const(packed.colsum), g.za]
            if epi.zb:
                args.append(relax.const(packed.zb))
            func = tconv.scheduled(spec, rw.isa, tile)
        return rw._emit(func, args + g.epi_ops, [sh[0], oc, oh, ow], epi.out)

    MAX_DENSE_GROUPS = 4

    def _dense_groups(self, rw, g: Group, groups: int, c: int, oc: int):
        """A grouped conv2d that is not depthwise (ShuffleNet's 1x1 convolutions in 3 or 4 groups) as one dense
        group-1 kernel whose weights outside each group's block are its output channel's zero point, so
        ``w - zw`` is 0 there: the same integers, ``groups`` times the multiply-adds, one call. (TVM's own
        lowering ran them as float conv2d; one kernel per group on channel slices, concatenated, was slower:
        the concat fused into the next elementwise function.) More groups (ResNeXt's 32) stay TVM's."""
        if c % groups or oc % groups or groups > self.MAX_DENSE_GROUPS:
            raise Unsupported(f"grouped conv2d ({c} -> {oc} channels in {groups} groups)")
        cin, cout = c // groups, oc // groups
        zw = np.broadcast_to(np.asarray(g.zb).reshape(-1), (oc,))
        dense = np.empty((oc, c) + g.b.shape[2:], g.b.dtype)
        dense[...] = zw.reshape(-1, 1, 1, 1)
        for gi in range(groups):
            dense[gi * cout:(gi + 1) * cout, gi * cin:(gi + 1) * cin] = g.b[gi * cout:(gi + 1) * cout]
        at = g.call.attrs
        call = relax.op.nn.conv2d(g.a, relax.const(dense), strides=[int(v) for v in at.strides],
                                  padding=[int(v) for v in at.padding], dilation=[int(v) for v in at.dilation], groups=1,
                                  data_layout=str(at.data_layout), kernel_layout=str(at.kernel_layout),
                                  out_layout=str(at.out_layout))
        return self.lower(rw, dataclasses.replace(g, call=call, b=dense))


# Tried in order; the first that returns a result lowers the group. (No CUDA conv2d family yet: such a
# group is left to TVM with that reason.)
LOWERINGS = (X86Matmul(), CudaMatmul(), X86Conv2d())
