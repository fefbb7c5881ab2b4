"""MatMul / Gemm unit tails: the elementwise QDQ segments DQ -> f -> Q after a unit's QuantizeLinear join the unit.

Each segment is a map code -> code per output column (f's constants: scalars, or [N] / [1,..,1,N] along the last
axis), built with the float graph's own float32 operations. Where f is plain arithmetic (a bias Add, Relu, Clip,
Mul by a scalar) the unit's result is the float QDQ graph's exactly: the reference below composes the integer GEMM
(``reference.qlinear_matmul``) with numpy's float32 tail, and at ORT_ENABLE_EXTENDED / ALL plain ORT (whose fused
QLinearMatMul gives the same GEMM codes) gives the same bytes. Erf / Gelu use libm where ORT uses MLAS's
approximations: within one step of ORT, on few codes. What the tails must not take (constants over other axes,
constants that would raise the rank, values read outside the segment) stays ORT's with plain ORT's results.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS, assert_exact
from qie_ep.session import options, session
from test_ep import T, assigned_to_qie, ep_session, needs_ep, qdq_matmul, rand, reference


def quantize(v, scale, zp, dtype):
    """QuantizeLinear as ORT computes it: saturate(round_half_even(v / scale) + zp), v / scale in float32."""
    ii = np.iinfo(dtype)
    q = np.rint(np.asarray(v, np.float32) / np.float32(scale)).astype(np.float64) + int(zp)
    return np.clip(q, ii.min, ii.max).astype(dtype)


def dequantize(q, scale, zp):
    return (q.astype(np.int32) - int(zp)).astype(np.float32) * np.float32(scale)


class Tail:
    """Appends QDQ segments after the unit's output 'y' of a qdq_matmul model; each segment: DQ with the previous Q's
    parameters, a list of float nodes, a Q of new parameters. Tracks the numpy meaning of the segments."""

    def __init__(self, model, ops, ydt):
        self.model, self.ops, self.dt = model, ops, ydt
        self.cur, self.scale, self.zp = "y", "sy", "zy"
        self.steps = []  # (numpy function of the float tensor, out scale, out zp)
        self.k = 0

    def segment(self, nodes, fn, out_scale, rng, dtype=None):
        """`nodes(x_name) -> (list of nodes, result name, initializers)`; `fn(float array) -> float array`."""
        g = self.model.graph
        k = self.k = self.k + 1
        dtype = dtype or self.dt
        zp = np.array(rand(rng, dtype, ()) // 4, dtype)
        g.initializer.extend([numpy_helper.from_array(np.array(out_scale, np.float32), f"s{k}"),
                              numpy_helper.from_array(zp, f"z{k}")])
        g.node.append(helper.make_node("DequantizeLinear", [self.cur, self.scale, self.zp], [f"d{k}"]))
        body, res, inits = nodes(f"d{k}")
        g.node.extend(body)
        g.initializer.extend(inits)
        g.node.append(helper.make_node("QuantizeLinear", [res, f"s{k}", f"z{k}"], [f"q{k}"]))
        self.steps.append((fn, np.float32(out_scale), zp))
        self.cur, self.scale, self.zp, self.dt = f"q{k}", f"s{k}", f"z{k}", dtype
        y = next(o for o in g.output if o.name in ("y", f"q{k - 1}"))
        shape = [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim]
        del g.output[:]
        g.output.append(helper.make_tensor_value_info(self.cur, T[dtype], shape))
        return self

    def want(self, x):
        """The QDQ graph's meaning: qie's GEMM codes (exact), then each segment in numpy float32."""
        q, s, z = reference(x, self.ops), self.ops["sy"], self.ops["zy"]
        for fn, s2, z2 in self.steps:
            q = quantize(fn(dequantize(q, s, z)), s2, z2, z2.dtype.type)
            s, z = s2, z2
        return q


def bias_add(b, first=False):
    def nodes(x):
        return [helper.make_node("Add", ["bias", x] if first else [x, "bias"], [x + "_b"])], x + "_b", [
            numpy_helper.from_array(b, "bias")]
    return nodes


def unary(op, **attrs):
    def nodes(x):
        return [helper.make_node(op, [x], [x + "_u"], **attrs)], x + "_u", []
    return nodes


def gelu_decomposed(b):
    """Add(bias) then the erf Gelu as torch exports it: Div(sqrt 2), Erf, Add(1), Mul(x, .), Mul(0.5)."""
    def nodes(x):
        c = [numpy_helper.from_array(b, "gb"), numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
        return [helper.make_node("Add", ["gb", x], ["a"]), helper.make_node("Div", ["a", "sqrt2"], ["dv"]),
                helper.make_node("Erf", ["dv"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"]),
                helper.make_node("Mul", ["a", "e1"], ["m"]), helper.make_node("Mul", ["m", "half"], ["g"])], "g", c
    return nodes


def erf_gelu(v, b):
    from math import erf
    a = (v + b).astype(np.float32)
    e = np.vectorize(erf)(a / np.float32(1.4142135)).astype(np.float32)
    return ((a * (e + np.float32(1))).astype(np.float32) * np.float32(0.5)).astype(np.float32)


def nodes_of_tail(n_float):
    return 4 + 2 + n_float  # the unit (DQ x, DQ W, MatMul, Q), then per segment DQ, f's nodes, Q


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("ydt", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("first", [False, True], ids=["x+b", "b+x"])
def test_bias_add_tail_is_exact(level, ydt, first):
    """DQ -> Add([N] bias) -> Q after a unit (a transformer's projection as torch exports it): run as a float program
    on the data, equal to the float graph's bytes; the batch changes between runs, zero rows give an empty output."""
    rng = np.random.default_rng(51)
    n = 48
    model, ops = qdq_matmul(rng, np.uint8, np.int8, ydt, 40, n, True)
    b = rng.normal(0, 2, n).astype(np.float32)
    tail = Tail(model, ops, ydt).segment(bias_add(b, first), lambda v: v + b, 0.05, rng)
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == nodes_of_tail(1), sess.get_provider_graph_assignment_info()
    plain = session(model, level=level)
    for batch in (1, 3, 0):
        x = rand(rng, np.uint8, (batch, 5, 40))
        got = sess.run(None, {"x": x})[0]
        assert_exact(got, tail.want(x), f"(level={level}, batch={batch})")
        if COMPARE_BUILTIN and level in ("extended", "all"):
            assert_exact(got, plain.run(None, {"x": x})[0], f"(plain ORT, level={level})")


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_segments_compose(level):
    """Four segments (bias Add, Relu, Mul by a scalar, Clip) joined in one unit and composed: exact."""
    rng = np.random.default_rng(52)
    n = 33
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 29, n, False)
    b = rng.normal(0, 1, (1, n)).astype(np.float32)  # [1, N]: along the last axis too
    k = np.array(0.75, np.float32)

    def mul(x):
        return [helper.make_node("Mul", [x, "k"], [x + "_m"])], x + "_m", [numpy_helper.from_array(k, "k")]

    def clip(x):
        c = [numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
             numpy_helper.from_array(np.array(1.25, np.float32), "hi")]
        return [helper.make_node("Clip", [x, "lo", "hi"], [x + "_c"])], x + "_c", c

    tail = (Tail(model, ops, np.uint8).segment(bias_add(b), lambda v: v + b, 0.04, rng)
            .segment(unary("Relu"), lambda v: np.maximum(v, 0), 0.03, rng)
            .segment(mul, lambda v: v * k, 0.02, rng, np.int8)
            .segment(clip, lambda v: np.clip(v, np.float32(-0.5), np.float32(1.25)), 0.01, rng))
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4 + 4 * 3, sess.get_provider_graph_assignment_info()
    x = rand(rng, np.uint8, (2, 5, 29))
    assert_exact(sess.run(None, {"x": x})[0], tail.want(x), level)
    # the per-tensor segments alone (no bias): one composed table
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 29, n, False)
    tail = (Tail(model, ops, np.uint8).segment(unary("Relu"), lambda v: np.maximum(v, 0), 0.03, rng)
            .segment(mul, lambda v: v * k, 0.02, rng, np.int8))
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4 + 2 * 3
    assert_exact(sess.run(None, {"x": x})[0], tail.want(x), level)


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
def test_bias_gelu_tail_within_one_step(level):
    """Add(bias) -> Gelu as Div / Erf / Add / Mul / Mul (BERT's intermediate layer): one table per column, built with
    libm's erff: within one step of the float graph (numpy with math.erf) and of ORT (MLAS's Erf), on few codes."""
    rng = np.random.default_rng(53)
    n = 64
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 48, n, True)
    b = rng.normal(0, 1, n).astype(np.float32)
    tail = Tail(model, ops, np.uint8).segment(gelu_decomposed(b), lambda v: erf_gelu(v, b), 0.02, rng)
    sess = ep_session(model, level)
    # from ORT_ENABLE_BASIC, ORT's level-1 GeluFusion has made Div .. Mul one ONNX Gelu before the EP sees the graph
    assert assigned_to_qie(sess) == nodes_of_tail(6 if level == "disable" else 2)
    x = rand(rng, np.uint8, (4, 5, 48))
    got = sess.run(None, {"x": x})[0].astype(np.int32)
    for name, want in [("float graph", tail.want(x)), ("ORT", session(model, level=level).run(None, {"x": x})[0])]:
        if name == "ORT" and not COMPARE_BUILTIN:
            continue
        diff = np.abs(got - want.astype(np.int32))
        if name == "ORT" and level in ("disable", "basic"):  # ORT's float GEMM: one step at ties, then the tail's
            assert diff.max() <= 2 and diff.mean() < 0.02, (name, diff.max(), diff.mean())
        else:
            assert diff.max() <= 1 and diff.mean() < 0.01, (name, level, diff.max(), diff.mean())


