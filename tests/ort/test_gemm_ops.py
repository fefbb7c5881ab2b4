"""Single-node ONNX models of every op: qie vs the numpy reference (atol=0) and vs ORT's built-in
kernel, at all four graph optimization levels, with qie_ep.stats() proving the node ran on qie.

Where ORT's built-in result is compared, it is compared bit-exactly; the known differences are:
* K == 0: the accumulator is 0 (plus bias), so QLinearMatMul must give y_zero_point; ORT's built-in
  QLinearMatMul returns zeros (or whatever the buffer held) there, and its QGemm with float output
  writes the bias as bytes (HandleZeroKCase). Those cases are checked against the reference only.
* onnx.reference's MatMulInteger subtracts a per-row a_zero_point of shape [M] along K (numpy
  broadcasting); the ONNX spec says [M] is per row. It agrees when the zero point is given as [M, 1].
"""
from __future__ import annotations

import numpy as np
import pytest

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS, assert_exact, run, single_node_model
from qie_ep import reference as R

LEVELS = list(OPT_LEVELS)


def rand(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


def check_op(model, feeds, want, key, levels=LEVELS, builtin=True, threads=1):
    """qie == reference at each level, the node counted in stats, and ORT built-in == reference."""
    for level in levels:
        qie_ep.reset_stats()
        got = run(model, feeds, qie=True, level=level, threads=threads)[0]
        assert_exact(got, want, f"(qie, level={level})")
        assert key in qie_ep.stats(), f"{key} did not run on qie at level {level}: {qie_ep.stats()}"
        if builtin and COMPARE_BUILTIN:
            ref = run(model, feeds, qie=False, level=level, threads=threads)[0]
            assert_exact(ref, want, f"(ORT built-in, level={level})")


def qlinear_matmul_case(rng, adt, bdt, ydt, a_shape, b_shape, per_column, b_const=True, opset=21):
    a, b = rand(rng, adt, a_shape), rand(rng, bdt, b_shape)
    n = b_shape[-1] if len(b_shape) > 1 else 1
    sa, za = np.float32(0.05), rand(rng, adt, ())
    sb = rng.uniform(0.002, 0.02, n if per_column else ()).astype(np.float32)
    zb = (rand(rng, bdt, (n,)) if per_column else rand(rng, bdt, ())) if bdt == np.uint8 else np.zeros(sb.shape, bdt)
    acc = R.matmul_integer(a, b, za, np.broadcast_to(zb, (n,))).astype(np.float64)
    sy = np.float32(max(1e-3, float(np.abs(acc).max(initial=0)) * 0.05 * float(sb.max()) / 190))  # saturates
    zy = np.array(128 if ydt == np.uint8 else 0, ydt)
    feeds = {"a": a} if b_const else {"a": a, "b": b}
    inits = dict(a_scale=np.array(sa), a_zp=np.array(za), b_scale=sb, b_zp=zb, y_scale=np.array(sy), y_zp=zy)
    if b_const:
        inits["b"] = b
    names = ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"]
    vals = {**inits, **feeds}
    model = single_node_model("QLinearMatMul", [(k, vals[k]) for k in names], inits, ydt, opset=opset)
    want = R.qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)
    return model, feeds, want


@pytest.mark.parametrize("adt,bdt", [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)],
                         ids=["u8s8", "u8u8", "s8s8"])
@pytest.mark.parametrize("per_column", [False, True], ids=["per-tensor", "per-column"])
def test_qlinear_matmul_all_levels(adt, bdt, per_column):
    rng = np.random.default_rng(10)
    ydt = adt
    model, feeds, want = qlinear_matmul_case(rng, adt, bdt, ydt, (2, 7, 45), (45, 33), per_column)
    check_op(model, feeds, want, ("", "QLinearMatMul"))


@pytest.mark.parametrize("a_shape,b_shape", [((45,), (45, 9)), ((5, 45), (45,)), ((3, 1, 4, 20), (2, 20, 6)),
                                             ((2, 4, 20), (2, 20, 6)), ((1, 20), (3, 20, 5)), ((0, 20), (20, 7))])
