"""The numpy reference: the single definition of every qie operator's numerics.

The contract (docs/numerics.md) that every ISA path and every host keeps:

* accumulate exactly in int32: ``acc = sum_k (a - a_zp) * (b - b_zp) (+ int32 bias)``;
* requantize in float32: ``y = saturate(round_half_to_even(float32(acc) * M) + y_zp)`` with the
  multiplier ``M`` computed in float32 in the order ONNX Runtime evaluates it;
* float outputs: ``y = float32(acc) * scale (+ bias)``, the product rounded before the add.

Integer results of qie's kernels equal these functions bit for bit (tests compare with atol=0).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _i64(x) -> np.ndarray:
    return np.asarray(x).astype(np.int64)


def _wrap_i32(x: np.ndarray) -> np.ndarray:
    """int64 -> int32 with two's-complement wrap, as int32 accumulators behave."""
    return np.asarray(x, np.int64).astype(np.uint32).view(np.int32)


def _matmul_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy matmul broadcasting in int64 (exact), for integer operands."""
    a64, b64 = _i64(a), _i64(b)
    if a64.size == 0 or b64.size == 0:
        return np.matmul(a64.astype(np.float64), b64.astype(np.float64)).astype(np.int64)
    return np.matmul(a64, b64)


def requantize(acc: np.ndarray, multiplier, y_zp, dtype) -> np.ndarray:
    """``saturate(round_half_even(float32(acc) * multiplier) + y_zp)`` in ``dtype`` (uint8/int8)."""
    dtype = np.dtype(dtype)
    lo, hi = QRANGE[dtype]
    zp = int(np.asarray(y_zp).reshape(-1)[0])
    v = np.asarray(acc).astype(F32) * np.asarray(multiplier, dtype=F32)
    v = np.clip(v, F32(lo - zp), F32(hi - zp))
    return (np.rint(v).astype(np.int32) + zp).astype(dtype)


def _per_column(x, n: int, name: str) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    if x.size not in (1, n):
        raise ValueError(f"{name} must have 1 or {n} elements, got {x.size}")
    return np.broadcast_to(x, (n,))


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None) -> np.ndarray:
    """ONNX MatMulInteger: ``sum_k (a - a_zp[m]) (b - b_zp[n])`` as int32, numpy matmul broadcasting.

    ``a_zero_point``: scalar or per row (M); ``b_zero_point``: scalar or per column (N).
    """
    a, b = np.asarray(a), np.asarray(b)
    za = np.zeros(1, np.int64) if a_zero_point is None else _i64(a_zero_point).reshape(-1)
    zb = np.zeros(1, np.int64) if b_zero_point is None else _i64(b_zero_point).reshape(-1)
    a64 = _i64(a)
    if za.size > 1:
        a64 = a64 - (za.reshape(-1, 1) if a.ndim > 1 else za)
    else:
        a64 = a64 - za[0]
    b64 = _i64(b) - (zb if b.ndim > 1 else zb.reshape(-1, 1) if zb.size > 1 else zb[0])
    return _wrap_i32(_matmul_exact(a64, b64))


def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point) -> np.ndarray:
    """ONNX QLinearMatMul; per-tensor or per-column B; ``M = a_scale * b_scale[n] / y_scale`` in float32."""
    b = np.asarray(b)
    n = b.shape[-1] if b.ndim > 1 else 1
    acc = matmul_integer(a, b, a_zero_point, _per_column(b_zero_point, n, "b_zero_point"))
    mult = F32(np.asarray(a_scale, F32).reshape(-1)[0]) * _per_column(np.asarray(b_scale, F32), n, "b_scale")
    mult = (mult / F32(np.asarray(y_scale, F32).reshape(-1)[0])).astype(F32)
    if b.ndim == 1:
        mult = mult[0]
    return requantize(acc, mult, y_zero_point, np.asarray(y_zero_point).dtype)


def matmul_integer_to_float(a, b, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None) -> np.ndarray:
    """com.microsoft MatMulIntegerToFloat: ``float32(acc) * (a_scale * b_scale[n]) + bias[n]``."""
    b = np.asarray(b)
    n = b.shape[-1] if b.ndim > 1 else 1
    zb = None if b_zero_point is None else _per_column(b_zero_point, n, "b_zero_point")
    acc = matmul_integer(a, b, a_zero_point, zb)
    scale = (F32(np.asarray(a_scale, F32).reshape(-1)[0]) * _per_column(np.asarray(b_scale, F32), n, "b_scale")).astype(F32)
    y = acc.astype(F32) * (scale if b.ndim > 1 else scale[0])
    if bias is not None:
        y = y + np.asarray(bias, F32)
    return y.astype(F32)


def dynamic_quantize_linear(x) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear as ONNX Runtime computes it: returns ``(q, scale, zero_point)``.

    ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``scale = (hi - lo) / 255`` (1 if hi == lo),
    ``zp = round_half_even(clamp(-lo / scale, 0, 255))``, ``q = saturate(round_half_even(x / scale) + zp)``.
    """
    x = np.asarray(x, F32)
    lo = F32(min(F32(0), x.min())) if x.size else F32(0)
    hi = F32(max(F32(0), x.max())) if x.size else F32(0)
    scale = F32(1) if hi == lo else F32((hi - lo) / F32(255))
    zp = np.uint8(np.rint(np.clip(F32(0) - lo / scale, F32(0), F32(255))))
    v = np.clip(x / scale, F32(0) - F32(zp), F32(255) - F32(zp))
    q = (np.rint(v).astype(np.int32) + int(zp)).astype(np.uint8)
    return q, scale, zp


