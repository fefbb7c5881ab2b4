"""Architectures none of the demo's models has, built with torch (seeded random weights), exported to ONNX and
quantized by `qie quantize` as a new user would: a torch.nn.TransformerEncoder (fused in-projection split by Slice,
MultiheadAttention's own head split, erf GELU, 20 tokens) and a MobileNetV2-like CNN (ReLU6, depthwise, residual Adds,
Hardswish, global pooling, Linear, Sigmoid). With qie's EP they load and run at every optimization level, the EP
claims their quantized work, and the outputs stay within reach of the QDQ graph's float semantics (ORT_DISABLE_ALL):
the spec. (ORT's own fused INT8 path at ORT_ENABLE_ALL is not the spec: on the encoder its QLinearSoftmax moves the
output to cosine ~0.96 of the float graph, measured and written in docs/numerics.md; not asserted here.)
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qie_ep
from qie_ep.cli import main
from qie_ep.session import options, session

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow
needs_ep = pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here")


def _encoder():
    nn = torch.nn

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(64, 128)
            layer = nn.TransformerEncoderLayer(128, 4, 256, activation="gelu", batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)))

    m = Enc().eval()
    for p in m.parameters():  # distinct weights per layer (deep-copied layers share them, and torch's export then
        # shares one initializer between layers)
        torch.nn.init.normal_(p, 0, 0.05) if p.dim() > 1 else torch.nn.init.uniform_(p, -0.1, 0.1)
    return m, (1, 20, 64)


def _mbnet():
    nn = torch.nn

    def block(cin, cout, stride):
        hid = cin * 4
        return nn.Sequential(nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                             nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                             nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.b = block(c, c, 1)

        def forward(self, x):
            return x + self.b(x)

    m = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(), block(16, 24, 2), Res(24),
                      block(24, 32, 2), Res(32), nn.Conv2d(32, 64, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(64, 20), nn.Sigmoid()).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    return m, (1, 3, 64, 64)


@pytest.fixture(scope="module", params=["encoder", "mbnet"])
def quantized(request, tmp_path_factory):
    torch.manual_seed(0)
    model, shape = {"encoder": _encoder, "mbnet": _mbnet}[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    fp32, int8, calib = d / "fp32.onnx", d / "int8.onnx", d / "calib"
    # (not under no_grad: torch then takes its fused encoder fast path, which has no ONNX export)
    torch.onnx.export(model, (torch.randn(*shape),), str(fp32), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.savez(calib / f"s{i}.npz", x=rng.standard_normal(shape).astype(np.float32))
    assert main(["quantize", str(fp32), "-o", str(int8), "--calib", str(calib), "--per-channel"]) == 0
    x = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    return request.param, fp32, int8, x


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
