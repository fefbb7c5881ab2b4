"""qie's EP Softmax unit: DequantizeLinear -> Softmax (last axis) -> QuantizeLinear claimed as one fused node.

Against the float QDQ semantics (``reference.qdq_softmax``, and ORT's own float kernels at ORT_DISABLE_ALL) and
ORT's QLinearSoftmax (its fusion at EXTENDED / ALL): within one output step, differences rare (libm's exp where
MLAS has its approximation; the row sum in double). Short rows (per element) and long rows (histogram and one
table per row) are both run; shapes change between runs, zero-size rows and zero rows give empty outputs; units
qie cannot prove (another axis, a negative scale, a second consumer) stay on ORT.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS
from qie_ep import reference as R
from qie_ep.session import session
from test_ep import assigned_to_qie, ep_session, needs_ep, rand

T = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def qdq_softmax(xdt, ydt, shape, axis=None, opset=21, sx=0.07, float_output=False):
    zx = np.array(7 if xdt == np.uint8 else -3, xdt)
    sy, zy = np.float32(1 / 256), np.array(0 if ydt == np.uint8 else -128, ydt)
    inits = [numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(zx, "zx"),
             numpy_helper.from_array(np.array(sy, np.float32), "sy"), numpy_helper.from_array(zy, "zy")]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("Softmax", ["xf"], ["p"], **attrs),
             helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", T[ydt], None)]
    if float_output:  # the float probabilities are a graph output too
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "qdq_softmax", [helper.make_tensor_value_info("x", T[xdt], shape)], outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return model, dict(x_scale=np.float32(sx), x_zero_point=zx, y_scale=sy, y_zero_point=zy)


def within_one_step(got, want, what, frac_max=0.01):
    """Codes of the same shape and dtype, none more than one step apart, at most `frac_max` of them apart at all."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max(initial=0) <= 1, (what, diff.max())
    frac = float((diff > 0).mean()) if diff.size else 0.0
    assert frac <= frac_max, (what, frac)


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("xdt,ydt", [(np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)],
                         ids=["u8u8", "s8s8", "s8u8"])
def test_softmax_unit_is_claimed_and_within_one_step(level, xdt, ydt):
    rng = np.random.default_rng(5)
    model, q = qdq_softmax(xdt, ydt, ["B", "R", "D"])
    sess, plain = ep_session(model, level), session(model, level=level)
    assert assigned_to_qie(sess) == 3, sess.get_provider_graph_assignment_info()
    before = qie_ep.ep_stats()["runs"]
    # short rows (per element), long rows (histogram + table), one-element rows, a row of one repeated code
    for shape in ((2, 3, 37), (1, 4, 1500), (3, 1, 1), (1, 2, 600)):
        x = rand(rng, xdt, shape)
        if shape == (1, 2, 600):
            x[0, 0] = x[0, 0, 0]
        got = sess.run(None, {"x": x})[0]
        within_one_step(got, R.qdq_softmax(x, **q), f"reference level={level} shape={shape}")
        # One-element rows: p = 1 is 256 steps of 1/256, saturated to the top code by the float graph and qie;
        # ORT's fused QLinearSoftmax (EXTENDED / ALL) wraps it to 0 (ORT 1.31), so those rows are not compared.
        if COMPARE_BUILTIN and not (shape[-1] == 1 and level in ("extended", "all")):
            within_one_step(got, plain.run(None, {"x": x})[0], f"ORT level={level} shape={shape}")
    assert qie_ep.ep_stats()["runs"] >= before + 4


@needs_ep
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_zero_size_rows_and_dims(shape):
    model, q = qdq_softmax(np.uint8, np.uint8, ["R", "D"])
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 3
    got = sess.run(None, {"x": np.zeros(shape, np.uint8)})[0]
    assert got.shape == shape and got.dtype == np.uint8


@needs_ep
def test_softmax_of_a_scalar_is_an_error_naming_the_node():
    model, _ = qdq_softmax(np.uint8, np.uint8, None)  # rank unknown: claimed, checked at run time
    sess = ep_session(model)
    with pytest.raises(Exception, match="Softmax input must have rank >= 1"):
        sess.run(None, {"x": np.array(3, np.uint8)})


