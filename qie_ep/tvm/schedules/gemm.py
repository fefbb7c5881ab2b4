"""Quantized GEMM as TIR: compute stages shared by matmul and conv, and the per-ISA schedules.

The math (the numerics contract of ``qie_ep.reference``): with activations ``a`` (u8/s8, zero point
``za``, one per tensor) and constant weights ``b`` (u8/s8, zero point ``zb`` per tensor or per column),

    acc[m, n] = sum_k (a[m, k] - za) (b[k, n] - zb[n])                         (int32, exact)

Each ISA multiplies fixed operand types (x86 VNNI: u8 x s8; CUDA dp4a / IMMA: s8 x s8), so operands
are shifted into them, ``a' = a + sa``, ``b' = b + sb`` (sa, sb in {0, +-128}), and

    acc = sum_k a' b'  -  za' colsum(b')[n]  -  zb'[n] rowsum(a')[m]  +  K za' zb'[n]

with ``za' = za + sa``, ``zb' = zb + sb``. ``b'`` is packed once (numpy, at compile time) as
``[N/W, K/kpack, W, kpack]`` (W = the register tile's columns) so that the tile's weights for one k
group are one contiguous run and each vector load feeds one dot-product instruction;
``colsum(b')`` and ``zb'`` ship beside it. ``rowsum(a')`` is computed only when some ``zb' != 0``.
Outputs: int32 ``acc`` (MatMulInteger / ConvInteger); requantized u8/s8
``saturate(round_half_even(float32(acc + bias[n]) * mult[n]) + zy)`` (QLinearMatMul / QLinearConv /
DQ->op->Q groups); or float32 ``float32(acc) * scale[n] (+ fbias[n])`` (MatMulIntegerToFloat, DQ->op).

Stages: (1) ``Ap``: the activation rows, shifted, padded to the row tile and to K/kpack (conv builds
them as im2col rows); (2) ``C``: the integer product, tensorized; (3) ``rowsum`` (only if needed);
(4) ``O``: the epilogue, computed per register tile right after its K loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from . import intrin
from .isa import Isa


@dataclass(frozen=True)
class Tile:
    """Register tile: ``rows`` activation rows x ``vecs`` accumulator vectors of ``isa.lanes``."""
    rows: int
    vecs: int


@dataclass(frozen=True)
class Epilogue:
    """What the GEMM writes: ``out`` dtype int32 / uint8 / int8 / float32, and which operands exist."""
    out: str
    per_channel: bool = False   # mult / scale per column (else one value)
    bias: bool = False          # int32 bias (requant) or float bias (float output)
    zb: bool = False            # some zb' != 0: the rowsum term is needed

    def __post_init__(self):
        if self.out not in ("int32", "uint8", "int8", "float32"):
            raise ValueError(f"qie GEMM: unsupported output dtype {self.out}")

    @property
    def tag(self) -> str:
        """The operands in a kernel's name: per-channel (c) or per-tensor (t) scale, bias (b), row sums (z)."""
        return ("c" if self.per_channel else "t") + ("b" if self.bias else "") + ("z" if self.zb else "")


@dataclass(frozen=True)
class PackedWeights:
    """Constant weights in the ISA's layout, plus the column terms the epilogue needs."""
    packed: np.ndarray      # int8 [Np/W, Kp/kpack, W, kpack], W = tile columns
    colsum: np.ndarray      # int32 [Np]: sum over the real K of b'
    zb: np.ndarray          # int32 [Np]: zb + sb
    k: int
    n: int


def check_qdtypes(op: str, **operands: str) -> None:
    """ValueError unless every operand dtype is uint8 or int8."""
    for name, dt in operands.items():
        if dt not in ("uint8", "int8"):
            raise ValueError(f"qie {op}: {name} must be uint8 or int8, got {dt}")


