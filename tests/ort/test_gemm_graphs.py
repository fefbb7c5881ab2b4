"""Whole graphs as users have them: a QDQ DequantizeLinear->MatMul->QuantizeLinear graph and a graph
made by onnxruntime.quantization.quantize_dynamic, at each optimization level, qie vs ORT built-in."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import OPT_LEVELS, assert_exact, run


def qdq_matmul_model(rng, k=64, n=48):
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(x, name) for x, name in [
        (np.array(0.02, np.float32), "xs"), (np.array(128, np.uint8), "xz"),
        (w, "w"), (rng.uniform(0.001, 0.01, n).astype(np.float32), "ws"), (np.zeros(n, np.int8), "wz"),
        (np.array(0.25, np.float32), "ys"), (np.array(120, np.uint8), "yz")]]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["yf"]),
        helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "m", n])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def run_both(model, feeds, level):
    """Run with qie (returning its stats) and on ORT's built-in kernels; assert identical outputs."""
    qie_ep.reset_stats()
    got = run(model, feeds, qie=True, level=level)[0]
    st = qie_ep.stats()
    assert_exact(got, run(model, feeds, qie=False, level=level)[0], f"level={level}")
    return st


@pytest.mark.parametrize("level", list(OPT_LEVELS))
def test_qdq_matmul_graph(level):
    """With qie's EP (the default where ORT has the EP API) the DQ -> MatMul -> Q unit is claimed at every level
    and computed in the integer domain: equal to ORT's fused QLinearMatMul (EXTENDED and ALL), within one output
    step of ORT's float QDQ semantics below that. Without the EP, ORT fuses the unit into QLinearMatMul at
    EXTENDED and above, which qie's custom op takes; below, nothing quantized runs anywhere."""
    rng = np.random.default_rng(30)
    model = qdq_matmul_model(rng)
    feeds = {"x": rng.normal(size=(2, 9, 64)).astype(np.float32)}
    if not qie_ep.ep_available():
        st = run_both(model, feeds, level)
        assert (("", "QLinearMatMul") in st) if level in ("extended", "all") else st == {}, st
        return
    qie_ep.reset_stats()
    got = run(model, feeds, qie=True, level=level, ep=None)[0]
    st = qie_ep.stats()
    assert list(st) == [(qie_ep.EP_NAME, "QDQ GEMM")], st
    want = run(model, feeds, qie=False, level=level)[0]
    if level in ("extended", "all"):
        assert_exact(got, want, f"level={level}")
    else:
        step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "ys")))
        assert np.abs(got - want).max() <= step * 1.0001, (np.abs(got - want).max(), step)


def float_mlp(rng, path, k=96, h=160, n=40):
    w1 = rng.normal(size=(k, h)).astype(np.float32) * 0.1
    w2 = rng.normal(size=(h, n)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=h).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["y0"]), helper.make_node("Add", ["y0", "b2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


@pytest.mark.parametrize("level", list(OPT_LEVELS))
def test_quantize_dynamic_graph(tmp_path, level):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    rng = np.random.default_rng(31)
    float_mlp(rng, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    model = onnx.load(tmp_path / "q.onnx")
    st = run_both(model, {"x": rng.normal(size=(3, 7, 96)).astype(np.float32)}, level)
    ran = {op for (_, op) in st}
    if level in ("disable", "basic"):  # DynamicQuantizeLinear + MatMulInteger
        assert ran == {"MatMulInteger"} and st[("", "MatMulInteger")] and sum(st[("", "MatMulInteger")].values()) == 2, st
    else:  # fused into com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat
        assert ran and ran <= {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, st
        assert sum(sum(v.values()) for v in st.values()) == 2, st
