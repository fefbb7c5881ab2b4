"""A region's Add / Mul of two u8 tensors computes ORT's QLinearAdd / QLinearMul arithmetic.

From ORT_ENABLE_EXTENDED on ORT fuses DQ(a), DQ(b) -> Add / Mul -> Q into QLinearAdd / QLinearMul, whose float32
formulas (MLAS's x86 kernels: fused multiply-adds on the raw codes for Add, an integer product times one ratio for
Mul) round a value near a .5 tie differently from the QDQ graph's Q(DQ(a) op DQ(b)). In a deep network one such
step travels (PP-OCRv6's logits: cosine 0.9966 to ORT INT8 with the float formula, 0.9998 with ORT's), so the
region's binary unit takes ORT's arithmetic where ORT fuses the unit (units.h QLinearBinary), at every level:
equal to ORT INT8 at ORT_ENABLE_ALL on every pair of codes and each broadcast form (ORT swaps the operands when the
first is broadcast along the innermost axis, in the NHWC layout ORT gives a u8 network's QLinear ops at ALL);
within one step of ORT's NCHW QLinearAdd at EXTENDED and of its float nodes at DISABLE / BASIC. The scales are
chosen so that hundreds of the 65536 pairs sit on a .5 tie, where the two arithmetics part. Where ORT keeps float
nodes (s8 tensors, a Relu between with a zero point above the bottom code, Sub) the unit keeps the float graph's
arithmetic.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS
from qie_ep.session import options, session

needs_ep = pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here (ORT < 1.27 or no libqie_ep.so)")

# operand shapes (NCHW) whose codes cover every pair: (a, b)
FORMS = {
    "same": ((1, 16, 64, 64), (1, 16, 64, 64)),
    "b_per_channel": ((1, 256, 16, 16), (1, 256, 1, 1)),
    "a_per_channel": ((1, 256, 1, 1), (1, 256, 16, 16)),  # ORT walks b as the span: the operands swapped
    "b_spatial": ((1, 256, 16, 16), (1, 1, 16, 16)),
    "a_spatial": ((1, 1, 16, 16), (1, 256, 16, 16)),
    "a_row": ((1, 256, 16, 1), (1, 256, 16, 16)),  # broadcast along W only
    "a_scalar": ((1, 1, 1, 1), (1, 16, 4, 4)),
}


def model(op, shape_a, shape_b, dtype, scales, zps, tail=None, tail_zp=None):
    """a, b (codes) -> DQ -> identity 1x1 Conv (multiplier exactly 1: codes kept) -> Q -> DQ -> op [-> tail] -> Q
    -> DQ: a region of two convs and the binary unit whose operand codes are the inputs'."""
    tt = T.UINT8 if dtype == np.uint8 else T.INT8
    sa, sb, sc = scales
    za, zb, zc = zps
    inits, nodes = [], []

    def const(name, v):
        inits.append(nh.from_array(np.asarray(v), name))
        return name

    def qdq_conv(x, shape, s, z, tag):
        ch = shape[1]
        const(f"s_{tag}", np.float32(s))
        const(f"z_{tag}", dtype(z))
        const(f"w_{tag}", np.eye(ch, dtype=np.int8).reshape(ch, ch, 1, 1))
        const(f"sw_{tag}", np.float32(2.0 ** -7))
        const(f"sy_{tag}", np.float32(s * 2.0 ** -7))
        nodes.extend([h.make_node("DequantizeLinear", [x, f"s_{tag}", f"z_{tag}"], [f"fx_{tag}"]),
                      h.make_node("DequantizeLinear", [f"w_{tag}", f"sw_{tag}"], [f"fw_{tag}"]),
                      h.make_node("Conv", [f"fx_{tag}", f"fw_{tag}"], [f"c_{tag}"]),
                      h.make_node("QuantizeLinear", [f"c_{tag}", f"sy_{tag}", f"z_{tag}"], [f"q_{tag}"]),
                      h.make_node("DequantizeLinear", [f"q_{tag}", f"sy_{tag}", f"z_{tag}"], [f"d_{tag}"])])
        return f"d_{tag}"

    # the conv's output scale is s * 2^-7 (the weight's scale), so the binary operand's scale is s itself / 2^-7:
    # scale the conv's input by 2^7 for the operand to have scale s
    fa = qdq_conv("a", shape_a, sa * 2.0 ** 7, za, "a")
    fb = qdq_conv("b", shape_b, sb * 2.0 ** 7, zb, "b")
    nodes.append(h.make_node(op, [fa, fb], ["r"]))
    last = "r"
    if tail:
        nodes.append(h.make_node(tail, [last], ["t"]))
        last = "t"
    const("sc", np.float32(sc))
    const("zc", dtype(zc if tail_zp is None else tail_zp))
    nodes.extend([h.make_node("QuantizeLinear", [last, "sc", "zc"], ["yq"]),
                  h.make_node("DequantizeLinear", ["yq", "sc", "zc"], ["y"])])
    g = h.make_graph(nodes, "binary", [h.make_tensor_value_info("a", tt, list(shape_a)),
                                       h.make_tensor_value_info("b", tt, list(shape_b))],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def run(m, feeds, level, qie):
    so = options(qie=qie, level=level, threads=1)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    s = session(m, so)
    ours = [n.op_type for a in s.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME
            for n in a.get_nodes()]
    return s.run(None, feeds)[0], ours


def params(rng, dtype, op, ties=True):
    """Scales and zero points. With ``ties`` the operands' scales are tenths of the output's (Mul: one is 1), so
    that many exact sums / products land on a .5 tie that float32 misses one way or the other: the two arithmetics
    then differ on hundreds of codes instead of a few in 65536."""
    info = np.iinfo(dtype)
    sc = float(np.float32(np.exp(rng.uniform(-5, -1))))
    if ties:
        scales = (float(np.float32(sc * 0.1)), 1.0 if op == "Mul" else float(np.float32(sc * 0.3)), sc)
    else:
        scales = tuple(float(np.float32(np.exp(rng.uniform(-5, -1)))) for _ in range(2)) + (sc,)
    zps = tuple(int(rng.integers(info.min, info.max + 1)) for _ in range(3))
    return scales, zps


def feeds_for(shape_a, shape_b, dtype):
    """Codes of a and b such that every pair meets where the sizes allow: the operand with fewer elements takes
    0, 1, ... 255, 0, ...; each of its values meets 0, 1, ... 255 in turn of the full operand's elements."""
    out = np.broadcast_shapes(shape_a, shape_b)
    a_small = np.prod(shape_a) <= np.prod(shape_b)
    small, full = (shape_a, shape_b) if a_small else (shape_b, shape_a)
    assert tuple(full) == out
    p = (np.arange(np.prod(small)) % 256).reshape(small)
    pv = np.broadcast_to(p, out).ravel()
    q = np.empty(pv.size, np.int64)
    for v in range(256):
        at = np.nonzero(pv == v)[0]
        q[at] = np.arange(at.size) % 256
    lo = np.iinfo(dtype).min
    p, q = (p + lo).astype(dtype), (q.reshape(out) + lo).astype(dtype)
    return {"a": p, "b": q} if a_small else {"a": q, "b": p}


def pairs_covered(f):
    a, b = np.broadcast_arrays(f["a"], f["b"])
    return len({(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel())})


def test_operand_codes_cover_every_pair():
    for form, (sa, sb) in FORMS.items():
        if form == "a_scalar":
            continue
        f = feeds_for(sa, sb, np.uint8)
        assert f["a"].shape == sa and f["b"].shape == sb
        assert pairs_covered(f) == 65536, form


@needs_ep
@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("form", list(FORMS))
def test_u8_binary_unit_equals_ort_qlinear_op_on_every_pair(op, form):
    rng = np.random.default_rng(zlib.crc32(f"{op} {form}".encode()))
    shape_a, shape_b = FORMS[form]
    feeds = feeds_for(shape_a, shape_b, np.uint8)
    apart = 0
    for trial in range(3):
        scales, zps = params(rng, np.uint8, op, ties=trial == 0)
        m = model(op, shape_a, shape_b, np.uint8, scales, zps)
        want = {lv: run(m, feeds, lv, qie=False)[0] for lv in ("all", "extended", "disable")}
        for level in OPT_LEVELS:
            got, ours = run(m, feeds, level, qie=True)
            assert ours.count("Conv") == 2 and op in ours, (level, ours)
            if not COMPARE_BUILTIN:  # valgrind: ORT's own kernels are not the reference there
                continue
            # ORT_ENABLE_ALL's fused kernel at every level; ORT's float nodes (DISABLE / BASIC) and its NCHW QLinearAdd
            # (EXTENDED, operands swapped where the first is broadcast along W, H or C) within one step
            np.testing.assert_array_equal(got, want["all"], err_msg=f"{level} trial {trial}")
            for other in ("extended", "disable"):
                d = np.abs(got - want[other]) / scales[2]
                assert d.max() <= 1.0001, (level, other, d.max())
            apart = max(apart, int((np.abs(got - want["disable"]) > 0.5 * scales[2]).sum()))
    print(f"{op} {form}: up to {apart} of {got.size} codes one step from the float QDQ graph")


@needs_ep
@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("form", ["same", "b_per_channel", "a_spatial"])
def test_s8_binary_unit_keeps_the_float_graph_arithmetic(op, form):
    """With s8 activations ORT leaves a network's Add / Mul as float nodes (x86: QLinearAdd is u8; the tests'
    ResNet-style s8 network keeps Add and Mul float at ORT_ENABLE_ALL): the unit computes Q(DQ(a) op DQ(b))."""
    rng = np.random.default_rng(zlib.crc32(f"s8 {op} {form}".encode()))
    shape_a, shape_b = FORMS[form]
    feeds = feeds_for(shape_a, shape_b, np.int8)
    scales, zps = params(rng, np.int8, op)
    m = model(op, shape_a, shape_b, np.int8, scales, zps)
    want = run(m, feeds, "disable", qie=False)[0]
    for level in ("disable", "all"):
        got, ours = run(m, feeds, level, qie=True)
        assert op in ours, ours
        if COMPARE_BUILTIN:
            np.testing.assert_array_equal(got, want, err_msg=level)


@needs_ep
@pytest.mark.parametrize("op,tail,bottom", [("Add", "Relu", True), ("Add", "Relu", False), ("Sub", None, None)])
def test_binary_unit_keeps_float_arithmetic_where_ort_keeps_float_nodes(op, tail, bottom):
    """Add -> Relu -> Q: ORT drops the Relu and fuses QLinearAdd only where the zero point is the bottom code (the
    Relu clamps no code); otherwise it runs the float nodes, and so does the unit. Sub has no QLinear form."""
    rng = np.random.default_rng(5)
    shape_a, shape_b = FORMS["b_per_channel"]
    feeds = feeds_for(shape_a, shape_b, np.uint8)
    scales, zps = params(rng, np.uint8, op)
    m = model(op, shape_a, shape_b, np.uint8, scales, zps, tail=tail, tail_zp=None if tail is None else 0 if bottom else 37)
    for level in ("disable", "all"):
        got, ours = run(m, feeds, level, qie=True)
        want, _ = run(m, feeds, level, qie=False)
        assert op in ours, ours
        if COMPARE_BUILTIN and (level == "all" or not bottom):
            np.testing.assert_array_equal(got, want, err_msg=level)


def silu_model(sx, zx, st, zt, sc, zc):
    """x (u8 codes, 256 channels) -> identity conv -> Q -> DQ -> Mul(x, Q(Sigmoid(x))) -> Q -> DQ: SiLU quantized with
    ORT's full op set (QLinearSigmoid and QLinearMul at ALL), which the plan folds into one table of x."""
    m = model("Mul", (1, 256, 2, 2), (1, 256, 2, 2), np.uint8, (sx, sx, sc), (zx, zx, zc))
    g = m.graph
    mul = next(n for n in g.node if n.op_type == "Mul")
    g.input.pop()  # no second input: the product's second operand is Sigmoid(x)
    g.initializer.extend([nh.from_array(np.float32(st), "st"), nh.from_array(np.uint8(zt), "zt")])
    keep = [n for n in g.node if not n.output[0].endswith("_b")]
    del g.node[:]
    at = next(i for i, n in enumerate(keep) if n is mul)
    g.node.extend(keep[:at] + [h.make_node("Sigmoid", ["d_a"], ["sg"]),
                               h.make_node("QuantizeLinear", ["sg", "st", "zt"], ["sq"]),
                               h.make_node("DequantizeLinear", ["sq", "st", "zt"], ["sd"]),
                               h.make_node("Mul", ["d_a", "sd"], ["r"])] + keep[at + 1:])
    return m


@needs_ep
def test_silu_fold_equals_ort_qlinear_sigmoid_and_mul():
    """x * Sigmoid(x) with both quantized is folded into one table of x (region.cc FoldSelfBinary) whose entries
    take QLinearMul's arithmetic: equal to ORT INT8 at ALL on every code, with scales whose products land on ties."""
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    feeds = {"a": np.arange(1024).reshape(1, 256, 2, 2).astype(np.uint8)}  # every code, per channel too
    for trial in range(4):
        sx = float(np.float32(np.exp(rng.uniform(-5, -2))))
        st = 1 / 256 if trial % 2 else float(np.float32(np.exp(rng.uniform(-7, -5))))
        sc = float(np.float32(sx * st * 10)) if trial < 2 else float(np.float32(np.exp(rng.uniform(-5, -2))))
        zx, zc = (int(v) for v in rng.integers(0, 256, 2))
        m = silu_model(sx, zx, st, 0, sc, zc)
        so = options(qie=False, level="all")
        qie_ep.register(so, ep_options={"profile": "1", "min_region_convs": "1"})
        qie_ep.reset_stats()
        got = ort.InferenceSession(m.SerializeToString(), so).run(None, feeds)[0]
        p = qie_ep.region_profile()
        assert "binary" not in p and ("conv+table" in p or "table" in p), p  # the region ran, the Mul folded
        if COMPARE_BUILTIN:
            np.testing.assert_array_equal(got, run(m, feeds, "all", qie=False)[0], err_msg=f"trial {trial}")


def unary_model(kind, c, hw, sx, zx, sy, zy, const=None, sk=None, zk=None, const_first=False):
    """a (u8 codes) -> identity conv -> Q -> DQ -> Mul / Add with a DequantizeLinear'd u8 constant [C,1,1] (``kind``
    "Mul" / "Add"), GlobalAveragePool ("GAP") or a 2 x 2 AveragePool of stride 2 ("AvgPool") -> Q -> DQ."""
    m = model("Mul", (1, c, hw[0], hw[1]), (1, c, hw[0], hw[1]), np.uint8, (sx, sx, sy), (zx, zx, zy))
    g = m.graph
    g.input.pop()
    keep = [n for n in g.node if not n.output[0].endswith("_b")]
    at = next(i for i, n in enumerate(keep) if n.op_type == "Mul")
    if kind == "GAP":
        mid = [h.make_node("GlobalAveragePool", ["d_a"], ["r"])]
    elif kind == "AvgPool":
        mid = [h.make_node("AveragePool", ["d_a"], ["r"], kernel_shape=[2, 2], strides=[2, 2])]
    else:
        g.initializer.extend([nh.from_array(const.reshape(c, 1, 1), "k"), nh.from_array(np.float32(sk), "sk"),
                              nh.from_array(np.uint8(zk), "zk")])
        ins = ["dk", "d_a"] if const_first else ["d_a", "dk"]
        mid = [h.make_node("DequantizeLinear", ["k", "sk", "zk"], ["dk"]), h.make_node(kind, ins, ["r"])]
    del g.node[:]
    g.node.extend(keep[:at] + mid + keep[at + 1:])
    return m


def region_run(m, feeds):
    import onnxruntime as ort

    so = options(qie=False, level="all")
    qie_ep.register(so, ep_options={"profile": "1", "min_region_convs": "1"})
    qie_ep.reset_stats()
    got = ort.InferenceSession(m.SerializeToString(), so).run(None, feeds)[0]
    return got, qie_ep.region_profile()


@needs_ep
@pytest.mark.parametrize("op", ["Mul", "Add"])
@pytest.mark.parametrize("const_first", [False, True])
def test_table_of_a_quantized_constant_equals_ort_qlinear_op(op, const_first):
    """DQ(x) op DQ(u8 constant [C,1,1]) -> Q (DenseNet's BatchNormalization as Mul and Add) is a table unit; ORT fuses
    it into QLinearMul / QLinearAdd, whose arithmetic the table takes: every pair of codes, scales with ties."""
    rng = np.random.default_rng(zlib.crc32(f"table {op} {const_first}".encode()))
    feeds = {"a": np.tile(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, 256, 1, 1))}
    for trial in range(3):
        sy = float(np.float32(np.exp(rng.uniform(-5, -2))))
        sx = float(np.float32(sy * 0.1)) if trial == 0 else float(np.float32(np.exp(rng.uniform(-5, -2))))
        sk = (1.0 if op == "Mul" else float(np.float32(sy * 0.3))) if trial == 0 else float(np.float32(np.exp(rng.uniform(-5, -2))))
        zx, zy, zk = (int(v) for v in rng.integers(0, 256, 3))
        m = unary_model(op, 256, (16, 16), sx, zx, sy, zy, const=np.arange(256, dtype=np.uint8), sk=sk, zk=zk,
                        const_first=const_first)
        got, p = region_run(m, feeds)
        assert "binary" not in p and ("conv+table" in p or "table" in p), p  # a table unit of the region
        if COMPARE_BUILTIN:
            want = run(m, feeds, "all", qie=False)[0]
            np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
            plain = run(m, feeds, "disable", qie=False)[0]
            assert np.abs(got - plain).max() <= sy * 1.0001


