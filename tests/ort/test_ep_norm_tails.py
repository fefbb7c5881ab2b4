"""MatMul / Gemm unit tails, the residual LayerNorm: after a unit's float output, [Add(bias)] -> Add(residual) ->
LayerNormalization(last axis) -> Q (BERT's output projections) joins the unit when the residual has the unit's rank
(broadcast at run time as ORT's Add does). Computed per row in float32 in ORT's LayerNormalization kernel's order,
then quantized: within one step of the float graph and of ORT (whose SkipLayerNormalization at EXTENDED / ALL sums its own way); a residual of
another rank, a read Mean output, or a residual from inside the unit leave it to ORT.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers import COMPARE_BUILTIN, OPT_LEVELS
from qie_ep.session import session
from test_ep import T, assigned_to_qie, ep_session, needs_ep, qdq_matmul, rand, reference
from test_ep_tails import dequantize, quantize


def _norm_model(rng, residual_dims=("B", "S"), bias=True, mean_output=False, ydt=np.uint8, n=64):
    """BERT's output projection: unit -> Q -> DQ -> Add(bias) -> Add(residual) -> LayerNormalization -> Q."""
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, n, True, x_shape=("B", "S"))
    g = model.graph
    b = rng.normal(0, 0.5, n).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, n).astype(np.float32), rng.normal(0, 0.2, n).astype(np.float32)
    g.input.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, [*residual_dims, n]))
    g.initializer.extend([numpy_helper.from_array(b, "nb"), numpy_helper.from_array(gamma, "gamma"),
                          numpy_helper.from_array(beta, "beta"), numpy_helper.from_array(np.array(0.03, np.float32), "s1"),
                          numpy_helper.from_array(np.array(128 if ydt == np.uint8 else 0, ydt), "z1")])
    nodes = [helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["d1"])]
    cur = "d1"
    if bias:
        nodes.append(helper.make_node("Add", ["nb", "d1"], ["a1"]))
        cur = "a1"
    nodes += [helper.make_node("Add", [cur, "res"], ["a2"]),
              helper.make_node("LayerNormalization", ["a2", "gamma", "beta"], ["ln"] + (["mean"] if mean_output else []),
                               axis=-1, epsilon=1e-5),
              helper.make_node("QuantizeLinear", ["ln", "s1", "z1"], ["q1"])]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("q1", T[ydt], None))
    if mean_output:
        g.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))

    def want(x, res):
        v = dequantize(reference(x, ops), ops["sy"], ops["zy"])
        v = (v + b if bias else v) + res
        mean = v.mean(-1, keepdims=True, dtype=np.float32)
        var = (v * v).mean(-1, keepdims=True, dtype=np.float32) - mean * mean
        return quantize((v - mean) / np.sqrt(var + np.float32(1e-5)) * gamma + beta, 0.03,
                        128 if ydt == np.uint8 else 0, ydt)
    return model, want


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_residual_layernorm_tail(level, ydt, bias):
    """DQ -> [Add(bias)] -> Add(residual of the same symbolic shape) -> LayerNormalization -> Q after a unit (BERT's
    output projection) joins it: float32 as ORT's LayerNormalization kernel computes it, then the Q; within one step
    of the float graph and of ORT (SkipLayerNormalization at EXTENDED / ALL), on few codes; zero rows give none."""
    rng = np.random.default_rng(63)
    model, want = _norm_model(rng, bias=bias, ydt=ydt)
    sess = ep_session(model, level)
    claimed = assigned_to_qie(sess)
    assert claimed == 4 + 1 + 3 + bias, sess.get_provider_graph_assignment_info()
    plain = session(model, level=level)
    for batch in (1, 3, 0):
        x, res = rand(rng, np.uint8, (batch, 5, 40)), rng.normal(0, 1, (batch, 5, 64)).astype(np.float32)
        got = sess.run(None, {"x": x, "res": res})[0]
        assert got.shape == (batch, 5, 64) and got.dtype == ydt
        if batch == 0:
            continue
        for name, ref in [("numpy", want(x, res))] + ([("ORT", plain.run(None, {"x": x, "res": res})[0])]
                                                       if COMPARE_BUILTIN else []):
            diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
            bound = 2 if name == "ORT" and level in ("disable", "basic") else 1  # ORT's float GEMM's tie, then LN
            assert diff.max() <= bound and diff.mean() < 0.02, (name, level, diff.max(), diff.mean())


