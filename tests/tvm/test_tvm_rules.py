"""qie's CPU schedule rules (qie_ep.tvm.cpu_rules) and the CPU pipeline around them.

Each rule must take the PrimFuncs it is written for, decline the others, and compute exactly what the
unscheduled PrimFunc computes; the pipeline must lower quantize with ORT's rounding and still compile
symbolic shapes (where TVM's fused lowering fails).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_helpers import HOST, compile_model, qtvm, tvm

from qie_ep import reference

from qie_ep.tvm import cpu_rules
from qie_ep.tvm import _cpu_passes, rewrite_pass  # noqa: PLC2701 - the pipeline's own stages

RNG = np.random.default_rng(5)
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name, shape, dt=F):
    return helper.make_tensor_value_info(name, dt, shape)


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def conv_model(c, oc, hw, k, group=1, stride=1, pad=1):
    w = RNG.standard_normal((oc, c // group, k, k)).astype(np.float32) * 0.2
    b = RNG.standard_normal(oc).astype(np.float32)
    n = helper.make_node("Conv", ["x", "w", "b"], ["c"], group=group, strides=[stride] * 2, pads=[pad] * 4)
    r = helper.make_node("Relu", ["c"], ["y"])
    return _model([n, r], [_vi("x", [1, c, *hw])], [_vi("y", None)], [_const("w", w), _const("b", b)])


def matmul_model(shape_a, n):
    w = RNG.standard_normal((shape_a[-1], n)).astype(np.float32) * 0.1
    b = RNG.standard_normal(n).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                  [_vi("x", shape_a)], [_vi("y", None)], [_const("w", w), _const("b", b)])


def qdq_elementwise_model(shape):
    """DQ -> HardSwish -> Add -> Q: one fused injective function ending in a uint8 store."""
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("HardSwish", ["d"], ["h"]),
             helper.make_node("Add", ["h", "d"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s2", "z"], ["y"])]
    inits = [_const("s", np.float32(0.05)), _const("s2", np.float32(0.07)), _const("z", np.uint8(120))]
    return _model(nodes, [_vi("x", shape, TensorProto.UINT8)], [_vi("y", None, TensorProto.UINT8)], inits)


def softmax_model(shape):
    return _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [_vi("x", shape)], [_vi("y", None)])


def qdq_softmax_model(shape):
    """DQ -> Softmax -> Q (an attention softmax between QDQ pairs): the dequantized input read twice."""
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("Softmax", ["d"], ["p"], axis=-1),
             helper.make_node("QuantizeLinear", ["p", "s2", "z"], ["y"])]
    inits = [_const("s", np.float32(0.1)), _const("s2", np.float32(1 / 255)), _const("z", np.uint8(0))]
    return _model(nodes, [_vi("x", shape, TensorProto.UINT8)], [_vi("y", None, TensorProto.UINT8)], inits)


def layernorm_model(shape):
    rng = np.random.default_rng(11)       # its own stream: the other cases' random data stay as they were
    g = rng.standard_normal(shape[-1]).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    return _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                  [_vi("x", shape)], [_vi("y", None)], [_const("g", g), _const("b", b)])


def reduce_mean_model(shape):
    return _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], [_vi("x", shape)],
                  [_vi("y", None)], [_const("axes", np.array([-1], np.int64))], opset=18)


def pool_model(kind, c, hw):
    attrs = {} if kind == "GlobalAveragePool" else {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}
    return _model([helper.make_node(kind, ["x"], ["y"], **attrs)], [_vi("x", [1, c, *hw])], [_vi("y", None)])


def fused_primfuncs(model, shapes):
    """The module's PrimFuncs after qie's rewrite, legalization and fusion (before scheduling; without
    the tables pass, which would take the one-tensor elementwise functions away from the rules)."""
    from qie_ep.tvm import from_onnx
    mod = rewrite_pass(HOST)(from_onnx(model, shape_dict=shapes, fold_shapes=shapes is not None))
    passes = _cpu_passes(HOST, fuse=True)
    with HOST:
        for p in passes[:passes.index(next(p for p in passes if p.info.name == "qie.NarrowStoreSafe")) + 1]:
            if p.info.name != "qie.Tables":
                mod = p(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and "qie.kernel" not in (f.attrs or {})}


def _size(d, sizes) -> int:
    """A dimension's value: constant, a symbolic variable named in ``sizes``, or an expression of them."""
    if isinstance(d, tvm.tirx.IntImm):
        return int(d)
    if isinstance(d, tvm.tirx.Var):
        return sizes[d.name]
    ana = tvm.sym.analyzer.Analyzer()
    for v in tvm.tirx.analysis.undefined_vars(d):
        ana.bind(v, tvm.tirx.IntImm("int64", sizes[v.name]))
    return int(ana.simplify(d))


