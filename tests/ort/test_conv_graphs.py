"""Convolution graphs as users have them: a small float CNN quantized by
onnxruntime.quantization.quantize_static (per-channel, QDQ and QOperator formats), and ConvInteger from
quantize_dynamic, at each optimization level: qie vs ORT built-in, identical outputs, and every
quantized convolution ran on qie.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import OPT_LEVELS, assert_exact, run

CONVS = 4  # the number of Conv nodes in float_cnn


def float_cnn(rng, path):
    """stem 3x3 s2 -> depthwise 3x3 -> pointwise 1x1 -> grouped 3x3, with ReLUs; NCHW 3x32x32 input."""
    def conv(name, x, m, c, k, **attrs):
        w = (rng.normal(size=(m, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + "_w"),
                      numpy_helper.from_array(rng.normal(size=m).astype(np.float32) * 0.1, name + "_b")])
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], **attrs))
        nodes.append(helper.make_node("Relu", [name], [name + "_r"]))
        return name + "_r"
    inits, nodes = [], []
    h = conv("stem", "x", 16, 3, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    h = conv("dw", h, 16, 1, 3, group=16, pads=[1, 1, 1, 1])
    h = conv("pw", h, 32, 16, 1)
    h = conv("gc", h, 32, 8, 3, group=4, pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["y"]))
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32, 1, 1])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)


class Reader:
    def __init__(self, rng, n=8):
        self.batches = iter([{"x": rng.normal(size=(1, 3, 32, 32)).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    d = tmp_path_factory.mktemp("cnn")
    rng = np.random.default_rng(40)
    float_cnn(rng, d / "f.onnx")
    out = {}
    for fmt in ("qdq", "qoperator"):
        quantize_static(d / "f.onnx", d / f"{fmt}.onnx", Reader(rng), per_channel=True,
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out[fmt] = onnx.load(d / f"{fmt}.onnx")
    return out


def conv_runs(st):
    return sum(sum(v.values()) for (dom, op), v in st.items() if op in ("QLinearConv", "ConvInteger"))


@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_quantize_static_cnn(quantized, fmt, level):
    # The QDQ model imports only the "" opset; at EXTENDED/ALL ORT fuses DQ->GlobalAveragePool->Q into
    # com.microsoft QLinearGlobalAveragePool, which resolves only if the model imports com.microsoft
    # (the ORT 1.31 custom-registry limitation described in qie_ep.with_contrib_opset).
    model = qie_ep.with_contrib_opset(quantized[fmt])
    if fmt == "qoperator":
        assert sum(n.op_type == "QLinearConv" for n in model.graph.node) == CONVS
    x = np.random.default_rng(41).normal(size=(2, 3, 32, 32)).astype(np.float32)
    qie_ep.reset_stats()
    got = run(model, {"x": x}, qie=True, level=level)[0]
    st = qie_ep.stats()
    assert_exact(got, run(model, {"x": x}, qie=False, level=level)[0], f"{fmt} level={level}")
    if fmt == "qdq" and level in ("disable", "basic"):  # QDQ stays float below EXTENDED
        assert conv_runs(st) == 0, st
    else:
        assert conv_runs(st) == CONVS, st
        if level == "all":  # ORT's NhwcTransformer rewrites them into the NHWC contrib op
            assert ("com.microsoft", "QLinearConv") in st, st


@pytest.mark.parametrize("level", ["disable", "all"])
def test_quantize_dynamic_conv_integer(tmp_path, level):
    """quantize_dynamic turns Conv into DynamicQuantizeLinear + ConvInteger (uint8 x uint8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    rng = np.random.default_rng(42)
    float_cnn(rng, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    model = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "ConvInteger" for n in model.graph.node) == CONVS
    x = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    qie_ep.reset_stats()
    got = run(model, {"x": x}, qie=True, level=level)[0]
    assert qie_ep.stats().get(("", "ConvInteger")), qie_ep.stats()
    assert conv_runs(qie_ep.stats()) == CONVS
    assert_exact(got, run(model, {"x": x}, qie=False, level=level)[0], f"level={level}")
