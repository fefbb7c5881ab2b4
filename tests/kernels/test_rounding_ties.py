"""Exact rounding ties in every requantizing epilogue: round half to even, never half away from zero.

Random data almost never lands on x.5 after float32 scaling, so a kernel that rounds half away from
zero passes random tests. Here the multiplier is 0.5 (or 0.25 with a bias) and the accumulators run
over every odd and even value, so half the outputs are exact ties on even and odd integers. Each
epilogue is reached on every ISA path: the generic one (non-zero B zero point), the AVX-512 fast one
(zero B zero point, per-column bias), the depthwise one, and dynamic quantization.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import isa_params
from helpers import kernel_conv, kernel_gemm, kernel_quantize_dynamic
from qie_ep import reference as R



def ties_operands(n_cols):
    """A: 256 rows, one per u8 value (K = 1, a_zp = 128), so acc = a - 128 spans [-128, 127]."""
    a = np.arange(256, dtype=np.uint8).reshape(256, 1)
    b = np.ones((1, n_cols), np.int8)
    return a, b


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt,y_zp", [(np.uint8, 100), (np.int8, -3)], ids=["u8", "s8"])
@pytest.mark.parametrize("zb", [0, 2], ids=["zb0-fast", "zb2-general"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gemm_epilogue_ties(isa, ydt, y_zp, zb, with_bias):
    n = 37  # full and partial column vectors of every tile width
    a, b = ties_operands(n)
    if zb:
        b = np.full((1, n), 3, np.int8)  # (b - zb) = 1: same accumulators through the general path
    bias = (np.arange(n, dtype=np.int32) % 5) - 2 if with_bias else None
    scale = np.full(n, 0.5, np.float32)
    want = R.gemm_u8s8(a, b, np.array(128), np.full(n, zb), bias=None if bias is None else np.broadcast_to(bias, (256, n)),
                       out=np.dtype(ydt).name, scale=scale, y_zero_point=y_zp)
    acc = (np.arange(256) - 128)[:, None] + (np.zeros(n, np.int64) if bias is None else bias)[None, :]
    assert ((acc % 2) != 0).sum() > 1000, "not enough ties"
    got = kernel_gemm(isa, a, b, 128, zb, bias=bias, bias_rs=0, bias_cs=1 if bias is not None else 0,
                      out=np.dtype(ydt).name, scale=scale, y_zp=y_zp)
    if got is None:
        pytest.skip("ISA unsupported")
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{len(bad)} tie mismatches on {isa}; first at {tuple(bad[0])}: acc {acc[tuple(bad[0])]}, "
                           f"x0.5 = {acc[tuple(bad[0])] * 0.5}, expected {want[tuple(bad[0])]}, got {got[tuple(bad[0])]}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt,y_zp", [(np.uint8, 100), (np.int8, -3)], ids=["u8", "s8"])
@pytest.mark.parametrize("group", [1, 16], ids=["dense", "depthwise"])
def test_conv_epilogue_ties(isa, ydt, y_zp, group):
    """3x3 conv whose only non-zero tap is the centre: acc = x - x_zp over all 256 values."""
    c = 16
    x = np.arange(256 * c, dtype=np.int64).reshape(1, 16, 16, c).astype(np.uint8)  # NHWC, every value per channel
    w = np.zeros((c, c // group, 3, 3), np.int8)
    for m in range(c):
        w[m, m % (c // group), 1, 1] = 1
    scale = np.full(c, 0.5, np.float32)
    bias = (np.arange(c, dtype=np.int32) % 3) - 1
    acc = R.conv_integer(x, w, np.array(128, np.uint8), np.zeros(c, np.int8), bias=bias, channels_last=True, group=group,
                         pads=[1, 1, 1, 1])
    assert ((acc % 2) != 0).sum() > 1000, "not enough ties"
    want = R.requantize(acc, scale, np.array(y_zp, ydt), ydt)
    got = kernel_conv(isa, x, w, 128, 0, group=group, pads=[1, 1, 1, 1], bias=bias, out=np.dtype(ydt).name, scale=scale,
                      y_zp=y_zp)
    if got is None:
        pytest.skip("ISA unsupported")
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} tie mismatches on {isa}; first at {tuple(bad[0])}: acc {acc[tuple(bad[0])]}"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("lo,hi", [(0.0, 255.0), (-127.5, 127.5)], ids=["zp0", "zp-tie"])
def test_dynamic_quantization_ties(isa, lo, hi):
    """scale = (hi - lo) / 255 = 1 exactly; x = k + 0.5 are ties; lo = -127.5 makes the zero point a tie."""
    x = np.concatenate([[lo, hi], np.arange(lo, hi, 0.5)]).astype(np.float32)
    x = np.concatenate([x, x[::-1], x[5:40]]).astype(np.float32)  # lengths off the vector width too
    want_q, want_s, want_z = R.dynamic_quantize_linear(x)
    assert want_s == 1.0
    got = kernel_quantize_dynamic(isa, x)
    if got is None:
        pytest.skip("ISA unsupported")
    q, scale, zp = got
    assert scale == want_s and zp == want_z, (scale, zp, want_s, want_z)
    bad = np.argwhere(q != want_q).ravel()
    assert bad.size == 0, f"{bad.size} mismatches on {isa}; first x={x[bad[0]]}: expected {want_q[bad[0]]}, got {q[bad[0]]}"