def _random_args(func, sizes=None):
    """Random operands; ``sizes``: values of the symbolic dimensions by name (a scalar parameter, as
    TVM adds for a size no buffer has by itself, gets its value)."""
    args = []
    for p in func.params:
        if not hasattr(p, "shape") and p not in func.buffer_map:
            args.append(sizes[p.name])
            continue
        b = p if hasattr(p, "shape") else func.buffer_map[p]
        shape = [_size(d, sizes) for d in b.shape]
        dt = str(b.dtype)
        args.append(RNG.standard_normal(shape).astype(dt) * 3 if "float" in dt
                    else RNG.integers(0, 255, shape).astype(dt))
    return args


GUARD = 256  # bytes after the output that no schedule may write


def _run(func, args):
    """Run ``func``; its output is a view at the start of a larger buffer whose tail must stay untouched
    (a vector store past the end would not show in the output itself)."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    out = args[-1]
    backing = np.full(out.nbytes + GUARD, 0xA5, np.uint8)
    whole = tvm.runtime.tensor(backing)
    view = whole._create_view(out.shape, str(out.dtype))
    t = [tvm.runtime.tensor(a.copy()) for a in args[:-1]] + [view]
    lib["main"](*t)
    after = whole.numpy()
    assert np.all(after[out.nbytes:] == 0xA5), "a store past the end of the output"
    return after[:out.nbytes].view(out.dtype).reshape(out.shape)


def scheduled_by(func):
    """(name of the first rule that takes ``func``, its scheduled PrimFunc) or (None, None)."""
    for rule in cpu_rules.rules():
        sch = rule.apply(func, HOST, False)
        if sch is not None:
            return type(rule).__name__, sch.mod["main"]
    return None, None


def assert_same_as_unscheduled(func, scheduled, sizes=None):
    args = _random_args(func, sizes)
    want, got = _run(func, args), _run(scheduled, args)
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
    else:
        # Inlining a chain of ops into one loop lets LLVM contract a * b + c into one FMA (TVM sets
        # AllowFPOpFusion=Fast; 0.27 has no target option against it), where the unscheduled PrimFunc
        # stored each op's float32 result: the product is then not rounded, and a value within one
        # rounding of a quantization tie can take the neighbouring code (measured: 4-9 of 1568).
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= max(1, diff.size // 100)


CASES = {
    "conv3x3": (conv_model(16, 24, (20, 32), 3), {"x": [1, 16, 20, 32]}, "Conv2d"),
    "conv3x3_s2": (conv_model(8, 12, (17, 32), 3, stride=2), {"x": [1, 8, 17, 32]}, "Conv2d"),
    "conv2x2_odd_channels": (conv_model(5, 7, (9, 48), 2, pad=0), {"x": [1, 5, 9, 48]}, "Conv2d"),
    "grouped": (conv_model(8, 16, (8, 16), 3, group=4), {"x": [1, 8, 8, 16]}, "Conv2d"),
    "depthwise": (conv_model(16, 16, (12, 16), 3, group=16), {"x": [1, 16, 12, 16]}, "Conv2d"),
    "matmul": (matmul_model([13, 96], 80), {"x": [13, 96]}, "Matmul"),
    "batch_matmul": (matmul_model([2, 7, 64], 48), {"x": [2, 7, 64]}, "Matmul"),
    "elementwise_u8": (qdq_elementwise_model([1, 8, 14, 14]), {"x": [1, 8, 14, 14]}, "Injective"),
    "elementwise_wide": (qdq_elementwise_model([2, 3, 64]), {"x": [2, 3, 64]}, "Injective"),
    "softmax": (softmax_model([6, 100]), {"x": [6, 100]}, "Reduction"),
    "softmax_odd_rows": (softmax_model([3, 37]), {"x": [3, 37]}, "Reduction"),
    # Rows of >= RowReduction.ROW_MIN: vectorized reductions, with and without a scalar tail.
    "softmax_long_rows": (softmax_model([5, 1000]), {"x": [5, 1000]}, "RowReduction"),
    "softmax_long_exact": (softmax_model([1, 3, 512]), {"x": [1, 3, 512]}, "RowReduction"),
    "qdq_softmax_long": (qdq_softmax_model([4, 300]), {"x": [4, 300]}, "RowReduction"),
    "layernorm_long": (layernorm_model([6, 768]), {"x": [6, 768]}, None),
    "reduce_mean_long": (reduce_mean_model([8, 1030]), {"x": [8, 1030]}, "RowReduction"),
    "maxpool": (pool_model("MaxPool", 8, (16, 16)), {"x": [1, 8, 16, 16]}, None),
    "global_avg_pool": (pool_model("GlobalAveragePool", 8, (7, 7)), {"x": [1, 8, 7, 7]}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rules_match_unscheduled(case):
    model, shapes, main_rule = CASES[case]
    funcs = fused_primfuncs(model, shapes)
    taken = {}
    for name, f in funcs.items():
        rule, sched = scheduled_by(f)
        assert rule is not None, f"{case}: no rule scheduled {name}"
        taken[name] = rule
        assert_same_as_unscheduled(f, sched)
    if main_rule:
        assert main_rule in taken.values(), f"{case}: expected {main_rule}, rules taken: {taken}"


def test_conv_rule_declines_non_convolutions():
    for case in ("matmul", "elementwise_u8", "softmax"):
        model, shapes, _ = CASES[case]
        for f in fused_primfuncs(model, shapes).values():
            assert cpu_rules.Conv2d().apply(f, HOST, False) is None
    for f in fused_primfuncs(*CASES["conv3x3"][:2]).values():
        assert cpu_rules.Matmul().apply(f, HOST, False) is None
        assert cpu_rules.Injective().apply(f, HOST, False) is None


def test_rules_decline_other_targets():
    f = next(iter(fused_primfuncs(*CASES["elementwise_u8"][:2]).values()))
    assert cpu_rules.Injective().apply(f, tvm.target.Target("cuda"), False) is None


def test_quantize_rounds_half_to_even_like_ort():
    """x / scale exactly k + 0.5: ORT rounds to the even code; TVM's own lowering rounded away from zero."""
    import onnxruntime as ort
    x = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 63.75, -64.25, 200.0], np.float32)
    for dt, zp in ((TensorProto.INT8, np.int8(0)), (TensorProto.UINT8, np.uint8(3))):
        m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], [_vi("x", [8])],
                   [_vi("y", None, dt)], [_const("s", np.float32(0.5)), _const("z", zp)])
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = compile_model(m)[0]({"x": x})[0]
        np.testing.assert_array_equal(got, want)


