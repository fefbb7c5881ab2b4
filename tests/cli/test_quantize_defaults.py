"""`qie quantize`'s default op set: the kernels' op types (MatMul, Conv, Gemm) and, in static QDQ models, the
feature-map ops (Relu, Clip, pools, Concat, Add, Mul) on convolutional feature maps only
(``quantizer.feature_map_nodes``). A CNN's residual adds, concatenations, pools and SE products are quantized; a
transformer's adds and products (3-D tensors, 4-D attention scores next to Softmax, GELU's erf) are not, nor a
convolution's tensor once a layout change made it a sequence; an explicit --op-types is taken exactly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qie_ep.cli import main
from qie_ep.quantization.config import QuantizeConfig
from qie_ep.quantization.quantizer import feature_map_nodes, quantize_file
from qie_ep.session import session


def _init(rng, name, shape, scale=0.2):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inits, x_shape, out_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _cnn():
    """conv1 -> relu1 -> pool (MaxPool) -> [conv2 -> relu2, conv3] -> cat (Concat) -> conv4 -> add (residual with
    cat's first half through conv5) -> se: gap -> conv6 -> Sigmoid -> mul -> relu3 -> gap2 -> Flatten -> fc (Gemm)."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "w1", (8, 3, 3, 3)), _init(rng, "w2", (8, 8, 3, 3)), _init(rng, "w3", (8, 8, 1, 1)),
             _init(rng, "w4", (8, 16, 1, 1)), _init(rng, "w5", (8, 16, 1, 1)), _init(rng, "w6", (8, 8, 1, 1)),
             _init(rng, "wf", (8, 4))]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4), n("Relu", ["c1"], ["r1"], name="relu1"),
             n("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p", "w2"], ["c2"], name="conv2", pads=[1] * 4), n("Relu", ["c2"], ["r2"], name="relu2"),
             n("Conv", ["p", "w3"], ["c3"], name="conv3"), n("Concat", ["r2", "c3"], ["cat"], name="cat", axis=1),
             n("Conv", ["cat", "w4"], ["c4"], name="conv4"), n("Conv", ["cat", "w5"], ["c5"], name="conv5"),
             n("Add", ["c4", "c5"], ["a"], name="add"), n("GlobalAveragePool", ["a"], ["g"], name="gap"),
             n("Conv", ["g", "w6"], ["c6"], name="conv6"), n("Sigmoid", ["c6"], ["s"], name="sigmoid"),
             n("Mul", ["a", "s"], ["m"], name="mul"), n("Relu", ["m"], ["r3"], name="relu3"),
             n("GlobalAveragePool", ["r3"], ["g2"], name="gap2"), n("Flatten", ["g2"], ["f"], name="flatten"),
             n("Gemm", ["f", "wf"], ["y"], name="fc")]
    return _model(nodes, inits, [1, 3, 16, 16], [1, 4])


CNN_FEATURE_MAPS = {"relu1", "pool", "relu2", "cat", "add", "gap", "mul", "relu3", "gap2"}


