"""Architectures none of the demo's models has (qie_ep.demo.synthetic: a torch.nn.TransformerEncoder, a
MobileNetV2-like CNN and a YOLOv8-style detector, seeded weights, exported and quantized by `qie quantize --per-channel` as a new user would).
With qie's EP they load and run at every optimization level, the EP claims their quantized work, and the outputs stay
within reach of the QDQ graph's float semantics (ORT_DISABLE_ALL), the spec, and of FP32. (ORT's own fused INT8 path
at ORT_ENABLE_ALL is not the spec: on the encoder its QLinearSoftmax moves the output to cosine ~0.96 of the float
graph, docs/numerics.md; not asserted here.)
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qie_ep
from qie_ep.session import options, session

pytest.importorskip("torch")
pytestmark = pytest.mark.slow
needs_ep = pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here")


@pytest.fixture(scope="module", params=["encoder", "mbnet", "detector"])
def quantized(request):
    from qie_ep.demo import synthetic

    fp32, int8 = synthetic.model(request.param)
    return request.param, fp32, int8, synthetic.inputs(request.param, 3, seed=2)


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@needs_ep
@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_unseen_architecture_on_the_ep(quantized, level):
    name, fp32, int8, xs = quantized
    so = options(level=level)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    qie_ep.register(so)
    sess = session(str(int8), so)
    claimed = sum(len(a.get_nodes()) for a in sess.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME)
    n_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    assert claimed >= n_q, (name, claimed, n_q)  # at least as many nodes as the model has Qs: its quantized work
    spec = session(str(int8), level="disable")
    ref = session(str(fp32), level="all")
    for x in xs:
        got, want = sess.run(None, {"x": x})[0], spec.run(None, {"x": x})[0]
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _cos(got, want) > 0.9999, (name, level, _cos(got, want))
        assert _cos(got, ref.run(None, {"x": x})[0]) > 0.999, (name, level)