def dynamic_quantize_matmul(a, b, b_scale, b_zero_point=None, bias=None) -> np.ndarray:
    """com.microsoft DynamicQuantizeMatMul: A quantized per tensor on the fly, then MatMulIntegerToFloat."""
    q, scale, zp = dynamic_quantize_linear(a)
    return matmul_integer_to_float(q, b, scale, b_scale, zp, b_zero_point, bias)


def qgemm(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None, y_zero_point=None,
          alpha: float = 1.0, trans_a: int = 0, trans_b: int = 0) -> np.ndarray:
    """com.microsoft QGemm: ``acc = (A' - za)(B' - zb) + C`` (C int32, broadcast to (M, N)).

    The multiplier is ``(alpha * a_scale * b_scale[n]) / y_scale`` in float32 (ORT's order); with
    ``y_scale``/``y_zero_point`` the output is requantized to their dtype, otherwise it is float32.
    """
    a, b = np.asarray(a), np.asarray(b)
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    n = b.shape[1]
    acc = _i64(matmul_integer(a, b, a_zero_point, _per_column(b_zero_point, n, "b_zero_point")))
    if c is not None:
        acc = acc + np.broadcast_to(_i64(c).reshape(np.asarray(c).shape if np.asarray(c).ndim else ()), acc.shape)
    acc = _wrap_i32(acc)
    mult = (F32(alpha) * F32(np.asarray(a_scale, F32).reshape(-1)[0]) * _per_column(np.asarray(b_scale, F32), n, "b_scale")).astype(F32)
    if y_scale is None:
        return (acc.astype(F32) * mult).astype(F32)
    mult = (mult / F32(np.asarray(y_scale, F32).reshape(-1)[0])).astype(F32)
    return requantize(acc, mult, y_zero_point, np.asarray(y_zero_point).dtype)


def gemm_u8s8(a, b, a_zero_point, b_zero_point, bias=None, out: str = "int32", scale=None, fbias=None, y_zero_point=0):
    """The kernel layer's 2-D GEMM (what ``qie_test_gemm`` computes), for the kernel tests.

    ``out``: "int32", "float", "uint8" or "int8". ``bias``: int32 (M, N) after broadcasting;
    ``scale``/``fbias``: per column.
    """
    acc = _i64(matmul_integer(a, b, a_zero_point, b_zero_point))
    if bias is not None:
        acc = acc + _i64(bias)
    acc = _wrap_i32(acc)
    if out == "int32":
        return acc
    scale = np.asarray(scale, F32)
    if out == "float":
        y = acc.astype(F32) * scale
        return (y + np.asarray(fbias, F32)).astype(F32) if fbias is not None else y.astype(F32)
    return requantize(acc, scale, np.asarray(y_zero_point), np.uint8 if out == "uint8" else np.int8)


# --- convolution -------------------------------------------------------------------------------------

