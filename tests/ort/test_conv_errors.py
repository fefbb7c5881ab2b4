"""Bad convolution input gets a clear ORT error naming the op, the node and the problem; never a crash.

ORT 1.31 ignores an error status from a custom op's shape inference (the session loads with the
output shape unknown), so even with static shapes the kernel reports the problem at run time.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run

X = np.full((1, 8, 6, 6), 7, np.uint8)


def qlinear_conv_model(w_shape=(8, 8, 3, 3), x_dims=("n", "c", "h", "w"), x_dtype=TensorProto.UINT8, w_scale=0.01,
                       w_zp=np.int8(0), x_zp=np.uint8(3), bias=None, **attrs):
    inits = [numpy_helper.from_array(np.asarray(v), n) for v, n in [
        (np.float32(0.05), "sx"), (x_zp, "zx"), (np.ones(w_shape, np.int8), "w"),
        (np.asarray(w_scale, np.float32), "sw"), (w_zp, "zw"), (np.float32(0.5), "sy"), (np.uint8(128), "zy")]]
    names = ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.int32), "b"))
        names.append("b")
    node = helper.make_node("QLinearConv", names, ["y"], name="conv0", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_dtype, list(x_dims))],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def expect_error(model, feeds, *fragments, level="all"):
    with pytest.raises(Exception) as ei:
        run(model, feeds, level=level)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in error: {msg}"


@pytest.mark.parametrize("level", ["disable", "all"])
def test_channels_do_not_match_group(level):
    expect_error(qlinear_conv_model(), {"x": np.ones((1, 5, 6, 6), np.uint8)}, "qie QLinearConv", "conv0",
                 "X has 5 channels but W [8,8,3,3] with group 1 expects 8", level="disable")
    expect_error(qlinear_conv_model(w_shape=(6, 4, 3, 3), group=4), {"x": X}, "conv0",
                 "W has 6 output channels, not a multiple of group 4", level=level)


def test_static_shapes_still_report_clearly():
    expect_error(qlinear_conv_model(x_dims=(1, 5, 6, 6)), {"x": np.ones((1, 5, 6, 6), np.uint8)},
                 "qie QLinearConv", "X has 5 channels")


def test_kernel_larger_than_padded_input():
    expect_error(qlinear_conv_model(w_shape=(8, 8, 5, 5)), {"x": np.ones((1, 8, 3, 3), np.uint8)}, "conv0",
                 "kernel extent 5 (kernel 5, dilation 1) exceeds the padded input 3")
    expect_error(qlinear_conv_model(dilations=[3, 3]), {"x": X}, "kernel extent 7 (kernel 3, dilation 3)")


def test_bad_pads_strides_dilations_auto_pad():
    expect_error(qlinear_conv_model(pads=[1, -1, 1, 1]), {"x": X}, "conv0", "pads must be in 0..")
    expect_error(qlinear_conv_model(pads=[1, 1]), {"x": X}, "pads must have 4 values")
    expect_error(qlinear_conv_model(strides=[0, 1]), {"x": X}, "strides must be in 1..")
    expect_error(qlinear_conv_model(dilations=[1, 1, 1]), {"x": X}, "dilations must have 2 values")
    expect_error(qlinear_conv_model(auto_pad="SAME"), {"x": X}, "auto_pad must be NOTSET, SAME_UPPER, SAME_LOWER or VALID")
    expect_error(qlinear_conv_model(kernel_shape=[2, 2]), {"x": X}, "kernel_shape [2,2] does not match W's spatial dims [3,3]")


def test_bias_and_per_channel_lengths():
    expect_error(qlinear_conv_model(bias=np.zeros(7)), {"x": X}, "conv0", "B must have shape [8] (one per output channel)")
    expect_error(qlinear_conv_model(w_scale=np.full(3, 0.01)), {"x": X}, "w_scale must have 1 or 8 elements")
    expect_error(qlinear_conv_model(w_zp=np.zeros(5, np.int8)), {"x": X}, "w_zero_point must have 1 or 8 elements")
    expect_error(qlinear_conv_model(x_zp=np.zeros(2, np.uint8)), {"x": X}, "x_zero_point must have 1 element")
    expect_error(qlinear_conv_model(w_scale=np.array([0.01] * 7 + [0.0])), {"x": X}, "w_scale must be finite and > 0", "index 7")


def test_rank_and_dtype():
    expect_error(qlinear_conv_model(x_dims=("n", "c")), {"x": np.ones((1, 8), np.uint8)}, "conv0", "X must have rank 3 to 5")
    expect_error(qlinear_conv_model(x_dtype=TensorProto.INT16, x_zp=np.int16(0)), {"x": X.astype(np.int16)},
                 "x must be uint8 or int8, got int16")


def test_conv_integer_bad_zero_point():
    inits = [numpy_helper.from_array(np.ones((4, 8, 3, 3), np.uint8), "w"),
             numpy_helper.from_array(np.zeros(2, np.uint8), "zx")]
    node = helper.make_node("ConvInteger", ["x", "w", "zx"], ["y"], name="ci0")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", "c", "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    expect_error(m, {"x": X}, "qie ConvInteger", "ci0", "x_zero_point must have 1 element")
