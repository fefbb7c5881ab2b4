"""Property-based suite: ORT + qie gives plain ORT's results on generated quantized graphs.

For every op qie registers, hypothesis draws quantized single-op graphs: u8/s8 operands, per-tensor and
per-channel zero points and scales, constant or runtime weights, broadcasting batches and 1-D operands,
zero-size dims, every conv geometry attribute, and inputs declared with static, symbolic, unnamed or no
dims or of unknown rank (a Reshape with a runtime shape). Each graph exposes the op's output in the
middle (a consumer follows it) and its Shape(). It runs at all four optimization levels with ORT's
arena off, twice with different input shapes where the declaration allows. Whenever plain ORT loads and
runs a graph, ORT + qie must too, with equal outputs (values, dtypes, shapes); when plain ORT refuses
one, qie must refuse it or compute it without crashing. Examples are derandomized: CI is repeatable.
"""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers import OPT_LEVELS, session

EXAMPLES = 400
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
NP2T = {np.uint8: T.UINT8, np.int8: T.INT8, np.float32: T.FLOAT, np.int32: T.INT32}
DECLS = ["static", "symbolic", "unnamed", "unknown_rank"]


def rand_q(rng, dtype, shape):
    ii = np.iinfo(dtype)
    return rng.integers(ii.min, ii.max + 1, shape).astype(dtype)


class Case:
    """One generated graph: a node over named inputs, some constant, some fed at run time."""

    def __init__(self, op, domain="", attrs=None):
        self.op, self.domain, self.attrs = op, domain, attrs or {}
        self.slots = []      # input names in order ("" = absent optional)
        self.consts = {}     # name -> array
        self.runtime = {}    # name -> (array, declaration, alternative array for a second run or None)
        self.k_zero = False  # empty reduction: plain ORT leaves the output uninitialized (see check)
        self.ort_drops_bias = False  # DynamicQuantizeMatMul, batched B, bias: see dynamic_quantize_matmul

    def const(self, name, value):
        self.slots.append(name)
        self.consts[name] = np.asarray(value)

    def feed(self, name, value, decl, alt=None):
        self.slots.append(name)
        self.runtime[name] = (np.asarray(value), decl, alt)

    def weight(self, name, value, constant):
        """B or W: an initializer, or a runtime input with symbolic dims."""
        self.const(name, value) if constant else self.feed(name, value, "symbolic")

    def absent(self):
        self.slots.append("")

    def model(self):
        nodes, inputs = [], []
        slots = list(self.slots)
        while slots and not slots[-1]:
            slots.pop()
        for name, (v, decl, _) in self.runtime.items():
            t = NP2T[v.dtype.type]
            if decl == "unknown_rank":
                inputs += [h.make_tensor_value_info(name + "_raw", t, [None] * v.ndim),
                           h.make_tensor_value_info(name + "_shape", T.INT64, ["r_" + name])]
                nodes.append(h.make_node("Reshape", [name + "_raw", name + "_shape"], [name]))
            else:
                dims = {"static": list(v.shape), "symbolic": [f"{name}_{i}" for i in range(v.ndim)],
                        "unnamed": [None] * v.ndim}[decl]
                inputs.append(h.make_tensor_value_info(name, t, dims))
        nodes.append(h.make_node(self.op, slots, ["y"], domain=self.domain, name="fuzz_node", **self.attrs))
        # a consumer after the op (its output is in the middle of the graph) and the op's Shape()
        nodes += [h.make_node("Cast", ["y"], ["yf"], to=T.FLOAT), h.make_node("ReduceSum", ["yf"], ["total"], keepdims=0),
                  h.make_node("Shape", ["y"], ["y_shape"])]
        outputs = [onnx.ValueInfoProto(name=n) for n in ("y", "total", "y_shape")]
        graph = h.make_graph(nodes, "fuzz", inputs, outputs, initializer=[nh.from_array(v, n) for n, v in self.consts.items()])
        opsets = [h.make_opsetid("", 21)] + ([h.make_opsetid("com.microsoft", 1)] if self.domain else [])
        m = h.make_model(graph, opset_imports=opsets)
        m.ir_version = 10
        return m

    def feeds(self, second=False):
        out = {}
        for name, (v, decl, alt) in self.runtime.items():
            if second and alt is not None and decl != "static":
                v = alt
            if decl == "unknown_rank":
                out[name + "_raw"] = v
                out[name + "_shape"] = np.array(v.shape, np.int64)
            else:
                out[name] = v
        return out