@needs_ep
def test_residual_from_a_node_compiles_quietly(capfd):
    """A residual produced by a node outside the unit (BERT's: the previous LayerNorm's DQ) is an input of the fused
    graph at Compile, with no producer there: asking ORT for one logged a warning per layer at its default level."""
    import onnxruntime as ort

    import qie_ep

    rng = np.random.default_rng(64)
    model, _ = _norm_model(rng)
    g = model.graph
    g.input[1].name = "res_in"
    g.node.insert(0, helper.make_node("Abs", ["res_in"], ["res"]))
    so = ort.SessionOptions()
    so.log_severity_level = 2  # ORT's default: warnings shown
    qie_ep.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so)
    x, res = rand(rng, np.uint8, (2, 5, 40)), rng.normal(0, 1, (2, 5, 64)).astype(np.float32)
    assert sess.run(None, {"x": x, "res_in": res})[0].shape == (2, 5, 64)
    assert "Unable to get producer" not in capfd.readouterr().err


@needs_ep
@pytest.mark.parametrize("case", ["residual of another rank", "LayerNorm's mean read"])
def test_layernorm_tails_the_unit_must_not_take(case):
    """A residual of another rank (its Add would raise the rank LayerNormalization's axis counts from), a
    LayerNormalization whose Mean output is read: the unit outputs its float values (DQ taken, 5 nodes) and ORT runs
    the rest."""
    rng = np.random.default_rng(64)
    model, _ = _norm_model(rng, residual_dims=("U", "B", "S") if case.startswith("residual") else ("B", "S"),
                           mean_output=case.startswith("LayerNorm"))
    x = rand(rng, np.uint8, (2, 5, 40))
    res = rng.normal(0, 1, (1, 2, 5, 64) if case.startswith("residual") else (2, 5, 64)).astype(np.float32)
    for level in ("disable", "all"):
        sess = ep_session(model, level)
        assert assigned_to_qie(sess) == 5, (case, sess.get_provider_graph_assignment_info())
        if COMPARE_BUILTIN:
            for got, want in zip(sess.run(None, {"x": x, "res": res}), session(model, level=level).run(None, {"x": x, "res": res})):
                np.testing.assert_array_equal(got, want, f"({case}, level={level})")


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_residual_of_unproven_shape_broadcasts_as_ort_does(level):
    """A residual whose dims ORT cannot prove equal to the unit's (other symbols: BERT's attention output, whose head
    merge Reshape leaves the unit's dims unknown) joins the unit; at run time it is broadcast as ORT's Add does: the
    same shape, a residual repeated along an axis, one that widens the output (the unit's rows repeated);
    one that cannot broadcast is an error naming the LayerNormalization (ORT's Add fails there too)."""
    rng = np.random.default_rng(64)
    model, _ = _norm_model(rng, residual_dims=("B2", "S2"))
    sess, plain = ep_session(model, level), session(model, level=level)
    assert assigned_to_qie(sess) == 9, sess.get_provider_graph_assignment_info()
    for xs, rs in (((2, 5), (2, 5, 64)), ((2, 5), (1, 5, 64)), ((2, 5), (2, 1, 64)),
                   ((1, 5), (3, 5, 64)), ((2, 1), (2, 4, 64)), ((0, 5), (1, 5, 64))):
        x, res = rand(rng, np.uint8, (*xs, 40)), rng.normal(0, 1, rs).astype(np.float32)
        got = sess.run(None, {"x": x, "res": res})[0]
        assert got.shape == np.broadcast_shapes((*xs, 64), rs), (xs, rs, got.shape)
        if COMPARE_BUILTIN and got.size:
            want = plain.run(None, {"x": x, "res": res})[0]
            diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
            assert diff.max() <= (2 if level == "disable" else 1) and diff.mean() < 0.02, (xs, rs, diff.max())
    x, res = rand(rng, np.uint8, (2, 5, 40)), rng.normal(0, 1, (3, 5, 64)).astype(np.float32)
    with pytest.raises(Exception, match="LayerNormalization '.*': the residual of shape \\[3,5,64\\] does not broadcast"):
        sess.run(None, {"x": x, "res": res})