def test_qlinear_matmul_broadcasting_and_runtime_b(a_shape, b_shape):
    rng = np.random.default_rng(11)
    model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, a_shape, b_shape, False, b_const=False)
    check_op(model, feeds, want, ("", "QLinearMatMul"), levels=["disable", "all"])


def test_qlinear_matmul_opset10_and_s8u8():
    rng = np.random.default_rng(12)
    model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, (9, 30), (30, 17), False, opset=10)
    check_op(model, feeds, want, ("", "QLinearMatMul"))
    # int8 A with uint8 B: valid ONNX; ORT has no built-in kernel for it, so only the reference judges.
    model, feeds, want = qlinear_matmul_case(rng, np.int8, np.uint8, np.int8, (9, 30), (30, 17), True)
    check_op(model, feeds, want, ("", "QLinearMatMul"), builtin=False)


@pytest.mark.parametrize("adt,bdt", [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)],
                         ids=["u8s8", "u8u8", "s8s8"])
def test_matmul_integer_all_levels(adt, bdt):
    rng = np.random.default_rng(13)
    a, b = rand(rng, adt, (2, 9, 70)), rand(rng, bdt, (70, 40))
    za, zb = rand(rng, adt, ()), rand(rng, bdt, (40,))
    model = single_node_model("MatMulInteger", [("a", a), ("b", b), ("za", np.array(za)), ("zb", zb)],
                              {"b": b, "za": np.array(za), "zb": zb}, np.int32)
    check_op(model, {"a": a}, R.matmul_integer(a, b, za, zb), ("", "MatMulInteger"))


def test_matmul_integer_per_row_a_zero_point_and_batched_b():
    """Per-row a_zero_point (ONNX allows it; ORT's built-in rejects it) is judged by the reference and by
    onnx.reference; a batched runtime B exercises per-call packing."""
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(14)
    a, b = rand(rng, np.uint8, (6, 33)), rand(rng, np.int8, (33, 21))
    za = rand(rng, np.uint8, (6,))
    model = single_node_model("MatMulInteger", [("a", a), ("b", b), ("za", za)], {"za": za}, np.int32)
    want = R.matmul_integer(a, b, za)
    za_col = za.reshape(6, 1)
    model_col = single_node_model("MatMulInteger", [("a", a), ("b", b), ("za", za_col)], {"za": za_col}, np.int32)
    assert_exact(ReferenceEvaluator(model_col).run(None, {"a": a, "b": b})[0], want, "(onnx.reference, za [M,1])")
    check_op(model_col, {"a": a, "b": b}, want, ("", "MatMulInteger"), levels=["all"], builtin=False)
    check_op(model, {"a": a, "b": b}, want, ("", "MatMulInteger"), levels=["all"], builtin=False)
    a3, b3 = rand(rng, np.uint8, (4, 5, 33)), rand(rng, np.int8, (4, 33, 21))
    model = single_node_model("MatMulInteger", [("a", a3), ("b", b3)], {}, np.int32)
    check_op(model, {"a": a3, "b": b3}, R.matmul_integer(a3, b3), ("", "MatMulInteger"), levels=["all"])
    # A 3-D A with a per-row zero point: the M zero points repeat in every batch, both when the batches are
    # folded into one GEMM (constant 2-D B) and when each batch has its own B.
    za5 = rand(rng, np.uint8, (5,))
    for bb, const_b in ((b, True), (b3, False)):
        inputs = [("a", a3), ("b", bb), ("za", za5)]
        model = single_node_model("MatMulInteger", inputs, {"za": za5, **({"b": bb} if const_b else {})}, np.int32)
        want = R.matmul_integer(a3, bb, za5)
        assert not np.array_equal(want, R.matmul_integer(a3, bb, np.tile(za5, 4)[:5][::-1])), "zero points must matter"
        check_op(model, {"a": a3, **({} if const_b else {"b": bb})}, want, ("", "MatMulInteger"), levels=["all"],
                 builtin=False)


