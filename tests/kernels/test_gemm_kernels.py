"""Kernel layer vs the numpy reference, atol=0, on every ISA path (forced), around the tile edges.

Tile-edge shapes are generated from each microkernel's own MR x NR tile and K-group, as the library
declares them (``qie_test_microkernel``): one below, at and above one and two tiles in M and N, K below /
at / above / not a multiple of the K-group, and zero; the output scale is set from the accumulator range
so that saturation is hit in both directions.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import isa_params
from helpers import kernel_gemm, kernel_quantize_dynamic, microkernel_tile
from qie_ep import reference as R



def around(t: int) -> list[int]:
    """Sizes one below, at and one above one and two multiples of ``t``, and 1."""
    return sorted({1, t - 1, t, t + 1, 2 * t - 1, 2 * t, 2 * t + 1} - {0})


def tile_edges(isa: str) -> tuple[list[int], list[int], list[int]]:
    mr, nr, kg = microkernel_tile(isa)
    # K past 256 runs tile by tile, K up to 256 as strips (the small-K path): both around every edge
    # (AMX: K from 33 on padded to 64 and run on tiles, shorter K on the VNNI tiles: both sides of each step)
    # M also around half a tile (AMX's 32-row tiles are two 16-row passes; a second pass of 1-3 rows runs on VNNI)
    ms = sorted(set(around(mr)) | {mr // 2 + d for d in (-1, 0, 1, 2, 3, 4)})
    return ms, around(nr), sorted({0, 1, kg - 1, kg, kg + 1, 2 * kg + 1, 31, 32, 33, 63, 64, 65, 129, 300} - {-1})
SIGNS = [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)]
SIGN_IDS = ["u8s8", "u8u8", "s8s8", "s8u8"]


def rand(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


def check(got, want, **ctx):
    if got is None:
        pytest.skip("ISA unsupported")
    if not np.array_equal(got, want):
        idx = tuple(np.argwhere(got != want)[0])
        raise AssertionError(f"first mismatch at {idx}: expected {want[idx]!r}, got {got[idx]!r}; {ctx}")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("adt,bdt", SIGNS, ids=SIGN_IDS)
def test_int32_all_tile_edges(isa, adt, bdt):
    rng = np.random.default_rng(1)
    ms, ns, ks = tile_edges(isa)
    for m, n, k in itertools.product(ms, ns, ks):
        a, b = rand(rng, adt, (m, k)), rand(rng, bdt, (k, n))
        za = rand(rng, adt, (1,)).astype(np.int32)
        # per column, and one value for all columns (kernels may add its term per row)
        for zb in (rand(rng, bdt, (n,)).astype(np.int32), np.full(n, rand(rng, bdt, (1,))[0], np.int32)):
            want = R.gemm_u8s8(a, b, za[0], zb)
            check(kernel_gemm(isa, a, b, za, zb), want, isa=isa, m=m, n=n, k=k, za=za, zb=zb)


@pytest.mark.parametrize("isa", isa_params())
def test_long_k_around_two_tiles_of_rows(isa):
    """K past 2048 (AMX runs 32-row tiles as one pass of six C tiles there, two 16-row passes below), rows around
    one and two 16-row tiles, a short last panel; per-row and per-column zero points."""
    rng = np.random.default_rng(11)
    for m, k in itertools.product((15, 16, 17, 31, 32, 33), (2047, 2048, 2112)):
        a, b = rand(rng, np.uint8, (m, k)), rand(rng, np.int8, (k, 53))
        za, zb = rand(rng, np.uint8, (m,)).astype(np.int32), rand(rng, np.int8, (53,)).astype(np.int32)
        want = (a.astype(np.int64) - za[:, None]) @ (b.astype(np.int64) - zb[None, :])
        check(kernel_gemm(isa, a, b, za, zb), want.astype(np.int32), isa=isa, m=m, k=k)
        za1 = za[:1]  # one A zero point: the folded epilogue
        check(kernel_gemm(isa, a, b, za1, zb), R.gemm_u8s8(a, b, za1[0], zb), isa=isa, m=m, k=k)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("adt,bdt", SIGNS, ids=SIGN_IDS)
@pytest.mark.parametrize("out", ["uint8", "int8"])
def test_requantize_saturates(isa, adt, bdt, out):
    rng = np.random.default_rng(2)
    for m, n, k in [(1, 1, 1), (7, 33, 5), (9, 17, 64), (17, 65, 129), (8, 32, 4), (13, 31, 31)]:
        a, b = rand(rng, adt, (m, k)), rand(rng, bdt, (k, n))
        za = rand(rng, adt, (1,)).astype(np.int32)
        zb = np.full(n, rand(rng, bdt, (1,))[0], np.int32)  # per tensor
        acc = R.gemm_u8s8(a, b, za[0], zb).astype(np.int64)
        lo, hi = R.QRANGE[np.dtype(out)]
        # The accumulator range maps onto ~1.5x the output range, centred: both ends saturate.
        span = max(1, int(acc.max() - acc.min()))
        scale = (np.float32(1.5 * (hi - lo) / span) * rng.uniform(0.8, 1.25, n)).astype(np.float32)
        mid = float(acc.max() + acc.min()) / 2
        y_zp = int(np.clip((lo + hi) / 2 - round(mid * float(scale.mean())), lo, hi))
        want = R.gemm_u8s8(a, b, za[0], zb, out=out, scale=scale, y_zero_point=y_zp)
        got = kernel_gemm(isa, a, b, za, zb, out=out, scale=scale, y_zp=y_zp)
        check(got, want, isa=isa, m=m, n=n, k=k, scale=scale[:4], y_zp=y_zp)
        if m * n > 100:
            assert (want == lo).any() and (want == hi).any(), "test did not exercise saturation"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("out", ["uint8", "int8", "int32"])
def test_small_k_strips_every_panel_width(isa, out):
    """Small K (pointwise convolutions' 16..256) runs each panel over the task's rows as one strip with the
    epilogue's constants set up once (and, for whole vectors, the row's codes packed and stored unmasked): every
    panel width (1 to NR columns, whole and masked vectors), rows past one tile with a remainder, B zero points
    absent / one value / per column (no fast epilogue: the tiles' own), output zero points at both ends."""
    rng = np.random.default_rng(11)
    mr, nr, kg = microkernel_tile(isa)
    for n in sorted({1, 15, 16, 17, 31, 32, 33, 47, 48, nr, nr + 16, 2 * nr, 3 * nr - 5}):
        m, k = 3 * mr + 5, int(rng.choice([kg, 16, 24, 64, 256]))
        a, b = rand(rng, np.uint8, (m, k)), rand(rng, np.int8, (k, n))
        za = np.array([int(rng.integers(0, 256))], np.int32)
        for zb in (np.zeros(n, np.int32), np.full(n, 3, np.int32), rng.integers(-4, 5, n).astype(np.int32)):
            if out == "int32":
                check(kernel_gemm(isa, a, b, za, zb), R.gemm_u8s8(a, b, za[0], zb), isa=isa, m=m, n=n, k=k)
                continue
            lo, hi = R.QRANGE[np.dtype(out)]
            acc = R.gemm_u8s8(a, b, za[0], zb).astype(np.int64)
            scale = np.full(n, 1.5 * (hi - lo) / max(1, int(acc.max() - acc.min())), np.float32)
            for y_zp in (lo, (lo + hi) // 2, hi):
                want = R.gemm_u8s8(a, b, za[0], zb, out=out, scale=scale, y_zero_point=y_zp)
                check(kernel_gemm(isa, a, b, za, zb, out=out, scale=scale, y_zp=y_zp), want, isa=isa, m=m, n=n, k=k,
                      y_zp=y_zp)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("out", ["uint8", "int8"])
def test_requantize_far_past_int32(isa, out):
    """Scales that put acc * scale far past the int32 range (1e12, -1e12, and large values of both signs in one
    row, at every vector of a 48-column tile and its masked edge): the codes saturate as the reference's, never wrap
    through an overflowing float -> int32 conversion."""
    rng = np.random.default_rng(5)
    lo, hi = R.QRANGE[np.dtype(out)]
    for m, n, k in [(3, 48, 64), (9, 37, 130), (1, 16, 4), (8, 95, 64)]:
        a, b = rand(rng, np.uint8, (m, k)), rand(rng, np.int8, (k, n))
        za, zb = np.array([3], np.int32), np.zeros(n, np.int32)
        scale = (rng.choice([-1.0, 1.0], n) * rng.uniform(1e5, 1e8, n)).astype(np.float32)
        for y_zp in (lo, 0, hi):
            want = R.gemm_u8s8(a, b, za[0], zb, out=out, scale=scale, y_zero_point=y_zp)
            check(kernel_gemm(isa, a, b, za, zb, out=out, scale=scale, y_zp=y_zp), want, isa=isa, m=m, n=n, k=k,
                  y_zp=y_zp)
            assert (want == lo).any() and (want == hi).any()


@pytest.mark.parametrize("isa", isa_params())
def test_float_output_and_bias_forms(isa):
    rng = np.random.default_rng(3)
    m, n, k = 11, 37, 45
    a, b = rand(rng, np.uint8, (m, k)), rand(rng, np.int8, (k, n))
    za, zb = np.array([131], np.int32), rand(rng, np.int8, (n,)).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    fbias = rng.normal(size=n).astype(np.float32)
    want = R.gemm_u8s8(a, b, za[0], zb, out="float", scale=scale, fbias=fbias)
    check(kernel_gemm(isa, a, b, za, zb, out="float", scale=scale, fbias=fbias), want, isa=isa)
    full = rng.integers(-50000, 50000, (m, n)).astype(np.int32)
    forms = {  # (bias buffer, row stride, per-column flag) -> broadcast (m, n) bias
        "scalar": (full[:1, :1].copy(), 0, 0), "per-column": (full[0].copy(), 0, 1),
        "per-row": (full[:, :1].copy(), 1, 0), "full": (full, n, 1)}
    for name, (buf, rs, cs) in forms.items():
        bias = np.broadcast_to(buf.reshape(-1)[0] if rs == 0 and cs == 0 else buf.reshape((m, 1) if rs == 1 and cs == 0 else (-1, n)), (m, n))
        want = R.gemm_u8s8(a, b, za[0], zb, bias=bias)
        check(kernel_gemm(isa, a, b, za, zb, bias=buf, bias_rs=rs, bias_cs=cs), want, isa=isa, bias=name)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("adt,bdt", SIGNS, ids=SIGN_IDS)
def test_per_row_a_zero_point_and_threads(isa, adt, bdt):
    """Per-row za (MatMulInteger) and a problem big enough to be split into tasks over 2 threads."""
    rng = np.random.default_rng(4)
    for m, n, k in [(67, 301, 259), (130, 96, 1024), (1, 1000, 777)]:
        a, b = rand(rng, adt, (m, k)), rand(rng, bdt, (k, n))
        za = rand(rng, adt, (m,)).astype(np.int32)
        zb = rand(rng, bdt, (n,)).astype(np.int32)
        want = R.matmul_integer(a, b, za, zb)
        check(kernel_gemm(isa, a, b, za, zb, threads=2), want, isa=isa, m=m, n=n, k=k)


@pytest.mark.parametrize("isa", isa_params())
def test_extreme_values_cannot_saturate(isa):
    """All-255 A against all -128 / +127 B with zero points 0: the largest |products| every step.

    AVX2's vpmaddubsw would saturate its int16 pair sums here (255*127*2 > 32767); qie's paths must not.
    """
    for bval in (-128, 127):
        for k in (2, 4, 64, 1000):
            a = np.full((5, k), 255, np.uint8)
            b = np.full((k, 19), bval, np.int8)
            want = np.full((5, 19), 255 * bval * k, np.int32)
            check(kernel_gemm(isa, a, b, [0], np.zeros(19, np.int32)), want, isa=isa, k=k, b=bval)


@pytest.mark.parametrize("isa", isa_params())
def test_dynamic_quantize_linear_matches_reference(isa):
    """DynamicQuantizeMatMul's on-the-fly quantization of A, per ISA path (vector and scalar), vs the
    reference: exact .5 ties (round half to even), values beyond the range, lengths off the vector width."""
    rng = np.random.default_rng(5)
    cases = [rng.normal(size=n).astype(np.float32) * 3 for n in (1, 15, 16, 17, 1000)]
    ties = (np.arange(-300, 300, dtype=np.float32) + 0.5) * np.float32(2.0 / 255)  # x / scale lands on .5
    cases += [ties, np.full(33, 2.5, np.float32), np.zeros(7, np.float32), -np.abs(cases[-1])]
    for x in cases:
        got = kernel_quantize_dynamic(isa, x)
        if got is None:
            pytest.skip("ISA unsupported")
        q, scale, zp = got
        want_q, want_s, want_zp = R.dynamic_quantize_linear(x)
        assert scale == want_s and zp == want_zp, (isa, x.size, scale, want_s, zp, want_zp)
        check(q, want_q, isa=isa, n=x.size)