@st.composite
def norm_cases(draw):
    """A unit + residual LayerNorm tail of random width, rank (static / symbolic dims), dtypes, bias or not, epsilon,
    and its inputs (zero rows included)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    n, k = draw(st.integers(1, 80)), draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
    symbolic = draw(st.booleans())
    dims = tuple(f"d{i}" for i in range(len(lead))) if symbolic else tuple(lead)
    ydt = draw(st.sampled_from([np.uint8, np.int8]))
    model, ops = qdq_matmul(rng, draw(st.sampled_from([np.uint8, np.int8])), np.int8, np.uint8, k, n,
                            draw(st.booleans()), x_shape=dims)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, [*dims, n]))
    g.initializer.extend([numpy_helper.from_array(rng.normal(0, 1, n).astype(np.float32), "nb"),
                          numpy_helper.from_array(rng.uniform(0.2, 2, n).astype(np.float32), "gamma"),
                          numpy_helper.from_array(np.array(rng.uniform(0.005, 0.1), np.float32), "s1"),
                          numpy_helper.from_array(np.array(rng.integers(0, 50), ydt), "z1")])
    cur = "d1"
    nodes = [helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["d1"])]
    if draw(st.booleans()):
        nodes.append(helper.make_node("Add", ["d1", "nb"], ["a1"]))
        cur = "a1"
    nodes += [helper.make_node("Add", ["res", cur], ["a2"]),
              helper.make_node("LayerNormalization", ["a2", "gamma"], ["ln"], epsilon=draw(st.sampled_from([1e-5, 1e-12]))),
              helper.make_node("QuantizeLinear", ["ln", "s1", "z1"], ["q1"])]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("q1", T[ydt], None))
    feed = tuple(lead)
    x = rand(rng, np.uint8 if ops["zx"].dtype == np.uint8 else np.int8, (*feed, k))
    return model, {"x": x, "res": rng.normal(0, 2, (*feed, n)).astype(np.float32)}


@needs_ep
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(norm_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_layernorm_tails_equal_ort(case, level):
    """Whatever plain ORT computes for a generated unit + residual LayerNorm graph, ORT + qie computes with the same
    shape and type, within two steps (one from ORT's float GEMM at a tie at DISABLE / BASIC, one from the LayerNorm's
    float sums in another order at EXTENDED / ALL), on few codes."""
    model, feeds = case
    plain, sess = session(model, level=level), ep_session(model, level)
    want, got = plain.run(None, feeds)[0], sess.run(None, feeds)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    if COMPARE_BUILTIN and want.size:
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        assert diff.max() <= 2 and diff.mean() < 0.05, (level, diff.max(), diff.mean(), want.shape)


@needs_ep
def test_layernorm_of_the_units_own_value_twice():
    """Add(v, v) -> LayerNormalization -> Q after a unit (the 'residual' is the unit's own float output, read twice):
    neither the DequantizeLinear (two readers) nor the tail is taken; the session builds, plain ORT's results."""
    rng = np.random.default_rng(65)
    model, _ = _norm_model(rng, bias=False)
    g = model.graph
    add = next(n for n in g.node if n.op_type == "Add")
    add.input[1] = add.input[0]
    g.input.pop()  # 'res' is read no more
    x = rand(rng, np.uint8, (2, 5, 40))
    sess = ep_session(model)
    assert assigned_to_qie(sess) == 4
    if COMPARE_BUILTIN:
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], session(model, level="all").run(None, {"x": x})[0])


