"""qie's EP attention unit: the QDQ core of self-attention as ORT's quantizer writes a torch export,
DQ(a) @ DQ(b) -> Q -> DQ [-> Div / Mul / Sub / Add by scalars, Add(mask)] -> Softmax [-> Where(IsNaN(p), 0, p)] -> Q
-> DQ @ DQ(v) -> Q, claimed as one fused node.

Both products are integer GEMMs requantized as ORT's QLinearMatMul does (its fusion at EXTENDED / ALL); the softmax
between them is the float graph's arithmetic with an exp approximation where MLAS has its own: within one output
step of ORT at every optimization level, differences rare. Masks broadcast (per key, per query and key, constant,
larger than the scores), fully masked rows follow ORT (NaN -> the Where's value; without it, NaN quantized to the
zero point), shapes change between runs, zero-size sequences give empty outputs; a group qie cannot prove (a
per-axis scale, a second reader of the probabilities, the probabilities as a graph output, another softmax axis)
stays on ORT, and a mask that does not broadcast is an error naming the node.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS
from qie_ep.session import options, session
from test_ep import T, assigned_to_qie, ep_session, needs_ep, rand
from test_ep_softmax import within_one_step as _within_one_step

UNIT_NODES = 14  # DQ a, DQ b, MatMul, Q, DQ, Add(mask), Softmax, IsNaN, Where, Q, DQ, DQ v, MatMul, Q


def attention_model(dt=np.uint8, pdt=np.uint8, mask="input", mask_shape=("B", 1, 1, "S"), nan_where=True, steps=(),
                    heads=4, d=16, batch="B", opset=21, const_mask=None, shape_read=False, probs_output=False,
                    per_axis_a=False, softmax_axis=-1, bdt=None, vdt=None, p_zp=0):
    """The attention core of one layer; `steps`: (op, scalar, value_first) before the mask Add; `bdt` / `vdt`: the
    keys' / values' type where it is not `dt`'s."""
    bdt, vdt = bdt or dt, vdt or dt
    def zp(dtype, v):
        return np.array(v if dtype == np.uint8 else v - 128, dtype)
    inits = [numpy_helper.from_array(np.array(s, np.float32), n) for n, s in
             (("sb", 0.02), ("s1", 0.08), ("sp", 1 / 255), ("sv", 0.03), ("sy", 0.03))]
    inits.append(numpy_helper.from_array(np.full(heads, 0.02, np.float32) if per_axis_a else np.array(0.02, np.float32),
                                         "sa"))
    inits += [numpy_helper.from_array(np.full(heads, zp(dt, 120)) if per_axis_a else zp(dt, 120), "za"),
              numpy_helper.from_array(zp(bdt, 131), "zb"), numpy_helper.from_array(zp(dt, 140), "z1"),
              numpy_helper.from_array(zp(pdt, p_zp), "zp"), numpy_helper.from_array(zp(vdt, 125), "zv"),
              numpy_helper.from_array(zp(dt, 128), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"], **({"axis": 1} if per_axis_a else {})),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node("MatMul", ["af", "bf"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "s1", "z1"], ["sq"]),
             helper.make_node("DequantizeLinear", ["sq", "s1", "z1"], ["sf"])]
    cur = "sf"
    for i, (op, k, first) in enumerate(steps):
        inits.append(numpy_helper.from_array(np.array(k, np.float32), f"k{i}"))
        nodes.append(helper.make_node(op, [cur, f"k{i}"] if first else [f"k{i}", cur], [f"st{i}"]))
        cur = f"st{i}"
    inputs = [helper.make_tensor_value_info("a", T[dt], [batch, heads, "S", d]),
              helper.make_tensor_value_info("b", T[bdt], [batch, heads, d, "S"]),
              helper.make_tensor_value_info("v", T[vdt], [batch, heads, "S", d])]
    if mask:
        if mask == "const":
            inits.append(numpy_helper.from_array(const_mask.astype(np.float32), "m"))
        else:
            inputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, list(mask_shape)))
        nodes.append(helper.make_node("Add", [cur, "m"], ["masked"]))
        cur = "masked"
    nodes.append(helper.make_node("Softmax", [cur], ["p"], axis=softmax_axis))
    cur = "p"
    if nan_where:
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"]), helper.make_node("Where", ["nan", "zero", "p"], ["pw"])]
        cur = "pw"
    nodes += [helper.make_node("QuantizeLinear", [cur, "sp", "zp"], ["pq"]),
              helper.make_node("DequantizeLinear", ["pq", "sp", "zp"], ["pf"]),
              helper.make_node("DequantizeLinear", ["v", "sv", "zv"], ["vf"]),
              helper.make_node("MatMul", ["pf", "vf"], ["o"]),
              helper.make_node("QuantizeLinear", ["o", "sy", "zy"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", T[dt], None)]
    if shape_read:  # BERT reads the value's shape for its head merge
        nodes.append(helper.make_node("Shape", ["vf"], ["vshape"], start=1, end=-1))
        outputs.append(helper.make_tensor_value_info("vshape", TensorProto.INT64, None))
    if probs_output:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def feeds(rng, dt, batch, heads, seq, d=16, mask_shape=None, masked=0.3, bdt=None, vdt=None):
    f = {"a": rand(rng, dt, (batch, heads, seq, d)), "b": rand(rng, bdt or dt, (batch, heads, d, seq)),
         "v": rand(rng, vdt or dt, (batch, heads, seq, d))}
    if mask_shape is not None:  # BERT's additive mask: 0 where attended, a large negative value elsewhere
        f["m"] = np.where(rng.random(mask_shape) < masked, np.float32(-3.4e38), np.float32(0)).astype(np.float32)
    return f


def within_one_step(got, want, what, frac_max=0.02):  # a probability code one step off moves a row's outputs
    _within_one_step(got, want, what, frac_max)


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("dt,pdt", [(np.uint8, np.uint8), (np.int8, np.int8), (np.int8, np.uint8)],
                         ids=["u8", "s8", "s8-u8p"])
def test_attention_unit_is_claimed_and_within_one_step(level, dt, pdt):
    rng = np.random.default_rng(3)
    model = attention_model(dt, pdt)
    sess, plain, floats = ep_session(model, level), session(model, level=level), session(model, level="disable")
    assert assigned_to_qie(sess) == UNIT_NODES, sess.get_provider_graph_assignment_info()
    before = qie_ep.ep_stats()["attention_runs"]
    for batch, seq in ((1, 11), (2, 37), (1, 1), (1, 130)):
        f = feeds(rng, dt, batch, 4, seq, mask_shape=(batch, 1, 1, seq))
        f["m"][..., 0] = 0  # no fully masked rows here (the test below has them)
        got = sess.run(None, f)[0]
        assert got.shape == (batch, 4, seq, 16)
        if COMPARE_BUILTIN:  # the float graph, and ORT at this level (QLinearMatMul from EXTENDED on)
            within_one_step(got, floats.run(None, f)[0], f"float graph batch={batch} seq={seq}")
            within_one_step(got, plain.run(None, f)[0], f"level={level} batch={batch} seq={seq}")
    assert qie_ep.ep_stats()["attention_runs"] >= before + 4


@needs_ep
@pytest.mark.parametrize("case", ["per_key", "per_query_key", "rank2", "const", "grows_batch", "no_mask", "steps",
                                  "shape_read", "opset11"])
def test_masks_steps_and_shapes(case):
    """Masks that broadcast every way ORT's Add does (a mask with a batch the scores lack makes the output that
    batch), scalar steps before the mask in either operand order, a Shape reading the value's DequantizeLinear, and
    opset 11's Softmax (axis -1)."""
    rng = np.random.default_rng(7)
    seq = 9
    kw, mshape, batch = {}, (1, 1, 1, seq), 1
    if case == "per_query_key":
        kw, mshape = dict(mask_shape=("B", 1, "S", "S")), (1, 1, seq, seq)
    elif case == "rank2":
        kw, mshape = dict(mask_shape=("S", "S")), (seq, seq)
    elif case == "const":
        kw, mshape = dict(mask="const", const_mask=np.triu(np.full((seq, seq), -1e9, np.float32), 1)), None
    elif case == "grows_batch":
        kw, mshape = dict(batch=1, mask_shape=(3, 1, 1, "S")), (3, 1, 1, seq)
    elif case == "no_mask":
        kw, mshape = dict(mask=None, nan_where=False), None
    elif case == "steps":
        kw = dict(steps=(("Div", 2.0, True), ("Mul", 1.5, False), ("Sub", 0.25, True), ("Add", -0.5, False)))
    elif case == "shape_read":
        kw = dict(shape_read=True)
    elif case == "opset11":
        kw = dict(opset=11, softmax_axis=-1)
    model = attention_model(np.uint8, **kw)
    # Against the float graph: without a mask, ORT fuses DQ -> Softmax -> Q into QLinearSoftmax from EXTENDED on,
    # its own rounding (a P code off by one moves many outputs by one step).
    sess, plain = ep_session(model), session(model, level="disable")
    assert assigned_to_qie(sess) > 0, (case, sess.get_provider_graph_assignment_info())
    f = feeds(rng, np.uint8, batch, 4, seq, mask_shape=mshape, masked=0.2)
    if "m" in f:
        f["m"].reshape(-1, seq)[:, 0] = 0
    got, want = sess.run(None, f), plain.run(None, f)
    if case == "grows_batch":
        assert got[0].shape == (3, 4, seq, 16)
    if case == "shape_read":
        np.testing.assert_array_equal(got[1], want[1])
    if COMPARE_BUILTIN:
        within_one_step(got[0], want[0], case)


@needs_ep
@pytest.mark.parametrize("nan_where", [True, False], ids=["where", "no-where"])
@pytest.mark.parametrize("p_zp", [0, 10])
def test_fully_masked_rows(nan_where, p_zp):
    """A row whose mask is -inf everywhere: softmax gives NaN; with torch's Where(IsNaN) those become 0 (the codes of
    0), without it QuantizeLinear takes NaN to the bottom code (MLAS clamps max(x / s, lo) first: 0, not the zero
    point where that is not 0); either way what ORT gives."""
    rng = np.random.default_rng(11)
    model = attention_model(np.uint8, mask_shape=("B", 1, "S", "S"), nan_where=nan_where, p_zp=p_zp)
    sess, plain = ep_session(model), session(model, level="disable")
    assert assigned_to_qie(sess) == UNIT_NODES - (0 if nan_where else 2)
    f = feeds(rng, np.uint8, 1, 4, 6, mask_shape=(1, 1, 6, 6), masked=0.0)
    f["m"][0, 0, 2, :] = -np.inf
    got = sess.run(None, f)[0]
    if COMPARE_BUILTIN:
        within_one_step(got, plain.run(None, f)[0], f"nan_where={nan_where}", frac_max=0.05)


@needs_ep
@pytest.mark.parametrize("seq,batch", [(0, 1), (5, 0)])
def test_zero_size_sequence_or_batch(seq, batch):
    model = attention_model(np.uint8)
    sess = ep_session(model)
    assert assigned_to_qie(sess) == UNIT_NODES
    f = feeds(np.random.default_rng(1), np.uint8, batch, 4, seq, mask_shape=(batch, 1, 1, seq))
    got = sess.run(None, f)[0]
    assert got.shape == (batch, 4, seq, 16) and got.dtype == np.uint8


@needs_ep
def test_keys_of_another_length_and_none():
    """Cross attention: K keys / values for S queries, K = 0 included (empty softmax rows: the second product sums
    nothing and gives the zero point's codes, as ORT does)."""
    model = attention_model(np.uint8, mask=None, nan_where=False)
    g = model.graph
    g.input[1].type.tensor_type.shape.dim[3].dim_param = "K"
    g.input[2].type.tensor_type.shape.dim[2].dim_param = "K"
    sess, plain = ep_session(model), session(model, level="disable")
    assert assigned_to_qie(sess) == UNIT_NODES - 3  # no mask Add, IsNaN, Where
    rng = np.random.default_rng(9)
    for s, k in ((3, 0), (0, 3), (4, 5), (1, 1)):
        f = {"a": rand(rng, np.uint8, (1, 4, s, 16)), "b": rand(rng, np.uint8, (1, 4, 16, k)),
             "v": rand(rng, np.uint8, (1, 4, k, 16))}
        got = sess.run(None, f)[0]
        assert got.shape == (1, 4, s, 16)
        if COMPARE_BUILTIN:
            within_one_step(got, plain.run(None, f)[0], f"S={s} K={k}")


@needs_ep
def test_a_mask_that_does_not_broadcast_is_an_error_naming_the_node():
    model = attention_model(np.uint8, mask_shape=("B", 1, 1, "M"))
    sess = ep_session(model)
    f = feeds(np.random.default_rng(2), np.uint8, 1, 4, 6, mask_shape=(1, 1, 1, 4))
    with pytest.raises(Exception, match="attention mask of shape \\[1,1,1,4\\] does not broadcast"):
        sess.run(None, f)


@needs_ep
@pytest.mark.parametrize("case", ["per_axis_scale", "probs_output", "softmax_axis", "option_off"])
def test_groups_it_cannot_prove_stay_on_ort(case):
    kw = {"per_axis_scale": dict(per_axis_a=True), "probs_output": dict(probs_output=True),
          "softmax_axis": dict(softmax_axis=2), "option_off": {}}[case]
    model = attention_model(np.uint8, **kw)
    level = "disable" if case == "per_axis_scale" else "all"  # (ORT's QLinearMatMul refuses that scale at ALL)
    if case == "option_off":
        so = options()
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        qie_ep.register(so, ep=True, ep_options={"attention": "0"})
        sess = session(model, so)
    else:
        sess = ep_session(model, level)
    nodes = [n.op_type for a in sess.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME
             for n in a.get_nodes()]
    assert nodes.count("MatMul") < 2 or "Softmax" not in nodes, (case, nodes)
    f = feeds(np.random.default_rng(4), np.uint8, 1, 4, 7, mask_shape=(1, 1, 1, 7))
    f["m"][..., 0] = 0
    got, want = sess.run(None, f), session(model, level=level).run(None, f)
    for g, w in zip(got, want):
        if COMPARE_BUILTIN and g.dtype != np.float32:
            within_one_step(g, w, case)


@st.composite
def attention_cases(draw):
    dt, pdt, bdt, vdt = (draw(st.sampled_from([np.uint8, np.int8])) for _ in range(4))  # queries, probs, keys, values
    heads, d = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 8, 20]))
    batch, seq = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 15, 16, 17, 70]))
    mask = draw(st.sampled_from(["key", "query_key", None]))
    mshape = {"key": (batch, 1, 1, seq), "query_key": (batch, 1, seq, seq), None: None}[mask]
    decl = {"key": ("B", 1, 1, "S"), "query_key": ("B", 1, "S", "S"), None: None}[mask]
    model = attention_model(dt, pdt, mask="input" if mask else None, mask_shape=decl or (), heads=heads, d=d,
                            nan_where=draw(st.booleans()), bdt=bdt, vdt=vdt)
    f = feeds(np.random.default_rng(draw(st.integers(0, 2**16))), dt, batch, heads, seq, d=d, mask_shape=mshape,
              bdt=bdt, vdt=vdt)
    if "m" in f:
        f["m"].reshape(-1, seq)[:, 0] = 0
    return model, f


