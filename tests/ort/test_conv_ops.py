"""Single-node convolution graphs: qie vs the numpy reference (atol=0), vs ORT's built-in kernels and
vs onnx.reference, at all four optimization levels, with qie_ep.stats() proving qie ran.

Known differences, each asserted below:
* ORT has no QLinearConv kernel for int8 x with uint8 w ("NOT_IMPLEMENTED"); qie runs it and equals
  the reference.
* ORT's ConvInteger rejects a per-output-channel w_zero_point ("Non per-tensor quantization is not
  supported"); the ONNX spec allows it, qie and onnx.reference compute it.
* onnx.reference's QLinearConv multiplies the int32 accumulator by the scales in float64 and adds
  y_zero_point before rounding; ORT and qie multiply in float32 and round before adding (so ties
  round differently when y_zero_point is odd). The two differ by at most 1, and only where the
  float32 value lies within 1e-3 of a rounding tie: asserted element by element.
* At ORT_ENABLE_ALL ORT's NhwcTransformer rewrites QLinearConv into com.microsoft QLinearConv
  (channels_last=1) between Transposes: qie then runs that node.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS, assert_exact, run, session, single_node_model
from qie_ep import reference as R

LEVELS = list(OPT_LEVELS)
QLC = [("", "QLinearConv"), ("com.microsoft", "QLinearConv")]

# name: (x shape NCHW, w shape, attrs)
GEOMETRIES = {
    "3x3_pad1": ((1, 8, 10, 10), (16, 8, 3, 3), dict(pads=[1, 1, 1, 1])),
    "5x3_stride_dil": ((2, 5, 13, 11), (7, 5, 5, 3), dict(strides=[2, 1], dilations=[1, 2], pads=[2, 0, 1, 1])),
    "pointwise": ((1, 32, 7, 7), (48, 32, 1, 1), {}),
    "grouped": ((1, 12, 8, 8), (18, 4, 3, 3), dict(group=3, pads=[1, 1, 1, 1])),
    "depthwise_s2": ((1, 24, 15, 15), (24, 1, 3, 3), dict(group=24, strides=[2, 2], pads=[1, 1, 1, 1])),
    "same_upper": ((1, 4, 9, 8), (6, 4, 4, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same_lower": ((1, 4, 9, 8), (6, 4, 4, 3), dict(auto_pad="SAME_LOWER", strides=[2, 1])),
    "valid": ((1, 4, 9, 8), (6, 4, 4, 3), dict(auto_pad="VALID", strides=[1, 2])),
    "conv1d": ((2, 6, 40), (10, 3, 5), dict(group=2, strides=[3], dilations=[2], pads=[3, 1])),
    "conv3d": ((1, 3, 5, 6, 7), (4, 3, 2, 3, 3), dict(pads=[1, 1, 0, 0, 1, 1])),
}
DTYPES = [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)]


def rand(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


def qlinear_conv_case(rng, geometry, xdt, wdt, per_channel=True, bias=True, w_const=True, nhwc=False):
    xs, ws, attrs = GEOMETRIES[geometry]
    x, w = rand(rng, xdt, xs), rand(rng, wdt, ws)
    m = ws[0]
    sx, zx = np.float32(0.05), rand(rng, xdt, ())
    sw = rng.uniform(0.002, 0.02, m if per_channel else ()).astype(np.float32)
    zw = rand(rng, wdt, m if per_channel else ()) if wdt == np.uint8 else np.zeros(sw.shape, wdt)
    b = rng.integers(-2000, 2000, m).astype(np.int32) if bias else None
    acc = R.conv_integer(x, w, zx, np.broadcast_to(zw, (m,)), bias=b, **attrs).astype(np.float64)
    sy = np.float32(max(1e-3, np.abs(acc).max() * 0.05 * float(sw.max()) / 180))  # saturates
    zy = np.array(100 if xdt == np.uint8 else -3, xdt)
    inits = dict(x_scale=np.array(sx), x_zp=zx, w_scale=sw, w_zp=zw, y_scale=np.array(sy), y_zp=zy)
    if w_const:
        inits["w"] = w
    if b is not None:
        inits["B"] = b
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if nhwc else x
    feeds = {"x": xin} if w_const else {"x": xin, "w": w}
    vals = {**inits, **feeds}
    names = ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"] + (["B"] if b is not None else [])
    node_attrs = dict(attrs, channels_last=1) if nhwc else attrs
    model = single_node_model("QLinearConv", [(k, vals[k]) for k in names], inits, xdt, attrs=node_attrs,
                              domain="com.microsoft" if nhwc else "")
    want = R.qlinear_conv(xin, sx, zx, w, sw, zw, sy, zy, bias=b, channels_last=nhwc, **attrs)
    mult = ((sx * np.broadcast_to(sw, (m,))).astype(np.float32) / sy).astype(np.float32)
    pre = acc.astype(np.float32) * mult.reshape((m,) + (1,) * (x.ndim - 2))  # before rounding (NCHW)
    return model, feeds, want, pre


def ran_on_qie(keys):
    st = qie_ep.stats()
    return any(k in st for k in keys)


def assert_onnx_ref_qlinear(model, feeds, want, pre):
    """onnx.reference's QLinearConv equals qie except within 1e-3 of a rounding tie, by at most 1."""
    got = ReferenceEvaluator(model).run(None, feeds)[0]
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max(initial=0) <= 1
    frac = np.abs(pre - np.floor(pre) - 0.5)
    assert (frac[diff > 0] < 1e-3).all(), f"onnx.reference differs away from a tie: {frac[diff > 0].max()}"