@needs_ep
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_tail(approximate):
    """ONNX Gelu (opset 20; ORT's level-1 GeluFusion also makes it) in a segment: within one step of ORT."""
    rng = np.random.default_rng(54)
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 32, 40, True, opset=21)
    Tail(model, ops, np.uint8).segment(unary("Gelu", approximate=approximate), lambda v: v, 0.02, rng)
    sess = ep_session(model)
    assert assigned_to_qie(sess) == nodes_of_tail(1)
    if COMPARE_BUILTIN:
        x = rand(rng, np.uint8, (3, 5, 32))
        diff = np.abs(sess.run(None, {"x": x})[0].astype(np.int32) -
                      session(model, level="all").run(None, {"x": x})[0].astype(np.int32))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_tail_then_float_output(level):
    """After the last segment's Q, a DequantizeLinear with its parameters is still the unit's: it outputs floats."""
    rng = np.random.default_rng(55)
    n = 24
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, n, True)
    b = rng.normal(0, 1, n).astype(np.float32)
    tail = Tail(model, ops, np.uint8).segment(bias_add(b), lambda v: v + b, 0.05, rng)
    g = model.graph
    g.node.append(helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["out"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == nodes_of_tail(1) + 1
    x = rand(rng, np.uint8, (2, 5, 40))
    got = sess.run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, dequantize(tail.want(x), tail.steps[-1][1], tail.steps[-1][2]))


def _model_with(rng, bias_shape, x_shape=("B", 5), extra_output=False):
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 20, 12, True, x_shape=x_shape)
    b = rng.normal(0, 1, bias_shape).astype(np.float32)
    Tail(model, ops, np.uint8).segment(bias_add(b), lambda v: v + b, 0.05, rng)
    if extra_output:  # the biased float value also leaves the graph
        model.graph.output.append(helper.make_tensor_value_info("d1_b", TensorProto.FLOAT, None))
    return model


