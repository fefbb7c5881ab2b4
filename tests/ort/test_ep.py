"""qie's plugin execution provider (``qie_ep.register(so, ep=True)``): which QDQ units it claims, and their results.

A claimed unit DequantizeLinear(x) -> MatMul(., DequantizeLinear(W)) -> QuantizeLinear is computed in the integer
domain: it must equal the integer reference (``reference.qlinear_matmul``) exactly, and so ORT's own fused
QLinearMatMul (ORT_ENABLE_EXTENDED / ALL); at ORT_DISABLE_ALL / BASIC ORT computes the float QDQ semantics
(float product, then rounding), which may differ by one quantization step where the float sum lands within
rounding of a .5 tie: bounded to 1, and counted. What the EP must leave to ORT (non-constant weights, a
weight value used twice, float outputs, blocked quantization) stays on the CPU EP with plain ORT's results.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS, assert_exact
from qie_ep import reference as R
from qie_ep.session import options, session

needs_ep = pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here (ORT < 1.27 or no libqie_ep.so)")

T = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def rand(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


def qdq_matmul(rng, xdt, wdt, ydt, k, n, per_column, x_shape=("B", 5), w_const=True, extra_w_use=False,
               quantize_output=True, opset=21):
    """The QDQ unit with random operands; returns (model, operands for the reference)."""
    w = rand(rng, wdt, (k, n))
    sx, zx = np.array(0.03, np.float32), np.array(rand(rng, xdt, ()))
    sw = rng.uniform(0.002, 0.02, n if per_column else ()).astype(np.float32)
    zw = rand(rng, wdt, sw.shape) if wdt == np.uint8 else np.zeros(sw.shape, wdt)
    sy, zy = np.array(rng.uniform(0.3, 1.5), np.float32), np.array(rand(rng, ydt, ()))
    inits = [numpy_helper.from_array(v, name) for v, name in ((sx, "sx"), (zx, "zx"), (sw, "sw"), (zw, "zw"),
                                                              (sy, "sy"), (zy, "zy"))]
    inputs = [helper.make_tensor_value_info("x", T[xdt], [*x_shape, k])]
    if w_const:
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", T[wdt], [k, n]))
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=1),
             helper.make_node("MatMul", ["xf", "wf"], ["yf"])]
    outputs = []
    if quantize_output:
        nodes.append(helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", T[ydt], [*x_shape, n]))
    else:
        outputs.append(helper.make_tensor_value_info("yf", TensorProto.FLOAT, [*x_shape, n]))
    if extra_w_use:  # the dequantized weights also leave the unit
        outputs.append(helper.make_tensor_value_info("wf", TensorProto.FLOAT, [k, n]))
    g = helper.make_graph(nodes, "qdq_matmul", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return model, dict(w=w, sx=sx, zx=zx, sw=sw, zw=zw, sy=sy, zy=zy)


def ep_session(model, level="all", threads=1):
    so = options(level=level, threads=threads)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    qie_ep.register(so, ep=True)
    return session(model, so)


def assigned_to_qie(sess) -> int:
    """How many nodes ORT assigned to qie's EP."""
    return sum(len(a.get_nodes()) for a in sess.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME)


def reference(x, ops):
    return R.qlinear_matmul(x, ops["sx"], ops["zx"], ops["w"], ops["sw"], ops["zw"], ops["sy"], ops["zy"])


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("xdt,wdt,ydt", [(np.uint8, np.int8, np.uint8), (np.uint8, np.uint8, np.uint8),
                                         (np.int8, np.int8, np.int8), (np.int8, np.uint8, np.uint8)],
                         ids=["u8s8u8", "u8u8u8", "s8s8s8", "s8u8u8"])
