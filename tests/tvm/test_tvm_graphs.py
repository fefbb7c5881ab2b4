"""TVM graphs: ONNX models compiled with ``qie_ep.tvm.pipeline`` against ORT's built-in kernels.

Integer outputs must equal ORT's (atol=0) and the compiled module must call qie's kernels (counted);
float outputs are bounded where the two runtimes round differently (each bound says why).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_helpers import HOST, compile_model, qtvm, tvm, tvm_isa_params
from helpers import run, single_node_model

RNG = np.random.default_rng(2024)


def q(dtype, shape, rng=RNG):
    lo, hi = (0, 256) if dtype == np.uint8 else (-128, 128)
    return rng.integers(lo, hi, shape).astype(dtype)


def ort_ref(model, feeds):
    return run(model, feeds, qie=False, level="disable")


def both(model, feeds, expect_kernels):
    fn, kernels = compile_model(model)
    assert len(kernels) == expect_kernels, kernels
    return fn(feeds), ort_ref(model, feeds), kernels


def qlinear_matmul_model(adt, bdt, k, n, per_column, batch_dims=("batch", 5)):
    b = q(bdt, (k, n))
    sb = RNG.uniform(0.002, 0.01, n if per_column else ()).astype(np.float32)
    zb = (q(bdt, (n,)) if per_column else q(bdt, ())) if bdt == np.uint8 else np.zeros(n if per_column else (), bdt)
    inits = {"a_scale": np.float32(0.03), "a_zp": np.asarray(q(adt, ()), adt), "b": b, "b_scale": sb,
             "b_zp": zb, "y_scale": np.float32(0.4), "y_zp": np.asarray(q(adt, ()), adt)}
    a = np.zeros((1, k), adt)
    m = single_node_model("QLinearMatMul", [("a", a), ("a_scale", 0), ("a_zp", 0), ("b", 0), ("b_scale", 0),
                                            ("b_zp", 0), ("y_scale", 0), ("y_zp", 0)], inits, adt)
    m.graph.input[0].type.tensor_type.shape.CopyFrom(helper.make_tensor_type_proto(
        helper.np_dtype_to_tensor_dtype(np.dtype(adt)), [*batch_dims, k]).tensor_type.shape)
    return m


@pytest.mark.parametrize("adt,bdt", [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)],
                         ids=["u8s8", "u8u8", "s8s8"])
@pytest.mark.parametrize("per_column", [False, True])
def test_qlinear_matmul(adt, bdt, per_column):
    k, n = 96, 72
    model = qlinear_matmul_model(adt, bdt, k, n, per_column)
    fn, kernels = compile_model(model)
    assert kernels and kernels[0].startswith("qie_matmul_")
    for batch in (1, 3):   # one compiled module, symbolic batch
        a = q(adt, (batch, 5, k))
        got, = fn({"a": a})
        want, = ort_ref(model, {"a": a})
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", tvm_isa_params())
def test_matmul_integer_every_isa(isa, monkeypatch):
    monkeypatch.setenv("QIE_TVM_ISA", isa)
    k, n = 40, 24
    b, zb = q(np.uint8, (k, n)), q(np.uint8, (n,))
    model = single_node_model("MatMulInteger", [("a", np.zeros((6, k), np.uint8)), ("b", 0), ("a_zp", 0), ("b_zp", 0)],
                              {"b": b, "a_zp": np.uint8(9), "b_zp": zb}, np.int32, opset=13)
    a = q(np.uint8, (6, k))
    (got,), (want,), kernels = both(model, {"a": a}, 1)
    assert kernels[0].endswith("__" + isa)
    np.testing.assert_array_equal(got, want)


def qlinear_conv_model(c, oc, hw, kernel, group, strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1)):
    w = q(np.int8, (oc, c // group, *kernel))
    inits = {"x_scale": np.float32(0.02), "x_zp": np.uint8(120), "w": w,
             "w_scale": RNG.uniform(0.002, 0.02, oc).astype(np.float32), "w_zp": np.zeros(oc, np.int8),
             "y_scale": np.float32(0.05), "y_zp": np.uint8(100), "B": RNG.integers(-2000, 2000, oc).astype(np.int32)}
    x = np.zeros((1, c, *hw), np.uint8)
    return single_node_model("QLinearConv", [("x", x), ("x_scale", 0), ("x_zp", 0), ("w", 0), ("w_scale", 0),
                                             ("w_zp", 0), ("y_scale", 0), ("y_zp", 0), ("B", 0)], inits, np.uint8,
                             attrs=dict(group=group, strides=list(strides), pads=list(pads), dilations=list(dil),
                                        kernel_shape=list(kernel)))


@pytest.mark.parametrize("geo", [(3, 16, (17, 15), (3, 3), 1, (2, 2)), (16, 24, (9, 9), (1, 1), 1, (1, 1)),
                                 (16, 16, (12, 10), (3, 3), 16, (1, 1)), (8, 8, (9, 9), (5, 5), 8, (2, 2))],
                         ids=["stem3x3s2", "pointwise", "depthwise3x3", "depthwise5x5s2"])
def test_qlinear_conv(geo):
    c, oc, hw, kernel, group, strides = geo
    pads = [kernel[0] // 2] * 4
    model = qlinear_conv_model(c, oc, hw, kernel, group, strides, pads)
    x = q(np.uint8, (1, c, *hw))
    (got,), (want,), kernels = both(model, {"x": x}, 1)
    want_kernel = ("qie_dwconv_u8s8_u8_",) if group > 1 else ("qie_conv_u8s8_u8_", "qie_pwconv_u8s8_u8_")
    assert kernels[0].startswith(want_kernel), kernels  # bias fused
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("geo", [(16, 24, (9, 9), (1, 1), 4, (1, 1)), (12, 12, (8, 7), (3, 3), 3, (2, 2)),
                                 (16, 32, (6, 6), (1, 1), 8, (1, 1))],
                         ids=["grouped1x1_g4", "grouped3x3s2_g3", "grouped_g8_stays_tvm"])
@pytest.mark.parametrize("w_zp", [0, 5])
def test_grouped_qlinear_conv(geo, w_zp):
    """Grouped convolutions that are not depthwise (ShuffleNet's): up to 4 groups one dense qie kernel whose weights
    outside the groups' blocks are the output channel's zero point (``w - zw`` = 0 there: per-channel zero points
    5 + channel % 3 as well); more groups are left to TVM (still ORT's results)."""
    c, oc, hw, kernel, group, strides = geo
    model = qlinear_conv_model(c, oc, hw, kernel, group, strides, [kernel[0] // 2] * 4)
    if w_zp:
        zps = (w_zp + np.arange(oc) % 3).astype(np.int8)
        for t in model.graph.initializer:
            if t.name == "w_zp":
                t.CopyFrom(numpy_helper.from_array(zps, "w_zp"))
    x = q(np.uint8, (1, c, *hw))
    (got,), (want,), kernels = both(model, {"x": x}, 1 if group <= 4 else 0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("geo", [(3, 16, 17, (3, 3), 1, (2, 2)), (16, 24, 9, (1, 1), 1, (1, 1)),
                                 (8, 12, 6, (3, 3), 1, (1, 2)), (16, 16, 7, (3, 3), 16, (1, 1)),
                                 (8, 8, 9, (5, 5), 8, (2, 2)), (8, 8, 6, (3, 3), 8, (1, 3))],
                         ids=["stem3x3s2", "pointwise", "3x3_stride_1x2", "depthwise3x3", "depthwise5x5s2",
                              "depthwise_stride_1x3"])
def test_qlinear_conv_with_a_symbolic_width(geo):
    """A text line's width (and a batch) symbolic: one kernel (im2col, pointwise or depthwise) takes every
    width through its own size variable (the output width an expression of it), exact at widths from 1 (rows
    narrower than a vector run element by element) to past several row tiles."""
    c, oc, h, kernel, group, strides = geo
    model = qlinear_conv_model(c, oc, (h, 8), kernel, group, strides, [kernel[0] // 2] * 4)
    model.graph.input[0].type.tensor_type.shape.CopyFrom(
        helper.make_tensor_type_proto(TensorProto.UINT8, ["n", c, h, "w"]).tensor_type.shape)
    fn, kernels = compile_model(model)
    assert len(kernels) == 1 and "wdyn" in kernels[0], kernels
    assert kernels[0].startswith("qie_dwconv" if group > 1 else ("qie_conv", "qie_pwconv"))
    if group > 1:   # a zero width (ORT rejects it: "Invalid input shape") gives an empty output, nothing written
        assert fn({"x": q(np.uint8, (1, c, h, 0))})[0].shape == (1, oc, (h + 2 * (kernel[0] // 2) - kernel[0])
                                                                  // strides[0] + 1, 0)
    for n, w in ((1, 1), (2, 7), (1, 33), (3, 64), (1, 321)):
        x = q(np.uint8, (n, c, h, w))
        got, = fn({"x": x})
        want, = ort_ref(model, {"x": x})
        np.testing.assert_array_equal(got, want)


def test_convs_differing_only_in_padding_get_their_own_kernels():
    """Kernels are shared by name: the name carries every geometry parameter (pads, both strides,
    dilations), so two convs alike but for their padding do not share one."""
    w = q(np.int8, (8, 8, 3, 3))
    inits = {"x_scale": np.float32(0.02), "x_zp": np.uint8(120), "w": w,
             "w_scale": np.float32(0.01), "w_zp": np.int8(0), "y_scale": np.float32(0.05), "y_zp": np.uint8(100)}
    ins = ["x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"]
    nodes = [helper.make_node("QLinearConv", ["x", *ins], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("QLinearConv", ["x", *ins], ["b"], pads=[1, 0, 1, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info(o, TensorProto.UINT8, None) for o in "ab"],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = q(np.uint8, (1, 8, 10, 10))
    got, want, kernels = both(model, {"x": x}, 2)
    assert len(set(kernels)) == 2, kernels
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_)


@pytest.mark.parametrize("mode,kernel,dil", [("SAME_UPPER", (2, 2), (1, 1)), ("SAME_LOWER", (3, 2), (1, 1))])
def test_qdq_conv_with_same_auto_pad_runs_on_qie(mode, kernel, dil):
    """A QDQ Conv with auto_pad SAME_* and stride 1 (PP-OCRv6's 2x2 stem convolutions): TVM's converter pads the
    dequantized input as a separate op, which hid the convolution from qie's matcher; qie's import gives it the
    explicit pads ONNX defines (the odd one after for SAME_UPPER, before for SAME_LOWER): one qie kernel, the
    codes equal ORT's, at any width (symbolic here)."""
    c, o = 6, 8
    w = q(np.int8, (o, c, *kernel))
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["y"], auto_pad=mode, kernel_shape=list(kernel),
                              dilations=list(dil)),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"])]
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in [
        ("sx", np.float32(0.02)), ("zx", np.uint8(120)), ("w", w), ("sw", RNG.uniform(0.005, 0.01, o).astype(np.float32)),
        ("zw", np.zeros(o, np.int8)), ("sy", np.float32(0.05)), ("zy", np.uint8(100))]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, 12, "W"])],
                          [helper.make_tensor_value_info("yq", TensorProto.UINT8, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    fn, kernels = compile_model(model)
    assert len(kernels) == 1 and kernels[0].startswith("qie_conv"), kernels
    for width in (1, 9, 20):
        x = q(np.uint8, (1, c, 12, width))
        got, = fn({"x": x})
        want, = ort_ref(model, {"x": x})
        assert got.shape == (1, o, 12, width)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", [[], [1], [-1]], ids=["scalar", "one", "minus_one"])
def test_symbolic_scalar_reshaped_in_a_shape_subgraph(target):
    """A shape element computed from a symbolic dim and reshaped (to a scalar or to one element) before it joins a
    Reshape target, as PP-OCRv6's recogniser (quantize_static's file) computes its sequence length from its width:
    TVM's importer refused the Reshape of a scalar ("Reshape requires the input data to be Tensor"); qie's
    converter keeps it a shape value. Compiled once with the symbolic width, equal to ORT at three widths."""
    c = 4
    as_int = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i3"], ["w"], axis=0),              # the width, a scalar
             helper.make_node("Sub", ["w", "one"], ["w1"]),
             helper.make_node("Div", ["w1", "two"], ["w2"]),
             helper.make_node("Add", ["w2", "one"], ["len"]),                  # (W - 1) // 2 + 1
             helper.make_node("Reshape", ["len", "tgt"], ["len_r"])]
    if target == []:
        nodes.append(helper.make_node("Unsqueeze", ["len_r", "ax0"], ["len_1"]))
    else:
        nodes.append(helper.make_node("Identity", ["len_r"], ["len_1"]))
    nodes += [helper.make_node("Concat", ["head", "len_1"], ["shape"], axis=0),
              helper.make_node("Slice", ["x", "zero", "len_1", "ax3"], ["xs"]),          # the first len columns
              helper.make_node("Reshape", ["xs", "shape"], ["y"])]
    inits = [as_int("i3", 3), as_int("one", 1), as_int("two", 2), as_int("tgt", target), as_int("ax0", [0]),
             as_int("head", [1, c * 2]), as_int("zero", [0]), as_int("ax3", [3])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    fn, _ = compile_model(model, qie=False)
    for width in (1, 7, 12):
        x = RNG.normal(size=(1, c, 2, width)).astype(np.float32)
        got, = fn({"x": x})
        want, = ort_ref(model, {"x": x})
        assert got.shape == want.shape == (1, c * 2, (width - 1) // 2 + 1)
        np.testing.assert_array_equal(got, want)


def test_conv_integer():
    w = q(np.uint8, (10, 4, 3, 3))
    model = single_node_model("ConvInteger", [("x", np.zeros((2, 4, 8, 9), np.uint8)), ("w", 0), ("x_zp", 0),
                                              ("w_zp", 0)], {"w": w, "x_zp": np.uint8(33), "w_zp": np.uint8(140)},
                              np.int32, attrs=dict(pads=[1, 0, 1, 2], strides=[1, 2]), opset=13)
    x = q(np.uint8, (2, 4, 8, 9))
    (got,), (want,), _ = both(model, {"x": x}, 1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("requant", [True, False])
def test_qgemm(requant):
    k, n = 64, 40
    b = q(np.int8, (n, k))          # transB=1
    inits = {"a_scale": np.float32(0.05), "a_zp": np.uint8(128), "b": b,
             "b_scale": RNG.uniform(0.002, 0.01, n).astype(np.float32), "b_zp": np.zeros(n, np.int8),
             "c": RNG.integers(-3000, 3000, n).astype(np.int32)}
    names = [("a", np.zeros((7, k), np.uint8)), ("a_scale", 0), ("a_zp", 0), ("b", 0), ("b_scale", 0), ("b_zp", 0),
             ("c", 0)]
    if requant:
        inits.update(y_scale=np.float32(0.5), y_zp=np.uint8(120))
        names += [("y_scale", 0), ("y_zp", 0)]
    model = single_node_model("QGemm", names, inits, np.uint8 if requant else np.float32, domain="com.microsoft",
                              attrs=dict(transB=1), opset=13)
    a = q(np.uint8, (7, k))
    (got,), (want,), _ = both(model, {"a": a}, 1)
    if requant:
        np.testing.assert_array_equal(got, want)
    else:
        # float output: qie computes float32(acc) * (sa*sb) and TVM adds float32(c) * (sa*sb) as a
        # separate op; ORT adds c to acc in int32 first: one float rounding apart.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)


def test_matmul_integer_to_float():
    k, n = 48, 33
    b = q(np.int8, (k, n))
    inits = {"b": b, "a_scale": np.float32(0.02), "b_scale": RNG.uniform(0.001, 0.01, n).astype(np.float32),
             "a_zp": np.uint8(100), "b_zp": np.zeros(n, np.int8)}
    model = single_node_model("MatMulIntegerToFloat", [("a", np.zeros((2, 5, k), np.uint8)), ("b", 0), ("a_scale", 0),
                                                       ("b_scale", 0), ("a_zp", 0), ("b_zp", 0)], inits, np.float32,
                              domain="com.microsoft", opset=13)
    a = q(np.uint8, (2, 5, k))
    (got,), (want,), _ = both(model, {"a": a}, 1)
    np.testing.assert_array_equal(got, want)   # same formula: float32(acc) * float32(sa * sb[n])


def test_dynamic_quantize_matmul():
    k, n = 64, 32
    b = q(np.int8, (k, n))
    inits = {"b": b, "b_scale": np.float32(0.01), "b_zp": np.int8(0)}
    model = single_node_model("DynamicQuantizeMatMul", [("a", np.zeros((4, k), np.float32)), ("b", 0), ("b_scale", 0),
                                                        ("b_zp", 0)], inits, np.float32, domain="com.microsoft",
                              opset=13)
    a = RNG.standard_normal((4, k)).astype(np.float32)
    (got,), (want,), _ = both(model, {"a": a}, 2)     # A's range (qie_ep.tvm.dynamic), then the GEMM
    # ORT's fused kernel may quantize A from a range computed in another order (the same min / max) but
    # rounds x / scale on its own path; a difference of one step in one element of A moves an output by
    # at most a_scale * max|b'| * b_scale.
    a_scale = (max(a.max(), 0) - min(a.min(), 0)) / 255
    bound = 2 * a_scale * 128 * 0.01
    np.testing.assert_allclose(got, want, atol=bound, rtol=0)


def qdq_mlp(tmp_path, rng, gemm=False):
    """A float MLP quantized by ORT's quantize_static (QDQ, per-channel); ``gemm``: Gemm layers with transB = 1
    and a bias (weights stored [N, K], as Caffe2 and torch.nn.Linear exports write them)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    k, h, n = 64, 96, 40
    w1 = rng.standard_normal((k, h)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((h, n)).astype(np.float32) * 0.2
    inits = [numpy_helper.from_array(w1.T.copy() if gemm else w1, "w1"), numpy_helper.from_array(w2.T.copy() if gemm else w2, "w2")]
    if gemm:
        inits += [numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "b1"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b2")]
        layer = lambda x, i, y: helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], transB=1)  # noqa: E731
    else:
        layer = lambda x, i, y: helper.make_node("MatMul", [x, f"w{i}"], [y])  # noqa: E731
    nodes = [layer("x", 1, "h"), helper.make_node("Relu", ["h"], ["r"]), layer("r", 2, "y")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8
    src, dst = tmp_path / "mlp.onnx", tmp_path / "mlp.qdq.onnx"
    onnx.save(fp32, src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": rng.standard_normal((8, k)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm_transB"])
def test_qdq_graph_matches_ort(tmp_path, gemm):
    """quantize_static QDQ: both MatMuls become requantizing qie kernels; ORT (EXTENDED) fuses the same
    groups into QLinearMatMul. Inputs and outputs are float, so Q/DQ at the edges run in each host. A Gemm with
    transB = 1 reaches the rewrite as matmul(x, permute_dims(dequantize(W))): the same kernels (it was left
    float, and constant folding then dequantized its weights: ResNet-50's classifier, 3.9 ms as a float matmul)."""
    model = qdq_mlp(tmp_path, np.random.default_rng(1), gemm)
    fn, kernels = compile_model(model)
    assert len(kernels) == 2 and all(k.startswith("qie_matmul_u8s8_u8") for k in kernels), kernels
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    got, = fn({"x": x})
    want, = run(model, {"x": x}, qie=False, level="extended")
    y_scale = float(numpy_helper.to_array([t for t in model.graph.initializer if "y_scale" in t.name][0]))
    # Equal quantized outputs except where TVM's QuantizeLinear of the float input rounds a tie the
    # other way (float32 x / scale computed as a multiply by 1/scale): at most one output step.
    assert np.abs(got - want).max() <= y_scale * 1.0001
    assert np.mean(got == want) > 0.95


@pytest.mark.parametrize("shapes", [[(2, 8, 5, 5), (2, 8, 5, 5)], [(2, 8, 5, 5), (1, 8, 1, 1), (5,)]],
                         ids=["two", "three_broadcast"])
def test_sum_is_pairwise_adds(shapes):
    """ONNX Sum (opset <= 12 exports' residuals) imports as adds, left to right: TVM's converter stacked the
    broadcast inputs and reduced them (a copy of every input per call); the result is ORT's."""
    names = [f"x{i}" for i in range(len(shapes))]
    g = helper.make_graph([helper.make_node("Sum", names, ["y"])], "s",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=8)
    text = qtvm.from_onnx(model)["main"].script()
    assert "R.stack" not in text and text.count("R.add(") == len(shapes) - 1, text
    feeds = {n: RNG.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    got, = compile_model(model)[0](feeds)
    want, = run(model, feeds, qie=False, level="all")
    np.testing.assert_array_equal(got, want)


def test_float_graph_is_untouched():
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mod = qtvm.from_onnx(model)
    out = qtvm.rewrite_pass(HOST)(mod)
    assert qtvm.kernel_calls(out) == []
    tvm.ir.assert_structural_equal(mod["main"], out["main"])


def test_non_constant_weights_fall_back(caplog):
    """Both operands at run time: left to TVM's lowering with a logged reason, still correct."""
    k, n = 16, 8
    inits = {"a_scale": np.float32(0.1), "a_zp": np.uint8(128), "b_scale": np.float32(0.1), "b_zp": np.int8(0),
             "y_scale": np.float32(1.0), "y_zp": np.uint8(128)}
    model = single_node_model("QLinearMatMul", [("a", np.zeros((4, k), np.uint8)), ("a_scale", 0), ("a_zp", 0),
                                                ("b", np.zeros((k, n), np.int8)), ("b_scale", 0), ("b_zp", 0),
                                                ("y_scale", 0), ("y_zp", 0)], inits, np.uint8)
    with caplog.at_level(logging.INFO, logger="qie_ep.tvm"):
        fn, kernels = compile_model(model)
    assert kernels == []
    assert "not a uint8/int8 constant" in caplog.text
    a, b = q(np.uint8, (4, k)), q(np.int8, (k, n))
    got, = fn({"a": a, "b": b})
    want, = ort_ref(model, {"a": a, "b": b})
    assert np.abs(got.astype(int) - want).max() <= 1      # TVM's float lowering: ties may round apart


def test_bad_dtype_names_the_node():
    model = single_node_model("QLinearMatMul", [("a", np.zeros((2, 4), np.float32)), ("a_scale", 0), ("a_zp", 0),
                                                ("b", 0), ("b_scale", 0), ("b_zp", 0), ("y_scale", 0), ("y_zp", 0)],
                              {"a_scale": np.float32(1), "a_zp": np.uint8(0), "b": np.zeros((4, 2), np.int8),
                               "b_scale": np.float32(1), "b_zp": np.int8(0), "y_scale": np.float32(1),
                               "y_zp": np.uint8(0)}, np.uint8)
    model.graph.node[0].name = "proj_q"
    with pytest.raises(ValueError, match=r"node 'proj_q' \(QLinearMatMul\): a has dtype float32"):
        qtvm.from_onnx(model)


def test_isa_override_is_checked(monkeypatch):
    monkeypatch.setenv("QIE_TVM_ISA", "avx9000")
    with pytest.raises(ValueError, match="QIE_TVM_ISA"):
        qtvm.isa_for(HOST)


def test_weight_scale_on_the_wrong_axis_falls_back(caplog):
    """DequantizeLinear(W [K, N], scale [K], axis=0) scales rows of K, not output channels: with K == N
    the shapes alone cannot tell; qie must read the axis and leave the group to TVM."""
    k = n = 16
    w = q(np.int8, (k, n))
    sw = RNG.uniform(0.01, 0.02, k).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0),
             helper.make_node("MatMul", ["af", "wf"], ["y"])]
    inits = [numpy_helper.from_array(v, name) for name, v in [
        ("sa", np.float32(0.05)), ("za", np.uint8(128)), ("w", w), ("sw", sw), ("zw", np.zeros(k, np.int8))]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with caplog.at_level(logging.INFO, logger="qie_ep.tvm"):
        fn, kernels = compile_model(model)
    assert kernels == []
    assert "not per output channel" in caplog.text
    a = q(np.uint8, (3, k))
    got, = fn({"a": a})
    want = ((a.astype(np.float32) - 128) * 0.05) @ (w.astype(np.float32) * sw[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _transcendental_model(n=4096):
    """y = softmax(x) + erf(x) + tanh(x) + exp(-x^2): every op FastMathTransform replaces."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n // 4])
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("Erf", ["x"], ["e"]),
             helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Mul", ["x", "x"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]), helper.make_node("Exp", ["nx2"], ["g"]),
             helper.make_node("Sum", ["s", "e", "t", "g"], ["y"])]
    g = helper.make_graph(nodes, "tf", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n // 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fast_math_stays_within_its_bound():
    """pipeline(target) replaces erf / exp / tanh / softmax by TVM's fast approximations (fast_math=True, the
    default): every output within 2e-6 relative (+1e-6 absolute) of ORT's, and of TVM's exact lowering."""
    model = _transcendental_model()
    x = {"x": np.linspace(-6, 6, 4096, dtype=np.float32).reshape(4, 1024)}
    want = ort_ref(model, x)[0]
    fast, _ = compile_model(model)
    exact_mod = qtvm.from_onnx(model)
    ex = tvm.compile(exact_mod, HOST, relax_pipeline=qtvm.pipeline(HOST, fast_math=False))
    exact = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x["x"])).numpy()
    got = fast(x)[0]
    np.testing.assert_allclose(exact, want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert not np.array_equal(got, exact), "fast math did not apply"


def test_qie_kernels_are_marked_scheduled():
    """TVM 0.27 reads ``tirx.is_scheduled`` (dlight, MetaSchedule's task extraction): qie's PrimFuncs carry it,
    so they are never re-scheduled or offered as tuning tasks."""
    from tvm.s_tir.dlight.base.transform import _is_scheduled
    model = qlinear_matmul_model(np.uint8, np.int8, 64, 48, per_column=True)
    mod = qtvm.rewrite_pass(HOST)(qtvm.from_onnx(model))
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "qie.kernel" in f.attrs]
    assert kernels and all(_is_scheduled(f) for f in kernels)