def _claims_and_equals_plain(model, x, claimed, case, ep_options=None):
    """At DISABLE and ALL: `claimed` nodes on qie's EP, and (ALL) plain ORT's results."""
    for level in ("disable", "all"):
        so = options(level=level)
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        qie_ep.register(so, ep=True, ep_options=ep_options)
        sess = session(model, so)
        assert assigned_to_qie(sess) == claimed, (case, sess.get_provider_graph_assignment_info())
        if COMPARE_BUILTIN and level == "all":
            for got, want in zip(sess.run(None, {"x": x}), session(model, level=level).run(None, {"x": x})):
                assert_exact(got, want, f"({case}, level={level})")


@needs_ep
@pytest.mark.parametrize("case", ["[rows,N] constant", "[rows,1] constant", "rank-raising constant",
                                  "value read outside", "tails off"])
def test_segments_the_tail_must_not_take(case):
    """Constants along another axis, a constant of more dimensions than the value (it would raise the output's
    rank), a segment value that is also a graph output, or the `tails` option off: the unit alone is claimed, and the
    results are plain ORT's."""
    rng = np.random.default_rng(56)
    model = {"[rows,N] constant": lambda: _model_with(rng, (5, 12)),
             "[rows,1] constant": lambda: _model_with(rng, (5, 1)),
             "rank-raising constant": lambda: _model_with(rng, (1, 1, 1, 12), x_shape=(5,)),
             "value read outside": lambda: _model_with(rng, (12,), extra_output=True),
             "tails off": lambda: _model_with(rng, (12,))}[case]()
    x = rand(rng, np.uint8, (2, 5, 20) if case != "rank-raising constant" else (5, 20))
    _claims_and_equals_plain(model, x, 4, case, {"tails": "0"} if case == "tails off" else None)


