"""The numpy reference: the single definition of every qie operator's numerics.

The contract (see DESIGN.md) that every ISA path and every host keeps:

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