@pytest.mark.parametrize("per_column", [False, True], ids=["per-tensor", "per-column"])
def test_qdq_matmul_unit_is_claimed_and_exact(level, xdt, wdt, ydt, per_column):
    rng = np.random.default_rng(31)
    model, ops = qdq_matmul(rng, xdt, wdt, ydt, 67, 50, per_column)
    before = qie_ep.ep_stats()["runs"]
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4, sess.get_provider_graph_assignment_info()
    plain = session(model, level=level)
    for batch in (1, 3):  # the batch dimension changes between runs
        x = rand(rng, xdt, (batch, 5, 67))
        got = sess.run(None, {"x": x})[0]
        assert_exact(got, reference(x, ops), f"(qie EP, level={level}, batch={batch})")
        if not COMPARE_BUILTIN:  # under valgrind ORT's own u8s8 kernels saturate (see helpers.py)
            continue
        want = plain.run(None, {"x": x})[0]
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        if level in ("extended", "all"):  # ORT's own QLinearMatMul: the same integer arithmetic
            assert_exact(got, want, f"(plain ORT, level={level})")
        else:  # ORT's float QDQ semantics: at most one step, only near rounding ties
            assert diff.max(initial=0) <= 1 and diff.mean() < 0.01, (level, diff.max(), diff.mean())
    assert qie_ep.ep_stats()["runs"] >= before + 2


@needs_ep
@pytest.mark.parametrize("x_shape,feed", [((), ()), (("M",), (7,)), (("B", 3, 4), (2, 3, 4))], ids=["1-D", "2-D", "4-D"])
def test_ranks_and_zero_rows(x_shape, feed):
    rng = np.random.default_rng(32)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 33, 17, True, x_shape=x_shape)
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 4
    x = rand(rng, np.uint8, (*feed, 33))
    assert_exact(sess.run(None, {"x": x})[0], reference(x, ops), f"x{list(x.shape)}")
    if feed:
        got = sess.run(None, {"x": rand(rng, np.uint8, (0, *feed[1:], 33))})[0]
        assert got.shape == (0, *feed[1:], 17)


@needs_ep
@pytest.mark.parametrize("case", ["runtime weights", "float output"])
def test_units_it_cannot_prove_stay_on_ort(case):
    rng = np.random.default_rng(33)
    kw = {"runtime weights": dict(w_const=False), "float output": dict(quantize_output=False)}[case]
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 24, True, **kw)
    feeds = {"x": rand(rng, np.uint8, (2, 5, 40))}
    if not kw.get("w_const", True):
        feeds["w"] = ops["w"]
    for level in ("disable", "all"):
        sess = ep_session(model, level)
        assert assigned_to_qie(sess) == 0, case
        if COMPARE_BUILTIN:  # what ORT fuses runs on qie's custom ops: equal to ORT's kernels where those are exact
            for got, want in zip(sess.run(None, feeds), session(model, level=level).run(None, feeds)):
                assert_exact(got, want, f"({case}, level={level})")


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_dequantized_weights_also_a_graph_output(level):
    """ORT gives each QDQ unit its own DequantizeLinear (its EnsureUniqueDQForNodeUnit step runs before any EP
    sees the graph): the unit is still claimed, and the float graph output comes from ORT's copy of the DQ."""
    rng = np.random.default_rng(35)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 24, True, extra_w_use=True)
    x = {"x": rand(rng, np.uint8, (2, 5, 40))}
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4
    y, wf = sess.run(None, x)
    assert_exact(y, reference(x["x"], ops), "y")
    assert_exact(wf, session(model, level=level).run(None, x)[1], "wf")