@needs_ep
def test_global_average_pool_equals_ort_qlinear_global_average_pool():
    """DQ -> GlobalAveragePool -> Q, u8: ORT fuses it into QLinearGlobalAveragePool, float(sum - HW zx) times one
    multiplier sx / (sy HW); the region's unit takes that arithmetic. Scales with .5 ties on many sums."""
    rng = np.random.default_rng(3)
    hw = (4, 5)
    for trial in range(3):
        sx = float(np.float32(np.exp(rng.uniform(-5, -2))))
        # trial 0: sy = sx / 10, so that every odd centred sum is a .5 tie (HW = 20): the two arithmetics part on ~18%
        sy = float(np.float32(sx * 0.1)) if trial == 0 else float(np.float32(np.exp(rng.uniform(-5, -2))))
        zx, zy = (int(v) for v in rng.integers(0, 256, 2))
        zy = 128 if trial == 0 else zy
        # codes near the zero point: means inside the output range, not saturated
        feeds = {"a": np.clip(zx + rng.integers(-12, 13, size=(1, 256, *hw)), 0, 255).astype(np.uint8)}
        m = unary_model("GAP", 256, hw, sx, zx, sy, zy)
        got, p = region_run(m, feeds)
        assert "gap" in p, p
        if COMPARE_BUILTIN:
            np.testing.assert_array_equal(got, run(m, feeds, "all", qie=False)[0], err_msg=f"trial {trial}")