def _dql_inputs():
    """Sizes around the range kernel's 64-element blocks and 16-lane vectors (below one vector, exact
    multiples, one more / fewer), and values where the range is empty, one-sided, or has its min / max in
    the last element (the overlapping last vector) or the first."""
    out = [np.zeros((4, 8), np.float32), np.full((4, 8), -0.5, np.float32),
           np.linspace(-1.0, 3.0, 32, dtype=np.float32).reshape(4, 8)]
    for n in (1, 7, 15, 16, 17, 63, 64, 65, 80, 127, 1000, 15 * 1536):
        x = RNG.standard_normal((1, n)).astype(np.float32)
        out.append(x)
        y = np.abs(x) + 0.25
        y[0, -1] = 9.0               # max in the last element, range all positive
        out.append(y)
        z = -np.abs(x) - 0.125
        z[0, 0] = -7.0               # min in the first element, range all negative
        out.append(z)
    return out


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("x", _dql_inputs(), ids=lambda x: "x".join(map(str, x.shape)))
def test_dynamic_quantize_linear_like_ort(x, symbolic):
    """ORT: scale 1 when the range is empty (TVM's converter divided by zero), zero point rounded half to
    even, as qie_ep.reference.dynamic_quantize_linear; the scale and zero point from qie's one-pass range
    kernel (``qie_ep.tvm.dynamic``), for static and symbolic sizes."""
    import onnxruntime as ort
    shape = ["a", "b"] if symbolic else list(x.shape)
    m = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], [_vi("x", shape)],
               [_vi("y", None, TensorProto.UINT8), _vi("s", None), _vi("z", None, TensorProto.UINT8)])
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    run, kernels = compile_model(m)
    assert [k.startswith("qie_dynamic_range_") for k in kernels] == [True]
    got = run({"x": x})
    ref = reference.dynamic_quantize_linear(x)
    for g, w, r in zip(got, want, ref):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(g, r)