def _ceil(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def i64(v):
    """An int as an int64 constant (one index type keeps index maps affine); an expression (a symbolic size)
    as it is."""
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def branch(cond, then: Callable, otherwise: Callable) -> None:
    """``if cond: then() else: otherwise()`` in the PrimFunc being built (IRBuilder)."""
    from tvm.script.ir_builder import tirx as T

    with T.If(cond):
        with T.Then():
            then()
        with T.Else():
            otherwise()


def shifts(isa: Isa, a_dtype: str, b_dtype: str) -> tuple[int, int]:
    """(sa, sb): what to add to a and b to reach the ISA's operand types."""
    sa = (128 if a_dtype == "int8" else 0) if isa.a_dtype == "uint8" else (-128 if a_dtype == "uint8" else 0)
    sb = -128 if b_dtype == "uint8" else 0
    return sa, sb


def pack_weights(b: np.ndarray, zb, isa: Isa, tile: Tile) -> PackedWeights:
    """Pack a constant [K, N] u8/s8 weight (zero point scalar or [N]) for ``isa`` and ``tile``."""
    if b.ndim != 2 or b.dtype not in (np.uint8, np.int8):
        raise ValueError(f"qie GEMM: weights must be a 2-D uint8/int8 array, got {b.dtype} {b.shape}")
    k, n = b.shape
    _, sb = shifts(isa, "uint8", str(b.dtype))
    kp, np_ = _ceil(max(k, 1), isa.kpack), _ceil(max(n, 1), isa.lanes * tile.vecs)
    bs = np.zeros((kp, np_), np.int8)
    bs[:k, :n] = (b.astype(np.int32) + sb).astype(np.int8)
    width = isa.lanes * tile.vecs
    packed = bs.reshape(kp // isa.kpack, isa.kpack, np_ // width, width).transpose(2, 0, 3, 1)
    zbs = np.zeros(np_, np.int32)
    zbs[:n] = np.broadcast_to(np.asarray(zb, np.int32).reshape(-1), (n,)) + sb
    colsum = bs[:k].astype(np.int32).sum(axis=0, dtype=np.int32)
    return PackedWeights(np.ascontiguousarray(packed), colsum.astype(np.int32), zbs, k, n)


def gemm_stages(ap: te.Tensor, k_real: int, wshape, epi: Epilogue, out_shape, out_index: Callable, isa: Isa,
                sa: int, za: te.Tensor | None = None):
    """Stages 2-4 over the shifted activation rows ``ap`` ([Mp, Kp]).

    ``out_index(*out_axes) -> (row, col)`` maps an output element to its GEMM row and column, so conv can
    write NCHW directly. Returns (params, output tensor); params are the placeholders after the
    activations: (Bp, colsum, za, [zb], epilogue operands...); ``za`` is created here unless the caller
    already needed it (conv padding).
    """
    mp, kp = ap.shape
    np_ = wshape[0] * wshape[2]
    width, kpack = wshape[2], isa.kpack
    bp = te.placeholder(wshape, "int8", name="Bp")
    colsum = te.placeholder((np_,), "int32", name="colsum")
    za = te.placeholder((1,), "int32", name="za") if za is None else za
    params = [bp, colsum, za]
    k = te.reduce_axis((0, kp), name="k")
    c = te.compute((mp, np_), lambda i, j: te.sum(
        ap[i, k].astype("int32") * bp[j // width, k // kpack, j % width, k % kpack].astype("int32"), axis=k),
        name="C")
    zap = za[0] + sa
    if epi.zb:
        zb = te.placeholder((np_,), "int32", name="zb")
        params.append(zb)
        kr = te.reduce_axis((0, kp), name="kr")     # padded K entries of A are zero
        rowsum = te.compute((mp,), lambda i: te.sum(ap[i, kr].astype("int32"), axis=kr), name="rowsum")

    def acc(*ax):
        i, j = out_index(*ax)
        v = c[i, j] - zap * colsum[j]
        if epi.zb:
            v = v - zb[j] * rowsum[i] + tirx.const(k_real, "int32") * zap * zb[j]
        return v

    eparams, o = epilogue_stage(acc, lambda *ax: out_index(*ax)[1], epi, out_shape, epi_n(out_shape, out_index))
    return params + eparams, o


def epi_n(out_shape, out_index) -> int:
    """The number of output columns (channels) addressed by ``out_index``."""
    axes = [tirx.Var(f"a{i}", "int64") for i in range(len(out_shape))]
    col = out_index(*axes)[1]
    for ax, ext in zip(axes, out_shape):
        if col.same_as(ax):
            return int(ext)
    raise ValueError("qie GEMM: the output column must be one output axis")


def epilogue_stage(acc: Callable, col: Callable, epi: Epilogue, out_shape, n: int):
    """The output block ``O`` from the int32 accumulator ``acc(*axes)`` of column ``col(*axes)``:
    ``epilogue_value`` per element, its operands created here. Returns (params, O)."""
    nsc = n if epi.per_channel else 1
    ops = {}
    if epi.out == "float32":
        ops["scale"] = te.placeholder((nsc,), "float32", name="scale")
        if epi.bias:
            ops["fbias"] = te.placeholder((n,), "float32", name="fbias")
    elif epi.out != "int32":
        ops["mult"] = te.placeholder((nsc,), "float32", name="mult")
        if epi.bias:
            ops["bias"] = te.placeholder((n,), "int32", name="bias")
        ops["zy"] = te.placeholder((1,), "int32", name="zy")
    return list(ops.values()), te.compute(out_shape, lambda *ax: epilogue_value(acc(*ax), col(*ax), epi, **ops),
                                          name="O")


def epilogue_args(epi: Epilogue, n: int) -> dict:
    """The epilogue operands as arguments of a PrimFunc being written with TVM's IRBuilder (inside
    ``T.prim_func()``), in ``epilogue_stage``'s order: {name: buffer} for ``epilogue_value``."""
    from tvm.script.ir_builder import tirx as T
    nsc = n if epi.per_channel else 1
    ops = {}
    if epi.out == "float32":
        ops["scale"] = T.arg("scale", T.buffer((i64(nsc),), "float32"))
        if epi.bias:
            ops["fbias"] = T.arg("fbias", T.buffer((i64(n),), "float32"))
    elif epi.out != "int32":
        ops["mult"] = T.arg("mult", T.buffer((i64(nsc),), "float32"))
        if epi.bias:
            ops["bias"] = T.arg("bias", T.buffer((i64(n),), "int32"))
        ops["zy"] = T.arg("zy", T.buffer((i64(1),), "int32"))
    return ops


def epilogue_value(a, col, epi: Epilogue, scale=None, fbias=None, mult=None, bias=None, zy=None, lanes: int = 1):
    """What the GEMM writes for the int32 accumulator ``a`` of output column ``col`` (one value, or a vector
    of ``lanes`` values of that column: the pointwise conv kernel).

    int32: a. float32: ``float32(a) * scale[col] (+ fbias[col])``. u8/s8: ``a + bias[col]`` times
    ``mult[col]`` in float32, clamped to ``[lo - zy, hi - zy]``, rounded half to even, plus ``zy`` (the clamp
    before rounding equals saturating after, and keeps the float -> int conversion in range).
    Per-tensor ``scale`` / ``mult`` have one element."""
    def bc(v):
        return v if lanes == 1 else tirx.Broadcast(v, lanes)

    def vt(dtype: str) -> str:
        return dtype if lanes == 1 else f"{dtype}x{lanes}"

    def sc(buf):
        return buf[col if epi.per_channel else 0]

    if epi.out == "int32":
        return a
    if epi.out == "float32":
        v = a.astype(vt("float32")) * bc(sc(scale))
        return v + bc(fbias[col]) if epi.bias else v
    if epi.bias:
        a = a + bc(bias[col])
    v = a.astype(vt("float32")) * bc(sc(mult))
    lo, hi = (0, 255) if epi.out == "uint8" else (-128, 127)
    zyf = zy[0].astype("float32")
    v = tirx.max(tirx.min(v, bc(tirx.const(hi, "float32") - zyf)), bc(tirx.const(lo, "float32") - zyf))
    return (tirx.nearbyint(v).astype(vt("int32")) + bc(zy[0])).astype(vt(epi.out))


def schedule_x86(s: Schedule, isa: Isa, tile: Tile, fuse_epilogue: bool = True, cols_outer: bool = True) -> None:
    """Schedule the C / rowsum / O / Ap blocks of a GEMM PrimFunc for an x86 dot-product ISA.

    1. C's rows split by ``tile.rows``, columns by ``tile.vecs * lanes``, K by ``kpack``;
    2. loop order column tile (parallel) > row tile > k > rows > vectors > [lanes x kpack]: each task owns
       a weight panel (K x W bytes, kept in L2 across all row tiles) and small M still has N/W tasks;
       ``cols_outer=False`` (conv: many rows, few output channels) swaps the two outer loops;
    3. the epilogue block O is computed inside the column tile, right after its K loop, while the
       accumulators are hot; rowsum and Ap are parallel over rows;
    4. the [lanes x kpack] body is tensorized with qie's intrinsic; rows and vectors are unrolled so
       the accumulators live in registers.
    """
    intrin.register()
    cb = s.get_sblock("C")
    writeback = s.cache_write(cb, 0, "local")
    i, j, k = s.get_loops(cb)
    io, ii = s.split(i, [None, tile.rows])
    jo, jv, jl = s.split(j, [None, tile.vecs, isa.lanes])
    ko, kk = s.split(k, [None, isa.kpack])
    if cols_outer:
        s.reorder(jo, io, ko, ii, jv, jl, kk)
        s.parallel(jo)
        _epilogue(s, io, isa.lanes, fuse_epilogue, *_out_extents(s, tile, isa), writeback=writeback)
    else:
        s.reorder(io, jo, ko, ii, jv, jl, kk)
        s.parallel(io)
        _epilogue(s, jo, isa.lanes, fuse_epilogue, *_out_extents(s, tile, isa), writeback=writeback)
    init = s.decompose_reduction(cb, ko)
    s.tensorize(jl, isa.intrin)
    s.unroll(ii)
    s.unroll(jv)
    s.vectorize(s.get_loops(init)[-1])
    _parallel_rows(s, "Ap")


def _epilogue(s: Schedule, column_tile, lanes: int, fuse: bool, out_cols: int, out_last: int,
              writeback=None) -> None:
    """Where the accumulators go after the K loop.

    Fused (matmul, only producer C): the register tile's write-back is inlined into O, which runs inside
    the column tile: no int32 matrix is ever stored. Otherwise (the rowsum term is a second producer that
    TVM cannot place inside the tile; conv writes NCHW): the tile is written back to C once, inside the
    column tile, and O runs as its own parallel pass over C.
    """
    ob = s.get_sblock("O")
    if _has_block(s, "rowsum") or not fuse:
        if writeback is not None:
            s.reverse_compute_at(writeback, column_tile)
        _parallel_rows(s, "rowsum")
        loops = s.get_loops(ob)
        if len(loops) == 4:
            # conv's NCHW output (b, oc, oh, ow) read from C[pixel, oc]: by output row, every channel of it,
            # so the row's accumulators stay in cache across the channels. Channel-outer, each vector of
            # ow gathered from a C of rows x OC int32 that outgrows the L2 at 112 x 112 pixels (3.2 MB at
            # 64 channels): 5-6 ms for a 3x3 stem layer ORT runs in 0.4 (15x its 56 x 56 time for 4x rows).
            b, oc, oh, ow = loops
            s.reorder(b, oh, oc, ow)
            loops = [s.fuse(b, oh), oc, ow]
        s.parallel(loops[0])
        _vectorize_exact(s, loops[-1], out_last, lanes)
    else:
        if writeback is not None:
            s.compute_inline(writeback)
        s.reverse_compute_at(ob, column_tile)
        _vectorize_exact(s, s.get_loops(ob)[-1], out_cols, lanes)


def _vectorize_exact(s: Schedule, loop, extent: int | None, lanes: int) -> None:
    """Vectorize only where no lane is masked (a predicated vector loop of u8/s8 stores wrote past the
    row here, like the LLVM remainder bug ``isa.kernel_target`` works around); other loops (and those of
    a symbolic ``extent=None``) stay scalar."""
    for width in (lanes, 8, 4):
        if extent is not None and extent % width == 0:
            _, vec = s.split(loop, [None, width])
            s.vectorize(vec)
            return


def _out_extents(s: Schedule, tile: Tile, isa: Isa) -> tuple[int, int | None]:
    """(columns a fused tile's epilogue sweeps without a mask, the output's innermost extent)."""
    f = s.mod["main"]
    out = f.params[-1]          # buffers are the params themselves in TVM 0.27
    last = out.shape[-1]
    if not isinstance(last, tirx.IntImm):   # a symbolic width (conv): no exact vector is known
        return 1, None
    last = int(last)
    width = tile.vecs * isa.lanes if isa.kind == "x86" else isa.lanes
    return (width if last % width == 0 else 1), last


def _has_block(s: Schedule, name: str) -> bool:
    try:
        s.get_sblock(name)
    except tvm.s_tir.ScheduleError:
        return False
    return True


def _parallel_rows(s: Schedule, block: str) -> None:
    if not _has_block(s, block):
        return
    b = s.get_sblock(block)
    loops = s.get_loops(b)
    if loops:
        s.parallel(loops[0])


def schedule_generic(s: Schedule, isa: Isa, tile: Tile, fuse_epilogue: bool = True) -> None:
    """Portable CPU schedule (no dot-product instruction): row-parallel, register-tiled, left to LLVM."""
    cb = s.get_sblock("C")
    i, j, k = s.get_loops(cb)
    io, ii = s.split(i, [None, tile.rows])
    jo, jl = s.split(j, [None, isa.lanes])
    s.reorder(io, jo, k, ii, jl)
    s.parallel(io)
    _epilogue(s, jo, isa.lanes, fuse_epilogue, *_out_extents(s, tile, isa))
    init = s.decompose_reduction(cb, k)
    s.unroll(ii)
    s.vectorize(s.get_loops(init)[-1])
    _parallel_rows(s, "Ap")


def build_primfunc(args, name: str) -> tirx.PrimFunc:
    f = te.create_prim_func(args)
    return f.with_attr("global_symbol", name)


def schedule_primfunc(f: tirx.PrimFunc, isa: Isa, tile: Tile, fuse_epilogue: bool = True,
                      then: Callable | None = None, cols_outer: bool = True) -> tirx.PrimFunc:
    """Apply ``isa``'s schedule (and ``then(schedule)`` for the caller's own stages); the result is
    marked scheduled so TVM's pipelines leave it alone."""
    s = Schedule(tvm.IRModule({"main": f}))
    if isa.kind == "cuda":
        raise ValueError("qie GEMM: CUDA groups are built by qie_ep.tvm.schedules.cuda (prep / core / epilogue)")
    if isa.kind == "x86":
        schedule_x86(s, isa, tile, fuse_epilogue, cols_outer)
    else:
        schedule_generic(s, isa, tile, fuse_epilogue)
    if then is not None:
        then(s)
    out = s.mod["main"].with_attr("tirx.is_scheduled", True)
    return out.with_attr("qie.kernel", f.attrs["global_symbol"])