def _float_unit_model(rng, end, bias=True, n=48):
    """`qie quantize`'s residual form: DQ(x), DQ(W) -> MatMul (no Q: float output) -> [Add(bias)] -> Add(residual)
    [-> LayerNormalization [-> Q]], the model's output at ``end`` ("sum", "ln" or "q")."""
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, n, True, x_shape=("B", "S"), quantize_output=False)
    g = model.graph
    b = rng.normal(0, 0.5, n).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, n).astype(np.float32), rng.normal(0, 0.2, n).astype(np.float32)
    g.input.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, ["B", "S", n]))
    g.initializer.extend([numpy_helper.from_array(b, "nb"), numpy_helper.from_array(gamma, "gamma"),
                          numpy_helper.from_array(beta, "beta"), numpy_helper.from_array(np.array(0.03, np.float32), "s1"),
                          numpy_helper.from_array(np.array(128, np.uint8), "z1")])
    cur = "yf"
    if bias:
        g.node.append(helper.make_node("Add", ["yf", "nb"], ["a1"]))
        cur = "a1"
    g.node.append(helper.make_node("Add", [cur, "res"], ["a2"]))
    if end != "sum":
        g.node.append(helper.make_node("LayerNormalization", ["a2", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5))
    c = rng.uniform(0.2, 3.0, n).astype(np.float32)  # SmoothQuant's 1 / s
    if end == "q":
        g.node.append(helper.make_node("QuantizeLinear", ["ln", "s1", "z1"], ["q1"]))
    if end in ("mulq", "mulq+ln"):
        g.initializer.append(numpy_helper.from_array(c, "c"))
        g.node.extend([helper.make_node("Mul", ["ln", "c"], ["m1"]), helper.make_node("QuantizeLinear", ["m1", "s1", "z1"], ["q1"])])
    out = {"sum": "a2", "ln": "ln"}.get(end, "q1")
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT if out != "q1" else TensorProto.UINT8, None))
    if end == "mulq+ln":  # the LayerNormalization's value read outside the unit too (BERT's next residual)
        g.node.append(helper.make_node("Relu", ["ln"], ["lr"]))
        g.output.append(helper.make_tensor_value_info("lr", TensorProto.FLOAT, None))

    def want(x, res, stage=end):  # float64 sums of the dequantized operands, then the float32 steps
        xf = (x.astype(np.float64) - ops["zx"]) * ops["sx"]
        wf = (ops["w"].astype(np.float64) - ops["zw"]) * ops["sw"]
        v = (xf @ wf).astype(np.float32)
        v = (v + b if bias else v) + res
        if stage == "sum":
            return v
        mean = v.mean(-1, keepdims=True, dtype=np.float32)
        var = (v * v).mean(-1, keepdims=True, dtype=np.float32) - mean * mean
        v = (v - mean) / np.sqrt(var + np.float32(1e-5)) * gamma + beta
        if stage == "ln":
            return v
        return quantize(v * c if stage.startswith("mulq") else v, 0.03, 128, np.uint8)
    return model, want, 3 + bias + 1 + (end != "sum") + (end != "sum" and end != "ln") + end.startswith("mulq")


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("end", ["sum", "ln", "q", "mulq", "mulq+ln"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_float_unit_residual_tail(level, end, bias):
    """A MatMul whose float output enters a residual sum (no Q / DQ between: `qie quantize`'s float_residual_outputs)
    is a unit with that tail: float(acc) * (sx * sw[n]) as ORT's MatMulIntegerToFloat computes it, + bias, + the
    residual, [LayerNormalization [[Mul(column constant)] Q]]: float outputs equal the float graph's to float32
    rounding, codes within one step, ORT's too; zero rows give none. With the Mul (SmoothQuant's division) the
    LayerNormalization's value may also be read outside: the unit outputs it as well, equal to ORT's."""
    rng = np.random.default_rng(71)
    model, want, nodes = _float_unit_model(rng, end, bias)
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == nodes, sess.get_provider_graph_assignment_info()
    plain = session(model, level=level)
    for batch in (1, 3, 0):
        x, res = rand(rng, np.uint8, (batch, 7, 40)), rng.normal(0, 1, (batch, 7, 48)).astype(np.float32)
        outs = sess.run(None, {"x": x, "res": res})
        got = outs[0]
        assert got.shape == (batch, 7, 48)
        if batch == 0:
            continue
        theirs = plain.run(None, {"x": x, "res": res}) if COMPARE_BUILTIN else None
        if end == "mulq+ln":  # the LayerNorm's value, through the Relu outside
            np.testing.assert_allclose(outs[1], np.maximum(want(x, res, "ln"), 0), rtol=1e-4, atol=1e-4)
            if theirs:
                np.testing.assert_allclose(outs[1], theirs[1], rtol=1e-5, atol=1e-5)
        for name, ref in [("numpy", want(x, res))] + ([("ORT", theirs[0])] if theirs else []):
            if end == "q":
                diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
                assert diff.max() <= 1 and diff.mean() < 0.02, (name, level, diff.max(), diff.mean())
            else:
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5 if end == "sum" else 1e-4, err_msg=name)


@needs_ep
def test_float_unit_needs_its_tail():
    """A MatMul with a float output that no residual sum reads (a bias Add alone, a Relu) stays ORT's, and so does one
    whose residual comes from inside the unit (x + x @ W's own input is not a residual of another tensor)."""
    rng = np.random.default_rng(72)
    for tail in ("bias", "relu"):
        model, _ = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, 48, True, x_shape=("B", "S"), quantize_output=False)
        g = model.graph
        g.initializer.append(numpy_helper.from_array(rng.normal(0, 1, 48).astype(np.float32), "nb"))
        g.node.append(helper.make_node("Add", ["yf", "nb"], ["o"]) if tail == "bias" else helper.make_node("Relu", ["yf"], ["o"]))
        del g.output[:]
        g.output.append(helper.make_tensor_value_info("o", TensorProto.FLOAT, None))
        assert assigned_to_qie(ep_session(model, "all")) == 0, tail