def test_dynamic_range_kernel_shared_and_declined():
    """Two DynamicQuantizeLinear of one tensor share one range call; a range whose pieces are not exactly
    the frontend's (a hand-written min / max with another divisor) is left to TVM's lowering."""
    from qie_ep.tvm.dynamic import dynamic_range_pass
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"]),
             helper.make_node("DynamicQuantizeLinear", ["x"], ["y2", "s2", "z2"]),
             helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0), helper.make_node("ReduceMin", ["x"], ["mn"], keepdims=0),
             helper.make_node("Sub", ["mx", "mn"], ["span"]), helper.make_node("Div", ["span", "d"], ["s3"])]
    m = _model(nodes, [_vi("x", [3, 40])], [_vi("y", None, TensorProto.UINT8), _vi("s", None), _vi("z", None, TensorProto.UINT8),
                                           _vi("y2", None, TensorProto.UINT8), _vi("s3", None)],
               [_const("d", np.float32(255.0))])
    mod = dynamic_range_pass()(qtvm.from_onnx(m))
    ranges = [gv for gv, f in mod.functions_items() if "qie_dynamic_range" in gv.name_hint]
    assert len(ranges) == 1
    text = mod["main"].script()
    assert text.count("qie_dynamic_range") == 1 and "R.max(" in text and "R.min(" in text
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    y, s, z, y2, s3 = compile_model(m)[0]({"x": x})
    ry, rs, rz = reference.dynamic_quantize_linear(x)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(y2, ry)
    assert s == rs and z == rz and s3 == np.float32(np.float32(x.max() - x.min()) / np.float32(255))


def test_symbolic_shapes_compile_without_fusion(caplog):
    """TVM 0.27's fused lowering fails on some symbolic shapes (VMShapeLower); the pipeline says so and
    compiles the unfused module, scheduled by the same rules."""
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "i0"], ["b"]),
             helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]),
             helper.make_node("Concat", ["b1", "n1"], ["sh2"], axis=0),
             helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Reshape", ["r", "sh2"], ["y"])]
    inits = [_const("w", w), _const("i0", np.int64(0)), _const("n1", np.array([-1], np.int64)),
             _const("ax", np.array([0], np.int64))]
    m = _model(nodes, [_vi("x", ["batch", "seq", 32])], [_vi("y", None)], inits)
    with caplog.at_level(logging.INFO, logger="qie_ep.tvm"):
        run = compile_model(m)[0]
    for shape in ((1, 3, 32), (2, 5, 32)):
        x = RNG.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(run({"x": x})[0], np.maximum(x @ w, 0).reshape(shape[0], -1), rtol=1e-5,
                                   atol=1e-5)


