"""Depthwise quantized convolution (NCHW, ``group == C == OC``) on CPUs, written as TIR with explicit vectors.

    acc[b, c, oy, ox] = sum_{i, j} (x[b, c, oy*sh - pt + i*dh, ox*sw - pl + j*dw] - zx) (w[c, i, j] - zw[c])

Both factors fit int16 (|x - zx|, |w - zw| <= 255), so the taps of a kernel row are taken two at a time
as int16 pairs and each pair is one multiply-add of pairs into int32 lanes: ``vpdpwssd`` on the VNNI
ISAs, ``vpmaddwd`` + ``vpaddd`` on AVX2, plain arithmetic elsewhere. A 5x5 kernel is 15 such
instructions per output vector (25 multiplies and 25 adds as int32), a 3x3 one 6 (the odd tap is paired
with a zero weight). One parallel task per group of (image, channel) planes; per plane:

1. ``Xp``: the plane widened to int16, zero point subtracted, zero padded (the padding is zeroed once per
   task and never written);
2. the pair operands: output ``ox`` of the pair of taps at column offsets ``e`` and ``e + dw`` needs
   ``(Xp[r, sw*ox + e], Xp[r, sw*ox + e + dw])`` in one 32-bit lane. With stride 2 and no dilation that is
   ``Xp`` itself read at int16 offset ``2*ox + e`` (no copy); otherwise a pair plane per column class
   ``e % sw``, ``Q_c[r, k] = (Xp[r, sw*k + c], Xp[r, sw*k + c + dw])``, built by vector interleaves, and
   the operand is ``Q_c[r, ox + e // sw]``: one contiguous vector load either way;
3. per output vector: the pairs of every kernel row accumulated, then ``gemm.epilogue_value`` and one
   whole store. A row that is not a multiple of the vector width ends with a vector that overlaps the
   previous one (the same values written twice by the same task): no masked or partial store.

Vector widths are the widest of 16 / 8 / 4 / 2 / 1 int32 lanes (16 only on AVX-512) that fit the row.
The TE version this replaces relied on LLVM's SLP vectorizer, which gave up when the batch was symbolic
(int64 index arithmetic through ``batch * C``): 4-5x slower in modules compiled for dynamic shapes.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .gemm import branch, epilogue_args, epilogue_value, i64
from .isa import Isa


def applies(spec, isa: Isa) -> bool:
    return spec.depthwise and isa.kind in ("x86", "generic")


def _width(n: int, widest: int) -> int:
    """The widest of widest / 8 / 4 / 2 / 1 lanes that is at most ``n``."""
    for v in (widest, 8, 4, 2):
        if v <= n:
            return v
    return 1


def _max(*xs):
    """max of ints, or of int64 expressions (a symbolic width)."""
    if all(isinstance(x, int) for x in xs):
        return max(xs)
    out = i64(xs[0])
    for x in xs[1:]:
        out = tirx.max(out, i64(x))
    return out


def _each_chunk(n, v: int, body) -> None:
    """``body(start)`` for every whole chunk of ``v`` in ``n`` (a loop), then once more for a chunk that ends
    at ``n`` and overlaps the previous one when ``v`` does not divide ``n`` (callers write the same values
    twice there, never past ``n``). A symbolic ``n`` (at least ``v``): the last chunk is always rewritten
    (``v == 1`` has no last chunk: with ``n == 0`` it would have been written at -1)."""
    with T.serial(i64(0), i64(n // v)) as k:
        body(k * v)
    if v > 1 and (not isinstance(n, int) or n % v):
        body(i64(n - v))


def _chunks(n, v: int, body) -> None:
    """``_each_chunk`` with ``v``-wide chunks where ``n >= v``; a symbolic ``n`` below ``v`` one element at a
    time (``body(start, width)``)."""
    if isinstance(n, int):
        _each_chunk(n, v, lambda at: body(at, v))
        return
    branch(n >= v, lambda: _each_chunk(n, v, lambda at: body(at, v)), lambda: _each_chunk(n, 1, lambda at: body(at, 1)))


def _vec(buf, at, n: int):
    """``n`` consecutive elements of ``buf`` from the int64 index ``at`` (a scalar when n == 1)."""
    return buf[at] if n == 1 else tirx.BufferLoad(buf, [tirx.Ramp(at, i64(1), n)])


def _bcast(value, n: int):
    return value if n == 1 else tirx.Broadcast(value, n)


class _Bound:
    """A bound scalar where ``gemm.epilogue_value`` indexes a buffer (any index reads the value)."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, _):
        return self.value


def _store(buf, value, at, n: int):
    T.buffer_store(buf, value, [at] if n == 1 else [tirx.Ramp(at, i64(1), n)])