@needs_ep
def test_per_column_tail_over_many_columns_stays_ort():
    """A per-column segment over more than 4096 columns is not taken ([N][256] tables would miss the caches); a
    per-tensor one is."""
    rng = np.random.default_rng(57)
    n = 4100
    for b, claimed in [(rng.normal(0, 1, n).astype(np.float32), 4), (np.array(0.5, np.float32), nodes_of_tail(1))]:
        model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 8, n, True)
        tail = Tail(model, ops, np.uint8).segment(bias_add(b), lambda v, b=b: v + b, 0.05, rng)
        sess = ep_session(model)
        assert assigned_to_qie(sess) == claimed
        x = rand(rng, np.uint8, (1, 5, 8))
        assert_exact(sess.run(None, {"x": x})[0], tail.want(x), f"claimed={claimed}")


# One random segment: (kind, constant shape); kinds of plain arithmetic and of libm functions.
_SEGMENT_KINDS = ["Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid", "Tanh", "Erf"]


@st.composite
def tail_cases(draw):
    """A QDQ MatMul unit of random dtypes and x rank (static, symbolic or unknown dims) followed by 1-5 random
    segments (scalar, [N] or [1, N] constants, either operand order), perhaps a last one with a Transpose or a
    Reshape, and an input (zero rows included)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    xdt, ydt = draw(st.sampled_from([np.uint8, np.int8])), draw(st.sampled_from([np.uint8, np.int8]))
    k, n = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    dims = draw(st.sampled_from(["static", "symbolic", "unknown"]))
    x_shape = tuple(lead) if dims == "static" else tuple(f"d{i}" for i in range(len(lead))) if dims == "symbolic" \
        else tuple("" for _ in lead)
    model, ops = qdq_matmul(rng, xdt, np.int8, ydt, k, n, draw(st.booleans()), x_shape=x_shape)
    tail = Tail(model, ops, ydt)
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(_SEGMENT_KINDS))
        shapes = [(), (n,), (1, n)] if lead else [(), (n,)]  # no constant raising the value's rank
        shape = draw(st.sampled_from(shapes)) if kind in ("Add", "Sub", "Mul", "Div") else ()
        c = rng.uniform(0.5, 2, shape).astype(np.float32) * np.float32(draw(st.sampled_from([-1, 1])))
        first = draw(st.booleans())
        j = tail.k + 1

        def nodes(x, kind=kind, c=c, first=first, j=j):
            if kind in ("Add", "Sub", "Mul", "Div"):
                ins = [f"c{j}", x] if first else [x, f"c{j}"]
                return [helper.make_node(kind, ins, [x + "_o"])], x + "_o", [numpy_helper.from_array(c, f"c{j}")]
            if kind == "Clip":
                lim = [numpy_helper.from_array(np.array(-0.7, np.float32), f"lo{j}"),
                       numpy_helper.from_array(np.array(0.9, np.float32), f"hi{j}")]
                return [helper.make_node("Clip", [x, f"lo{j}", f"hi{j}"], [x + "_o"])], x + "_o", lim
            return [helper.make_node(kind, [x], [x + "_o"])], x + "_o", []

        tail.segment(nodes, None, float(rng.uniform(0.005, 0.1)), rng, draw(st.sampled_from([np.uint8, np.int8])))
    layout = draw(st.sampled_from([None, "Transpose", "Reshape"]))
    if layout:  # a last segment moving the bytes, a scalar Mul after the move
        rank = len(lead) + 1
        perm = list(draw(st.permutations(range(rank))))
        j = tail.k + 1

        def moved(x, j=j):
            if layout == "Transpose":
                body = [helper.make_node("Transpose", [x], [x + "_t"], perm=perm)]
                inits = []
            else:
                body = [helper.make_node("Reshape", [x, f"shape{j}"], [x + "_t"])]
                inits = [numpy_helper.from_array(np.array([-1], np.int64), f"shape{j}")]
            body.append(helper.make_node("Mul", [x + "_t", f"k{j}"], [x + "_m"]))
            return body, x + "_m", inits + [numpy_helper.from_array(np.array(0.75, np.float32), f"k{j}")]

        tail.segment(moved, None, float(rng.uniform(0.005, 0.1)), rng)
        del model.graph.output[0].type.tensor_type.shape.dim[:]
    feed = tuple(lead) if dims == "static" else tuple(draw(st.integers(0, 3)) for _ in lead)
    return model, rand(rng, xdt, (*feed, k))


@needs_ep
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(tail_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_tails_equal_ort(case, level):
    """Whatever plain ORT computes for a generated unit + segments graph, ORT + qie computes with the same shape and
    type; at EXTENDED / ALL (ORT's GEMM codes equal qie's) within one step per libm segment, and equal when every
    segment is plain arithmetic; at DISABLE / BASIC (ORT's float GEMM may round a tie the other way, and each segment
    may carry that step on) within one step per segment plus one."""
    model, x = case
    try:
        plain = session(model, level=level)
    except Exception as e:  # ORT 1.31's transpose optimizer pushes a Transpose through a Q -> DQ pair of another
        # type and fails its own type check: models plain ORT cannot load are not this test's
        assert "TypeInferenceError" in str(e), e
        assume(False)
    sess = ep_session(model, level)
    want, got = plain.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    if not COMPARE_BUILTIN or x.size == 0:
        return
    kinds = [n.op_type for n in model.graph.node
             if n.op_type not in ("DequantizeLinear", "QuantizeLinear", "MatMul", "Transpose", "Reshape")]
    libm = sum(k in ("Sigmoid", "Tanh", "Erf") for k in kinds)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    if level in ("extended", "all"):
        assert diff.max(initial=0) <= libm, (level, kinds, diff.max())
    else:
        assert diff.max(initial=0) <= len(kinds) + 1, (level, kinds, diff.max())


def _key_path(rng, shape_kind, n=48, heads=4, then_mul=True):
    """A transformer's key projection: unit -> Q -> DQ -> Add([N] bias) -> Reshape([B, S, heads, N / heads]) ->
    Transpose(0, 2, 1, 3) -> Mul(scalar) -> Q; the Reshape's shape a constant (with 0 / -1) or a runtime input."""
    model, ops = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, n, True, x_shape=("B", "S"))
    b = rng.normal(0, 1, n).astype(np.float32)
    k = np.float32(0.35355339)
    g = model.graph
    inits = [numpy_helper.from_array(b, "kb"), numpy_helper.from_array(np.array(k), "kscale"),
             numpy_helper.from_array(np.array(0.04, np.float32), "s1"), numpy_helper.from_array(np.array(3, np.uint8), "z1")]
    if shape_kind == "runtime":
        g.input.append(helper.make_tensor_value_info("hs", TensorProto.INT64, [4]))
    else:
        spec = [0, 0, heads, -1] if shape_kind == "constant 0/-1" else [-1, 5, heads, n // heads]
        inits.append(numpy_helper.from_array(np.array(spec, np.int64), "hs"))
    g.initializer.extend(inits)
    nodes = [helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["d1"]),
             helper.make_node("Add", ["kb", "d1"], ["a1"]),
             helper.make_node("Reshape", ["a1", "hs"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 1, 3])]
    last = "t1"
    if then_mul:
        nodes.append(helper.make_node("Mul", ["t1", "kscale"], ["m1"]))
        last = "m1"
    nodes.append(helper.make_node("QuantizeLinear", [last, "s1", "z1"], ["q1"]))
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("q1", TensorProto.UINT8, None))

    def want(x):
        v = dequantize(reference(x, ops), ops["sy"], ops["zy"]) + b
        v = v.reshape(x.shape[0], x.shape[1], heads, n // heads).transpose(0, 2, 1, 3)
        return quantize(v * k if then_mul else v, 0.04, 3, np.uint8)
    return model, want


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("shape_kind", ["constant 0/-1", "constant", "runtime"])
def test_head_split_layout_tail_is_exact(level, shape_kind):
    """Add(bias) -> Reshape -> Transpose -> Mul(1/sqrt d) -> Q (BERT's key path) joins the unit: computed on the
    [rows][N] codes, the bytes moved once; equal to the float graph at every level, batch and sequence changing."""
    rng = np.random.default_rng(58)
    model, want = _key_path(rng, shape_kind)
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4 + 6, sess.get_provider_graph_assignment_info()
    plain = session(model, level=level)
    for batch in (1, 2, 0):
        x = rand(rng, np.uint8, (batch, 5, 40))
        feeds = {"x": x}
        if shape_kind == "runtime":
            feeds["hs"] = np.array([batch, 5, 4, 12], np.int64)
        if batch == 0 and shape_kind == "constant 0/-1":  # -1 beside a 0 dim: no size to infer, for ORT too
            for sess_ in (sess, plain):
                with pytest.raises(Exception, match="Reshape|reshape"):
                    sess_.run(None, feeds)
            continue
        got = sess.run(None, feeds)[0]
        assert_exact(got, want(x), f"(level={level}, batch={batch})")
        if COMPARE_BUILTIN and level in ("extended", "all"):
            assert_exact(got, plain.run(None, feeds)[0], f"(plain ORT, level={level})")


@needs_ep
def test_layout_tail_errors_name_the_node():
    """A runtime shape that does not fit: an error naming the Reshape, as plain ORT also fails."""
    rng = np.random.default_rng(59)
    model, _ = _key_path(rng, "runtime")
    sess = ep_session(model)
    x = rand(rng, np.uint8, (2, 5, 40))
    for bad in ([2, 5, 4, 13], [2, -1, -1, 12], [2, 5, 0, 12]):
        with pytest.raises(Exception, match="Reshape"):
            sess.run(None, {"x": x, "hs": np.array(bad, np.int64)})
        with pytest.raises(Exception, match="[Rr]eshape"):
            session(model, level="all").run(None, {"x": x, "hs": np.array(bad, np.int64)})


@needs_ep
def test_value_path_segments_and_float_output():
    """Add(bias) -> Q, then DQ -> Reshape -> Q and DQ -> Transpose -> Q (ORT's quantizer around the value path's
    layout ops): three segments in one unit; and a float DequantizeLinear after a layout tail."""
    rng = np.random.default_rng(60)
    model, want = _key_path(rng, "constant", then_mul=False)
    g = model.graph
    # split the one segment into three at its layout nodes: Q -> DQ pairs after Add and after Reshape
    g.initializer.extend([numpy_helper.from_array(np.array(0.04, np.float32), "sm"),
                          numpy_helper.from_array(np.array(3, np.uint8), "zm")])
    for name in ("a1", "r1"):
        for node in g.node:
            for i, inp in enumerate(node.input):
                if inp == name and node.op_type in ("Reshape", "Transpose"):
                    node.input[i] = name + "_dq"
        g.node.extend([helper.make_node("QuantizeLinear", [name, "sm", "zm"], [name + "_q"]),
                       helper.make_node("DequantizeLinear", [name + "_q", "sm", "zm"], [name + "_dq"])])
    g.node.append(helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["out"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    model = _rebuilt(model)
    for level in ("disable", "all"):
        sess = ep_session(model, level)
        assert assigned_to_qie(sess) == 4 + 3 * 2 + 3 + 1, sess.get_provider_graph_assignment_info()
        x = rand(rng, np.uint8, (2, 5, 40))
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], dequantize(want(x), 0.04, 3))


def _rebuilt(model):
    """The model with its nodes in topological order (nodes appended out of order above)."""
    g = model.graph
    return helper.make_model(helper.make_graph(_topo(g.node), g.name, g.input, g.output, g.initializer),
                             opset_imports=model.opset_import, ir_version=10)


def _topo(nodes):
    """Nodes in an order where each reads only earlier outputs (graph inputs and initializers aside)."""
    nodes, done, out = list(nodes), set(), []
    produced = {o for n in nodes for o in n.output}
    while nodes:
        for n in list(nodes):
            if all(i not in produced or i in done for i in n.input):
                out.append(n)
                done.update(n.output)
                nodes.remove(n)
    return out


@needs_ep
@pytest.mark.parametrize("case", ["per-column after Reshape", "two layouts meet"])
def test_layout_segments_the_tail_must_not_take(case):
    """A [N] constant after the layout (its columns moved), two differently moved values meeting: no segment is
    claimed (the unit takes its DequantizeLinear, whose float value its float ops read, and the bias Add after it:
    it outputs the biased float values the layout reads), plain ORT's results."""
    rng = np.random.default_rng(61)
    model, _ = _key_path(rng, "constant", then_mul=False)
    g = model.graph
    tr = next(n for n in g.node if n.op_type == "Transpose")
    qn = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.output[0] == "q1")
    extra = []
    if case == "per-column after Reshape":
        g.initializer.append(numpy_helper.from_array(rng.normal(0, 1, 12).astype(np.float32), "late"))
        extra = [helper.make_node("Add", ["t1", "late"], ["t2"])]
        qn.input[0] = "t2"
    else:  # Transpose(r1) + Transpose(r1, other perm) have the same shape only for square heads: use 4 x 12 -> both
        g.initializer.append(numpy_helper.from_array(np.array([-1, 5, 12, 4], np.int64), "hs2"))
        extra = [helper.make_node("Reshape", ["a1", "hs2"], ["r2"]),
                 helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 3, 1, 2]),
                 helper.make_node("Add", ["t1", "t2"], ["t3"])]
        tr.attribute[0].ints[:] = [0, 2, 1, 3]
        qn.input[0] = "t3"
    g.node.extend(extra)
    model = _rebuilt(model)
    x = rand(rng, np.uint8, (2, 5, 40))
    _claims_and_equals_plain(model, x, 6, case)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "basic", "all"])