def check(model, feeds, want, keys, builtin=True, onnx_ref=False):
    for level in LEVELS:
        qie_ep.reset_stats()
        got = run(model, feeds, qie=True, level=level)[0]
        assert_exact(got, want, f"(qie, level={level})")
        assert ran_on_qie(keys), f"{keys} did not run on qie at level {level}: {qie_ep.stats()}"
        if builtin and COMPARE_BUILTIN:
            assert_exact(run(model, feeds, qie=False, level=level)[0], want, f"(ORT built-in, level={level})")
    if onnx_ref:
        assert_exact(ReferenceEvaluator(model).run(None, feeds)[0], want, "(onnx.reference)")


@pytest.mark.parametrize("xdt,wdt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_qlinear_conv(geometry, xdt, wdt):
    rng = np.random.default_rng(len(geometry) * 31 + np.dtype(xdt).num * 7 + np.dtype(wdt).num)
    model, feeds, want, pre = qlinear_conv_case(rng, geometry, xdt, wdt)
    has_builtin = not (xdt == np.int8 and wdt == np.uint8)
    check(model, feeds, want, QLC, builtin=has_builtin)
    if len(GEOMETRIES[geometry][0]) == 4:  # onnx.reference's QLinearConv expands w_scale for 2-D only
        assert_onnx_ref_qlinear(model, feeds, want, pre)
    if not has_builtin:
        with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
            run(model, feeds, qie=False)


@pytest.mark.parametrize("per_channel,bias", [(False, False), (False, True), (True, False)])
def test_qlinear_conv_per_tensor_and_no_bias(per_channel, bias):
    rng = np.random.default_rng(5)
    model, feeds, want, pre = qlinear_conv_case(rng, "3x3_pad1", np.uint8, np.int8, per_channel=per_channel, bias=bias)
    check(model, feeds, want, QLC)
    assert_onnx_ref_qlinear(model, feeds, want, pre)


@pytest.mark.parametrize("geometry", ["3x3_pad1", "depthwise_s2", "pointwise"])
def test_qlinear_conv_runtime_weights(geometry):
    """W fed at run time (not an initializer): packed per call instead of at kernel creation."""
    rng = np.random.default_rng(6)
    model, feeds, want, _ = qlinear_conv_case(rng, geometry, np.uint8, np.uint8, w_const=False)
    check(model, feeds, want, QLC)


@pytest.mark.parametrize("xdt,wdt", DTYPES[:3], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("geometry", ["3x3_pad1", "depthwise_s2", "pointwise", "same_upper"])
def test_qlinear_conv_nhwc_contrib(geometry, xdt, wdt):
    """com.microsoft QLinearConv with channels_last=1, as ORT's NhwcTransformer emits it."""
    rng = np.random.default_rng(8)
    model, feeds, want, _ = qlinear_conv_case(rng, geometry, xdt, wdt, nhwc=True)
    check(model, feeds, want, [("com.microsoft", "QLinearConv")])


@pytest.mark.parametrize("xdt,wdt", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("geometry", ["3x3_pad1", "5x3_stride_dil", "grouped", "depthwise_s2", "conv1d", "conv3d"])
def test_conv_integer(geometry, xdt, wdt):
    rng = np.random.default_rng(9)
    xs, ws, attrs = GEOMETRIES[geometry]
    x, w = rand(rng, xdt, xs), rand(rng, wdt, ws)
    zx, zw = rand(rng, xdt, ()), rand(rng, wdt, ())
    inits = {"w": w, "x_zp": zx, "w_zp": zw}
    model = single_node_model("ConvInteger", [("x", x), ("w", w), ("x_zp", zx), ("w_zp", zw)], inits, np.int32, attrs=attrs)
    want = R.conv_integer(x, w, zx, zw, **attrs)
    check(model, {"x": x}, want, [("", "ConvInteger")], onnx_ref=True)


@pytest.mark.parametrize("isa", qie_ep.ISAS)
@pytest.mark.parametrize("xdt,wdt", DTYPES, ids=lambda d: np.dtype(d).name)
def test_conv_integer_pointwise_nchw(isa, xdt, wdt, restore_isa):
    """Pointwise ConvInteger runs as NCHW GEMMs (weights as A, each image's channels x pixels packed as B): int32
    written in NCHW without transposes. Exact on every ISA path, per-tensor and per-channel weight zero points,
    groups, batches, channel counts off the K-group, pixels across several panels, 1 and 2 threads."""
    if isa not in qie_ep.supported_isas():
        pytest.skip(f"{isa} not on this CPU")
    qie_ep.force_isa(isa)
    rng = np.random.default_rng(13)
    for xs, ws, group, per_channel in [((1, 32, 7, 7), (48, 32, 1, 1), 1, False), ((2, 13, 9, 11), (21, 13, 1, 1), 1, True),
                                       ((3, 12, 5, 20), (18, 4, 1, 1), 3, True), ((1, 6, 1, 1), (5, 6, 1, 1), 1, False)]:
        x, w = rand(rng, xdt, xs), rand(rng, wdt, ws)
        zx, zw = rand(rng, xdt, ()), rand(rng, wdt, ws[0] if per_channel else ())
        model = single_node_model("ConvInteger", [("x", x), ("w", w), ("x_zp", zx), ("w_zp", zw)],
                                  {"w": w, "x_zp": zx, "w_zp": zw}, np.int32, attrs=dict(group=group))
        want = R.conv_integer(x, w, zx, zw, group=group)
        for threads in (1, 2):
            qie_ep.reset_stats()
            assert_exact(run(model, {"x": x}, qie=True, threads=threads)[0], want, f"{isa} {xs} {ws} group={group}")
            assert qie_ep.stats()[("", "ConvInteger")] == {isa: 1}


@pytest.mark.parametrize("isa", qie_ep.ISAS)
def test_conv_integer_pointwise_nchw_shapes_change(isa, restore_isa):
    """The NCHW pointwise path keeps its packed input between runs: one session fed images whose pixel counts
    (full and short panels) and batch sizes change, smaller after larger, stays exact on every run (no stale
    bytes of an earlier, larger input in the padding of channels off the K-group or of a short last panel)."""
    if isa not in qie_ep.supported_isas():
        pytest.skip(f"{isa} not on this CPU")
    qie_ep.force_isa(isa)
    rng = np.random.default_rng(21)
    for c in (30, 32):  # off and on the K-group of four
        w, zx, zw = rand(rng, np.uint8, (7, c, 1, 1)), np.array(131, np.uint8), np.array(120, np.uint8)
        model = single_node_model("ConvInteger", [("x", np.zeros((1, c, 1, 1), np.uint8)), ("w", w), ("x_zp", zx),
                                                  ("w_zp", zw)], {"w": w, "x_zp": zx, "w_zp": zw}, np.int32)
        model.graph.input[0].type.tensor_type.shape.Clear()  # rank only: any batch and size
        for d in ("n", "c", "h", "w"):
            model.graph.input[0].type.tensor_type.shape.dim.add().dim_param = d
        s = session(model, qie=True)
        for shape in [(2, c, 13, 11), (1, c, 3, 5), (1, c, 10, 10), (3, c, 2, 1), (1, c, 12, 12), (1, c, 1, 1)]:
            x = rand(rng, np.uint8, shape)
            assert_exact(s.run(None, {"x": x})[0], R.conv_integer(x, w, zx, zw), f"{isa} C={c} {shape}")


def test_conv_integer_per_channel_and_defaults():
    rng = np.random.default_rng(10)
    x, w = rand(rng, np.uint8, (1, 6, 7, 7)), rand(rng, np.uint8, (5, 6, 3, 3))
    zw = rand(rng, np.uint8, 5)
    model = single_node_model("ConvInteger", [("x", x), ("w", w), ("", None), ("w_zp", zw)], {"w": w, "w_zp": zw},
                              np.int32)
    want = R.conv_integer(x, w, None, zw)
    check(model, {"x": x}, want, [("", "ConvInteger")], builtin=False, onnx_ref=True)
    with pytest.raises(Exception, match="Non per-tensor"):
        run(model, {"x": x}, qie=False)
    plain = single_node_model("ConvInteger", [("x", x), ("w", w)], {"w": w}, np.int32, attrs=dict(strides=[2, 2]))
    check(plain, {"x": x}, R.conv_integer(x, w, strides=[2, 2]), [("", "ConvInteger")], onnx_ref=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_qlinear_conv_threads_and_batch(threads):
    rng = np.random.default_rng(12)
    model, feeds, want, _ = qlinear_conv_case(rng, "5x3_stride_dil", np.uint8, np.int8)
    for level in ("disable", "all"):
        assert_exact(run(model, feeds, qie=True, level=level, threads=threads)[0], want, f"threads={threads}")