def _range_mask_model():
    """A transformer's shape arithmetic: position ids ``Range(0, Shape(x)[1])`` added to the input, a
    causal mask from the same range (LessOrEqual -> Where) on ``x x^T``, and the input reshaped to
    ``Concat(Shape(x)[0:1], -1)``."""
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "i1"], ["s"]),
             helper.make_node("Range", ["zero", "s", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["rf", "ax02"], ["pos"]),
             helper.make_node("Add", ["x", "pos"], ["xp"]),
             helper.make_node("Unsqueeze", ["r", "ax0"], ["row"]),
             helper.make_node("Unsqueeze", ["r", "ax1"], ["col"]),
             helper.make_node("LessOrEqual", ["row", "col"], ["keep"]),
             helper.make_node("Where", ["keep", "fzero", "fneg"], ["mask"]),
             helper.make_node("Transpose", ["xp"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["xp", "xt"], ["att"]),
             helper.make_node("Add", ["att", "mask"], ["y"]),
             helper.make_node("Slice", ["sh", "st0", "en1"], ["b"]),
             helper.make_node("Concat", ["b", "n1"], ["sh2"], axis=0),
             helper.make_node("Reshape", ["x", "sh2"], ["y2"])]
    inits = [_const("i1", np.int64(1)), _const("zero", np.int64(0)), _const("one", np.int64(1)),
             _const("ax02", np.array([0, 2], np.int64)), _const("ax0", np.array([0], np.int64)),
             _const("ax1", np.array([1], np.int64)), _const("fzero", np.float32(0)),
             _const("fneg", np.float32(-1e4)), _const("st0", np.array([0], np.int64)),
             _const("en1", np.array([1], np.int64)), _const("n1", np.array([-1], np.int64))]
    return _model(nodes, [_vi("x", ["batch", "seq", 8])], [_vi("y", None), _vi("y2", None)], inits)


def test_shape_arithmetic_folds_and_the_model_fuses(caplog):
    """Sizes the graph computes from its input shapes (Range over Shape(x)[1]) are given back to TVM as
    expressions of the input's sizes: no size is bound by a run-time ``match_cast`` any more, the fused
    lowering succeeds (it failed in VMShapeLower and the model ran unfused), and the results equal ORT's."""
    import onnxruntime as ort
    from qie_ep.tvm import from_onnx
    from qie_ep.tvm.shapes import fold_function
    m = _range_mask_model()
    f = from_onnx(m)["main"]
    assert "range_len" in f.script()
    folded = fold_function(f).script()
    assert "range_len" not in folded and "R.Tensor((seq,)" in folded
    with caplog.at_level(logging.INFO, logger="qie_ep.tvm"):
        run = compile_model(m)[0]
    assert "failed" not in caplog.text
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 8), (2, 6, 8)):
        x = RNG.standard_normal(shape).astype(np.float32)
        for got, want in zip(run({"x": x}), sess.run(None, {"x": x})):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(auto_pad="SAME_UPPER", kernel_shape=[2, 2], strides=[1, 1])),          # PP-OCRv6's
    ("MaxPool", dict(auto_pad="SAME_LOWER", kernel_shape=[3, 3], strides=[2, 1])),          # stride on static H
    ("AveragePool", dict(auto_pad="SAME_UPPER", kernel_shape=[3, 2], strides=[1, 1])),
], ids=["max_upper", "max_lower_strided_h", "avg_upper"])
def test_same_padded_pools_with_a_symbolic_width(op, attrs):
    """TVM's converter needs every spatial size as an int for SAME auto-padding; qie's gives it explicit pads
    where they do not depend on the size (stride 1, or a static axis). Equal to ORT at two widths."""
    import onnxruntime as ort
    m = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [_vi("x", ["n", 4, 9, "w"])], [_vi("y", None)], [])
    run = compile_model(m)[0]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for w in (7, 12):
        x = RNG.standard_normal((2, 4, 9, w)).astype(np.float32)
        np.testing.assert_allclose(run({"x": x})[0], sess.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c,oc,k,group,pad", [(16, 24, 3, 1, 1), (16, 16, 3, 16, 1), (8, 12, 2, 1, 0)],
                         ids=["conv3x3", "depthwise", "conv2x2_no_pad"])
def test_conv2d_rule_with_symbolic_sizes(c, oc, k, group, pad):
    """A symbolic batch and width (a text line's length): the Conv2d rule's row schedule (each output row
    accumulated in place over the window, rows left to LLVM's loop vectorizer), equal to the unscheduled
    function at widths below, at and past a vector, output checked for stores past its end."""
    m = conv_model(c, oc, (12, 16), k, group=group, pad=pad)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[3].dim_param = "n", "w"
    funcs = [f for f in fused_primfuncs(m, None).values() if "conv2d" in str(f)]
    assert funcs
    for f in funcs:
        sch = cpu_rules.Conv2d().apply(f, HOST, False)
        assert sch is not None
        for n, w in ((1, 2), (2, 17), (1, 40)):
            assert_same_as_unscheduled(f, sch.mod["main"], {"n": n, "w": w})


def _symbolic_batch_matmul():
    """Attention's probabilities x V with sizes from a symbolic width: [n, 8, 40, w] x [n, 8, w, 15]."""
    m = _model([helper.make_node("MatMul", ["p", "v"], ["y"])],
               [_vi("p", ["n", 8, 40, "w"]), _vi("v", ["n", 8, "w", 15])], [_vi("y", None)])
    return m