def _attention():
    """A transformer block on x[1, 6, 16]: q / k projections (MatMul) -> Reshape to heads -> Transpose -> scores
    (MatMul, 4-D) -> Mul by a scale -> Add a mask -> Softmax -> ... ; a residual Add -> LayerNormalization; a GELU
    (Div, Erf, Add, Mul, Mul) in the FFN; and a 4-D Mul not next to Softmax (a scaled head tensor)."""
    rng = np.random.default_rng(1)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [_init(rng, "wq", (16, 16)), _init(rng, "wk", (16, 16)), _init(rng, "wo", (16, 16)), _init(rng, "w1", (16, 32)),
             _init(rng, "w2", (32, 16)), numpy_helper.from_array(np.array([1, 6, 2, 8], np.int64), "heads"),
             numpy_helper.from_array(np.array([1, 6, 16], np.int64), "back"), c("scale", 0.35), c("mask", np.zeros((1, 1, 1, 6))),
             c("sqrt2", 1.4142135), c("one", 1.0), c("half", 0.5), c("gamma", np.ones(16)), c("beta", np.zeros(16))]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q"]), n("MatMul", ["x", "wk"], ["k"]),
             n("Reshape", ["q", "heads"], ["qh"]), n("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
             n("Reshape", ["k", "heads"], ["kh"]), n("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
             n("Mul", ["qt", "scale"], ["qs"], name="head_scale"),
             n("MatMul", ["qs", "kt"], ["sc"]), n("Mul", ["sc", "scale"], ["sc2"], name="score_scale"),
             n("Add", ["sc2", "mask"], ["sc3"], name="mask_add"), n("Softmax", ["sc3"], ["pr"], axis=-1),
             n("Transpose", ["pr"], ["pt"], perm=[0, 2, 1, 3]), n("Reshape", ["pt", "back"], ["ctx0"]),
             n("MatMul", ["ctx0", "wo"], ["o"]), n("Add", ["o", "x"], ["res"], name="residual"),
             n("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1),
             n("MatMul", ["ln", "w1"], ["h"]), n("Div", ["h", "sqrt2"], ["hd"]), n("Erf", ["hd"], ["he"]),
             n("Add", ["he", "one"], ["h1"], name="gelu_add"), n("Mul", ["h", "h1"], ["h2"], name="gelu_mul"),
             n("Mul", ["h2", "half"], ["h3"], name="gelu_half"), n("MatMul", ["h3", "w2"], ["y"])]
    return _model(nodes, inits, [1, 6, 16], [1, 6, 16])


def test_a_cnns_feature_map_ops_are_chosen():
    assert feature_map_nodes(_cnn()) == CNN_FEATURE_MAPS


def test_a_transformers_adds_and_products_are_not():
    m = _attention()
    assert feature_map_nodes(m) == frozenset(), "no convolution: no feature map"


def test_a_convolutions_tensor_after_a_layout_change_is_not_a_feature_map():
    """conv -> Reshape [1, 8, 4, 16] (4-D, a sequence of heads now) -> Add -> Relu: no feature map; conv -> Relu
    next to a LayerNormalization's input: float-only neighbour; conv -> Add whose other input is 3-D: a group
    with a non-4-D output."""
    rng = np.random.default_rng(2)
    n = helper.make_node
    inits = [_init(rng, "w", (8, 4, 1, 1)), numpy_helper.from_array(np.array([1, 8, 4, 16], np.int64), "shape"),
             _init(rng, "bias", (16,)), numpy_helper.from_array(np.ones(8, np.float32), "gamma")]
    nodes = [n("Conv", ["x", "w"], ["c"]), n("Reshape", ["c", "shape"], ["r"]), n("Add", ["r", "bias"], ["a"], name="add"),
             n("Relu", ["a"], ["ra"], name="relu_a"),
             n("Relu", ["c"], ["rc"], name="relu_ln"), n("Transpose", ["rc"], ["t"], perm=[0, 2, 3, 1]),
             n("LayerNormalization", ["rc", "gamma"], ["y"], axis=1)]
    m = _model(nodes, inits, [1, 4, 8, 8], [1, 8, 8, 8])
    m.graph.output.append(helper.make_tensor_value_info("ra", TensorProto.FLOAT, [1, 8, 4, 16]))
    assert feature_map_nodes(m) == frozenset()


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    onnx.save(_cnn(), str(d / "cnn.onnx"))
    rng = np.random.default_rng(3)
    np.save(d / "calib.npy", rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    return d


def _quantized_outputs(path) -> set:
    """The float tensors a QuantizeLinear reads: what the model quantizes."""
    return {nd.input[0] for nd in onnx.load(str(path)).graph.node if nd.op_type == "QuantizeLinear"}


def test_qie_quantize_default_quantizes_the_feature_maps(cnn_files, capsys):
    d = cnn_files
    assert main(["quantize", str(d / "cnn.onnx"), "-o", str(d / "auto.onnx"), "--calib", str(d / "calib.npy")]) == 0
    assert "7 of 7 layers quantized and 9 feature-map ops between them" in capsys.readouterr().out
    assert main(["quantize", str(d / "cnn.onnx"), "-o", str(d / "exact.onnx"), "--calib", str(d / "calib.npy"),
                 "--op-types", "MatMul", "Conv", "Gemm"]) == 0
    auto, exact = _quantized_outputs(d / "auto.onnx"), _quantized_outputs(d / "exact.onnx")
    # by default the residual sum, the SE product's inputs and output and the last pool are quantized (with the
    # kernels' op types only, just the convolutions' inputs and outputs are); the Relus become the ranges of their
    # QuantizeLinear (ORT's removable activations) and leave the graph
    for t in ("a", "s", "r3", "g2"):
        assert t in auto and t not in exact, t
    assert "Relu" not in {nd.op_type for nd in onnx.load(str(d / "auto.onnx")).graph.node}
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = session(str(d / "cnn.onnx"), qie=False).run(None, {"x": x})[0]
    for f in ("auto.onnx", "exact.onnx"):
        got = session(str(d / f)).run(None, {"x": x})[0]
        assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99, f


def test_the_api_default_and_the_switch(cnn_files, tmp_path):
    d = cnn_files
    feeds = [{"x": x[None]} for x in np.load(d / "calib.npy")]
    quantize_file(str(d / "cnn.onnx"), str(tmp_path / "on.onnx"), feeds, QuantizeConfig(), progress=False, log=lambda _: None)
    quantize_file(str(d / "cnn.onnx"), str(tmp_path / "off.onnx"), feeds, QuantizeConfig(feature_maps=False),
                  progress=False, log=lambda _: None)
    assert "a" in _quantized_outputs(tmp_path / "on.onnx") and "a" not in _quantized_outputs(tmp_path / "off.onnx")
    # dynamic quantization and QOperator files take the kernels' op types only
    quantize_file(str(d / "cnn.onnx"), str(tmp_path / "qop.onnx"), feeds, QuantizeConfig(fmt="qoperator"),
                  progress=False, log=lambda _: None)
    ops = {nd.op_type for nd in onnx.load(str(tmp_path / "qop.onnx")).graph.node}
    assert "QLinearConcat" not in ops and "QLinearAdd" not in ops and "QLinearConv" in ops, ops


def test_a_residual_sums_matmul_output_stays_float(tmp_path):
    """The output projection's MatMul -> Add(residual) -> LayerNormalization: by default no Q / DQ on the MatMul's
    output (``float_residual_outputs``); the FFN's MatMul whose output GELU reads keeps ORT's; with
    ``float_residuals=False`` both are quantized. Weights are per-channel by default (DequantizeLinear with an axis)."""
    rng = np.random.default_rng(5)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    n = helper.make_node
    inits = [_init(rng, "wo", (16, 16)), _init(rng, "bo", (16,)), _init(rng, "w1", (16, 32)), _init(rng, "w2", (32, 16)),
             c("sqrt2", 1.4142135), c("one", 1.0), c("gamma", np.ones(16)), c("beta", np.zeros(16))]
    nodes = [n("MatMul", ["x", "wo"], ["o"]), n("Add", ["o", "bo"], ["ob"]), n("Add", ["ob", "x"], ["res"]),
             n("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1),
             n("MatMul", ["ln", "w1"], ["h"]), n("Div", ["h", "sqrt2"], ["hd"]), n("Erf", ["hd"], ["he"]),
             n("Add", ["he", "one"], ["h1"]), n("Mul", ["h", "h1"], ["h2"]), n("MatMul", ["h2", "w2"], ["y"])]
    onnx.save(_model(nodes, inits, [1, 6, 16], [1, 6, 16]), str(tmp_path / "t.onnx"))
    feeds = [{"x": rng.standard_normal((1, 6, 16)).astype(np.float32)} for _ in range(4)]
    quantize_file(str(tmp_path / "t.onnx"), str(tmp_path / "on.onnx"), feeds, QuantizeConfig(), progress=False,
                  log=lambda _: None)
    quantize_file(str(tmp_path / "t.onnx"), str(tmp_path / "off.onnx"), feeds, QuantizeConfig(float_residuals=False),
                  progress=False, log=lambda _: None)
    on, off = _quantized_outputs(tmp_path / "on.onnx"), _quantized_outputs(tmp_path / "off.onnx")
    assert "o" not in on and "o" in off
    assert "h" in on and "h" in off
    m = onnx.load(str(tmp_path / "on.onnx"))
    used = {i for nd in m.graph.node for i in nd.input}
    assert all(i.name in used for i in m.graph.initializer), "the dropped pair's scale and zero point are gone"
    wdq = [nd for nd in m.graph.node if nd.op_type == "DequantizeLinear" and nd.input[0].startswith("wo")]
    assert wdq and numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == wdq[0].input[1])).shape == (16,)
    want = session(str(tmp_path / "t.onnx"), qie=False).run(None, feeds[0])[0]
    for f in ("on.onnx", "off.onnx"):
        got = session(str(tmp_path / f)).run(None, feeds[0])[0]
        assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.98, f