@st.composite
def float_unit_cases(draw):
    """A float unit (MatMul without its Q) of random width, rank (static / symbolic dims), dtypes and weight scales,
    with a random tail: [bias] + residual, then nothing, a LayerNorm, a LayerNorm -> Q, or a LayerNorm -> Mul -> Q
    with the LayerNorm also read outside; and its inputs (zero rows included)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    n, k = draw(st.integers(1, 80)), draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
    dims = tuple(f"d{i}" for i in range(len(lead))) if draw(st.booleans()) else tuple(lead)
    xdt, wdt = draw(st.sampled_from([np.uint8, np.int8])), draw(st.sampled_from([np.int8, np.uint8]))
    model, ops = qdq_matmul(rng, xdt, wdt, np.uint8, k, n, draw(st.booleans()), x_shape=dims, quantize_output=False)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, [*dims, n]))
    g.initializer.extend([numpy_helper.from_array(rng.normal(0, 1, n).astype(np.float32), "nb"),
                          numpy_helper.from_array(rng.uniform(0.2, 2, n).astype(np.float32), "gamma"),
                          numpy_helper.from_array(rng.uniform(0.3, 3, n).astype(np.float32), "c"),
                          numpy_helper.from_array(np.array(rng.uniform(0.005, 0.1), np.float32), "s1"),
                          numpy_helper.from_array(np.array(rng.integers(0, 50), np.uint8), "z1")])
    cur = "yf"
    if draw(st.booleans()):
        g.node.append(helper.make_node("Add", ["yf", "nb"], ["a1"]))
        cur = "a1"
    g.node.append(helper.make_node("Add", ["res", cur], ["a2"]))
    end = draw(st.sampled_from(["sum", "ln", "q", "mulq+ln"]))
    outs = [("a2", TensorProto.FLOAT)]
    if end != "sum":
        g.node.append(helper.make_node("LayerNormalization", ["a2", "gamma"], ["ln"],
                                       epsilon=draw(st.sampled_from([1e-5, 1e-12]))))
        outs = [("ln", TensorProto.FLOAT)]
    if end == "q":
        g.node.append(helper.make_node("QuantizeLinear", ["ln", "s1", "z1"], ["q1"]))
        outs = [("q1", TensorProto.UINT8)]
    if end == "mulq+ln":
        g.node.extend([helper.make_node("Mul", ["ln", "c"], ["m1"]), helper.make_node("QuantizeLinear", ["m1", "s1", "z1"], ["q1"]),
                       helper.make_node("Relu", ["ln"], ["lr"])])
        outs = [("q1", TensorProto.UINT8), ("lr", TensorProto.FLOAT)]
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o, t, None) for o, t in outs)
    x = rand(rng, xdt, (*lead, k))
    return model, {"x": x, "res": rng.normal(0, 2, (*lead, n)).astype(np.float32)}


@needs_ep
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(float_unit_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_float_units_equal_ort(case, level):
    """Whatever plain ORT computes for a generated float unit with its tail, ORT + qie computes with the same shapes
    and types: float outputs to float32 rounding of the sums' order, codes within one step."""
    model, feeds = case
    plain, sess = session(model, level=level), ep_session(model, level)
    # the unit at least (two DequantizeLinears, the MatMul, the residual Add) as the graph is given; from BASIC on ORT's
    # own rewrites come first (a 2-D MatMul + Add becomes a Gemm with a float C, which stays ORT's)
    if level == "disable":
        assert assigned_to_qie(sess) >= 4
    for want, got in zip(plain.run(None, feeds), sess.run(None, feeds)):
        assert got.shape == want.shape and got.dtype == want.dtype
        if not COMPARE_BUILTIN or not want.size:
            continue
        if got.dtype == np.uint8:
            diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
            assert diff.max() <= 1 and diff.mean() < 0.05, (level, diff.max(), diff.mean(), want.shape)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * max(1.0, float(np.abs(want).max())))