def test_conv2d_rule_declines_a_symbolic_batch_matmul():
    """4 spatial axes + 1 reduction with symbolic sizes: not a window, and the Conv2d rule's register tile
    wrote out of bounds on one (a dynamic-width PP-OCRv6's attention, found in session 29 by bisecting the
    rules); dlight's rules take it, and the result is still right."""
    funcs = [f for f in fused_primfuncs(_symbolic_batch_matmul(), None).values() if "matmul" in str(f)]
    assert funcs
    for f in funcs:
        assert cpu_rules.Conv2d().apply(f, HOST, False) is None
        name, sch = scheduled_by(f)
        assert name not in (None, "Conv2d")
        assert_same_as_unscheduled(f, sch, {"n": 2, "w": 15})


def test_whole_model_every_primfunc_scheduled():
    """After the pipeline no PrimFunc is left as TVM wrote it (each is qie's kernel or rule-scheduled)."""
    from qie_ep.tvm import pipeline, from_onnx
    model, shapes, _ = CASES["conv3x3"]
    mod = pipeline(HOST)(from_onnx(model, shape_dict=shapes, fold_shapes=True))
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert f.attrs is not None and f.attrs.get("tirx.is_scheduled"), gv.name_hint



def test_tune_writes_a_database_the_pipeline_applies(tmp_path):
    """qie_ep.tvm.tune (MetaSchedule, one trial: the mechanics, not a search) writes records for the
    PrimFuncs qie's pipeline leaves to TVM; pipeline(database=...) applies them (the function arrives
    at the rules already scheduled) and the compiled model computes what the rules' build computes."""
    pytest.importorskip("psutil")
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    import qie_ep.tvm as qt
    model = matmul_model([16, 64], 48)
    mod = qt.from_onnx(model, shape_dict={"x": [16, 64]})
    # MetaSchedule's worker processes start slowly on a loaded 2-core host: generous timeouts, one worker.
    wd = qt.tune(mod, HOST, 1, str(tmp_path / "db"), builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=600),
                 runner=ms.runner.LocalRunner(timeout_sec=600))
    assert (tmp_path / "db" / "database_tuning_record.json").read_text().strip()
    with HOST:
        pre = tvm.transform.Sequential(qt._front(HOST, True) + qt._pre_schedule(HOST, fuse=True)
                                       + [relax.transform.MetaScheduleApplyDatabase(wd)])(mod)
    tuned = [gv.name_hint for gv, f in pre.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled")]
    assert any("matmul" in n for n in tuned), tuned
    x = RNG.standard_normal((16, 64)).astype(np.float32)
    outs = []
    for db in (None, wd):
        ex = tvm.compile(mod, HOST, relax_pipeline=qt.pipeline(HOST, database=db))
        outs.append(tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CPU"):
        qt.tune(mod, tvm.target.Target("cuda"), 1, str(tmp_path / "x"))


def _qdq_unary_model(shape, op, in_t=TensorProto.UINT8, out_t=TensorProto.INT8, **attrs):
    """DQ -> op -> Q: after fusion one function of one quantized tensor."""
    zin = np.uint8(117) if in_t == TensorProto.UINT8 else np.int8(-9)
    zout = np.uint8(3) if out_t == TensorProto.UINT8 else np.int8(5)
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node(op, ["d"], ["a"], **attrs),
             helper.make_node("QuantizeLinear", ["a", "s2", "z2"], ["y"])]
    inits = [_const("s", np.float32(0.043)), _const("z", zin), _const("s2", np.float32(0.021)), _const("z2", zout)]
    return _model(nodes, [_vi("x", shape, in_t)], [_vi("y", None, out_t)], inits, opset=20)


def _tabled(model, shapes):
    from qie_ep.tvm import from_onnx, _front, _pre_schedule
    mod = from_onnx(model, shape_dict=shapes, fold_shapes=shapes is not None)
    with HOST:
        mod = tvm.transform.Sequential(_front(HOST, True) + _pre_schedule(HOST, fuse=True))(mod)
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("qie_table")]


