"""The NHWC convolution kernel layer vs the numpy reference, atol=0, on every ISA path.

Cases cover each of the three paths (pointwise GEMM, im2col + GEMM, depthwise), output channels
around the microkernels' NR (16 / 48), output pixels around MR, K = taps x Cg not a multiple of the
K-group, strides, dilations, asymmetric pads, groups, 1-D / 2-D / 3-D, every signedness combination,
per-channel weight zero points, bias, saturation at both ends of the requantized range, more than one
im2col block, and 2 threads.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from conftest import isa_params
from helpers import kernel_conv
from qie_ep import reference as R

DTYPES = [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)]

# (batch, C, M, spatial, kernel, group, strides, dilations, pads)
CASES = {
    "pointwise": (2, 24, 40, [5, 7], [1, 1], 1, None, None, None),
    "pointwise_k_odd": (1, 13, 17, [3, 5], [1, 1], 1, None, None, None),
    "pointwise_groups": (1, 12, 18, [4, 4], [1, 1], 3, None, None, None),
    "pointwise_strided": (1, 16, 49, [7, 7], [1, 1], 1, [2, 2], None, None),
    "3x3_pad": (1, 8, 48, [9, 9], [3, 3], 1, None, None, [1, 1, 1, 1]),
    "3x3_nr_edges": (1, 5, 47, [6, 11], [3, 3], 1, None, None, [1, 0, 1, 2]),
    "3x3_stride2_dil2": (2, 7, 16, [13, 12], [3, 3], 1, [2, 2], [2, 2], [2, 1, 0, 2]),
    "7x7_s2_first_layer": (1, 3, 64, [23, 23], [7, 7], 1, [2, 2], None, [3, 3, 3, 3]),
    "grouped": (1, 16, 24, [7, 6], [3, 3], 4, None, None, [1, 1, 1, 1]),
    "depthwise": (2, 32, 32, [9, 9], [3, 3], 32, None, None, [1, 1, 1, 1]),
    "depthwise_odd_c_s2": (1, 19, 19, [11, 10], [3, 3], 19, [2, 2], None, [1, 1, 0, 1]),
    "depthwise_5x5_dil": (1, 33, 33, [12, 12], [5, 5], 33, None, [2, 1], [4, 2, 4, 2]),
    "depthwise_c16": (1, 16, 16, [8, 8], [3, 3], 16, None, None, [1, 1, 1, 1]),  # two pixels per zmm
    "depthwise_c16_odd_5x5": (2, 16, 16, [7, 9], [5, 5], 16, [1, 2], None, [2, 2, 2, 2]),  # 7x5 pixels: one left
    "depthwise_c48_s2": (2, 48, 48, [10, 9], [3, 3], 48, [2, 2], None, [1, 1, 1, 1]),  # one 32 block + 16
    "depthwise_c64_7x7": (1, 64, 64, [9, 11], [7, 7], 64, None, None, [3, 3, 3, 3]),  # 25 tap pairs
    "conv1d": (2, 6, 20, [31], [5], 2, [3], [2], [2, 1]),
    "conv3d": (1, 4, 9, [4, 5, 6], [2, 3, 2], 1, [1, 2, 1], [1, 1, 2], [1, 0, 1, 0, 1, 1]),
    # H / D dilation with W contiguous: the interior pixels' kernel rows copied from shared offsets (GatherRows)
    "3x3_dil_h": (2, 8, 16, [11, 9], [3, 3], 1, None, [2, 1], [2, 1, 2, 1]),
    "conv3d_dil_d": (1, 4, 9, [5, 4, 6], [2, 3, 2], 1, None, [2, 1, 1], [1, 1, 0, 0, 1, 1]),
    "kernel_fills_input": (1, 8, 8, [3, 3], [3, 3], 1, None, None, None),
    "m1_c1": (1, 1, 1, [5, 5], [2, 2], 1, None, None, None),
}


def rand(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


def make_case(rng, name, xdt, wdt):
    n, c, m, sp, k, group, strides, dil, pads = CASES[name]
    x = rand(rng, xdt, [n] + sp + [c])
    w = rand(rng, wdt, [m, c // group] + k)
    x_zp = int(rand(rng, xdt, ()))
    w_zp = rand(rng, wdt, m).astype(np.int32)
    bias = rng.integers(-5000, 5000, m).astype(np.int32)
    attrs = dict(group=group, strides=strides, dilations=dil, pads=pads)
    return x, w, x_zp, w_zp, bias, attrs


def context(isa, name, xdt, wdt, **kw):
    return f"isa={isa} case={name} x={np.dtype(xdt).name} w={np.dtype(wdt).name} {CASES[name]} {kw}"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("xdt,wdt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(CASES))
def test_conv_int32(isa, name, xdt, wdt):
    rng = np.random.default_rng(zlib.crc32(f"{name}{np.dtype(xdt).name}{np.dtype(wdt).name}".encode()))
    x, w, x_zp, w_zp, bias, attrs = make_case(rng, name, xdt, wdt)
    for b in (None, bias):
        want = R.conv_integer(x, w, np.array(x_zp), w_zp, bias=b, channels_last=True, **attrs)
        got = kernel_conv(isa, x, w, x_zp, w_zp, bias=b, **attrs)
        np.testing.assert_array_equal(got, want, err_msg=context(isa, name, xdt, wdt, bias=b is not None))


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(CASES))
def test_conv_requantized_saturates(isa, name, ydt):
    rng = np.random.default_rng(7)
    x, w, x_zp, w_zp, bias, attrs = make_case(rng, name, np.uint8, np.int8)
    acc = R.conv_integer(x, w, np.array(x_zp), w_zp, bias=bias, channels_last=True, **attrs)
    m = w.shape[0]
    # Per-channel multipliers from the observed range, 1.5x too small: both ends saturate.
    span = np.maximum(np.abs(acc.reshape(-1, m)).max(axis=0), 1).astype(np.float64)
    scale = (190.0 / span * rng.uniform(1.2, 1.8, m)).astype(np.float32)
    y_zp = 3 if ydt == np.uint8 else -5
    want = R.requantize(acc, scale, np.array(y_zp, ydt), ydt)
    lo, hi = np.iinfo(ydt).min, np.iinfo(ydt).max
    if acc.size > 16:
        assert (want == lo).any() and (want == hi).any(), "case does not saturate"
    got = kernel_conv(isa, x, w, x_zp, w_zp, bias=bias, out=np.dtype(ydt).name, scale=scale, y_zp=y_zp, **attrs)
    np.testing.assert_array_equal(got, want, err_msg=context(isa, name, np.uint8, np.int8, y=np.dtype(ydt).name))


TABLE_CASES = ["pointwise", "pointwise_groups", "pointwise_strided", "3x3_nr_edges", "grouped", "depthwise",
               "depthwise_odd_c_s2", "depthwise_c16", "conv3d", "big_weights", "pointwise_7x7_wide", "depthwise_7x7_k5"]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", TABLE_CASES)
def test_conv_following_table(isa, name, ydt, threads):
    """A table after the convolution (the EP's conv + activation / per-channel affine) applied by the kernel's own
    tasks on their output blocks: every driver path (pointwise GEMM, grouped GEMMs, per-task im2col, depthwise
    forms, blocks of weights past L2) equals requantizing, then looking up, for one table and one per channel."""
    rng = np.random.default_rng(zlib.crc32(f"{name}{np.dtype(ydt).name}".encode()))
    if name == "big_weights":  # 3x3 x 256 -> 384: 884 KiB of packed weights, the block path
        x, w = rand(rng, np.uint8, (1, 5, 6, 256)), rand(rng, np.int8, (384, 256, 3, 3))
        x_zp, w_zp, bias, attrs = 7, np.zeros(384, np.int32), rng.integers(-5000, 5000, 384).astype(np.int32), \
            dict(group=1, strides=None, dilations=None, pads=[1, 1, 1, 1])
    elif name in ("pointwise_7x7_wide", "depthwise_7x7_k5"):  # under 2 x 64 rows: tasks split columns / short tiles
        dw = name.startswith("depthwise")
        x, w = rand(rng, np.uint8, (1, 7, 7, 512 if dw else 256)), rand(rng, np.int8, (512, 1, 5, 5) if dw else (512, 256, 1, 1))
        x_zp, w_zp, bias, attrs = 5, np.zeros(512, np.int32), rng.integers(-5000, 5000, 512).astype(np.int32), \
            dict(group=512 if dw else 1, strides=None, dilations=None, pads=[2, 2, 2, 2] if dw else [0, 0, 0, 0])
    else:
        x, w, x_zp, w_zp, bias, attrs = make_case(rng, name, np.uint8, np.int8)
    m = w.shape[0]
    acc = R.conv_integer(x, w, np.array(x_zp), w_zp, bias=bias, channels_last=True, **attrs)
    span = np.maximum(np.abs(acc.reshape(-1, m)).max(axis=0), 1).astype(np.float64)
    scale = (150.0 / span).astype(np.float32)
    y_zp = 3 if ydt == np.uint8 else -5
    codes = R.requantize(acc, scale, np.array(y_zp, ydt), ydt).view(np.uint8)
    for tables in (rng.permutation(256).astype(np.uint8), rng.integers(0, 256, (m, 256)).astype(np.uint8)):
        want = (tables[codes] if tables.ndim == 1 else tables[np.arange(m), codes]).view(ydt)
        got = kernel_conv(isa, x, w, x_zp, w_zp, bias=bias, out=np.dtype(ydt).name, scale=scale, y_zp=y_zp,
                          threads=threads, lut=tables, **attrs)
        np.testing.assert_array_equal(got, want, err_msg=f"isa={isa} case={name} tables={tables.shape} threads={threads}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_many_im2col_blocks(isa, threads):
    """56x56 rows x 576 bytes is over 2 MiB of im2col: several blocks, each split over threads."""
    rng = np.random.default_rng(11)
    x, w = rand(rng, np.uint8, (1, 56, 56, 64)), rand(rng, np.int8, (24, 64, 3, 3))
    attrs = dict(pads=[1, 1, 1, 1])
    want = R.conv_integer(x, w, np.array(9), None, channels_last=True, **attrs)
    got = kernel_conv(isa, x, w, 9, 0, threads=threads, **attrs)
    np.testing.assert_array_equal(got, want, err_msg=f"isa={isa} threads={threads}")


@pytest.mark.parametrize("isa", isa_params())
def test_conv_extreme_values(isa):
    """All operands at their extremes with the zero points at the opposite ends: largest |acc| per tap."""
    for xdt, xv, xz, wv, wz in [(np.uint8, 255, 0, -128, 127), (np.uint8, 0, 255, 127, -128),
                                (np.int8, -128, 127, -128, 127)]:
        x = np.full((1, 6, 6, 40), xv, xdt)
        for m, group in ((20, 1), (40, 40)):  # dense, and depthwise (its own kernels)
            w = np.full((m, 40 // group, 3, 3), wv, np.int8)
            want = R.conv_integer(x, w, np.array(xz), np.full(m, wz), pads=[1, 1, 1, 1], group=group,
                                  channels_last=True)
            got = kernel_conv(isa, x, w, xz, wz, pads=[1, 1, 1, 1], group=group)
            np.testing.assert_array_equal(got, want, err_msg=f"isa={isa} x={xv} xz={xz} w={wv} wz={wz} group={group}")


def test_reference_geometry_auto_pad():
    """conv_geometry's SAME_UPPER / SAME_LOWER split (odd padding at the end / the beginning)."""
    assert R.conv_geometry([5], [4], [1], [1], auto_pad="SAME_UPPER") == ([5], [1], [2])
    assert R.conv_geometry([5], [4], [1], [1], auto_pad="SAME_LOWER") == ([5], [2], [1])
    assert R.conv_geometry([7], [3], [2], [1], auto_pad="VALID") == ([3], [0], [0])
    assert R.conv_geometry([7], [3], [2], [2], pads=[1, 0]) == ([2], [1], [0])
