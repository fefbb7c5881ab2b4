"""qie's TIR kernels (qie_ep.tvm.schedules) against the numpy reference, atol=0, on every ISA path this CPU has.

Shapes straddle the tiles: rows below / at / above the row tile, K not a multiple of the K pack,
N below / above the column tile, primes, and K = 1. Output scales are set from the observed
accumulator range so that saturation is hit at both ends.
"""
from __future__ import annotations

import numpy as np
import pytest

from tvm_helpers import HOST, assert_within_fma, tvm_isa_params  # noqa: F401  (imports TVM or skips)
from qie_ep import reference as ref
from qie_ep.tvm.schedules import conv, isa as tisa, kernels, matmul, pointwise
from qie_ep.tvm.schedules.gemm import Epilogue, Tile

QR = {"uint8": (0, 256), "int8": (-128, 128)}
SHAPES = [(1, 1, 1), (1, 64, 48), (7, 5, 17), (8, 64, 48), (9, 67, 49), (13, 131, 97), (33, 260, 200)]
_CACHE: dict = {}


def rand(rng, dtype, shape):
    lo, hi = QR[dtype]
    return rng.integers(lo, hi, shape).astype(dtype)


def kernel(spec, isa_name, tile=None):
    key = (spec, isa_name, tile)
    if key not in _CACHE:
        _CACHE[key] = kernels.Kernel(spec, tisa.ALL[isa_name], HOST, tile)
    return _CACHE[key]


