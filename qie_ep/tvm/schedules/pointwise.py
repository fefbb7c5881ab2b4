"""Pointwise (1x1, stride 1, no padding) quantized convolution in NCHW on the x86 dot-product ISAs.

An NCHW pointwise convolution is a GEMM per image with the weights as the left operand:
``acc[o, p] = sum_c (w[o, c] - zw[o]) (x[c, p] - zx)`` over the image's pixels ``p``. The im2col kernel
(``conv.py``) turns it around (pixels as rows, channels as columns): it copies the input into a padded
NHWC matrix, writes the int32 products to a scratch matrix and transposes them back to NCHW in a second
pass, which made PP-LCNet's 1x1 layers 2-5x slower than they are here. This kernel keeps NCHW end to end:

1. ``Xq``: each group of 4 channels is interleaved into one u32 per pixel (``x[4g + j, p]`` in byte j,
   shifted to u8), a vectorized pass that reads the input once: ``vpdpbusd``'s unsigned operand is then
   one plain vector load per 16 pixels (8 on ymm);
2. a register tile of ``R`` output channels x ``V`` pixel vectors accumulates over the channel groups:
   per group, V vector loads of Xq, R broadcasts of 4 weight bytes (the signed operand), R x V
   ``vpdpbusd``. Tiles (image, pixel tile, channel tile) are the parallel tasks;
3. the epilogue (zero-point column term, then ``gemm.epilogue_value``: bias, requantization or float scale)
   runs on the accumulators and stores whole NCHW row vectors; only the last vector of a row that is not
   a multiple of the lanes is stored lane by lane.

It applies to images of at least two vectors of pixels (below that most lanes would be padding: a 1x1
image is a GEMV, where the im2col kernel's pixel rows waste nothing) when the weights need no row-sum
term (``zw' = 0``: symmetric int8 weights, the quantizers' default) and the ISA packs 4 bytes per lane
(AVX-512 VNNI, AVX-VNNI); other pointwise convolutions go to the im2col kernel. The PrimFunc is written
directly as TIR (IRBuilder) rather than scheduled from TE: its loop nest, vector widths and register tile
are the schedule.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .gemm import PackedWeights, _ceil, branch, epilogue_args, epilogue_value, i64, shifts
from .isa import Isa

# Register tile (output channels x pixel vectors) per vector width: R * V accumulators + V input vectors
# + 1 broadcast fit the register file (32 zmm, 16 ymm).
TILES = {16: (6, 4), 8: (3, 3)}
INTRIN = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}


def applies(spec, isa: Isa) -> bool:
    """Whether ``spec`` (a ConvSpec) runs on this kernel on ``isa``."""
    return (isa.kind == "x86" and isa.kpack == 4 and isa.lanes in TILES and spec.group == 1
            and tuple(spec.kernel) == (1, 1) and tuple(spec.strides) == (1, 1) and tuple(spec.dilations) == (1, 1)
            and not any(spec.pads) and not spec.epi.zb
            and (spec.symbolic or spec.height * spec.width >= 2 * isa.lanes))


def kernel_name(spec, isa: Isa) -> str:
    xw = ("u8" if spec.x_dtype == "uint8" else "s8") + ("u8" if spec.w_dtype == "uint8" else "s8")
    out = {"int32": "s32", "uint8": "u8", "int8": "s8", "float32": "f32"}[spec.epi.out]
    width = "dyn" if spec.symbolic else spec.width
    return (f"qie_pwconv_{xw}_{out}_c{spec.channels}o{spec.out_channels}h{spec.height}w{width}"
            f"_{spec.epi.tag}__{isa.name}")


def pack(w: np.ndarray, zw, isa: Isa) -> PackedWeights:
    """OIHW (1x1) u8/s8 weights -> int8 ``[OCp, C/4, 4]`` (shifted to s8, rows padded to the tile with 0),
    their per-row sums and ``zw + sb`` (all zero when this kernel applies)."""
    oc, c = w.shape[:2]
    rows, _ = TILES[isa.lanes]
    _, sb = shifts(isa, "uint8", str(w.dtype))
    ocp, kp = _ceil(oc, rows), _ceil(c, 4)
    bs = np.zeros((ocp, kp), np.int8)
    bs[:oc, :c] = (w.reshape(oc, c).astype(np.int32) + sb).astype(np.int8)
    zbs = np.zeros(ocp, np.int32)
    zbs[:oc] = np.broadcast_to(np.asarray(zw, np.int32).reshape(-1), (oc,)) + sb
    colsum = bs.astype(np.int32).sum(axis=1, dtype=np.int32)
    return PackedWeights(np.ascontiguousarray(bs.reshape(ocp, kp // 4, 4)), colsum, zbs, c, oc)


def primfunc(spec, isa: Isa, batch: int | None = None) -> tirx.PrimFunc:
    """(X, Wp, colsum, za, epilogue operands..., O), scheduled; ``batch=None``: symbolic batch."""
    if not applies(spec, isa):
        raise ValueError(f"qie pointwise conv: {spec} does not fit {isa.name}")
    c, oc, epi = spec.channels, spec.out_channels, spec.epi
    sym = spec.symbolic                           # a symbolic width: p, nv, ptiles... are expressions
    p = spec.height * spec.width
    lanes = isa.lanes
    rows, vecs = TILES[lanes]
    groups = _ceil(c, 4) // 4
    nv = _ceil(p, lanes) // lanes                 # pixel vectors per image
    pp = nv * lanes
    vecs = vecs if sym else min(vecs, nv)
    ptiles = _ceil(nv, vecs) // vecs              # (static widths)
    last_vecs = nv - (ptiles - 1) * vecs
    tail = p % lanes                              # pixels in a row's last, partial vector (0: none)
    otiles = _ceil(oc, rows) // rows
    ocp = otiles * rows
    sa, _ = shifts(isa, spec.x_dtype, spec.w_dtype)
    bv = tirx.Var("batch", "int64") if batch is None else i64(batch)
    vu32, vi8, vi32 = f"uint32x{lanes}", f"int8x{4 * lanes}", f"int32x{lanes}"

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(kernel_name(spec, isa))
            x = T.arg("X", T.buffer((bv, i64(c), i64(spec.height), i64(spec.width)), spec.x_dtype))
            wp = T.arg("Wp", T.buffer((i64(ocp), i64(groups), i64(4)), "int8"))
            colsum = T.arg("colsum", T.buffer((i64(ocp),), "int32"))
            za = T.arg("za", T.buffer((i64(1),), "int32"))
            ops = epilogue_args(epi, oc)
            o = T.arg("O", T.buffer((bv, i64(oc), i64(spec.height), i64(spec.width)), epi.out))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})

            xf = T.decl_buffer((bv * c * p,), spec.x_dtype, data=x.data)
            of = T.decl_buffer((bv * oc * p,), epi.out, data=o.data)
            w32 = T.decl_buffer((i64(ocp * groups),), "int32", data=wp.data)
            xq = T.decl_buffer((bv * groups * pp * 4,), "uint8")
            xq32 = T.decl_buffer((bv * groups * pp,), "uint32", data=xq.data)

            # 1. Xq: 4 channels interleaved per pixel (u32), shifted to u8.
            flip = tirx.const(0x80808080 if sa else 0, "uint32")
            with T.parallel(i64(0), bv * groups) as bg:
                b, g = bg // groups, bg % groups
                src = b * (c * p) + g * (4 * p)
                dst = bg * pp

                def pixels(count_full: bool):
                    """The group's pixels: whole vectors, the scalar tail, then zero padding up to pp."""
                    nch = 4 if count_full else c % 4

                    def word(load, dtype):
                        v = None
                        for j in range(nch):
                            part = load(src + j * p)
                            part = part.astype(dtype.replace("uint32", "uint8")) if sa else part
                            part = part.astype(dtype)
                            part = part if j == 0 else part << tirx.const(8 * j, dtype)
                            v = part if v is None else v | part
                        return v ^ (flip if dtype == "uint32" else tirx.Broadcast(flip, lanes))

                    if sym or p // lanes:
                        with T.serial(i64(0), i64(p // lanes)) as pv:
                            i = pv * lanes
                            T.buffer_store(xq32, word(lambda s: xf.vload([s + i], f"{spec.x_dtype}x{lanes}"),
                                                      vu32), [tirx.Ramp(dst + i, i64(1), lanes)])
                    if sym or p % lanes:
                        with T.serial(i64(p // lanes * lanes), i64(p)) as pi:
                            T.buffer_store(xq32, word(lambda s: xf[s + pi], "uint32"), [dst + pi])
                        with T.serial(i64(p), i64(pp)) as pz:
                            T.buffer_store(xq32, tirx.const(0, "uint32"), [dst + pz])

                if c % 4 == 0:
                    pixels(True)
                else:
                    with T.If(g < groups - 1):
                        with T.Then():
                            pixels(True)
                        with T.Else():
                            pixels(False)

            # 2-3. Register tiles and their epilogue. A symbolic width: an image's pixel vectors are
            # ``full`` tiles of ``vecs`` and then ``rem`` tiles of one vector (two tile bodies instead of one
            # per possible last-tile size, whose equality branches TVM's buffer compaction failed on).
            zap = za[0] + sa
            full, rem = (nv // vecs, nv % vecs) if sym else (ptiles, 0)
            per_image = (full + rem) * otiles
            with T.parallel(i64(0), bv * per_image) as t:
                b = t // per_image
                pt = (t % per_image) // otiles
                o0 = (t % otiles) * rows

                def tile(nvec: int, p0, last: bool):
                    """``nvec`` pixel vectors from pixel ``p0``; ``last``: its last vector may be the row's
                    partial one."""
                    # One small "global"-scope buffer per accumulator: TVM 0.27 puts global buffers under
                    # 1 KB on the stack (alloca, which LLVM promotes to registers) and every "local" one,
                    # or one buffer for the whole tile (1.5 KB), on its workspace heap, where LLVM could
                    # not always keep the accumulators in registers (2x slower with a symbolic batch).
                    acc = [[T.decl_buffer((lanes,), "int32") for _ in range(nvec)]
                           for _ in range(rows)]
                    lane_ix = [tirx.Ramp(0, 1, lanes)]
                    for r in range(rows):
                        for v in range(nvec):
                            T.buffer_store(acc[r][v], tirx.Broadcast(tirx.const(0, "int32"), lanes), lane_ix)
                    xbase = b * (groups * pp * 4) + p0 * 4
                    with T.serial(i64(0), i64(groups)) as g:
                        xrow = xbase + g * (pp * 4)
                        xs = [tirx.reinterpret(vi8, xq.vload([xrow + v * lanes * 4], f"uint8x{4 * lanes}"))
                              for v in range(nvec)]
                        for r in range(rows):
                            wb = tirx.reinterpret(vi8, tirx.Broadcast(w32[(o0 + r) * groups + g], lanes))
                            for v in range(nvec):
                                cur = tirx.BufferLoad(acc[r][v], lane_ix)
                                T.buffer_store(acc[r][v], tirx.call_llvm_pure_intrin(
                                    vi32, INTRIN[lanes], cur, xs[v], wb), lane_ix)
                    for r in range(rows):
                        orow = o0 + r

                        def store_row(r=r, orow=orow):
                            for v in range(nvec):
                                a = tirx.BufferLoad(acc[r][v], lane_ix)
                                a = a - tirx.Broadcast(zap * colsum[orow], lanes)
                                val = epilogue_value(a, orow, epi, lanes=lanes, **ops)
                                base = b * (oc * p) + orow * p + p0 + v * lanes

                                def whole(val=val, base=base):
                                    T.buffer_store(of, val, [tirx.Ramp(base, i64(1), lanes)])

                                def partial(val=val, base=base, v=v):
                                    tmp = T.decl_buffer((lanes,), epi.out)
                                    T.buffer_store(tmp, val, [tirx.Ramp(0, 1, lanes)])
                                    count = p - (p0 + v * lanes) if sym else tail
                                    with T.serial(i64(0), i64(count)) as lane:
                                        T.buffer_store(of, tmp[lane], [base + lane])

                                if not (last and v == nvec - 1) or (not sym and not tail):
                                    whole()
                                elif not sym:
                                    partial()
                                else:
                                    branch(p0 + (v + 1) * lanes <= p, whole, partial)

                        if oc % rows == 0:
                            store_row()
                        else:
                            with T.If(orow < oc):
                                with T.Then():
                                    store_row()

                if sym:
                    branch(pt < full, lambda: tile(vecs, pt * (vecs * lanes), True),
                            lambda: tile(1, full * (vecs * lanes) + (pt - full) * lanes, True))
                elif ptiles == 1:
                    tile(last_vecs, 0, True)
                elif last_vecs == vecs and p % lanes == 0:
                    tile(vecs, pt * (vecs * lanes), False)
                else:
                    branch(pt < ptiles - 1, lambda: tile(vecs, pt * (vecs * lanes), False),
                            lambda: tile(last_vecs, pt * (vecs * lanes), True))
    return ib.get().with_attr("qie.kernel", kernel_name(spec, isa))
