"""Registering qie never breaks, corrupts or changes a model that plain ONNX Runtime runs.

Each test here reproduces a failure once found in the shipped library (heap overflow from a guessed
output dtype, float bits returned as integers, out-of-range conv geometry, buffer reuse from shared
symbols, unknown ranks inferred as scalars, wrong-typed attributes taken as defaults, double
registration, torn stats, NaN quantized, QGemm's y_scale alone) and checks the fix against plain ORT
at every optimization level, with ORT's memory arena off so an overflow would not hide in slack.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qie_ep
import helpers
from helpers import OPT_LEVELS, assert_exact
from qie_ep.session import options, session as qie_session

INT64_MAX = np.iinfo(np.int64).max


def session(model, qie, level="all"):
    return helpers.session(model, qie, level, arena=False)


def make_model(nodes, inputs, outputs, inits=(), ms=False, opset=21):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [h.make_opsetid("", opset)] + ([h.make_opsetid("com.microsoft", 1)] if ms else [])
    m = h.make_model(graph, opset_imports=opsets)
    m.ir_version = 10
    return m


def untyped(name):
    """A graph output with no type or shape: what ORT infers for it is what the test sees."""
    return onnx.ValueInfoProto(name=name)


def c(name, value):
    return nh.from_array(np.asarray(value), name)


def assert_same_as_ort(model, feeds, levels=tuple(OPT_LEVELS)):
    """ORT + qie gives plain ORT's outputs (values, dtypes, shapes) at every level."""
    for level in levels:
        want = session(model, False, level).run(None, feeds)
        got = session(model, True, level).run(None, feeds)
        for g, w in zip(got, want):
            assert_exact(g, w, f"(level {level})")


def unknown_rank(x_name, out_name):
    """Reshape whose target shape is a runtime tensor of unknown length: the result has unknown rank."""
    return h.make_node("Reshape", [x_name, x_name + "_shape"], [out_name]), \
        h.make_tensor_value_info(x_name + "_shape", T.INT64, ["r"])


RNG = np.random.default_rng(7)