@pytest.mark.parametrize("start,end", [(None, None), (-2, None), (1, 3)])
def test_shape_reading_a_tail_value_joins_the_unit(level, start, end):
    """BERT's query path: a Shape node also reads the Reshape's value (for the output's head merge). It joins the unit,
    which outputs the dims it gives (start / end as ONNX Shape takes them) beside the codes."""
    rng = np.random.default_rng(62)
    model, want = _key_path(rng, "runtime")
    g = model.graph
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    g.node.append(helper.make_node("Shape", ["r1"], ["r1_shape"], **attrs))
    g.output.append(helper.make_tensor_value_info("r1_shape", TensorProto.INT64, None))
    model = _rebuilt(model)
    sess = ep_session(model, level)
    assert assigned_to_qie(sess) == 4 + 6 + 1, sess.get_provider_graph_assignment_info()
    for batch in (1, 3):
        x = rand(rng, np.uint8, (batch, 5, 40))
        feeds = {"x": x, "hs": np.array([batch, 5, 4, 12], np.int64)}
        got, dims = sess.run(None, feeds)
        assert_exact(got, want(x), f"(level={level}, batch={batch})")
        np.testing.assert_array_equal(dims, np.array([batch, 5, 4, 12], np.int64)[slice(start, end)])


@needs_ep
@pytest.mark.parametrize("level", ["disable", "basic", "all"])
@pytest.mark.parametrize("case", ["[N] bias -> Softmax", "bias first, [1,N]", "one value", "also an output",
                                  "-> Reshape", "-> Gelu: not taken", "-> Add: not taken"])
