"""Real convolution models, quantized with onnxruntime.quantization.quantize_static (per-channel, QDQ and
QOperator) on rendered calibration data: the PP-OCRv6 text recogniser and the PP-LCNet orientation
classifier. With qie every quantized convolution runs on qie, the outputs equal ORT's built-in run
(bound: 0, bit-identical: the integer convolutions are exact and requantize identically), and task
accuracy on labelled rendered data is reported against FP32.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qie_ep
from qie_ep.demo import vision as V
from qie_ep.session import session as qie_session

N_EVAL = 16


def session(model, qie: bool, level: str):
    return qie_session(model, qie=qie, level=level, threads=2, ep=False)  # the custom ops (counted below)


@pytest.fixture(scope="module")
def evaluation():
    return {name: V.dataset(name, N_EVAL, seed=1) for name in ("ppocr_rec", "orientation")}


@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("name", ["orientation", "ppocr_rec"])
def test_real_model(name, fmt, level, evaluation):
    if fmt == "qdq" and level == "disable":
        pytest.skip("a QDQ graph stays float below ORT_ENABLE_EXTENDED: nothing quantized runs")
    x, labels = evaluation[name]
    fp32 = onnx.load(str(V.model_path(name)))
    convs = sum(n.op_type == "Conv" for n in fp32.graph.node)
    model = qie_ep.with_contrib_opset(onnx.load(str(V.quantized(name, fmt))))
    if fmt == "qoperator":
        assert sum(n.op_type == "QLinearConv" for n in model.graph.node) == convs
    qie_ep.reset_stats()
    got = session(model, True, level).run(None, {"x": x})[0]
    ran = sum(sum(v.values()) for (_, op), v in qie_ep.stats().items() if op in ("QLinearConv", "ConvInteger"))
    assert ran == convs, f"{ran} of {convs} convolutions ran on qie: {qie_ep.stats()}"
    want = session(model, False, level).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)  # bound 0
    chars = V.charset(V.model_path(name)) if name == "ppocr_rec" else None
    ref = session(fp32, False, "all").run(None, {"x": x})[0]
    acc_fp32, acc_int8 = V.accuracy(name, ref, labels, chars), V.accuracy(name, got, labels, chars)
    print(f"{name} {fmt} {level}: accuracy FP32 {acc_fp32:.3f}, INT8 with qie {acc_int8:.3f} ({N_EVAL} samples)")
    assert acc_fp32 >= 0.75, "the rendered evaluation data no longer suit the FP32 model"
    assert acc_int8 >= acc_fp32 - 0.2, (acc_fp32, acc_int8)


def _claimed(sess) -> dict:
    import collections

    return collections.Counter(n.op_type for a in sess.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME
                               for n in a.get_nodes())


@pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here (ORT < 1.27 or no libqie_ep.so)")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["orientation", "ppocr_rec"])
def test_real_model_regions(name, threads, evaluation):
    """The QDQ models with qie's EP (the one line): nearly every convolution runs inside a region (PP-LCNet's all
    32; PP-OCRv6's all but those of its attention blocks), the same labelled samples are recognised as with ORT's
    own INT8 (PP-LCNet: regions bit-identical, its final QDQ Softmax within one step of ORT's and nearer its float
    graph; PP-OCRv6: logits at cosine >= 0.999 to ORT INT8's, measured 0.9997: its residual Add / SE Mul units
    compute ORT's QLinearAdd / QLinearMul, and what remains is its attention softmax, the float graph's arithmetic
    where ORT fuses QLinearSoftmax, docs/numerics.md), and a second run gives the same outputs."""
    import onnxruntime as ort

    x, labels = evaluation[name]
    model = str(V.quantized(name, "qdq"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    qie_ep.register(so)
    s = ort.InferenceSession(model, so)
    convs = sum(n.op_type == "Conv" for n in onnx.load(model).graph.node)
    claimed = _claimed(s)
    assert claimed["Conv"] >= (convs if name == "orientation" else convs - 12), (claimed, convs)
    got = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    again = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(got, again)
    want = session(model, False, "all").run(None, {"x": x})[0]
    chars = V.charset(V.model_path(name)) if name == "ppocr_rec" else None
    acc_qie, acc_ort = V.accuracy(name, got, labels, chars), V.accuracy(name, want, labels, chars)
    print(f"{name} regions, {threads} threads: {dict(claimed)}; accuracy ORT INT8 {acc_ort:.3f}, qie EP {acc_qie:.3f}")
    if name == "orientation":
        # Every region bit-identical; the last unit, the QDQ Softmax, is qie's EP unit: the float graph's arithmetic,
        # one step from ORT's QLinearSoftmax (its fusion at ALL) on some codes and closer to ORT's own float graph.
        step = 1 / 255
        plain = session(model, False, "disable").run(None, {"x": x})[0]
        assert np.abs(got - want).max() <= step * 1.001 and (got.argmax(1) == want.argmax(1)).all()
        assert np.abs(got - plain).max() <= step * 1.001
        assert (got != plain).sum() <= (want != plain).sum(), ((got != plain).sum(), (want != plain).sum())
    else:
        assert acc_qie >= acc_ort - 1 / N_EVAL, (acc_qie, acc_ort)  # one line of the 16 at most
        a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999  # 0.9966 with the float graph's Add / Mul