def u8(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def s8(*shape):
    return RNG.integers(-128, 128, shape, dtype=np.int8)


# ---- 1, 2: output dtypes never guessed from the last input --------------------------------------------

def matmul_family_models():
    a_in = h.make_tensor_value_info("x", T.UINT8, [4, 8])
    reshape, shp = unknown_rank("x", "a")
    b, sa, sb, zb = c("b", s8(8, 5)), c("sa", np.float32(0.05)), c("sb", np.float32(0.02)), c("zb", np.int8(0))
    za = c("za", np.uint8(7))
    yield "MatMulInteger", make_model([reshape, h.make_node("MatMulInteger", ["a", "b", "", "zb"], ["y"])],
                                      [a_in, shp], [untyped("y")], [b, zb])
    yield "MatMulIntegerToFloat", make_model(
        [reshape, h.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb", "", "zb"], ["y"], domain="com.microsoft")],
        [a_in, shp], [untyped("y")], [b, sa, sb, zb], ms=True)
    yield "QGemm-float", make_model(
        [reshape, h.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb"], ["y"], domain="com.microsoft")],
        [a_in, shp], [untyped("y")], [b, sa, sb, zb, za], ms=True)
    # 2: float output and an int32 C: the output was typed int32 and the float bits returned as integers
    yield "QGemm-float-C", make_model(
        [reshape, h.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb", "cc"], ["y"], domain="com.microsoft")],
        [a_in, shp], [untyped("y")], [b, sa, sb, zb, za, c("cc", np.arange(5, dtype=np.int32) * 100)], ms=True)
    yield "QGemm-u8", make_model(
        [reshape, h.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb", "cc", "sy", "zy"], ["y"], domain="com.microsoft")],
        [a_in, shp], [untyped("y")],
        [b, sa, sb, zb, za, c("cc", np.arange(5, dtype=np.int32)), c("sy", np.float32(0.3)), c("zy", np.uint8(9))], ms=True)


@pytest.mark.parametrize("name,model", list(matmul_family_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_unknown_rank_input_keeps_output_dtype(name, model):
    feeds = {"x": u8(4, 8), "x_shape": np.array([4, 8], np.int64)}
    assert_same_as_ort(model, feeds)


def test_dynamic_quantize_matmul_unknown_rank():
    reshape, shp = unknown_rank("x", "a")
    model = make_model([reshape, h.make_node("DynamicQuantizeMatMul", ["a", "b", "sb", "zb"], ["y"], domain="com.microsoft")],
                       [h.make_tensor_value_info("x", T.FLOAT, [3, 8]), shp], [untyped("y")],
                       [c("b", s8(8, 6)), c("sb", np.float32(0.02)), c("zb", np.int8(0))], ms=True)
    feeds = {"x": RNG.standard_normal((3, 8)).astype(np.float32), "x_shape": np.array([3, 8], np.int64)}
    assert_same_as_ort(model, feeds)


def ocr_like_model():
    """The shape of the third-party OCR model that aborted the process: ConvInteger on a dynamically
    quantized image, then a MatMulInteger whose A comes out of a Reshape with a runtime shape."""
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["img"], ["q", "qs", "qz"]),
        h.make_node("ConvInteger", ["q", "w", "qz", "wz"], ["acc"], pads=[1, 1, 1, 1]),
        h.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
        h.make_node("Reshape", ["accf", "target"], ["flat"]),
        h.make_node("DynamicQuantizeLinear", ["flat"], ["fq", "fs", "fz"]),
        h.make_node("MatMulInteger", ["fq", "b", "fz"], ["y"]),
    ]
    inits = [c("w", s8(4, 2, 3, 3)), c("wz", np.int8(0)), c("b", s8(4 * 6 * 6, 10))]
    return make_model(nodes, [h.make_tensor_value_info("img", T.FLOAT, ["n", 2, 6, 6]),
                              h.make_tensor_value_info("target", T.INT64, ["r"])], [untyped("y")], inits)


def test_ocr_like_model_with_runtime_reshape():
    model = ocr_like_model()
    assert_same_as_ort(model, {"img": RNG.standard_normal((3, 2, 6, 6)).astype(np.float32),
                               "target": np.array([3, -1], np.int64)})


# ---- 3: conv geometry arithmetic that overflows is rejected --------------------------------------------

@pytest.mark.parametrize("attrs", [dict(dilations=[INT64_MAX, 1]), dict(pads=[INT64_MAX, 0, INT64_MAX, 0]),
                                   dict(strides=[INT64_MAX, 1], pads=[INT64_MAX, 0, 0, 0]),
                                   dict(dilations=[1 << 62, 1 << 62]), dict(group=1 << 62)],
                         ids=["dilation", "pads", "stride+pad", "dilation62", "group"])
def test_conv_geometry_overflow_is_an_error(attrs):
    x = h.make_tensor_value_info("x", T.UINT8, [1, 4, 64, 64])
    node = h.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"], name="evil_conv",
                       group=attrs.pop("group", 4), **attrs)
    inits = [c("sx", np.float32(0.1)), c("zx", np.uint8(3)), c("w", s8(4, 1, 3, 3)), c("sw", np.float32(0.1)),
             c("zw", np.int8(0)), c("sy", np.float32(0.2)), c("zy", np.uint8(5))]
    model = make_model([node], [x], [untyped("y")], inits)
    feeds = {"x": u8(1, 4, 64, 64)}
    with pytest.raises(Exception):  # noqa: B017  (plain ORT rejects these too, with its own exception types)
        session(model, False).run(None, feeds)
    for level in ("disable", "all"):
        with pytest.raises(Exception) as ei:
            session(model, True, level).run(None, feeds)
        assert "evil_conv" in str(ei.value) or "QLinearConv" in str(ei.value), str(ei.value)


# ---- 4: unknown dims get symbols of their own ----------------------------------------------------------

def test_two_matmulintegers_with_unnamed_unknown_dims():
    """Equal invented symbols made ORT's planner reuse a smaller buffer ("Shape mismatch ... re-use")."""
    nodes = []
    inputs = []
    for i, (rows, k) in enumerate([(2, 8), (9, 8)]):
        reshape, shp = unknown_rank(f"x{i}", f"a{i}")
        nodes += [reshape, h.make_node("MatMulInteger", [f"a{i}", f"b{i}"], [f"y{i}"]),
                  h.make_node("Cast", [f"y{i}"], [f"f{i}"], to=T.FLOAT),
                  h.make_node("ReduceSum", [f"f{i}"], [f"r{i}"], keepdims=0)]
        inputs += [h.make_tensor_value_info(f"x{i}", T.UINT8, [rows, k]), shp]
    nodes.append(h.make_node("Add", ["r0", "r1"], ["out"]))
    model = make_model(nodes, inputs, [untyped("out"), untyped("y0"), untyped("y1")],
                       [c("b0", s8(8, 16)), c("b1", s8(8, 4))], opset=13)
    feeds = {"x0": u8(2, 8), "x0_shape": np.array([2, 8], np.int64),
             "x1": u8(9, 8), "x1_shape": np.array([9, 8], np.int64)}
    assert_same_as_ort(model, feeds)


def test_conv_symbolic_hw_stride_resize_conv():
    def qconv(x, y, w, stride):
        return h.make_node("QLinearConv", [x, "sx", "zx", w, "sw", "zw", "sy", "zy"], [y], pads=[1, 1, 1, 1],
                           strides=[stride, stride])
    nodes = [qconv("x", "c1", "w1", 2),
             h.make_node("DequantizeLinear", ["c1", "sy", "zy"], ["d1"]),
             h.make_node("Resize", ["d1", "", "scales"], ["r1"], mode="nearest"),
             h.make_node("QuantizeLinear", ["r1", "sx", "zx"], ["q1"]),
             qconv("q1", "y", "w2", 1)]
    inits = [c("sx", np.float32(0.1)), c("zx", np.uint8(3)), c("sw", np.float32(0.05)), c("zw", np.int8(0)),
             c("sy", np.float32(0.2)), c("zy", np.uint8(5)), c("w1", s8(4, 3, 3, 3)), c("w2", s8(4, 4, 3, 3)),
             c("scales", np.array([1, 1, 2, 2], np.float32))]
    model = make_model(nodes, [h.make_tensor_value_info("x", T.UINT8, [1, 3, "h", "w"])], [untyped("y")], inits)
    for hw in [(9, 7), (16, 16), (5, 11)]:
        assert_same_as_ort(model, {"x": u8(1, 3, *hw)})


# ---- 5: unknown rank stays unknown ------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["QLinearConv", "ConvInteger"])
def test_conv_unknown_rank_shape_is_not_folded_to_scalar(op):
    reshape, shp = unknown_rank("x", "xr")
    if op == "QLinearConv":
        conv = h.make_node(op, ["xr", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"])
        inits = [c("sx", np.float32(0.1)), c("zx", np.uint8(3)), c("sw", np.float32(0.1)), c("zw", np.int8(0)),
                 c("sy", np.float32(0.2)), c("zy", np.uint8(5))]
    else:
        conv = h.make_node(op, ["xr", "w"], ["y"])
        inits = []
    model = make_model([reshape, conv, h.make_node("Shape", ["y"], ["shape"])],
                       [h.make_tensor_value_info("x", T.UINT8, [1, 2, 7, 7]), shp], [untyped("shape"), untyped("y")],
                       inits + [c("w", s8(4, 2, 3, 3))])
    feeds = {"x": u8(1, 2, 7, 7), "x_shape": np.array([1, 2, 7, 7], np.int64)}
    assert_same_as_ort(model, feeds)
    got = session(model, True, "basic").run(None, feeds)[0]
    assert list(got) == [1, 4, 5, 5]


# ---- 6: wrong-typed attributes are errors, never defaults ---------------------------------------------

def qgemm_model(**attrs):
    node = h.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb"], ["y"], domain="com.microsoft", name="g0", **attrs)
    return make_model([node], [h.make_tensor_value_info("a", T.UINT8, [3, 4])], [untyped("y")],
                      [c("sa", np.float32(0.1)), c("za", np.uint8(1)), c("b", s8(4, 4)), c("sb", np.float32(0.1)),
                       c("zb", np.int8(0))], ms=True)


def qconv_model(**attrs):
    node = h.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"], name="c0", **attrs)
    inits = [c("sx", np.float32(0.1)), c("zx", np.uint8(3)), c("w", s8(4, 2, 3, 3)), c("sw", np.float32(0.1)),
             c("zw", np.int8(0)), c("sy", np.float32(0.2)), c("zy", np.uint8(5))]
    return make_model([node], [h.make_tensor_value_info("x", T.UINT8, [1, 2, 8, 8])], [untyped("y")], inits)


@pytest.mark.parametrize("model,attr", [
    (qgemm_model(transB=1.0), "transB"),
    (qgemm_model(alpha=2), "alpha"),
    (qconv_model(group="1"), "group"),
    (qconv_model(pads=[1.0, 1.0, 1.0, 1.0]), "pads"),
    (qconv_model(strides=2), "strides"),
], ids=["qgemm-transB-float", "qgemm-alpha-int", "conv-group-string", "conv-pads-floats", "conv-strides-int"])
def test_wrong_typed_attribute_is_an_error(model, attr):
    feeds = {i.name: u8(*[d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input}
    for level in ("disable", "all"):
        with pytest.raises(Exception) as ei:
            session(model, True, level).run(None, feeds)
        assert f"attribute '{attr}'" in str(ei.value), str(ei.value)


def test_qgemm_transB_int_is_honoured():
    model = qgemm_model(transB=1)
    assert_same_as_ort(model, {"a": u8(3, 4)})


# ---- 7: registration ---------------------------------------------------------------------------------------

def test_register_twice_on_one_options():
    model = qgemm_model()
    so = options(qie=True, ep=False)
    qie_ep.register(so, ep=False)
    qie_ep.reset_stats()
    for _ in range(2):  # two sessions from the same options
        qie_session(model, so).run(None, {"a": u8(3, 4)})
    assert sum(qie_ep.stats()[("com.microsoft", "QGemm")].values()) == 2


class _ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.c_void_p)]


def test_register_reports_a_runtime_too_old():
    """An ORT without qie's API version gets an error status, not a silent success."""
    messages = []
    create_status_t = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p)
    create_status = create_status_t(lambda code, msg: messages.append((code, msg.decode())) or 0xBAD)
    api1 = (ctypes.c_void_p * 8)(ctypes.cast(create_status, ctypes.c_void_p).value)
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint32)  # integer returns: ctypes keeps no objects alive
    get_api = get_api_t(lambda v: ctypes.addressof(api1) if v == 1 else 0)
    version_text = ctypes.create_string_buffer(b"1.16.0")
    version_t = ctypes.CFUNCTYPE(ctypes.c_size_t)
    version = version_t(lambda: ctypes.addressof(version_text))
    base = _ApiBase(ctypes.cast(get_api, ctypes.c_void_p).value, ctypes.cast(version, ctypes.c_void_p).value)
    lib = ctypes.CDLL(qie_ep.library_path())
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = lib.RegisterCustomOps(None, ctypes.addressof(base))
    assert status == 0xBAD
    assert len(messages) == 1 and "1.16.0" in messages[0][1] and "API version" in messages[0][1]


# ---- 8: stats under concurrency ----------------------------------------------------------------------------

def test_stats_polled_while_sessions_run():
    model = qgemm_model()
    sess = session(model, True)
    stop = threading.Event()
    qie_ep.reset_stats()

    def work():
        feeds = {"a": u8(3, 4)}
        for _ in range(3000):
            sess.run(None, feeds)
        stop.set()

    t = threading.Thread(target=work)
    t.start()
    last = 0
    polls = 0
    while not stop.is_set() or polls == 0:
        n = sum(qie_ep.stats().get(("com.microsoft", "QGemm"), {}).values())
        assert n >= last, f"counter went back from {last} to {n}"
        last = n
        polls += 1
    t.join()
    assert sum(qie_ep.stats()[("com.microsoft", "QGemm")].values()) == 3000


def test_stats_text_that_grows_between_calls_is_read_whole():
    """The reader retries when the text outgrew its buffer (never cuts a line)."""
    text = b"".join(b"d\top%d\tavx2\t%d\n" % (i, 10 ** 12 + i) for i in range(400))
    calls = []

    def fake(buf, cap):  # grows by one line on every call; writes as the C function does
        calls.append(cap)
        full = text + b"d\textra\tavx2\t%d\n" % len(calls)
        n = min(cap - 1, len(full))
        ctypes.memmove(buf, full, n)
        ctypes.memset(ctypes.addressof(buf) + n, 0, 1)
        return len(full)

    lines = qie_ep._read_lines(fake)
    assert len(calls) >= 2
    assert all(len(line.split("\t")) == 4 for line in lines) and len(lines) == 401


# ---- 9: non-finite input to DynamicQuantizeMatMul ---------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 4])
def test_dynamic_quantize_matmul_non_finite_is_an_error(bad, where):
    """ORT maps a NaN to the zero point when it is not first, an all-NaN output when it is; qie errors."""
    model = make_model([h.make_node("DynamicQuantizeMatMul", ["a", "b", "sb"], ["y"], domain="com.microsoft", name="dq0")],
                       [h.make_tensor_value_info("a", T.FLOAT, [2, 3])], [untyped("y")],
                       [c("b", s8(3, 2)), c("sb", np.float32(0.1))], ms=True)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    a.flat[where] = bad
    with pytest.raises(Exception) as ei:
        session(model, True).run(None, {"a": a})
    assert "non-finite" in str(ei.value) and "dq0" in str(ei.value)


# ---- 10: QGemm with y_scale but no y_zero_point -------------------------------------------------------------

def test_qgemm_y_scale_without_zero_point_is_float_output():
    node = h.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb", "cc", "sy"], ["y"], domain="com.microsoft", alpha=0.75)
    model = make_model([node], [h.make_tensor_value_info("a", T.UINT8, [5, 8])], [untyped("y")],
                       [c("sa", np.float32(0.1)), c("za", np.uint8(3)), c("b", s8(8, 6)), c("sb", np.float32(0.02)),
                        c("zb", np.int8(0)), c("cc", np.arange(6, dtype=np.int32)), c("sy", np.float32(0.3))], ms=True)
    assert_same_as_ort(model, {"a": u8(5, 8)})


# ---- known limitation, owned by the plugin EP (issue 13) ---------------------------------------------------

def _erf_gelu_model():
    """An FP32 model ORT's GeluFusion turns into com.microsoft:Gelu at ORT_ENABLE_EXTENDED and above."""
    inits = [nh.from_array(np.array(v, np.float32), n) for v, n in ((1.4142135, "s2"), (1.0, "one"), (0.5, "half"))]
    nodes = [h.make_node("Div", ["x", "s2"], ["d"]), h.make_node("Erf", ["d"], ["e"]), h.make_node("Add", ["e", "one"], ["a"]),
             h.make_node("Mul", ["x", "a"], ["m"]), h.make_node("Mul", ["m", "half"], ["y"])]
    g = h.make_graph(nodes, "gelu", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_contrib_fusions_load_with_the_one_line():
    """ORT registers a custom com.microsoft domain at opset 1000 (onnxruntime's CreateCustomRegistry), and a
    model that does not import com.microsoft then gets com.microsoft:1000, at which the nodes ORT's own
    fusions create (Gelu, QLinearSoftmax, ...) no longer resolve. ``qie_ep.register(so)`` with the EP adds no
    com.microsoft custom op, so this FP32 model loads and runs at every level, with ORT's results. Without the
    EP (custom-op library alone, ORT < 1.27) the limitation stays: asserted, with the with_contrib_opset fix."""
    model = _erf_gelu_model()
    x = {"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)}
    for level in ("disable", "basic", "extended", "all"):
        want = helpers.session(model, qie=False, level=level).run(None, x)[0]
        if qie_ep.ep_available():
            assert_exact(helpers.session(model, qie=True, level=level, ep=None).run(None, x)[0], want, level)
    want = helpers.session(model, qie=False).run(None, x)[0]
    with pytest.raises(Exception, match=r"com.microsoft:Gelu\(-1\) is not a registered function/op"):
        helpers.session(model, qie=True, quiet=True, ep=False)
    assert_exact(helpers.session(qie_ep.with_contrib_opset(model), qie=True).run(None, x)[0], want, "with_contrib_opset")