@needs_ep
@pytest.mark.parametrize("case", ["axis_not_last", "opset11_flattens", "negative_scale", "float_output"])
def test_units_it_cannot_prove_stay_on_ort(case):
    kw = {"axis_not_last": dict(axis=1), "opset11_flattens": dict(opset=11), "negative_scale": dict(sx=-0.07),
          "float_output": dict(float_output=True)}[case]
    model, _ = qdq_softmax(np.uint8, np.uint8, [2, 3, 5], **kw)
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 0, (case, sess.get_provider_graph_assignment_info())
    x = rand(np.random.default_rng(1), np.uint8, (2, 3, 5))
    for got, want in zip(sess.run(None, {"x": x}), session(model).run(None, {"x": x})):
        np.testing.assert_array_equal(got, want)


@needs_ep
@pytest.mark.parametrize("opset,axis", [(11, 1), (13, 1), (21, -1)])
def test_last_axis_forms_are_claimed(opset, axis):
    """opset < 13 flattens from `axis`: the same as the last axis when it is the last one (here, of a 2-D input)."""
    model, q = qdq_softmax(np.uint8, np.uint8, [3, 40], axis=axis, opset=opset)
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 3
    x = rand(np.random.default_rng(2), np.uint8, (3, 40))
    within_one_step(sess.run(None, {"x": x})[0], R.qdq_softmax(x, **q), f"opset={opset}")


@st.composite
def softmax_cases(draw):
    """A QDQ Softmax graph and a feed: u8/s8 in and out, scales from tiny to large, shapes of rank 1-4 with zero-size
    and long rows (both of the unit's paths), the input declared static, symbolic or of unknown rank."""
    xdt = draw(st.sampled_from([np.uint8, np.int8]))
    ydt = draw(st.sampled_from([np.uint8, np.int8]))
    rank = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 5])) for _ in range(rank - 1)]
    shape.append(draw(st.sampled_from([0, 1, 2, 7, 40, 511, 512, 1031])))
    sx = draw(st.sampled_from([1e-4, 0.01, 0.07, 0.5, 3.0]))
    decl = draw(st.sampled_from(["static", "symbolic", "unknown_rank"]))
    declared = {"static": shape, "symbolic": [f"d{i}" for i in range(rank)], "unknown_rank": None}[decl]
    axis = draw(st.sampled_from([None, -1] + ([rank - 1] if decl != "unknown_rank" else [])))
    opset = draw(st.sampled_from([13, 21]))
    model, _ = qdq_softmax(xdt, ydt, declared, axis=axis, opset=opset, sx=sx)
    seed = draw(st.integers(0, 2**16))
    return model, rand(np.random.default_rng(seed), xdt, tuple(shape))


@needs_ep
@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(softmax_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_softmax_units_equal_ort_within_one_step(case, level):
    """Whatever plain ORT computes for a generated QDQ Softmax graph, ORT + qie computes within one step (the same
    shape and dtype); one-element rows compared with the float graph only at EXTENDED / ALL (ORT's QLinearSoftmax
    wraps p = 1 there, module docstring), and an empty input gives an empty output (where ORT's QLinearSoftmax
    returns none)."""
    model, x = case
    plain, sess = session(model, level=level), ep_session(model, level)
    want, got = plain.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
    if want is None:  # ORT 1.31's QLinearSoftmax (EXTENDED / ALL) returns no value for an empty input
        assert x.size == 0 and got.shape == x.shape, (level, x.shape)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    if x.shape[-1] == 1 and level in ("extended", "all"):
        want = session(model, level="disable").run(None, {"x": x})[0]
    if COMPARE_BUILTIN:
        within_one_step(got, want, f"level={level} shape={x.shape}")


@needs_ep
def test_softmax_unit_pacing_changes_no_result():
    """The unit learns from its first runs whether to run on the pool or the calling thread (option "pacing"); at 2
    threads its codes equal those of a session that always uses the pool, through and past the calibration and for a
    second size class."""
    from qie_ep.session import options

    model, _ = qdq_softmax(np.uint8, np.uint8, ["N", 300])
    sessions = []
    for pacing in ("1", "0"):
        so = options(threads=2, spinning=False)
        qie_ep.register(so, ep=True, ep_options={"pacing": pacing})
        sessions.append(session(model, so))
    rng = np.random.default_rng(5)
    for rows in (64, 3):
        x = rand(rng, np.uint8, (rows, 300))
        for _ in range(16):
            a, b = (s.run(None, {"x": x})[0] for s in sessions)
            np.testing.assert_array_equal(a, b)