def conv_geometry(in_spatial, kernel, strides=None, dilations=None, pads=None, auto_pad="NOTSET"):
    """ONNX Conv output geometry: returns ``(out_spatial, pads_begin, pads_end)``.

    ``pads`` is ONNX's ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``; ``auto_pad`` SAME_UPPER /
    SAME_LOWER put the odd padding element at the end / the beginning; VALID means no padding.
    """
    r = len(in_spatial)
    strides = list(strides or [1] * r)
    dilations = list(dilations or [1] * r)
    pads = list(pads or [0] * (2 * r))
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out, pb, pe = [], [], []
    for i in range(r):
        ext = dilations[i] * (kernel[i] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-in_spatial[i] // strides[i])
            total = max(0, (o - 1) * strides[i] + ext - in_spatial[i])
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pb.append(lo)
            pe.append(total - lo)
        elif auto_pad == "VALID":
            pb.append(0)
            pe.append(0)
        else:
            pb.append(pads[i])
            pe.append(pads[i + r])
        out.append((in_spatial[i] + pb[i] + pe[i] - ext) // strides[i] + 1)
    return out, pb, pe


def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, bias=None, group: int = 1, kernel_shape=None,
                 strides=None, dilations=None, pads=None, auto_pad="NOTSET", channels_last: bool = False) -> np.ndarray:
    """ONNX ConvInteger: ``sum_{c,taps} (x - x_zp) * (w - w_zp[m]) (+ bias[m])`` as int32.

    ``x``: (N, C, *spatial) or, with ``channels_last``, (N, *spatial, C); ``w``: (M, C/group, *kernel);
    ``x_zero_point`` per tensor, ``w_zero_point`` per tensor or per output channel. Padding contributes
    nothing (it is ``x_zero_point`` in quantized terms). 1-D, 2-D and 3-D.
    """
    x, w = np.asarray(x), np.asarray(w)
    if channels_last:
        x = np.moveaxis(x, -1, 1)
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    kernel = list(kernel_shape or w.shape[2:])
    sp = x.shape[2:]
    r = len(sp)
    strides = list(strides or [1] * r)
    dilations = list(dilations or [1] * r)
    out, pb, pe = conv_geometry(sp, kernel, strides, dilations, pads, auto_pad)
    if c != cg * group or m % group:
        raise ValueError(f"channels {c} / weights {w.shape} do not fit group {group}")
    xs = _i64(x) - (0 if x_zero_point is None else int(_i64(x_zero_point).reshape(-1)[0]))
    zw = np.zeros(1, np.int64) if w_zero_point is None else _i64(w_zero_point).reshape(-1)
    ws = _i64(w) - _per_column(zw, m, "w_zero_point").reshape((m,) + (1,) * (w.ndim - 1))
    xs = np.pad(xs, [(0, 0), (0, 0)] + [(pb[i], pe[i]) for i in range(r)])
    mg = m // group
    acc = np.zeros((n, group, mg) + tuple(max(o, 0) for o in out), np.int64)
    wg = ws.reshape((group, mg, cg) + tuple(kernel))
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(r))
        xt = xs[(slice(None), slice(None)) + sl].reshape((n, group, cg) + tuple(out))
        acc += np.einsum("ngc...,gmc->ngm...", xt, wg[(slice(None), slice(None), slice(None)) + tap])
    acc = acc.reshape((n, m) + tuple(out))
    if bias is not None:
        acc = acc + _i64(bias).reshape((1, m) + (1,) * r)
    acc = _wrap_i32(acc)
    return np.moveaxis(acc, 1, -1) if channels_last else acc


def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None,
                 channels_last: bool = False, **attrs) -> np.ndarray:
    """ONNX QLinearConv (and com.microsoft's NHWC form with ``channels_last``).

    ``acc`` as :func:`conv_integer` plus int32 bias; ``M[m] = x_scale * w_scale[m] / y_scale`` in float32,
    then :func:`requantize` per output channel.
    """
    m = np.asarray(w).shape[0]
    acc = conv_integer(x, w, x_zero_point, w_zero_point, bias=bias, channels_last=channels_last, **attrs)
    mult = F32(np.asarray(x_scale, F32).reshape(-1)[0]) * _per_column(np.asarray(w_scale, F32), m, "w_scale")
    mult = (mult / F32(np.asarray(y_scale, F32).reshape(-1)[0])).astype(F32)
    shape = (m,) if channels_last else (m,) + (1,) * (acc.ndim - 2)
    return requantize(acc, mult.reshape(shape), y_zero_point, np.asarray(y_zero_point).dtype)


def qdq_softmax(x, x_scale, x_zero_point, y_scale, y_zero_point) -> np.ndarray:
    """DequantizeLinear -> Softmax (last axis) -> QuantizeLinear as the float QDQ graph means it, in float32:
    ``v = (x - zx) * sx``, ``e = exp(v - max v)``, ``p = e * (1 / sum e)``, ``y = saturate(round_half_even(p / sy) + zy)``.
    qie's EP unit (ort_plugin/src/ep/softmax.h) is within one step of this (libm's exp, the argument as
    ``(x - max x) * sx``, the sum in double)."""
    dtype = np.asarray(y_zero_point).dtype
    lo, hi = QRANGE[dtype]
    zp = int(y_zero_point)
    v = (np.asarray(x).astype(np.int32) - int(x_zero_point)).astype(F32) * F32(x_scale)
    e = np.exp(v - v.max(axis=-1, keepdims=True), dtype=F32) if v.size else v
    p = e * (F32(1) / e.sum(axis=-1, keepdims=True, dtype=F32)) if v.size else v
    q = np.clip(p / F32(y_scale), F32(lo - zp), F32(hi - zp))
    return (np.rint(q).astype(np.int32) + zp).astype(dtype)