@needs_ep
def test_average_pool_equals_ort_qlinear_average_pool():
    """DQ -> AveragePool -> Q, u8: ORT fuses it into QLinearAveragePool, which sums and divides as the float graph but
    quantizes as nearbyint(v / s + zp), the zero point added before rounding: a .5 tie rounds the other way for an odd
    zero point (DenseNet-121's transition pools: 39 of its 1000 outputs). The region's pool does the same for u8."""
    rng = np.random.default_rng(4)
    for trial in range(3):
        sx = float(np.float32(np.exp(rng.uniform(-5, -2))))
        sy = sx if trial == 0 else float(np.float32(np.exp(rng.uniform(-5, -2))))  # trial 0: every sum = 2 mod 4 a tie
        zx, zy = int(rng.integers(0, 256)), 2 * int(rng.integers(0, 128)) + 1
        feeds = {"a": np.clip(zx + rng.integers(-40, 41, size=(1, 64, 8, 10)), 0, 255).astype(np.uint8)}
        m = unary_model("AvgPool", 64, (8, 10), sx, zx, sy, zy)
        got, p = region_run(m, feeds)
        assert "avgpool" in p, p
        if COMPARE_BUILTIN:
            np.testing.assert_array_equal(got, run(m, feeds, "all", qie=False)[0], err_msg=f"trial {trial}")
            if trial == 0:  # the float graph rounds those ties the other way
                assert (got != run(m, feeds, "disable", qie=False)[0]).sum() > 0
