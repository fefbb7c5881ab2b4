"""Quantized 2-D convolution PrimFuncs (NCHW, as TVM's ONNX frontend produces it).

    acc[b, oc, oh, ow] = sum_{c, kh, kw} (x[b, c, ih, iw] - zx) (w[oc, c, kh, kw] - zw[oc])
    ih = oh * sh - ph + kh * dh,  iw = ow * sw - pw + kw * dw;  padding taps read zx (contribute 0)

Two kernels:
1. ``group == 1``: im2col GEMM. The input is first made a padded NHWC copy ``Xp`` (shifted, padding =
   the shifted zero point, channels padded to the K pack with zeros); the activation rows of ``gemm`` are
   the patches ``Ap[b*RPI + oh*OW + ow, (kh*KW + kw)*Cp + c]`` (RPI: OH*OW padded to the row tile), one
   contiguous run of Xp per tap; the weights are packed in the same K order, and the epilogue writes
   NCHW directly.
2. depthwise (``group == C == OC``): ``depthwise.py`` (explicit-vector TIR, one task per plane).
Other grouped convolutions: up to 4 groups as kernel 1 with block-diagonal weights (``lowering.X86Conv2d``),
more are left to TVM's own lowering by the Relax pass (it logs the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from . import depthwise, gemm, pointwise, records
from .gemm import Epilogue, Tile
from .isa import Isa


@dataclass(frozen=True)
class ConvSpec:
    x_dtype: str
    w_dtype: str
    channels: int               # C
    out_channels: int           # OC
    height: int
    width: int | tirx.PrimExpr     # or an int64 variable: any width
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]   # top, left, bottom, right
    dilations: tuple[int, int]
    group: int
    epi: Epilogue

    def __post_init__(self):
        gemm.check_qdtypes("conv", X=self.x_dtype, W=self.w_dtype)
        if self.group != 1 and not self.depthwise:
            raise ValueError(f"qie conv: group={self.group} is neither 1 nor depthwise")

    @property
    def symbolic(self) -> bool:
        return not isinstance(self.width, int)

    @property
    def depthwise(self) -> bool:
        return self.group == self.channels == self.out_channels and self.group > 1

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        t, l, b, r = self.pads  # noqa: E741  (top, left, bottom, right)
        return ((self.height + t + b - (dh * (kh - 1) + 1)) // sh + 1,
                (self.width + l + r - (dw * (kw - 1) + 1)) // sw + 1)

    @property
    def k(self) -> int:
        return self.channels // self.group * self.kernel[0] * self.kernel[1]

    def kernel_name(self, isa: Isa, tile: Tile) -> str:
        xw = ("u8" if self.x_dtype == "uint8" else "s8") + ("u8" if self.w_dtype == "uint8" else "s8")
        out = {"int32": "s32", "uint8": "u8", "int8": "s8", "float32": "f32"}[self.epi.out]
        kh, kw = self.kernel
        t, l, b, r = self.pads  # noqa: E741
        geo = (f"c{self.channels}o{self.out_channels}h{self.height}w{'dyn' if self.symbolic else self.width}"
               f"k{kh}x{kw}s{self.strides[0]}x{self.strides[1]}d{self.dilations[0]}x{self.dilations[1]}"
               f"p{t}_{l}_{b}_{r}_{self.epi.tag}")
        if self.depthwise:
            return f"qie_dwconv_{xw}_{out}_{geo}__{isa.name}"
        return f"qie_conv_{xw}_{out}_{tile.rows}x{tile.vecs * isa.lanes}c{isa.kpack}_{geo}__{isa.name}"


def cpad(channels: int, isa: Isa) -> int:
    """Channels per tap in the GEMM's K: padded to the ISA's K pack so each tap is whole packs."""
    return gemm._ceil(channels, isa.kpack)


def weights_as_gemm(w: np.ndarray, isa: Isa) -> np.ndarray:
    """[OC, C, KH, KW] -> the GEMM's [KH*KW*Cp, OC], K ordered (kh, kw, c) like the patches; the padded
    channels hold the value that packing shifts to 0 (128 for uint8 weights), so they add nothing."""
    oc, c, kh, kw = w.shape
    cp = cpad(c, isa)
    _, sb = gemm.shifts(isa, "uint8", str(w.dtype))
    out = np.full((kh, kw, cp, oc), -sb, w.dtype)
    out[:, :, :c, :] = w.transpose(2, 3, 1, 0)
    return out.reshape(kh * kw * cp, oc)


def tile_for(spec: ConvSpec, isa: Isa) -> Tile:
    oh, ow = spec.out_hw
    rows = None if spec.symbolic else oh * ow
    return (records.lookup(isa, "conv", (rows, spec.out_channels, spec.k))
            or records.default_tile(isa, spec.out_channels))


def _shift(v, sa: int, dtype: str):
    return v if sa == 0 else (v.astype("int32") + sa).astype(dtype)


def primfunc(spec: ConvSpec, isa: Isa, tile: Tile, batch: int | None = None) -> tirx.PrimFunc:
    """Unscheduled PrimFunc (X, Wp, colsum, za, [zb], epilogue operands..., O); ``batch=None``: symbolic."""
    if spec.depthwise:
        return depthwise.primfunc(spec, isa, spec.kernel_name(isa, Tile(1, 1)), batch)
    bv = tirx.Var("batch", "int64") if batch is None else batch
    c, h, w = spec.channels, spec.height, spec.width
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    pt, pl, pb, pr = spec.pads
    oh, ow = spec.out_hw
    cp = cpad(c, isa)
    kp = kh * kw * cp
    np_ = gemm._ceil(spec.out_channels, isa.lanes * tile.vecs)
    sa, _ = gemm.shifts(isa, spec.x_dtype, spec.w_dtype)
    x = te.placeholder((bv, c, h, w), spec.x_dtype, name="X")
    za = te.placeholder((1,), "int32", name="za")
    i64 = gemm.i64
    zero = tirx.const(0, isa.a_dtype)

    def padded(b, yy, xx, ci):
        inside = tirx.all(yy >= pt, yy < h + pt, xx >= pl, xx < w + pl)
        v = tirx.if_then_else(inside, _shift(x[b, ci, yy - pt, xx - pl], sa, isa.a_dtype),
                              (za[0] + sa).astype(isa.a_dtype))
        return tirx.if_then_else(ci < c, v, zero)

    xp = te.compute((bv, i64(h + pt + pb), i64(w + pl + pr), i64(cp)), padded, name="Xp")
    # Rows are padded per image (to the row tile), so the row count is a multiple of the batch that
    # TVM can prove covers every output row; padded rows are never written out.
    rpi = gemm._ceil(oh * ow, tile.rows)
    mp = bv * rpi

    def patch(r, kk):
        # The row-tile padding at an image's end repeats its last pixel (rows never written out): no
        # guard, whose condition TVM's buffer compaction turned into a loop-dependent allocation size
        # once the width was symbolic.
        b, pix = r // rpi, tirx.min(r % rpi, oh * ow - 1)
        y, xx = pix // ow, pix % ow
        tap, ci = kk // cp, kk % cp
        return xp[b, y * sh + (tap // kw) * dh, xx * sw + (tap % kw) * dw, ci]

    ap = te.compute((mp, i64(kp)), patch, name="Ap")
    width = isa.lanes * tile.vecs
    wshape = (np_ // width, kp // isa.kpack, width, isa.kpack)
    params, o = gemm.gemm_stages(ap, spec.k, wshape, spec.epi, (bv, i64(spec.out_channels), i64(oh), i64(ow)),
                                 lambda b, oc, y, xx: (b * rpi + y * ow + xx, oc), isa, sa,
                                 za=za)
    return gemm.build_primfunc([x, *params, o], spec.kernel_name(isa, tile))


def schedule_im2col(s: Schedule, cp: int, lanes: int) -> None:
    """1. Xp (NCHW -> padded NHWC, shifted) parallel over image rows; 2. Ap's K loop split into taps x
    channels so each tap is one contiguous run of Xp, copied with exact vectors."""
    xb = s.get_sblock("Xp")
    b, yy, xx, ci = s.get_loops(xb)
    s.parallel(s.fuse(b, yy))
    ab = s.get_sblock("Ap")
    r, kk = s.get_loops(ab)
    _, cin = s.split(kk, [None, cp])
    gemm._vectorize_exact(s, cin, cp, lanes)


def pack(spec: ConvSpec, isa: Isa, w: np.ndarray, zw, tile: Tile | None = None):
    """Constant OIHW weights in the layout ``scheduled(spec, isa, tile)`` takes: ``w - zw`` as int32
    [C, KH, KW] (depthwise), the pointwise kernel's rows, or the im2col GEMM's packed panels."""
    if spec.depthwise:
        return depthwise.pack(w, zw)
    if pointwise.applies(spec, isa):
        return pointwise.pack(w, zw, isa)
    return gemm.pack_weights(weights_as_gemm(w, isa), zw, isa, tile or tile_for(spec, isa))


def scheduled(spec: ConvSpec, isa: Isa, tile: Tile | None = None, batch: int | None = None) -> tirx.PrimFunc:
    if pointwise.applies(spec, isa):
        return pointwise.primfunc(spec, isa, batch)
    if spec.depthwise:
        return primfunc(spec, isa, Tile(1, 1), batch)
    tile = tile or tile_for(spec, isa)
    f = primfunc(spec, isa, tile, batch)
    return gemm.schedule_primfunc(f, isa, tile, fuse_epilogue=False, cols_outer=False,
                                  then=lambda s: schedule_im2col(s, cpad(spec.channels, isa), isa.lanes))