def qgemm_model(rng, adt, bdt, m, k, n, trans_a, trans_b, alpha, c_shape, quant_out, per_column):
    a = rand(rng, adt, (k, m) if trans_a else (m, k))
    b = rand(rng, bdt, (n, k) if trans_b else (k, n))
    sa, za = np.array(0.03, np.float32), np.array(rand(rng, adt, ()))
    sb = rng.uniform(0.002, 0.02, (n,) if per_column else ()).astype(np.float32)
    zb = rand(rng, bdt, sb.shape)  # non-zero B zero points (one per column when per_column)
    inputs = [("a", a), ("sa", sa), ("za", za), ("b", b), ("sb", sb), ("zb", zb)]
    inits = {"sa": sa, "za": za, "b": b, "sb": sb, "zb": zb}
    c = None
    if c_shape is not None:
        c = rng.integers(-20000, 20000, c_shape).astype(np.int32)
        inputs.append(("c", c))
        inits["c"] = c
    ydt, sy, zy = np.float32, None, None
    if quant_out:
        if c is None:
            inputs.append(("", None))
        sy, zy = np.array(2.0, np.float32), np.array(128 if adt == np.uint8 else 0, adt)
        inputs += [("sy", sy), ("zy", zy)]
        inits.update(sy=sy, zy=zy)
        ydt = adt
    attrs = dict(alpha=alpha, transA=trans_a, transB=trans_b)
    model = single_node_model("QGemm", inputs, inits, ydt, domain="com.microsoft", attrs=attrs)
    want = R.qgemm(a, sa, za, b, sb, zb, c, sy, zy, alpha, trans_a, trans_b)
    return model, {"a": a}, want


@pytest.mark.parametrize("quant_out", [True, False], ids=["requant", "float-out"])
@pytest.mark.parametrize("adt,bdt", [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)],
                         ids=["u8s8", "u8u8", "s8s8"])
def test_qgemm_all_levels(quant_out, adt, bdt):
    rng = np.random.default_rng(15)
    model, feeds, want = qgemm_model(rng, adt, bdt, 13, 50, 37, 0, 1, 1.0, (37,), quant_out, True)
    check_op(model, feeds, want, ("com.microsoft", "QGemm"))


@pytest.mark.parametrize("c_shape", [None, (), (1, 19), (11, 1), (11, 19)], ids=str)
@pytest.mark.parametrize("trans", [(0, 0), (1, 0), (1, 1)], ids=str)
def test_qgemm_forms(c_shape, trans):
    rng = np.random.default_rng(16)
    model, feeds, want = qgemm_model(rng, np.uint8, np.int8, 11, 26, 19, trans[0], trans[1], 0.75, c_shape, True, False)
    check_op(model, feeds, want, ("com.microsoft", "QGemm"), levels=["all"])


