"""Depthwise convolution's two weight forms vs the numpy reference, atol=0, on every ISA path.

The AVX-512 VNNI path has a second depthwise kernel, used when every (w - w_zp) fits int8 (symmetric
int8 weights, uint8 weights around 128): input bytes are not widened, four taps go into one vpdpbusd,
the input zero point is folded into the accumulators' start, and channels are laid out 16 per 128-bit
lane (blocks of 64 channels of one pixel; the last block two pixels of <= 32 channels or four of <= 16).
Its edges: C around 16, 32 and 64, tails of 1, 16 and 32 channels past a multiple of 64 (lane and block
boundaries) and uneven ones; tap counts that are and are not multiples of four (the last group padded
with zero weights over the zero-point row); pixel counts that leave a vector's last pixels empty;
padding, strides and dilations; signed inputs (XOR 0x80); int32 and requantized outputs saturating at
both ends; two threads. Every case is also run on the other ISA paths, and where the weights do not
fit int8 the pair form must be chosen (asserted through the kernel's own report).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from conftest import SUPPORTED, isa_params
from helpers import kernel_conv
from qie_ep import reference as R

CHANNELS = [2, 5, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 80, 96, 130, 144]

# (spatial, kernel, strides, dilations, pads)
GEOMETRIES = {
    "3x3_pad": ([7, 9], [3, 3], None, None, [1, 1, 1, 1]),
    "5x5_s2": ([11, 10], [5, 5], [2, 2], None, [2, 1, 2, 2]),
    "1x1": ([3, 5], [1, 1], None, None, None),
    "2x2_dil": ([9, 8], [2, 2], [1, 2], [2, 3], [0, 1, 1, 0]),
    "7x7": ([9, 9], [7, 7], None, None, [3, 3, 3, 3]),
    "1d_k6": ([23], [6], [3], None, [2, 3]),
    "3d": ([3, 4, 5], [2, 3, 3], [1, 1, 2], None, [0, 1, 1, 1, 1, 0]),
}

# (x dtype, w dtype, w_zp): weight forms whose (w - w_zp) fits int8
FITTING = [(np.uint8, np.int8, 0), (np.int8, np.int8, 0), (np.uint8, np.uint8, 128)]


def case(seed, c, geom, xdt, wdt, w_zp, batch=1):
    rng = np.random.default_rng(seed)
    sp, k, strides, dil, pads = GEOMETRIES[geom]
    xi, wi = np.iinfo(xdt), np.iinfo(wdt)
    x = rng.integers(xi.min, xi.max + 1, [batch] + sp + [c]).astype(xdt)
    w = rng.integers(wi.min, wi.max + 1, [c, 1] + k).astype(wdt)
    x_zp = int(rng.integers(xi.min, xi.max + 1))
    bias = rng.integers(-20000, 20000, c).astype(np.int32)
    return x, w, x_zp, np.full(c, w_zp, np.int32), bias, dict(group=c, strides=strides, dilations=dil, pads=pads)


def expect_form(isa, form, fits, ctx):
    """The quad-tap form runs exactly where the VNNI path has it and the weights fit."""
    assert form == (isa in ("avx512vnni", "amx") and fits), f"{ctx}: quad-tap form used={form}"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("c", CHANNELS)
def test_depthwise_int32(isa, c, geom):
    for xdt, wdt, w_zp in FITTING:
        seed = zlib.crc32(f"{c}{geom}{np.dtype(xdt).name}{np.dtype(wdt).name}".encode())
        x, w, x_zp, wz, bias, attrs = case(seed, c, geom, xdt, wdt, w_zp, batch=2 if c % 2 else 1)
        for b in (None, bias):
            want = R.conv_integer(x, w, np.array(x_zp), wz, bias=b, channels_last=True, **attrs)
            got, form = kernel_conv(isa, x, w, x_zp, wz, bias=b, with_form=True, **attrs)
            ctx = f"isa={isa} C={c} {geom} x={np.dtype(xdt).name} w={np.dtype(wdt).name} bias={b is not None}"
            np.testing.assert_array_equal(got, want, err_msg=ctx)
            expect_form(isa, form, True, ctx)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("c", [5, 16, 24, 32, 48, 64, 96, 130, 144])
@pytest.mark.parametrize("geom", ["3x3_pad", "5x5_s2", "1d_k6"])
def test_depthwise_requantized_saturates(isa, geom, c, ydt):
    for xdt, wdt, w_zp in FITTING:
        x, w, x_zp, wz, bias, attrs = case(zlib.crc32(f"rq{c}{geom}".encode()), c, geom, xdt, wdt, w_zp)
        acc = R.conv_integer(x, w, np.array(x_zp), wz, bias=bias, channels_last=True, **attrs)
        span = np.maximum(np.abs(acc.reshape(-1, c)).max(axis=0), 1).astype(np.float64)
        scale = (190.0 / span * np.random.default_rng(c).uniform(1.2, 1.8, c)).astype(np.float32)
        y_zp = 3 if ydt == np.uint8 else -5
        want = R.requantize(acc, scale, np.array(y_zp, ydt), ydt)
        lo, hi = np.iinfo(ydt).min, np.iinfo(ydt).max
        assert (want == lo).any() and (want == hi).any(), "case does not saturate"
        got, form = kernel_conv(isa, x, w, x_zp, wz, bias=bias, out=np.dtype(ydt).name, scale=scale, y_zp=y_zp,
                                with_form=True, **attrs)
        ctx = f"isa={isa} C={c} {geom} x={np.dtype(xdt).name} w={np.dtype(wdt).name} y={np.dtype(ydt).name}"
        np.testing.assert_array_equal(got, want, err_msg=ctx)
        expect_form(isa, form, True, ctx)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("c", [16, 64, 144])
def test_depthwise_requantized_extreme_scales(isa, c, ydt):
    """Scaled accumulators far outside int16 and past 2^31 (a tiny output scale): the kernels' saturating packs
    and top clamp give the reference's clamp (cvt of x >= 2^31 alone would be INT_MIN, the bottom)."""
    x, w, x_zp, wz, bias, attrs = case(zlib.crc32(f"ex{c}".encode()), c, "3x3_pad", np.uint8, np.int8, 0)
    acc = R.conv_integer(x, w, np.array(x_zp), wz, bias=bias, channels_last=True, **attrs)
    span = np.maximum(np.abs(acc.reshape(-1, c)).max(axis=0), 1).astype(np.float64)
    scale = (np.geomspace(1e2, 1e7, c) / span).astype(np.float32)  # |x| up to ~1e7 (past int16) ...
    scale[::3] = np.float32(1e6)  # ... and, on every third channel, up to ~1e11 (past int32)
    y_zp = 7 if ydt == np.uint8 else -9
    want = R.requantize(acc, scale, np.array(y_zp, ydt), ydt)
    got = kernel_conv(isa, x, w, x_zp, wz, bias=bias, out=np.dtype(ydt).name, scale=scale, y_zp=y_zp, **attrs)
    lo, hi = np.iinfo(ydt).min, np.iinfo(ydt).max
    assert (want == lo).any() and (want == hi).any()
    np.testing.assert_array_equal(got, want, err_msg=f"isa={isa} C={c} y={np.dtype(ydt).name}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c", [16, 32, 96])