@needs_ep
def test_register_twice_and_two_units_in_a_chain():
    """Two claimed units hand each other uint8 directly (the Q -> DQ pair between them is inside the units);
    register(so, ep=True) twice adds the EP once."""
    rng = np.random.default_rng(34)
    m1, o1 = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 32, 32, True)
    g = m1.graph
    w2 = rand(rng, np.int8, (32, 16))
    g.initializer.extend([numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.array(0.01, np.float32), "sw2"),
                          numpy_helper.from_array(np.array(0.4, np.float32), "sy2"),
                          numpy_helper.from_array(np.array(128, np.uint8), "zy2")])
    g.node.extend([helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["y_f"]),
                   helper.make_node("DequantizeLinear", ["w2", "sw2"], ["w2f"]),
                   helper.make_node("MatMul", ["y_f", "w2f"], ["y2f"]),
                   helper.make_node("QuantizeLinear", ["y2f", "sy2", "zy2"], ["y2"])])
    g.node.append(helper.make_node("DequantizeLinear", ["y2", "sy2", "zy2"], ["y2_f"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("y2_f", TensorProto.FLOAT, ["B", 5, 16]))
    so = options(level="all")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    qie_ep.register(so, ep=True)
    qie_ep.register(so, ep=True)
    sess = session(m1, so)
    assert assigned_to_qie(sess) == 9  # 4 + 5: the DQ between the units is the second's input, the last joins it
    x = rand(rng, np.uint8, (2, 5, 32))
    y1 = reference(x, o1)
    want = R.qlinear_matmul(y1, o1["sy"], o1["zy"], w2, np.float32(0.01), np.int8(0), np.float32(0.4), np.uint8(128))
    want = (want.astype(np.int32) - 128).astype(np.float32) * np.float32(0.4)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want, "chain")


def dequantized_output(model, scale="sy", zero_point="zy", then=None):
    """The unit's quantized output y read by DequantizeLinear(scale, zero point) into 'y_f', the graph's output (or
    `then`'s: a float op after it)."""
    g = model.graph
    ydt = next(o for o in g.output if o.name == "y").type.tensor_type.elem_type
    g.node.append(helper.make_node("DequantizeLinear", ["y", scale, zero_point], ["y_f"]))
    out = "y_f"
    if then:
        g.node.append(helper.make_node(then, ["y_f"], ["z"]))
        out = "z"
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return ydt


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("then", [None, "Relu"])
def test_unit_with_its_dequantize_outputs_float(level, ydt, then):
    """Q -> DQ after a unit (the Q's only consumer, same scale and zero point) joins the unit: it outputs
    (q - zy) * sy itself, as ORT's DequantizeLinear computes it, and ORT runs two nodes fewer."""
    rng = np.random.default_rng(37)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, ydt, 40, 24, True)
    dequantized_output(model, then=then)
    sess, plain = ep_session(model, level), session(model, level=level)
    assert assigned_to_qie(sess) == 5, sess.get_provider_graph_assignment_info()
    for batch in (1, 3):
        x = rand(rng, np.uint8, (batch, 5, 40))
        codes = reference(x, ops)
        want = (codes.astype(np.int32) - int(ops["zy"])).astype(np.float32) * ops["sy"]
        if then == "Relu":
            want = np.maximum(want, 0)
        got = sess.run(None, {"x": x})[0]
        assert got.dtype == np.float32 and np.array_equal(got, want), level
        if COMPARE_BUILTIN and level in ("extended", "all"):
            np.testing.assert_array_equal(got, plain.run(None, {"x": x})[0])


@needs_ep
def test_dequantize_of_another_scale_or_read_by_a_unit_stays_outside():
    """A DQ with another scale than the Q's is ORT's (the unit outputs codes); one whose float op is quantized
    again is a tail segment with the EP's `tails` option (test_ep_tails.py), ORT's QDQ group without it."""
    rng = np.random.default_rng(38)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 24, True)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.77, np.float32), "sy_other"))
    dequantized_output(model, scale="sy_other")
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 4
    x = rand(rng, np.uint8, (2, 5, 40))
    want = (reference(x, ops).astype(np.int32) - int(ops["zy"])).astype(np.float32) * np.float32(0.77)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)
    # DQ -> Relu -> Q: a tail segment (7 nodes), or, tails off, a QDQ group of ORT's (its fusions need the DQ)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 24, True)
    dequantized_output(model, then="Relu")
    g = model.graph
    g.node.append(helper.make_node("QuantizeLinear", ["z", "sy", "zy"], ["zq"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("zq", TensorProto.UINT8, None))
    for tails, claimed in (("1", 7), ("0", 4)):
        so = options(level="all")
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        qie_ep.register(so, ep=True, ep_options={"tails": tails})
        sess = session(model, so)
        assert assigned_to_qie(sess) == claimed
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(reference(x, ops), ops["zy"]))


def test_without_the_ep_register_keeps_to_the_custom_ops(monkeypatch):
    """An ORT without the EP API (or a build without libqie_ep.so): register(so) registers the custom-op library
    alone and the QDQ unit runs as ORT fuses it (QLinearMatMul on qie's custom op at ALL); asking for the EP
    is a clear error."""
    monkeypatch.setattr("qie_ep._lib.ep_library_path", lambda: None)
    assert not qie_ep.ep_available()
    rng = np.random.default_rng(36)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 24, True)
    so = options(level="all")
    qie_ep.register(so)
    assert not so.has_providers()
    qie_ep.reset_stats()
    x = rand(rng, np.uint8, (2, 5, 40))
    assert_exact(session(model, so).run(None, {"x": x})[0], reference(x, ops), "custom ops only")
    assert ("", "QLinearMatMul") in qie_ep.stats()
    with pytest.raises(RuntimeError, match="no libqie_ep.so"):
        qie_ep.register(options(), ep=True)