@pytest.mark.parametrize("per_column", [False, True], ids=["per-tensor", "per-column"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_integer_to_float(with_bias, per_column):
    rng = np.random.default_rng(17)
    a, b = rand(rng, np.uint8, (3, 7, 64)), rand(rng, np.int8, (64, 48))
    sa = np.array(0.02, np.float32)
    sb = rng.uniform(0.002, 0.02, 48).astype(np.float32) if per_column else np.array(0.007, np.float32)
    za, zb = np.array(7, np.uint8), (rand(rng, np.int8, (48,)) if per_column else np.array(0, np.int8))
    bias = rng.normal(size=48).astype(np.float32)
    inputs = [("a", a), ("b", b), ("sa", sa), ("sb", sb), ("za", za), ("zb", zb)]
    inits = {"b": b, "sa": sa, "sb": sb, "za": za, "zb": zb}
    if with_bias:
        inputs.append(("bias", bias))
        inits["bias"] = bias
    model = single_node_model("MatMulIntegerToFloat", inputs, inits, np.float32, domain="com.microsoft")
    want = R.matmul_integer_to_float(a, b, sa, sb, za, zb, bias if with_bias else None)
    check_op(model, {"a": a}, want, ("com.microsoft", "MatMulIntegerToFloat"))


@pytest.mark.parametrize("form", ["per-tensor", "per-column", "bare"])
@pytest.mark.parametrize("bdt", [np.int8, np.uint8], ids=["s8", "u8"])
def test_dynamic_quantize_matmul(bdt, form):
    """Per-tensor scale and zero point with bias; per-column scales and zero points with bias; no zero point
    and no bias (both optional inputs absent)."""
    rng = np.random.default_rng(18)
    a = rng.normal(size=(2, 9, 64)).astype(np.float32)
    b = rand(rng, bdt, (64, 40))
    if form == "per-column":
        sb, zb = rng.uniform(0.002, 0.02, 40).astype(np.float32), rand(rng, bdt, (40,))
    else:
        sb, zb = np.array(0.01, np.float32), np.array(3 if bdt == np.uint8 else 0, bdt)
    bias = rng.normal(size=40).astype(np.float32)
    inputs = [("a", a), ("b", b), ("sb", sb), ("zb", zb), ("bias", bias)]
    inits = {"b": b, "sb": sb, "zb": zb, "bias": bias}
    if form == "bare":
        inputs, zb, bias = inputs[:3], None, None
        inits = {"b": b, "sb": sb}
    model = single_node_model("DynamicQuantizeMatMul", inputs, inits, np.float32, domain="com.microsoft")
    want = R.dynamic_quantize_matmul(a, b, sb, zb, bias)
    check_op(model, {"a": a}, want, ("com.microsoft", "DynamicQuantizeMatMul"))


def test_zero_size():
    """Zero-size tensors give correct empty outputs; K == 0 gives the epilogue of a zero accumulator."""
    rng = np.random.default_rng(19)
    for a_shape, b_shape in [((0, 8), (8, 5)), ((4, 8), (8, 0)), ((2, 0, 8), (8, 5))]:
        model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, a_shape, b_shape, False, b_const=False)
        check_op(model, feeds, want, ("", "QLinearMatMul"), levels=["all"])
    model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, (4, 0), (0, 5), False, b_const=False)
    assert (want == 128).all()  # y_zero_point
    check_op(model, feeds, want, ("", "QLinearMatMul"), levels=["all"], builtin=False)
    # QGemm K == 0 with float output and a bias: ORT's built-in writes the bias bytes into the float
    # output (HandleZeroKCase), so only the reference judges: y = float(C) * multiplier.
    model, feeds, want = qgemm_model(rng, np.uint8, np.int8, 3, 0, 4, 0, 0, 1.0, (4,), False, False)
    check_op(model, feeds, want, ("com.microsoft", "QGemm"), levels=["all"], builtin=False)


def test_threads_honoured():
    """Two intra-op threads give the same integers (the work is split through ORT's pool)."""
    rng = np.random.default_rng(20)
    model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, (200, 300), (300, 500), True)
    check_op(model, feeds, want, ("", "QLinearMatMul"), levels=["all"], threads=2)


@pytest.mark.parametrize("spinning", [False, True])
def test_pacing_through_calibration_changes_no_result(spinning):
    """The custom ops learn per input size from their first runs (2 warm-up, then 6 each way, alternating) whether
    ORT's pool pays for a call (kernels/pacing.h): at 2 threads, pools spinning or not, every run through and past
    the calibration equals the reference, for a GEMV and a 96-row product (size classes learnt apart)."""
    import onnxruntime as ort

    from qie_ep.session import options

    rng = np.random.default_rng(23)
    for shape in ((1, 300), (96, 300)):
        model, feeds, want = qlinear_matmul_case(rng, np.uint8, np.int8, np.uint8, shape, (300, 200), True)
        s = ort.InferenceSession(model.SerializeToString(), options(qie=True, threads=2, spinning=spinning, ep=False))
        for i in range(18):
            assert_exact(s.run(None, feeds)[0], want, f"{shape} run {i}")


@pytest.mark.parametrize("isa", qie_ep.ISAS)
def test_forced_isa_runs_and_is_reported(isa, restore_isa):
    if isa not in qie_ep.supported_isas():
        with pytest.raises(ValueError, match="not supported"):
            qie_ep.force_isa(isa)
        return
    qie_ep.force_isa(isa)
    rng = np.random.default_rng(21)
    model, feeds, want = qlinear_matmul_case(rng, np.int8, np.int8, np.int8, (17, 70), (70, 45), True)
    qie_ep.reset_stats()
    assert_exact(run(model, feeds)[0], want, f"isa={isa}")
    assert qie_ep.stats()[("", "QLinearMatMul")] == {isa: 1}
