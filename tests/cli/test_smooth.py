"""SmoothQuant in `qie quantize` (``quantization/smooth.py``): the MatMuls reading a LayerNormalization's output get
a Mul by 1 / s before them and their weights' rows times s; the FP32 function is unchanged, and a LayerNorm output
with outlier channels quantizes with less error."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qie_ep.quantization.config import QuantizeConfig
from qie_ep.quantization.metrics import sqnr_db
from qie_ep.quantization.quantizer import quantize_file
from qie_ep.quantization.smooth import smooth_norm_inputs, smoothing_targets
from qie_ep.session import session


def _ln_model(rng, gamma, second_reader="Add", w_const=True):
    """x[1, 8, 32] -> LayerNormalization(gamma) -> ln; ln @ wa -> ya, ln @ wb -> yb, and ln read by ``second_reader``
    (an Add with x: a residual; or a MatMul reading ln as its B)."""
    n = helper.make_node
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [c("gamma", gamma), c("beta", rng.normal(0, 0.1, 32)), c("wa", rng.normal(0, 0.2, (32, 16))),
             c("wb", rng.normal(0, 0.2, (32, 16)))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])]
    if not w_const:
        inits = [i for i in inits if i.name != "wb"]
        inputs.append(helper.make_tensor_value_info("wb", TensorProto.FLOAT, [32, 16]))
    nodes = [n("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             n("MatMul", ["ln", "wa"], ["ya"], name="mm_a"), n("MatMul", ["ln", "wb"], ["yb"], name="mm_b")]
    if second_reader == "Add":
        nodes.append(n("Add", ["ln", "x"], ["r"], name="res"))
    else:
        inits.append(c("q", rng.normal(0, 1, (8, 1, 8))))
        nodes.append(n("MatMul", ["q", "ln"], ["r"], name="mm_t"))
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 8, 16]) for t in ("ya", "yb")]
    outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8, 32] if second_reader == "Add" else [8, 8, 32]))
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outs, inits), opset_imports=[helper.make_opsetid("", 17)],
                          ir_version=8)
    onnx.checker.check_model(m)
    return m


def _gamma(rng):
    g = rng.uniform(0.5, 1.5, 32)
    g[[3, 17]] = 40.0  # BERT-style outlier channels
    return g


def test_targets_are_the_matmuls_reading_a_layernorm_as_a():
    rng = np.random.default_rng(0)
    m = _ln_model(rng, _gamma(rng))
    t = smoothing_targets(m, {"mm_a", "mm_b"})
    assert list(t) == ["ln"] and sorted(x.name for x in t["ln"]) == ["mm_a", "mm_b"]
    assert smoothing_targets(m, {"mm_a"}) == {}, "a reader kept float: the shared division would reach it too"
    assert smoothing_targets(_ln_model(rng, _gamma(rng), "MatMul"), {"mm_a", "mm_b", "mm_t"}) == {}, "ln as B"
    assert smoothing_targets(_ln_model(rng, _gamma(rng), w_const=False), {"mm_a", "mm_b"}) == {}, "weights not constant"


def test_smoothing_keeps_the_fp32_function():
    rng = np.random.default_rng(1)
    m = _ln_model(rng, _gamma(rng))
    feeds = [{"x": rng.normal(0, 1, (1, 8, 32)).astype(np.float32)} for _ in range(4)]
    want = session(m, qie=False).run(None, feeds[0])
    s = onnx.ModelProto()
    s.CopyFrom(m)
    assert smooth_norm_inputs(s, feeds, {"mm_a", "mm_b"}) == ["ln"]
    assert [n.op_type for n in s.graph.node].count("Mul") == 1
    assert {i.name for i in s.graph.initializer}.isdisjoint({"wa", "wb"}), "the original weights are replaced"
    got = session(s, qie=False).run(None, feeds[0])
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_smoothing_lowers_the_quantization_error(tmp_path):
    rng = np.random.default_rng(2)
    onnx.save(_ln_model(rng, _gamma(rng)), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.normal(0, 1, (1, 8, 32)).astype(np.float32)} for _ in range(8)]
    ref = session(str(tmp_path / "m.onnx"), qie=False)
    sq = {}
    for alpha in (0.5, 0.0):
        out = tmp_path / f"q{alpha}.onnx"
        res = quantize_file(str(tmp_path / "m.onnx"), str(out), feeds, QuantizeConfig(smooth=alpha), progress=False,
                            log=lambda _: None)
        assert res["smoothed"] == (["ln"] if alpha else [])
        q = session(str(out))
        sq[alpha] = min(sqnr_db(np.concatenate([ref.run(None, f)[i].ravel() for f in feeds]),
                                np.concatenate([q.run(None, f)[i].ravel() for f in feeds])) for i in (0, 1))
    assert sq[0.5] > sq[0.0] + 3, sq
