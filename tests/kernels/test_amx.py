"""The AMX-INT8 path beside ONNX Runtime's own AMX kernels (skipped where the CPU or the OS has no AMX).

AMX tiles are per-thread state: MLAS (ORT's kernels) loads its tile configuration once per thread and never again,
so a qie kernel that left another configuration behind would make ORT's own INT8 nodes wrong on that thread. qie's
AMX kernel uses MLAS's configuration and puts back any other one it finds. The exactness of the AMX GEMM itself is
in test_gemm_kernels.py / test_conv_kernels.py (every ISA path, tile edges from the kernel's own MR / NR / K step).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qie_ep
from conftest import SUPPORTED
from helpers import kernel_gemm, microkernel_tile, testing_lib
from qie_ep import reference as R

pytestmark = pytest.mark.skipif("amx" not in SUPPORTED, reason="CPU or OS lacks AMX-INT8")


def test_tile_rows_and_panel():
    """32-row tiles (two of AMX's 16) on the VNNI kernel's 48-column panels of K-groups of four (K from 33 on
    padded to 64)."""
    assert microkernel_tile("amx") == (32, 48, 4)


def test_foreign_tile_configuration_is_put_back():
    """A thread holding 8-row tiles (another library's) gets them back after a qie AMX tile; the tile is right."""
    assert testing_lib().qie_test_amx_foreign_config() == 0


def _matmul_integer_model(m, k, n, b):
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "za"], ["y"])], "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [helper.make_tensor("b", TensorProto.INT8, [k, n], b.tobytes(), raw=True),
         helper.make_tensor("za", TensorProto.UINT8, [], [7])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_ort_own_int8_right_after_qie_amx_on_the_same_thread():
    """ORT alone (MLAS's AMX path, on the calling thread) between qie AMX GEMMs of short tiles (the shapes that
    would load 8- or 5-row tiles if qie configured tiles per shape) stays equal to the reference."""
    rng = np.random.default_rng(3)
    m, k, n = 40, 192, 96
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(_matmul_integer_model(m, k, n, b).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    want = R.gemm_u8s8(a, b, np.int32(7), np.zeros(n, np.int32))
    for rows in (8, 5, 21):
        qa = rng.integers(0, 256, (rows, 200)).astype(np.uint8)
        qb = rng.integers(-128, 128, (200, 50)).astype(np.int8)
        za = np.array([3], np.int32)
        zb = np.zeros(50, np.int32)
        assert np.array_equal(kernel_gemm("amx", qa, qb, za, zb), R.gemm_u8s8(qa, qb, za[0], zb))
        assert np.array_equal(sess.run(None, {"a": a})[0], want), f"ORT's own MatMulInteger after a {rows}-row tile"


def test_amx_is_the_default_path_and_runs_the_custom_ops():
    """On an AMX host the library picks AMX, and a QLinearMatMul through qie's custom op equals ORT's own."""
    assert qie_ep.active_isa() == "amx"
    rng = np.random.default_rng(5)
    m, k, n = 37, 130, 70
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    g = helper.make_graph(
        [helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])], "qlmm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [m, n])],
        [helper.make_tensor("sa", TensorProto.FLOAT, [], [0.02]), helper.make_tensor("za", TensorProto.UINT8, [], [120]),
         helper.make_tensor("b", TensorProto.INT8, [k, n], b.tobytes(), raw=True),
         helper.make_tensor("sb", TensorProto.FLOAT, [], [0.01]), helper.make_tensor("zb", TensorProto.INT8, [], [0]),
         helper.make_tensor("sy", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("zy", TensorProto.UINT8, [], [128])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=10).SerializeToString()
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    so = ort.SessionOptions()
    qie_ep.register(so, ep=False)
    qie_ep.reset_stats()
    got = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    assert np.array_equal(got, plain)
    assert qie_ep.stats() == {("", "QLinearMatMul"): {"amx": 1}}