def test_depthwise_threads_many_tasks(isa, c, threads):
    """56x56 pixels: many tasks of the pixel range, each its own indirection table."""
    x, w, x_zp, wz, bias, attrs = case(3, c, "3x3_pad", np.uint8, np.int8, 0)
    x = np.random.default_rng(4).integers(0, 256, (1, 56, 57, c)).astype(np.uint8)
    want = R.conv_integer(x, w, np.array(x_zp), wz, bias=bias, channels_last=True, **attrs)
    got = kernel_conv(isa, x, w, x_zp, wz, bias=bias, threads=threads, **attrs)
    np.testing.assert_array_equal(got, want, err_msg=f"isa={isa} C={c} threads={threads}")


@pytest.mark.parametrize("isa", isa_params())
def test_depthwise_form_choice_and_extremes(isa):
    """Weights at the int8 edge take the quad-tap form; one step past it (w - w_zp = 128 or -129) the pair
    form. Both at the largest |acc| per tap: x and x_zp at opposite ends."""
    for wv, w_zp, wdt, fits in [(-128, 0, np.int8, True), (127, 0, np.int8, True), (255, 128, np.uint8, True),
                                (0, 128, np.uint8, True), (255, 127, np.uint8, False), (-128, 1, np.int8, False),
                                (0, 129, np.uint8, False)]:
        for xdt, xv, xz in [(np.uint8, 255, 0), (np.uint8, 0, 255), (np.int8, -128, 127), (np.int8, 127, -128)]:
            for c in (16, 32, 40):
                x = np.full((1, 6, 7, c), xv, xdt)
                w = np.full((c, 1, 3, 3), wv, wdt)
                attrs = dict(pads=[1, 1, 1, 1], group=c)
                want = R.conv_integer(x, w, np.array(xz), np.full(c, w_zp), channels_last=True, **attrs)
                got, form = kernel_conv(isa, x, w, xz, w_zp, with_form=True, **attrs)
                ctx = f"isa={isa} x={xv} xz={xz} w={wv} wz={w_zp} C={c}"
                np.testing.assert_array_equal(got, want, err_msg=ctx)
                expect_form(isa, form, fits, ctx)


def test_quad_form_reachable_here():
    """Where the host has AVX-512 VNNI, the quad-tap kernel is the one the tests above reach."""
    if "avx512vnni" not in SUPPORTED:
        pytest.skip("CPU lacks avx512vnni")
    x, w, x_zp, wz, bias, attrs = case(1, 32, "3x3_pad", np.uint8, np.int8, 0)
    _, form = kernel_conv("avx512vnni", x, w, x_zp, wz, with_form=True, **attrs)
    assert form