def test_bias_add_after_the_float_output(level, case):
    """unit -> Q -> DQ -> Add(a constant of 1 or N values along N) read by float ops ORT fuses nothing with (a
    classifier's logits -> Softmax, a projection -> Reshape): the unit outputs the biased values, one float32 add after
    the dequantization as ORT's Add; an Add that ORT would fuse with what reads it (BiasGelu, SkipLayerNormalization)
    stays ORT's. Results equal plain ORT's at every level."""
    rng = np.random.default_rng(71)
    n = 48
    model, _ = qdq_matmul(rng, np.uint8, np.int8, np.uint8, 40, n, True, x_shape=("B", 5))
    g = model.graph
    bias = rng.normal(0, 1, (1 if case == "one value" else n,)).astype(np.float32)
    g.initializer.append(numpy_helper.from_array(bias.reshape(1, -1) if case.startswith("bias first") else bias, "b"))
    nodes = [helper.make_node("DequantizeLinear", ["y", "sy", "zy"], ["d"]),
             helper.make_node("Add", ["b", "d"] if case.startswith("bias first") else ["d", "b"], ["a"])]
    outputs = ["o"]
    if case == "-> Reshape":
        g.initializer.append(numpy_helper.from_array(np.array([0, 0, 4, 12], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["a", "shape"], ["o"]))
    elif case == "-> Gelu: not taken":
        nodes.append(helper.make_node("Gelu", ["a"], ["o"]))
    elif case == "-> Add: not taken":
        g.initializer.append(numpy_helper.from_array(rng.normal(0, 1, (5, n)).astype(np.float32), "c"))
        nodes.append(helper.make_node("Add", ["a", "c"], ["o"]))
    else:
        nodes.append(helper.make_node("Softmax", ["a"], ["o"], axis=-1))
    if case == "also an output":
        outputs.append("a")
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    sess = ep_session(model, level)
    taken = "not taken" not in case
    assert assigned_to_qie(sess) == 5 + taken, (case, level)  # DQ x, DQ w, MatMul, Q, DQ (+ Add)
    x = rand(rng, np.uint8, (3, 5, 40))
    if COMPARE_BUILTIN:
        for got, want in zip(sess.run(None, {"x": x}), session(model, level=level).run(None, {"x": x})):
            assert_exact(got, want, f"({case}, level={level})")