@needs_ep
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(attention_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_attention_units_equal_ort_within_one_step(case, level):
    """Whatever ORT computes for a generated attention core, ORT + qie computes within one step of it (the float graph
    where ORT's QLinearSoftmax takes an unmasked softmax: it wraps p = 1 to 0 on one-element rows, ORT 1.31)."""
    model, f = case
    got = ep_session(model, level).run(None, f)[0]
    want = session(model, level=level if "m" in f else "disable").run(None, f)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    if COMPARE_BUILTIN:
        within_one_step(got, want, f"level={level} shapes={ {k: v.shape for k, v in f.items()} }", frac_max=0.05)


@needs_ep
def test_attention_unit_pacing_changes_no_result():
    sessions = []
    model = attention_model(np.uint8)
    for pacing in ("1", "0"):
        so = options(threads=2, spinning=False)
        qie_ep.register(so, ep=True, ep_options={"pacing": pacing})
        sessions.append(session(model, so))
    rng = np.random.default_rng(5)
    for seq in (64, 3):
        f = feeds(rng, np.uint8, 1, 4, seq, mask_shape=(1, 1, 1, seq))
        f["m"][..., 0] = 0
        for _ in range(16):
            a, b = (s.run(None, f)[0] for s in sessions)
            np.testing.assert_array_equal(a, b)