def pack(w: np.ndarray, zw) -> np.ndarray:
    """OIHW depthwise weights -> int32 [C, KH, ceil(KW/2)]: the int16 pair ``(w - zw)[c, i, 2p]`` (low half),
    ``(w - zw)[c, i, 2p + 1]`` (high half; 0 past the last tap)."""
    zw = np.broadcast_to(np.asarray(zw, np.int32).reshape(-1), (w.shape[0],))
    wd = (w.astype(np.int32) - zw.reshape(-1, 1, 1, 1)).reshape(w.shape[0], *w.shape[2:])
    c, kh, kw = wd.shape
    padded = np.zeros((c, kh, kw + kw % 2), np.int32)
    padded[..., :kw] = wd
    lo = padded[..., 0::2].astype(np.uint32) & 0xFFFF
    hi = (padded[..., 1::2].astype(np.uint32) & 0xFFFF) << 16
    return (lo | hi).view(np.int32)


def _planes_per_task(c: int, work: int) -> int:
    """Planes per parallel task: a divisor of C (no bound test), enough work per task to pay for its set-up
    (~16k multiply-adds), at least 8 tasks per image."""
    best = 1
    for g in range(1, c // 8 + 1):
        if c % g == 0 and g * work <= 16384:
            best = g
    return best


def _dot(isa: Isa, acc, a, b, v: int):
    """``acc + sum of int16 pairs a * b`` per int32 lane (``a``, ``b``: int16 x 2v)."""
    vt = "int32" if v == 1 else f"int32x{v}"
    bits = 32 * v
    if isa.kind == "x86" and isa.kpack == 4 and bits in (128, 256, 512):    # AVX512-VNNI / AVX-VNNI
        return tirx.call_llvm_pure_intrin(vt, f"llvm.x86.avx512.vpdpwssd.{bits}", acc, a, b)
    if isa.kind == "x86" and bits in (128, 256):                             # SSE2 / AVX2
        name = "llvm.x86.sse2.pmadd.wd" if bits == 128 else "llvm.x86.avx2.pmadd.wd"
        return acc + tirx.call_llvm_pure_intrin(vt, name, a, b)

    def half(x, k):
        return tirx.Shuffle([x], [2 * i + k for i in range(v)]).astype(vt)
    return acc + half(a, 0) * half(b, 0) + half(a, 1) * half(b, 1)


def primfunc(spec, isa: Isa, name: str, batch: int | None = None) -> tirx.PrimFunc:
    """(X, Wd, za, epilogue operands..., O), scheduled; ``batch=None``: symbolic batch. A symbolic width
    (``spec.width`` an int64 variable): the plane buffers' sizes are expressions of it, rows at least a
    vector wide run on vectors and narrower ones element by element (a branch per row loop)."""
    if not applies(spec, isa):
        raise ValueError(f"qie depthwise conv: {spec} does not fit {isa.name}")
    c, h, w, epi = spec.channels, spec.height, spec.width, spec.epi
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    pt, pl, _, _ = spec.pads
    oh, ow = spec.out_hw
    sym = spec.symbolic
    widest = 16 if isa.lanes >= 16 else 8
    v = widest if sym else _width(ow, widest)                # int32 lanes per output vector
    npairs = (kw + 1) // 2
    starts = [2 * p * dw for p in range(npairs)]             # column offset of each pair's first tap
    direct = sw == 2 and dw == 1                             # pairs are Xp's own adjacent int16s
    classes = [] if direct else sorted({e % sw for e in starts})
    wq = ow + max(starts) // sw                              # pair plane width (k < wq is read)
    wp = _max(pl + w, sw * (ow - 1) + max(starts) + dw + 1, sw * wq + sw + dw)   # Xp row width (int16)
    wp = wp + wp % 2
    hp = max(pt + h, (oh - 1) * sh + (kh - 1) * dh + 1)
    xp_len = (hp * wp + 31) // 32 * 32                       # int16 elements, Q planes start aligned
    q_len = hp * wq * 2                                       # int16 elements per pair plane
    total = (xp_len + len(classes) * q_len + 31) // 32 * 32
    bv = tirx.Var("batch", "int64") if batch is None else i64(batch)
    xdt = spec.x_dtype
    g = _planes_per_task(c, oh * (64 if sym else ow) * kh * kw)     # (any divisor of C is right)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            x = T.arg("X", T.buffer((bv, i64(c), i64(h), i64(w)), xdt))
            wt = T.arg("Wd", T.buffer((i64(c), i64(kh), i64(npairs)), "int32"))
            za = T.arg("za", T.buffer((i64(1),), "int32"))
            ops = epilogue_args(epi, c)
            o = T.arg("O", T.buffer((bv, i64(c), i64(oh), i64(ow)), epi.out))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xf = T.decl_buffer((bv * (c * h * w),), xdt, data=x.data)
            of = T.decl_buffer((bv * (c * oh * ow),), epi.out, data=o.data)
            wf = T.decl_buffer((i64(c * kh * npairs),), "int32", data=wt.data)

            with T.parallel(i64(0), bv * (c // g)) as task:
                # Global scope: TVM 0.27 keeps a global buffer under 1 KB on the stack and puts larger ones
                # and every "local" one on its workspace heap (one allocation per task either way).
                sp = T.decl_buffer((i64(total),), "int16")
                with T.serial(i64(0), i64(total // 32)) as z:     # padding: zeroed once, never written
                    _store(sp, tirx.Broadcast(tirx.const(0, "int16"), 32), z * 32, 32)
                with T.serial(i64(0), i64(g)) as gi:
                    t = task * g + gi
                    _fill(xf, sp, za[0], t, h, w, pt, pl, wp, widest)
                    for ci, cls in enumerate(classes):
                        _pairs(sp, xp_len + ci * q_len, cls, pt, h, wp, wq, sw, dw, v)

                    def operand(r, x0, e, n):
                        if direct:
                            return _vec(sp, r * wp + sw * x0 + e, 2 * n)
                        base = xp_len + classes.index(e % sw) * q_len
                        return _vec(sp, base + 2 * (r * wq + x0 + e // sw), 2 * n)

                    ch = T.bind(t % c)
                    # The plane's weights and epilogue constants bound once (SSA values): read from their
                    # buffers inside the loops, LLVM reloaded them after every output store.
                    wvs = {n: [[T.bind(tirx.reinterpret(f"int16x{2 * n}", _bcast(
                        wf[ch * (kh * npairs) + i * npairs + pi], n))) for pi in range(npairs)] for i in range(kh)]
                        for n in ((v, 1) if sym else (v,))}
                    col = ch if epi.per_channel else 0
                    at = {"scale": col, "mult": col, "fbias": ch, "bias": ch, "zy": 0}
                    consts = {k: _Bound(T.bind(buf[at[k]])) for k, buf in ops.items()}
                    with T.serial(i64(0), i64(oh)) as oy:
                        def out_vec(x0, n):
                            acc = _bcast(tirx.const(0, "int32"), n)
                            for i in range(kh):
                                for pi, e in enumerate(starts):
                                    acc = _dot(isa, acc, operand(oy * sh + i * dh, x0, e, n), wvs[n][i][pi], n)
                            val = epilogue_value(acc, 0, epi, lanes=n, **consts)
                            _store(of, val, t * (oh * ow) + oy * ow + x0, n)

                        _chunks(ow, v, out_vec)
    return ib.get().with_attr("qie.kernel", name)


def _fill(xf, sp, zav, t, h: int, w, pt: int, pl: int, wp, widest: int) -> None:
    """Plane ``t`` of the input into Xp's inner rows / columns: widened to int16, zero point subtracted."""
    fv = 2 * widest if not isinstance(w, int) else _width(w, 2 * widest)
    with T.serial(i64(0), i64(h)) as y:
        src = t * (h * w) + y * w
        dst = (y + pt) * wp + pl

        def chunk(c0, n):
            vt = "int16" if n == 1 else f"int16x{n}"
            val = _vec(xf, src + c0, n).astype(vt) - _bcast(tirx.Cast("int16", zav), n)
            _store(sp, val, dst + c0, n)

        _chunks(w, fv, chunk)


def _pairs(sp, base, cls: int, pt: int, h: int, wp, wq, sw: int, dw: int, v: int) -> None:
    """Pair plane ``Q_cls[r, k] = (Xp[r, sw*k + cls], Xp[r, sw*k + cls + dw])`` for the inner rows (the
    padding rows stay zero), ``v`` pairs per step, as int16 at ``sp[base + 2 * (r * wq + k)]``."""
    with T.serial(i64(pt), i64(pt + h)) as r:
        def chunk(k0, n):
            def strided(off):
                if sw == 1:
                    return _vec(sp, r * wp + k0 + off, n)
                raw = _vec(sp, r * wp + sw * k0 + off, sw * n)
                return tirx.Shuffle([raw], [sw * i for i in range(n)]) if n > 1 else tirx.Shuffle([raw], [0])
            a, b = strided(cls), strided(cls + dw)
            pair = tirx.Shuffle([a, b], [j for i in range(n) for j in (i, n + i)])
            _store(sp, pair, base + 2 * (r * wq + k0), 2 * n)

        _chunks(wq, v, chunk)
