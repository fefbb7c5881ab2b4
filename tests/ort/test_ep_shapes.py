"""qie's EP shape units: every Shape of one tensor -> Gather(constant index) -> Unsqueeze(axes [0]) -> the Concats of
those and constants, with the DequantizeLinear that only the Shape reads, claimed as one fused node that reads its
input's dims (the Reshape targets of a torch export with dynamic
axes, as BERT computes them). Integers: the outputs equal ORT's exactly, at every level, as shapes change; what ORT
reads besides (the Shape's own output, a Gather's) is output too; an index out of range is an error naming the Shape.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from helpers import OPT_LEVELS
from qie_ep.session import options, session
from test_ep import assigned_to_qie, ep_session, needs_ep, rand


def shape_model(opset=17, start=None, end=None, indices=(0, 1), vector_index=False, dq_shared=False,
                gather_output=False, shape_output=False, two_shapes=False):
    """y = Reshape(f, Concat(Unsqueeze(Gather(Shape(DQ(x)), i)) for i, [4, 16])): BERT's head split. f's dims have
    their own names, so ORT's ReshapeFusion cannot prove them x's (where it can, it folds the chain to 0s itself)."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(7, np.uint8), "z"),
             numpy_helper.from_array(np.array([4, 16], np.int64), "tail")]
    shape_attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
             helper.make_node("Shape", ["h" if two_shapes else "xf"], ["dims"], **shape_attrs)]
    parts = []
    for k, i in enumerate(indices):
        inits.append(numpy_helper.from_array(np.array([i] if vector_index else i, np.int64), f"i{k}"))
        dims = "dims"
        if two_shapes and k:  # BERT: each dim from its own Shape of the same float tensor
            dims = f"dims{k}"
            nodes.append(helper.make_node("Shape", ["h"], [dims], **shape_attrs))
        nodes.append(helper.make_node("Gather", [dims, f"i{k}"], [f"g{k}"], axis=0))
        if vector_index:
            parts.append(f"g{k}")
            continue
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"ax{k}"))
            nodes.append(helper.make_node("Unsqueeze", [f"g{k}", f"ax{k}"], [f"u{k}"]))
        else:
            nodes.append(helper.make_node("Unsqueeze", [f"g{k}"], [f"u{k}"], axes=[0]))
        parts.append(f"u{k}")
    nodes += [helper.make_node("Concat", [*parts, "tail"], ["target"], axis=0),
              helper.make_node("Reshape", ["f", "target"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if dq_shared:  # the dequantized tensor is a graph output too
        outputs.append(helper.make_tensor_value_info("xf", TensorProto.FLOAT, None))
    if gather_output:
        outputs.append(helper.make_tensor_value_info("g0", TensorProto.INT64, None))
    if shape_output:
        outputs.append(helper.make_tensor_value_info("dims", TensorProto.INT64, None))
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["B", "S", 64]),
                                            helper.make_tensor_value_info("f", TensorProto.FLOAT, ["P", "Q", 64])]
                          + ([helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", "S", 64])] if two_shapes else []),
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def feeds(rng, b, s, two_shapes=False):
    f = {"x": rand(rng, np.uint8, (b, s, 64)), "f": rng.normal(size=(b, s, 64)).astype(np.float32)}
    if two_shapes:
        f["h"] = rng.normal(size=(b, s, 64)).astype(np.float32)
    return f


def check(model, level, expect_nodes, shapes=((1, 11), (2, 5), (3, 1))):
    sess, plain = ep_session(model, level), session(model, level=level)
    assert assigned_to_qie(sess) == expect_nodes, sess.get_provider_graph_assignment_info()
    rng = np.random.default_rng(0)
    for b, s in shapes:
        f = feeds(rng, b, s, any(i.name == "h" for i in model.graph.input))
        for got, want in zip(sess.run(None, f), plain.run(None, f)):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
def test_head_split_shape_chain_is_one_unit(level):
    check(shape_model(), level, 7)  # DQ, Shape, 2 Gathers, 2 Unsqueezes, the Concat


@needs_ep
@pytest.mark.parametrize("case", ["opset11_axes_attribute", "start_end", "negative_index", "vector_index",
                                  "dq_is_an_output", "gather_is_an_output", "shape_is_an_output"])
def test_forms(case):
    kw, nodes = {
        "opset11_axes_attribute": (dict(opset=11), 7),
        "start_end": (dict(opset=15, start=-3, end=2, indices=(0, -1)), 7),
        "negative_index": (dict(indices=(-3, -2)), 7),
        "vector_index": (dict(vector_index=True), 4),  # a Concat of Gathers: ORT's
        # the dequantized tensor is a graph output too: ORT gives the Shape its own DequantizeLinear (as it does for
        # every reader of a DQ's output), which joins the unit; the output is ORT's
        "dq_is_an_output": (dict(dq_shared=True), 7),
        "gather_is_an_output": (dict(gather_output=True), 7),
        "shape_is_an_output": (dict(shape_output=True), 7),
    }[case]
    check(shape_model(**kw), "all", nodes)


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
def test_shapes_of_one_tensor_and_their_concat_are_one_unit(level):
    """BERT's form: each dim from its own Shape of the same float tensor, one Concat of both and constants: one unit
    (ORT's common-subexpression elimination merges the two Shapes from BASIC on)."""
    check(shape_model(two_shapes=True), level, 7 if level == "disable" else 6)


@needs_ep
def test_an_index_out_of_range_is_an_error_naming_the_shape():
    model = shape_model(indices=(0, 5))
    model.graph.node[1].name = "head_dims"
    sess = ep_session(model)
    with pytest.raises(Exception, match="head_dims: a Gather index 5 is out of range for its 3 dims"):
        sess.run(None, feeds(np.random.default_rng(1), 1, 4))


@needs_ep
def test_option_off_leaves_the_chain_to_ort():
    so = options()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    qie_ep.register(so, ep=True, ep_options={"shapes": "0"})
    sess = session(shape_model(), so)
    assert assigned_to_qie(sess) == 0


@st.composite
def shape_cases(draw):
    """A Shape of a tensor of rank 1-4 (a DequantizeLinear's output or the tensor itself), opset 13 / 15 start and end,
    Gathers of random in-range indices (scalar or 1-D), each scalar one Unsqueezed or not, and every value read by
    Concats that are the graph's outputs; the input fed at two shapes."""
    rank = draw(st.integers(1, 4))
    opset = draw(st.sampled_from([13, 15]))
    start = draw(st.sampled_from([None, 0, 1, -1, -rank])) if opset >= 15 else None
    end = draw(st.sampled_from([None, rank, -1, 1])) if opset >= 15 else None
    n = len(range(rank)[slice(start, end)])
    dq = draw(st.booleans())
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z"),
             numpy_helper.from_array(np.array([0], np.int64), "ax")]
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"])] if dq else []
    nodes.append(helper.make_node("Shape", ["xf" if dq else "x"], ["dims"], **attrs))
    outs = ["dims"]
    for k in range(draw(st.integers(0, 3)) if n else 0):
        vector = draw(st.booleans())
        idx = [draw(st.integers(-n, n - 1)) for _ in range(draw(st.integers(1, 2)) if vector else 1)]
        inits.append(numpy_helper.from_array(np.array(idx if vector else idx[0], np.int64), f"i{k}"))
        dims = "dims"
        if k and draw(st.booleans()):  # BERT: a dim from another Shape of the same tensor
            dims = f"dims{k}"
            nodes.append(helper.make_node("Shape", ["xf" if dq else "x"], [dims], **attrs))
        nodes.append(helper.make_node("Gather", [dims, f"i{k}"], [f"g{k}"], axis=0))
        if not vector and draw(st.booleans()):
            nodes.append(helper.make_node("Unsqueeze", [f"g{k}", "ax"], [f"u{k}"]))
            outs.append(f"u{k}")
        else:
            outs.append(f"g{k}")
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.UINT8, [f"d{i}" for i in range(rank)])],
                          [helper.make_tensor_value_info(o, TensorProto.INT64, None) for o in outs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    shapes = [tuple(draw(st.integers(0, 4)) for _ in range(rank)) for _ in range(2)]
    return model, shapes


@needs_ep
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(shape_cases(), st.sampled_from(list(OPT_LEVELS)))
def test_property_shape_units_equal_ort(case, level):
    model, shapes = case
    sess, plain = ep_session(model, level), session(model, level=level)
    fusable = any(n.op_type in ("DequantizeLinear", "Gather") for n in model.graph.node)
    assert (assigned_to_qie(sess) > 0) == fusable, sess.get_provider_graph_assignment_info()
    for shape in shapes:
        x = np.zeros(shape, np.uint8)
        for got, want in zip(sess.run(None, {"x": x}), plain.run(None, {"x": x})):
            assert got.shape == want.shape and got.dtype == want.dtype, (shape, got.shape, want.shape)
            np.testing.assert_array_equal(got, want)