def check(got, want, ctx):
    if got.shape != want.shape:
        raise AssertionError(f"{ctx}: shape {got.shape} != {want.shape}")
    bad = np.argwhere(got != want)
    if bad.size:
        i = tuple(bad[0])
        raise AssertionError(f"{ctx}: {len(bad)} mismatches; first at {i}: expected {want[i]}, got {got[i]}")


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("ab", ["u8s8", "u8u8", "s8s8", "s8u8"])
def test_matmul_int32(isa, m, k, n, ab):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    adt, bdt = ("uint8" if ab[:2] == "u8" else "int8"), ("uint8" if ab[2:] == "u8" else "int8")
    a, b = rand(rng, adt, (m, k)), rand(rng, bdt, (k, n))
    za = int(rand(rng, adt, ()))
    zb = rand(rng, bdt, (n,)) if n % 2 else rand(rng, bdt, ())
    kzb = bool(np.any(np.asarray(zb, np.int32) + (-128 if bdt == "uint8" else 0)))
    spec = matmul.MatmulSpec(adt, bdt, k, n, Epilogue("int32", zb=kzb))
    kk = kernel(spec, isa)
    got = kk(a, kk.pack(b, zb), za)
    check(got, ref.matmul_integer(a, b, np.asarray(za, adt), zb), f"{isa} {ab} {m}x{k}x{n}")


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("out", ["uint8", "int8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matmul_requant_saturates(isa, out, per_channel):
    rng = np.random.default_rng(7)
    m, k, n = 19, 75, 52
    a, b = rand(rng, "uint8", (m, k)), rand(rng, "int8", (k, n))
    za, zb = 131, np.zeros(n, np.int8)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    acc = ref.matmul_integer(a, b, np.uint8(za), zb).astype(np.int64) + bias
    span = float(np.abs(acc).max())
    mult = (rng.uniform(0.5, 1.5, n if per_channel else 1) * 400.0 / span).astype(np.float32)
    zy = 10 if out == "uint8" else -3
    spec = matmul.MatmulSpec("uint8", "int8", k, n, Epilogue(out, per_channel=per_channel, bias=True))
    kk = kernel(spec, isa)
    got = kk(a, kk.pack(b, zb), za, mult=mult, bias=bias, zy=zy)
    want = ref.requantize(acc, np.broadcast_to(mult, (n,)), np.asarray(zy, out), out)
    lo, hi = (0, 255) if out == "uint8" else (-128, 127)
    assert (want == lo).any() and (want == hi).any(), "the test must reach both saturation bounds"
    check(got, want, f"{isa} requant {out} per_channel={per_channel}")


@pytest.mark.parametrize("isa", tvm_isa_params())
def test_matmul_float_output(isa):
    rng = np.random.default_rng(3)
    m, k, n = 10, 33, 40
    a, b = rand(rng, "uint8", (m, k)), rand(rng, "uint8", (k, n))
    za, zb = 77, rand(rng, "uint8", (n,))
    sa, sb = np.float32(0.013), rng.uniform(0.001, 0.01, n).astype(np.float32)
    fbias = rng.standard_normal(n).astype(np.float32)
    spec = matmul.MatmulSpec("uint8", "uint8", k, n, Epilogue("float32", per_channel=True, bias=True, zb=True))
    kk = kernel(spec, isa)
    got = kk(a, kk.pack(b, zb), za, scale=(sa * sb).astype(np.float32), fbias=fbias)
    want = ref.matmul_integer_to_float(a, b, sa, sb, np.uint8(za), zb, fbias)
    assert_within_fma(got, want, fbias)
    nobias = kernel(matmul.MatmulSpec("uint8", "uint8", k, n, Epilogue("float32", per_channel=True, zb=True)), isa)
    got = nobias(a, nobias.pack(b, zb), za, scale=(sa * sb).astype(np.float32))
    np.testing.assert_array_equal(got, ref.matmul_integer_to_float(a, b, sa, sb, np.uint8(za), zb))


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("tile", [Tile(8, 3), Tile(6, 4), Tile(12, 2), Tile(16, 1)], ids=str)
def test_every_tile_is_exact(isa, tile):
    """Tuning may pick any tile; each one must give the same integers."""
    if isa not in ("avx512vnni",) and tile.rows * tile.vecs > 24:
        pytest.skip("tile too large for 16 vector registers")
    rng = np.random.default_rng(11)
    m, k, n = 29, 41, 70
    a, b = rand(rng, "int8", (m, k)), rand(rng, "uint8", (k, n))
    spec = matmul.MatmulSpec("int8", "uint8", k, n, Epilogue("int32", zb=True))
    kk = kernel(spec, isa, tile)
    got = kk(a, kk.pack(b, 128), -9)
    check(got, ref.matmul_integer(a, b, np.int8(-9), np.uint8(128)), f"{isa} {tile}")


def test_symbolic_rows_share_one_kernel():
    """One compiled kernel serves any number of rows (dynamic batch / sequence length)."""
    isa = tisa.host_isas()[-1]
    rng = np.random.default_rng(5)
    k, n = 48, 32
    b = rand(rng, "int8", (k, n))
    kk = kernel(matmul.MatmulSpec("uint8", "int8", k, n, Epilogue("int32")), isa)
    packed = kk.pack(b, 0)
    for m in (1, 3, 8, 17, 64):
        a = rand(rng, "uint8", (m, k))
        check(kk(a, packed, 5), ref.matmul_integer(a, b, np.uint8(5), np.int8(0)), f"m={m}")


CONVS = [
    # c, oc, h, w, kernel, strides, pads (t, l, b, r), dilations, group
    (3, 16, 17, 15, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (8, 20, 9, 9, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (5, 7, 9, 11, (3, 3), (2, 1), (1, 1, 1, 0), (1, 2), 1),
    (4, 9, 12, 10, (5, 3), (1, 2), (2, 0, 1, 1), (1, 1), 1),
    (16, 16, 10, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16),
    (24, 24, 9, 7, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 24),
    (6, 6, 8, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 6),
]


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("geo", CONVS, ids=lambda g: f"c{g[0]}o{g[1]}k{g[4][0]}x{g[4][1]}s{g[5][0]}g{g[8]}")
@pytest.mark.parametrize("xw", ["u8s8", "s8u8"])
def test_conv_int32(isa, geo, xw):
    c, oc, h, w, kern, strides, pads, dil, group = geo
    xdt, wdt = ("uint8", "int8") if xw == "u8s8" else ("int8", "uint8")
    rng = np.random.default_rng(c * 100 + oc)
    x = rand(rng, xdt, (2, c, h, w))
    wt = rand(rng, wdt, (oc, c // group, *kern))
    zx = int(rand(rng, xdt, ()))
    zw = rand(rng, wdt, (oc,))
    kzb = bool(np.any(zw.astype(np.int32) + (-128 if wdt == "uint8" else 0)))
    spec = conv.ConvSpec(xdt, wdt, c, oc, h, w, kern, strides, pads, dil, group, Epilogue("int32", zb=kzb))
    kk = kernel(spec, isa)
    got = kk(x, kk.pack(wt, zw), zx)
    want = ref.conv_integer(x, wt, np.asarray(zx, xdt), zw, group=group, strides=list(strides),
                            pads=[pads[0], pads[1], pads[2], pads[3]], dilations=list(dil))
    check(got, want, f"{isa} conv {geo} {xw}")


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("group", [1, 8])
def test_conv_requant(isa, group):
    rng = np.random.default_rng(group)
    c, oc, h, w = 8, 8, 11, 9
    x, wt = rand(rng, "uint8", (1, c, h, w)), rand(rng, "int8", (oc, c // group, 3, 3))
    bias = rng.integers(-300, 300, oc).astype(np.int32)
    sx, sw, sy = np.float32(0.02), rng.uniform(0.005, 0.02, oc).astype(np.float32), np.float32(0.05)
    spec = conv.ConvSpec("uint8", "int8", c, oc, h, w, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), group,
                         Epilogue("uint8", per_channel=True, bias=True))
    kk = kernel(spec, isa)
    mult = (sx * sw / sy).astype(np.float32)
    got = kk(x, kk.pack(wt, 0), 100, mult=mult, bias=bias, zy=120)
    want = ref.qlinear_conv(x, sx, np.uint8(100), wt, sw, np.zeros(oc, np.int8), sy, np.uint8(120), bias,
                            group=group, pads=[1, 1, 1, 1])
    check(got, want, f"{isa} conv requant group={group}")


# Pointwise NCHW kernel (schedules/pointwise.py): pixels below / at / above a vector and the pixel tile,
# channels not a multiple of 4 (a partial last group), output channels not a multiple of the row tile.
POINTWISE = [(16, 32, 8, 8), (8, 20, 9, 9), (6, 7, 3, 5), (64, 13, 7, 7), (33, 64, 1, 1), (5, 12, 14, 14), (33, 20, 4, 8),
             (3, 6, 16, 20)]


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("geo", POINTWISE, ids=lambda g: "c{}o{}h{}w{}".format(*g))
@pytest.mark.parametrize("out", ["int32", "uint8", "int8", "float32"])
@pytest.mark.parametrize("xdt", ["uint8", "int8"])
def test_pointwise_conv(isa, geo, out, xdt):
    c, oc, h, w = geo
    rng = np.random.default_rng(c * 1000 + oc * 10 + h)
    x, wt = rand(rng, xdt, (2, c, h, w)), rand(rng, "int8", (oc, c, 1, 1))
    zx = int(rand(rng, xdt, ()))
    per_channel, has_bias = bool(oc % 2), True
    spec = conv.ConvSpec(xdt, "int8", c, oc, h, w, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1,
                         Epilogue(out, per_channel=per_channel, bias=has_bias))
    kk = kernel(spec, isa)
    name = kk.func.attrs["global_symbol"]
    assert name.startswith("qie_pwconv_") == pointwise.applies(spec, tisa.ALL[isa]), name
    acc = ref.conv_integer(x, wt, np.asarray(zx, xdt), np.int8(0))
    bias = rng.integers(-3000, 3000, oc).astype(np.int32)
    if out == "int32":
        got, want = kk(x, kk.pack(wt, 0), zx), acc
    elif out == "float32":
        scale = rng.uniform(1e-4, 1e-3, oc if per_channel else 1).astype(np.float32)
        fbias = (bias.astype(np.float32) * np.float32(1e-3)).reshape(1, -1, 1, 1)
        got = kk(x, kk.pack(wt, 0), zx, scale=scale, fbias=fbias)
        want = acc.astype(np.float32) * scale.reshape(1, -1, 1, 1) + fbias
        assert_within_fma(got, want, fbias)
        return
    else:
        span = float(np.abs(acc).max() + 3000) or 1.0
        mult = (rng.uniform(150, 300, oc if per_channel else 1) / span).astype(np.float32)
        zy = 3 if out == "uint8" else -5
        got = kk(x, kk.pack(wt, 0), zx, mult=mult, bias=bias, zy=zy)
        want = ref.requantize(acc + bias.reshape(1, -1, 1, 1), mult.reshape(1, -1, 1, 1), zy, out)
    check(got, want, f"{isa} pointwise {geo} {xdt}->{out}")


# Depthwise kernel (schedules/depthwise.py): rows below / at / past a vector (overlapping last vector),
# stride 2 read directly as int16 pairs, stride 3 and dilated strides through pair planes, odd and even
# kernel widths (a tap paired with a zero weight), 1x1 outputs, rows narrower than the stride, tiny planes
# grouped several per task (64 channels of 3x3), asymmetric padding.
DEPTHWISE = [
    # c, h, w, kernel, strides, pads (t, l, b, r), dilations
    (8, 15, 33, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (5, 1, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (4, 3, 2, (3, 3), (2, 2), (1, 1, 1, 0), (1, 1)),
    (3, 9, 4, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1)),
    (4, 13, 19, (3, 3), (3, 3), (1, 1, 1, 1), (1, 1)),
    (4, 12, 20, (3, 5), (1, 2), (1, 2, 1, 2), (1, 2)),
    (16, 9, 40, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1)),
    (8, 5, 1, (3, 3), (1, 2), (1, 1, 1, 1), (1, 1)),
    (64, 4, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (6, 17, 18, (4, 2), (2, 1), (2, 0, 1, 1), (1, 1)),
]


@pytest.mark.parametrize("isa", tvm_isa_params())
@pytest.mark.parametrize("geo", DEPTHWISE, ids=lambda g: "c{}h{}w{}k{}x{}s{}x{}d{}".format(*g[:3], *g[3], *g[4], g[6][1]))
@pytest.mark.parametrize("out", ["int32", "uint8", "int8", "float32"])
@pytest.mark.parametrize("xw", ["u8s8", "s8u8"])
def test_depthwise_conv(isa, geo, out, xw):
    c, h, w, kern, strides, pads, dil = geo
    xdt, wdt = ("uint8", "int8") if xw == "u8s8" else ("int8", "uint8")
    rng = np.random.default_rng(c * 1000 + h * 10 + w)
    x, wt = rand(rng, xdt, (2, c, h, w)), rand(rng, wdt, (c, 1, *kern))
    zx, zw = int(rand(rng, xdt, ())), rand(rng, wdt, (c,))
    per_channel = bool(c % 2)
    spec = conv.ConvSpec(xdt, wdt, c, c, h, w, kern, strides, pads, dil, c,
                         Epilogue(out, per_channel=per_channel, bias=out != "int32"))
    kk = kernel(spec, isa)
    assert kk.func.attrs["global_symbol"].startswith("qie_dwconv_")
    acc = ref.conv_integer(x, wt, np.asarray(zx, xdt), zw, group=c, strides=list(strides), pads=list(pads),
                           dilations=list(dil))
    bias = rng.integers(-3000, 3000, c).astype(np.int32)
    if out == "int32":
        got, want = kk(x, kk.pack(wt, zw), zx), acc
    elif out == "float32":
        scale = rng.uniform(1e-4, 1e-3, c if per_channel else 1).astype(np.float32)
        fbias = (bias.astype(np.float32) * np.float32(1e-3)).reshape(1, -1, 1, 1)
        got = kk(x, kk.pack(wt, zw), zx, scale=scale, fbias=fbias)
        assert_within_fma(got, acc.astype(np.float32) * scale.reshape(1, -1, 1, 1) + fbias, fbias)
        return
    else:
        span = float(np.abs(acc).max() + 3000) or 1.0
        mult = (rng.uniform(150, 300, c if per_channel else 1) / span).astype(np.float32)
        zy = 3 if out == "uint8" else -5
        got = kk(x, kk.pack(wt, zw), zx, mult=mult, bias=bias, zy=zy)
        want = ref.requantize(acc + bias.reshape(1, -1, 1, 1), mult.reshape(1, -1, 1, 1), zy, out)
    check(got, want, f"{isa} depthwise {geo} {xw}->{out}")


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="uint8 or int8"):
        matmul.MatmulSpec("int16", "int8", 4, 4, Epilogue("int32"))
    with pytest.raises(ValueError, match="output dtype"):
        Epilogue("float16")
    with pytest.raises(ValueError, match="neither 1 nor depthwise"):
        conv.ConvSpec("uint8", "int8", 8, 8, 4, 4, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 2, Epilogue("int32"))