@pytest.mark.parametrize("shape,op,in_t,out_t,attrs", [
    ([1, 16, 30, 40], "Gelu", TensorProto.UINT8, TensorProto.UINT8, {}),          # 19200: whole vectors
    ([3, 7, 11, 13], "Sigmoid", TensorProto.INT8, TensorProto.UINT8, {}),         # 3003: a scalar tail
    ([2, 64, 100], "HardSwish", TensorProto.UINT8, TensorProto.INT8, {}),         # 12800: parallel groups
    ([1, 9000], "Tanh", TensorProto.INT8, TensorProto.INT8, {}),
], ids=["gelu", "sigmoid_tail", "hardswish", "tanh_s8"])
def test_elementwise_functions_become_tables(shape, op, in_t, out_t, attrs):
    """A dequantize -> op -> quantize function is replaced by a 256-entry table: every output equal to
    ORT's QDQ result but where ORT's own float op differs from TVM's (fast-math polynomials, within a code)."""
    model = _qdq_unary_model(shape, op, in_t, out_t, **attrs)
    assert _tabled(model, {"x": shape}), "no table"
    _check_table_against_ort(model, compile_model(model, shape_dict={"x": shape})[0], shape, in_t)


def test_tables_with_a_symbolic_batch():
    """A symbolic batch: the function is probed at batch 1 and one lookup serves every batch."""
    model = _qdq_unary_model(["N", 16, 30, 40], "Sigmoid", TensorProto.UINT8, TensorProto.INT8)
    assert _tabled(model, None), "no table"
    fn = compile_model(model)[0]
    for n in (1, 3):
        _check_table_against_ort(model, fn, [n, 16, 30, 40], TensorProto.UINT8)


def _check_table_against_ort(model, fn, shape, in_t):
    lo, hi = (0, 256) if in_t == TensorProto.UINT8 else (-128, 128)
    x = RNG.integers(lo, hi, shape).astype(np.uint8 if in_t == TensorProto.UINT8 else np.int8)
    got = fn({"x": x})[0]
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= max(2, diff.size // 200), (diff.max(), np.count_nonzero(diff))
    # The same value gives the same code everywhere (it is a table).
    flat_x, flat_y = x.reshape(-1).view(np.uint8), got.reshape(-1)
    for v in np.unique(flat_x)[:32]:
        assert len(np.unique(flat_y[flat_x == v])) == 1


def test_position_dependent_functions_are_not_tables():
    """DQ -> Transpose -> Q is a function of one quantized tensor of the same (square) shape whose outputs
    depend on position: the permuted probe rejects the table and the result stays exact."""
    shape = [1, 1, 48, 48]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("Transpose", ["d"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["y"])]
    model = _model(nodes, [_vi("x", shape, TensorProto.UINT8)], [_vi("y", None, TensorProto.UINT8)],
                   [_const("s", np.float32(0.05)), _const("z", np.uint8(128))], opset=20)
    assert not _tabled(model, {"x": shape})
    x = RNG.integers(0, 256, shape).astype(np.uint8)
    got = compile_model(model, shape_dict={"x": shape})[0]({"x": x})[0]
    np.testing.assert_array_equal(got, x.transpose(0, 1, 3, 2))


@pytest.mark.parametrize("vbmi", [True, False])
@pytest.mark.parametrize("n", [1, 63, 64, 4097, 3 * 4096 + 65])
def test_table_lookup_kernel(vbmi, n):
    """The lookup PrimFunc on both paths (VBMI vpermi2b and scalar), whole vectors, tails, parallel groups,
    u8 -> s8: equal to numpy's table[x], nothing written past the output."""
    from qie_ep.tvm import tables
    from qie_ep.tvm.schedules import isa as tisa
    if vbmi and not tisa.has_features(HOST, ("avx512vbmi",)):
        pytest.skip("no AVX-512 VBMI on this CPU")
    tbl = RNG.integers(-128, 128, 256).astype(np.int8)
    for shape in ((n,), (None,)):           # static, and the symbolic-size kernel run at n
        f = tables.lookup_primfunc(shape, "uint8", "int8", vbmi)
        x = RNG.integers(0, 256, n).astype(np.uint8)
        got = _run(f, [x, tbl, np.zeros(n, np.int8)])
        np.testing.assert_array_equal(got, tbl[x])


def test_matmul_with_a_symbolic_row_count():
    """Rows unknown at compile time (a dynamic sequence length), with a dequantized residual added in the
    epilogue: the Matmul rule pads the rows to its register tile (no predicated tile in the K loop) and
    inlines the residual's dequantize into the per-tile epilogue; equal to the unscheduled function for
    row counts below, at and past the tile."""
    rng = np.random.default_rng(41)
    k, n = 96, 80
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("DequantizeLinear", ["r", "s", "z"], ["d"]), helper.make_node("Add", ["a", "d"], ["y"])]
    inits = [_const("w", rng.standard_normal((k, n)).astype(np.float32) * 0.1),
             _const("b", rng.standard_normal(n).astype(np.float32)), _const("s", np.float32(0.05)),
             _const("z", np.uint8(120))]
    model = _model(nodes, [_vi("x", ["M", k]), _vi("r", ["M", n], TensorProto.UINT8)], [_vi("y", None)], inits)
    funcs = [f for f in fused_primfuncs(model, None).values() if "matmul" in str(f)]
    assert funcs
    for f in funcs:
        rule, sched = scheduled_by(f)
        assert rule == "Matmul"
        assert "pad" in sched.script()
        for m in (1, 3, 4, 15, 16):
            assert_same_as_unscheduled(f, sched, {"M": m})