def run(model_bytes, feeds_list, qie, level):
    sess = session(model_bytes, qie, level, arena=False, quiet=True)
    return [sess.run(None, f) for f in feeds_list]


def check(case: Case):
    data = case.model().SerializeToString()
    feeds = [case.feeds()] + ([case.feeds(second=True)] if any(a is not None for _, _, a in case.runtime.values()) else [])
    for level in OPT_LEVELS:
        try:
            want = run(data, feeds, False, level)
        except Exception:  # plain ORT refuses this graph: qie may refuse it too, but must not crash
            try:
                run(data, feeds, True, level)
            except Exception:
                pass
            continue
        got = run(data, feeds, True, level)
        for i, (g_run, w_run) in enumerate(zip(got, want)):
            for name, g, w in zip(("y", "total", "y_shape"), g_run, w_run):
                ctx = f"{case.op} output {name}, run {i}, level {level}, slots {case.slots}, attrs {case.attrs}, " \
                      f"feeds {[(k, v.dtype, v.shape) for k, v in feeds[i].items()]}"
                assert g.dtype == w.dtype and g.shape == w.shape, f"{g.dtype}{g.shape} != {w.dtype}{w.shape}: {ctx}"
                if (case.k_zero or case.ort_drops_bias) and name != "y_shape":
                    continue  # ORT does not write the output of an empty reduction (seen: MatMulInteger 1970169395);
                    # qie's zero-K results are checked against the reference by the kernel tests (K=0 is a tile edge)
                if name != "total":  # the float sum depends on ORT's reduction order only; y is compared exactly
                    assert np.array_equal(g, w, equal_nan=g.dtype.kind == "f"), ctx


# ---- strategies ----------------------------------------------------------------------------------------

dims = st.integers(0, 9)
qtypes = st.sampled_from([np.uint8, np.int8])


@st.composite
def matmul_shapes(draw):
    m, k, n = draw(dims), draw(st.integers(0, 12)), draw(dims)
    a_batch = draw(st.lists(st.integers(1, 3), max_size=2))
    b_batch = draw(st.sampled_from([[], a_batch[-1:], [1]]))
    a_shape = [k] if draw(st.integers(0, 9)) == 0 else a_batch + [m, k]
    b_shape = [k] if draw(st.integers(0, 9)) == 0 else b_batch + [k, n]
    return a_shape, b_shape, draw(st.integers(1, 3))  # alt M for the second run


def matmul_operands(draw, rng, a_dtype=None):
    a_shape, b_shape, alt_m = draw(matmul_shapes())
    a_dt = a_dtype or draw(qtypes)
    b_dt = draw(qtypes)
    decl = draw(st.sampled_from(DECLS))
    a = rand_q(rng, a_dt, a_shape) if a_dt is not np.float32 else rng.standard_normal(a_shape).astype(np.float32)
    alt = None
    if len(a_shape) >= 2:
        alt_s = list(a_shape[:-2]) + [alt_m, a_shape[-1]]
        alt = rand_q(rng, a_dt, alt_s) if a_dt is not np.float32 else rng.standard_normal(alt_s).astype(np.float32)
    b = rand_q(rng, b_dt, b_shape)
    n = b_shape[-1] if len(b_shape) >= 2 else 1
    b_const = draw(st.booleans())
    per_col = draw(st.booleans()) and len(b_shape) >= 2
    return a, alt, decl, b, b_const, n, per_col, a_shape[-1] == 0


def zp(rng, dtype, count):
    return rand_q(rng, dtype, (count,) if count > 1 else ())


def scale(rng, count=0):
    return np.asarray(rng.uniform(0.001, 0.05, (count,)) if count else rng.uniform(0.001, 0.05), np.float32)