def qdq_gemm(rng, trans_b, with_bias, per_column, bias_scale_matches=True, m=6, k=45, n=29):
    """DQ(x) -> Gemm(., DQ(W), [DQ(int32 bias, scale sx*sw)]) -> Q, as ORT's quantizer writes a quantized Gemm."""
    w = rand(rng, np.int8, (n, k) if trans_b else (k, n))
    sx, zx = np.array(0.04, np.float32), np.array(rand(rng, np.uint8, ()))
    sw = rng.uniform(0.002, 0.02, n if per_column else ()).astype(np.float32)
    zw = np.zeros(sw.shape, np.int8)
    sy, zy = np.array(0.7, np.float32), np.array(rand(rng, np.uint8, ()))
    bias = rng.integers(-30000, 30000, n).astype(np.int32)
    sb = (sx * sw).astype(np.float32) * (np.float32(1) if bias_scale_matches else np.float32(1.0001))
    inits = [numpy_helper.from_array(v, name) for v, name in ((sx, "sx"), (zx, "zx"), (w, "w"), (sw, "sw"), (zw, "zw"),
                                                              (sy, "sy"), (zy, "zy"), (bias, "b"), (sb, "sb"))]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0 if trans_b else 1),
             helper.make_node("Gemm", ["xf", "wf"] + (["bf"] if with_bias else []), ["yf"], transB=int(trans_b)),
             helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    if with_bias:
        nodes.insert(2, helper.make_node("DequantizeLinear", ["b", "sb"], ["bf"], axis=0))
    g = helper.make_graph(nodes, "qdq_gemm", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, ["M", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    want = lambda x: R.qgemm(x, sx, zx, w, sw, zw, bias if with_bias else None, sy, zy,  # noqa: E731
                             trans_b=int(trans_b))
    return model, want


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["B", "B^T"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "int32-bias"])
@pytest.mark.parametrize("per_column", [False, True], ids=["per-tensor", "per-column"])
def test_qdq_gemm_unit(level, trans_b, with_bias, per_column):
    """Gemm units (alpha = beta = 1, no transA): transB packed as such, the DequantizeLinear'd int32 bias added to
    the integer accumulator (its scale is sx * sw[n], as the quantizer writes it)."""
    rng = np.random.default_rng(40)
    model, want = qdq_gemm(rng, trans_b, with_bias, per_column)
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == (5 if with_bias else 4)
    plain = session(model, level=level)
    for m in (1, 6):
        x = rand(rng, np.uint8, (m, 45))
        got = sess.run(None, {"x": x})[0]
        assert_exact(got, want(x), f"(qie EP, level={level}, m={m})")
        if not COMPARE_BUILTIN:
            continue
        diff = np.abs(got.astype(np.int32) - plain.run(None, {"x": x})[0].astype(np.int32))
        assert diff.max(initial=0) <= (0 if level == "all" else 1), (level, diff.max())


@needs_ep
def test_gemm_with_a_bias_of_another_scale_stays_on_ort():
    rng = np.random.default_rng(41)
    model, _ = qdq_gemm(rng, True, True, True, bias_scale_matches=False)
    sess = ep_session(model, "all")
    assert assigned_to_qie(sess) == 0
    x = {"x": rand(rng, np.uint8, (6, 45))}
    if COMPARE_BUILTIN:
        assert_exact(sess.run(None, x)[0], session(model, level="all").run(None, x)[0], "bias of another scale")


@needs_ep
def test_matmul_unit_pacing_changes_no_result():
    """A MatMul unit learns from its first runs whether to run on the pool or the calling thread (option "pacing");
    at 2 threads, through and past that calibration and after a size change, its codes equal those of a session
    that always uses the pool."""
    rng = np.random.default_rng(77)
    model, _ = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 96, 200, True, x_shape=("B", "S"))
    sessions = []
    for pacing in ("1", "0"):
        so = options(threads=2, spinning=False)
        qie_ep.register(so, ep=True, ep_options={"pacing": pacing})
        sessions.append(session(model, so))
    for rows in (64, 7):
        x = rand(rng, np.uint8, (2, rows, 96))
        for _ in range(16):
            a, b = (s.run(None, {"x": x})[0] for s in sessions)
            np.testing.assert_array_equal(a, b)