def test_matmul_rows_not_a_multiple_of_the_tile():
    """15 rows (MiniLM's 15-token projections): the register tile takes 5 rows (no predicated last
    tile) and computes what the unscheduled function computes."""
    funcs = fused_primfuncs(matmul_model([15, 96], 80), {"x": [15, 96]})
    assert cpu_rules._rows_dividing(15, 4, 4, 32) == 5 and cpu_rules._rows_dividing(16, 4, 4, 32) == 4
    assert cpu_rules._rows_dividing(7, 4, 3, 32) == 7 and cpu_rules._rows_dividing(7, 4, 4, 32) == 4  # 33 registers
    assert cpu_rules._rows_dividing(13, 4, 4, 32) == 4 and cpu_rules._rows_dividing(15, 4, 3, 16) == 3
    for f in funcs.values():
        rule, sched = scheduled_by(f)
        assert rule == "Matmul"
        assert_same_as_unscheduled(f, sched)


def _float_elementwise_model(shape):
    """Sigmoid(x) * x + 1 over a float tensor: one fused injective function storing float32 only."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["m"]),
             helper.make_node("Add", ["m", "one"], ["y"])]
    return _model(nodes, [_vi("x", shape)], [_vi("y", None)], [_const("one", np.float32(1))])


@pytest.mark.parametrize("model", [qdq_elementwise_model, _float_elementwise_model], ids=["u8_store", "f32_store"])
def test_injective_with_a_symbolic_width(model):
    """A symbolic innermost extent: the other loops fused and parallel, the row left whole (fused with
    the others it cost a division per element: PP-OCRv6's elementwise functions ran 20x slower). LLVM's
    loop vectorizer stays off exactly where the function stores an 8-bit type (the remainder miscompile)."""
    from qie_ep.tvm import _stores_narrow
    funcs = fused_primfuncs(model(["n", 8, 6, "w"]), None)
    assert funcs
    for f in funcs.values():
        assert ("target" in f.attrs) == _stores_narrow(f) == (model is qdq_elementwise_model)
        name, sch = scheduled_by(f)
        assert name == "Injective"
        loops = [ln for ln in sch.script().splitlines() if " in T." in ln or " in range(" in ln]
        assert "T.parallel" in loops[0] and "range(" in loops[-1] and "w" in loops[-1], loops
        for n, w in ((1, 1), (2, 17), (1, 67)):
            assert_same_as_unscheduled(f, sch, {"n": n, "w": w})


def test_a_shape_through_identity_imports_with_symbolic_sizes():
    """TVM's importer lets only a fixed list of ops take a shape value (Identity is not on it: "cannot handle
    ShapeExpr inputs"); qie's frontend drops Identity nodes whose output is not a graph output first. A
    shape passed through two Identities into a Reshape, a graph output kept: equal to ORT at two sizes."""
    import onnxruntime as ort
    nodes = [helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Identity", ["sh"], ["sh1"]),
             helper.make_node("Identity", ["sh1"], ["sh2"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "sh2"], ["y"]), helper.make_node("Identity", ["y"], ["z"])]
    m = _model(nodes, [_vi("x", ["n", 3, "w"])], [_vi("z", None)])
    run = compile_model(m)[0]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 5), (2, 3, 9)):
        x = RNG.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(run({"x": x})[0], sess.run(None, {"x": x})[0])