def matmul_case(draw, op, domain=""):
    """(rng, the Case with A fed, B, whether B is constant, N, per-column) for a matmul-shaped op."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    a, alt, decl, b, b_const, n, per_col, k0 = matmul_operands(draw, rng)
    c = Case(op, domain)
    c.k_zero = k0
    c.feed("a", a, decl, alt)
    return rng, c, a, b, b_const, n, per_col


@st.composite
def qlinear_matmul(draw):
    rng, c, a, b, b_const, n, per_col = matmul_case(draw, "QLinearMatMul")
    c.const("sa", scale(rng))
    c.const("za", zp(rng, a.dtype.type, 1))
    c.weight("b", b, b_const)
    c.const("sb", scale(rng, n if per_col else 0))
    c.const("zb", zp(rng, b.dtype.type, n if per_col else 1))
    c.const("sy", np.float32(rng.uniform(0.05, 2.0)))
    c.const("zy", zp(rng, draw(qtypes), 1))
    return c


@st.composite
def matmul_integer(draw):
    rng, c, a, b, b_const, n, per_col = matmul_case(draw, "MatMulInteger")
    c.weight("b", b, b_const)
    which = draw(st.sampled_from(["none", "a", "b", "both"]))
    if which == "none":
        return c
    if which in ("a", "both"):
        c.const("za", zp(rng, a.dtype.type, 1))
    else:
        c.absent()
    if which in ("b", "both"):
        c.const("zb", zp(rng, b.dtype.type, n if per_col else 1))
    return c


@st.composite
def matmul_integer_to_float(draw):
    rng, c, a, b, b_const, n, per_col = matmul_case(draw, "MatMulIntegerToFloat", "com.microsoft")
    c.weight("b", b, b_const)
    c.const("sa", scale(rng))
    c.const("sb", scale(rng, n if per_col else 0))
    opt = draw(st.sampled_from(["none", "zps", "all"]))
    if opt != "none":
        c.const("za", zp(rng, a.dtype.type, 1))
        c.const("zb", zp(rng, b.dtype.type, n if per_col else 1))
    if opt == "all":
        c.const("bias", rng.standard_normal(n).astype(np.float32))
    return c


@st.composite
def dynamic_quantize_matmul(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    a, alt, decl, b, b_const, n, per_col, k0 = matmul_operands(draw, rng, a_dtype=np.float32)
    c = Case("DynamicQuantizeMatMul", "com.microsoft")
    c.k_zero = k0
    c.feed("a", a, decl, alt)
    c.weight("b", b, b_const)
    c.const("sb", scale(rng, n if per_col else 0))
    opt = draw(st.sampled_from(["none", "zp", "bias", "all"]))
    if opt in ("zp", "all"):
        c.const("zb", zp(rng, b.dtype.type, n if per_col else 1))
    elif opt == "bias":
        c.absent()
    if opt in ("bias", "all"):
        c.const("bias", rng.standard_normal(n).astype(np.float32))
        # ORT 1.31.1 drops this bias for some batched-B inputs (seen with one-row A, B [1, 1, N]: its output
        # is the bias-free product); not yet characterised, so only dtype and shape are compared there.
        c.ort_drops_bias = b.ndim >= 3
    return c


@st.composite
def qgemm(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    m, k, n = draw(dims), draw(st.integers(0, 12)), draw(dims)
    ta, tb = draw(st.booleans()), draw(st.booleans())
    a_dt = draw(qtypes)
    b_dt = draw(qtypes)
    a = rand_q(rng, a_dt, (k, m) if ta else (m, k))
    alt_m = draw(st.integers(1, 4))
    alt = rand_q(rng, a_dt, (k, alt_m) if ta else (alt_m, k))
    b = rand_q(rng, b_dt, (n, k) if tb else (k, n))
    attrs = {"transA": int(ta), "transB": int(tb)}
    if draw(st.booleans()):
        attrs["alpha"] = float(draw(st.sampled_from([0.5, 1.0, 1.75])))
    c = Case("QGemm", "com.microsoft", attrs)
    c.k_zero = k == 0
    decl = draw(st.sampled_from(DECLS))
    c_kind = draw(st.sampled_from(["none", "scalar", "row", "full"]))
    c.feed("a", a, decl, alt if c_kind != "full" else None)
    c.const("sa", scale(rng))
    c.const("za", zp(rng, a_dt, 1))
    c.weight("b", b, draw(st.booleans()))
    per_col = draw(st.booleans())
    c.const("sb", scale(rng, n if per_col else 0))
    c.const("zb", zp(rng, b_dt, n if per_col else 1) if b_dt == np.uint8 else np.zeros(n if per_col else (), np.int8))
    out = draw(st.sampled_from(["float", "float_y_scale", "u8", "s8"]))
    if c_kind == "none":
        c.absent()
    else:
        shape = {"scalar": (1,), "row": (n,), "full": (m, n)}[c_kind]
        c.const("cc", rng.integers(-5000, 5000, shape).astype(np.int32))
    if out != "float":
        c.const("sy", np.float32(rng.uniform(0.05, 2.0)))
    if out in ("u8", "s8"):
        c.const("zy", zp(rng, np.uint8 if out == "u8" else np.int8, 1))
    return c


@st.composite
def conv(draw, op):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    r = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    cpg, mpg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    cin, mout = cpg * group, mpg * group
    if draw(st.integers(0, 3)) == 0:  # depthwise
        group, cin, mout = cin, cin, cin * draw(st.integers(1, 2))
        cpg = 1
    k = [draw(st.integers(1, 3)) for _ in range(r)]
    sp = [draw(st.integers(0, 9)) for _ in range(r)]
    attrs = {}
    if draw(st.booleans()):
        attrs["strides"] = [draw(st.integers(1, 3)) for _ in range(r)]
    if draw(st.booleans()):
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(r)]
    pad_mode = draw(st.sampled_from(["none", "pads", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if pad_mode == "pads":
        attrs["pads"] = [draw(st.integers(0, 3)) for _ in range(2 * r)]
    elif pad_mode != "none":
        attrs["auto_pad"] = pad_mode
    if group > 1:
        attrs["group"] = group
    if draw(st.booleans()):
        attrs["kernel_shape"] = k
    batch = draw(st.integers(0, 2))
    x_dt, w_dt = draw(qtypes), draw(qtypes)
    x = rand_q(rng, x_dt, [batch, cin] + sp)
    alt = rand_q(rng, x_dt, [batch, cin] + [s + draw(st.integers(1, 4)) for s in sp])
    w = rand_q(rng, w_dt, [mout, cpg] + k)
    decl = draw(st.sampled_from(DECLS))
    per_ch = draw(st.booleans())
    c = Case(op, "", attrs)
    c.feed("x", x, decl, alt)
    if op == "ConvInteger":
        c.weight("w", w, draw(st.booleans()))
        opt = draw(st.sampled_from(["none", "x", "both"]))
        if opt != "none":
            c.const("zx", zp(rng, x_dt, 1))
        if opt == "both":
            c.const("zw", zp(rng, w_dt, mout if per_ch else 1))
        return c
    c.const("sx", scale(rng))
    c.const("zx", zp(rng, x_dt, 1))
    c.weight("w", w, draw(st.booleans()))
    c.const("sw", scale(rng, mout if per_ch else 0))
    c.const("zw", zp(rng, w_dt, mout if per_ch else 1) if w_dt == np.uint8 else np.zeros(mout if per_ch else (), np.int8))
    c.const("sy", np.float32(rng.uniform(0.05, 2.0)))
    c.const("zy", zp(rng, draw(qtypes), 1))
    if draw(st.booleans()):
        c.const("bias", rng.integers(-3000, 3000, mout).astype(np.int32))
    return c


@SETTINGS
@given(qlinear_matmul())
def test_fuzz_qlinear_matmul(case):
    check(case)


@SETTINGS
@given(matmul_integer())
def test_fuzz_matmul_integer(case):
    check(case)


@SETTINGS
@given(matmul_integer_to_float())
def test_fuzz_matmul_integer_to_float(case):
    check(case)


@SETTINGS
@given(dynamic_quantize_matmul())
def test_fuzz_dynamic_quantize_matmul(case):
    check(case)


@SETTINGS
@given(qgemm())
def test_fuzz_qgemm(case):
    check(case)


@SETTINGS
@given(conv("QLinearConv"))
def test_fuzz_qlinear_conv(case):
    check(case)


@SETTINGS
@given(conv("ConvInteger"))
def test_fuzz_conv_integer(case):
    check(case)

