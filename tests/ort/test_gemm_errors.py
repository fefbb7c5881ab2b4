"""Bad input gets a clear ORT error naming the op, the node and the problem; never a crash."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run


def qlmm_model(a_dim=None, b=None, a_scale=0.05, b_scale=0.01, y_scale=0.5, a_zp=np.uint8(3), b_zp=np.int8(0),
               y_zp=np.uint8(128), a_dtype=TensorProto.UINT8, b_runtime=False):
    """QLinearMatMul whose A (and optionally B) have symbolic shapes, so problems surface at run time."""
    a_in = helper.make_tensor_value_info("a", a_dtype, ["m", "k"] if a_dim is None else a_dim)
    inputs = [a_in]
    inits = [numpy_helper.from_array(np.asarray(a_scale, np.float32), "sa"),
             numpy_helper.from_array(np.asarray(a_zp), "za"),
             numpy_helper.from_array(np.asarray(b_scale, np.float32), "sb"),
             numpy_helper.from_array(np.asarray(b_zp), "zb"),
             numpy_helper.from_array(np.asarray(y_scale, np.float32), "sy"),
             numpy_helper.from_array(np.asarray(y_zp), "zy")]
    if b_runtime:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.INT8, ["k2", "n"]))
    else:
        inits.append(numpy_helper.from_array(b if b is not None else np.ones((8, 4), np.int8), "b"))
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], name="mm0")
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    m = helper.make_model(helper.make_graph([node], "g", inputs, [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def expect_error(model, feeds, *fragments):
    with pytest.raises(Exception) as ei:
        run(model, feeds)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in error: {msg}"


A = np.ones((3, 8), np.uint8)


def test_k_mismatch_names_node_and_shapes():
    expect_error(qlmm_model(), {"a": np.ones((3, 7), np.uint8)}, "qie QLinearMatMul", "mm0", "inner dimensions differ", "K=7")


def test_k_mismatch_static_shapes():
    # ORT ignores a failing custom-op shape inference; the kernel reports the problem at run time.
    expect_error(qlmm_model(a_dim=[3, 7]), {"a": np.ones((3, 7), np.uint8)}, "QLinearMatMul", "inner dimensions differ")


def test_rank_zero():
    expect_error(qlmm_model(a_dim=[]), {"a": np.array(3, np.uint8)}, "QLinearMatMul", "rank >= 1")


def test_batch_dims_do_not_broadcast():
    m = qlmm_model(a_dim=["b", "m", "k"], b_runtime=True)
    m.graph.input[1].CopyFrom(helper.make_tensor_value_info("b", TensorProto.INT8, ["bb", "k2", "n"]))
    expect_error(m, {"a": np.ones((2, 3, 8), np.uint8), "b": np.ones((3, 8, 4), np.int8)}, "mm0", "do not broadcast")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scales(bad):
    expect_error(qlmm_model(y_scale=bad), {"a": A}, "mm0", "y_scale must be finite and > 0")
    expect_error(qlmm_model(b_scale=np.array([0.1, bad, 0.1, 0.1], np.float32)), {"a": A}, "b_scale must be finite", "index 1")


def test_per_column_scale_of_wrong_length():
    expect_error(qlmm_model(b_scale=np.full(3, 0.1, np.float32)), {"a": A}, "mm0", "b_scale must have 1 or 4 elements")


def test_zero_point_dtype_and_shape():
    expect_error(qlmm_model(a_zp=np.int8(3)), {"a": A}, "a_zero_point must have the dtype of its tensor (uint8)")
    expect_error(qlmm_model(b_zp=np.zeros(5, np.int8)), {"a": A}, "b_zero_point must have 1 or 4 elements")


def test_per_row_a_scale_is_rejected_clearly():
    expect_error(qlmm_model(a_scale=np.full(3, 0.1, np.float32)), {"a": A}, "a_scale must have 1 element (per-row quantization")


def test_unsupported_dtype():
    m = qlmm_model(a_dtype=TensorProto.INT16, a_zp=np.int16(0))
    expect_error(m, {"a": np.ones((3, 8), np.int16)}, "a must be uint8 or int8, got int16")


def test_qgemm_bias_shape_and_missing_pair():
    a = np.ones((4, 8), np.uint8)
    b = np.ones((8, 5), np.int8)
    inits = [numpy_helper.from_array(x, n) for x, n in [
        (np.array(0.1, np.float32), "sa"), (np.array(0, np.uint8), "za"), (b, "b"), (np.array(0.1, np.float32), "sb"),
        (np.array(0, np.int8), "zb"), (np.zeros(3, np.int32), "c"), (np.array(4, np.uint8), "zy")]]
    for ins, frag in [(["a", "sa", "za", "b", "sb", "zb", "c"], "C of shape [3] does not broadcast"),
                      (["a", "sa", "za", "b", "sb", "zb", "", "", "zy"], "y_zero_point is given without y_scale")]:
        node = helper.make_node("QGemm", ins, ["y"], domain="com.microsoft", name="g0")
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", "k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT if "C" in frag else TensorProto.UINT8, None)],
                              initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 10
        expect_error(m, {"a": a}, "qie QGemm", "g0", frag)


def test_dynamic_quantize_matmul_non_finite_input():
    b = np.ones((8, 4), np.int8)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(0.1, np.float32), "sb")]
    node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "sb"], ["y"], domain="com.microsoft", name="d0")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    a = np.ones((2, 8), np.float32)
    a[1, 3] = np.inf
    expect_error(m, {"a": a}, "qie DynamicQuantizeMatMul", "d0", "non-finite")
