"""Architectures the demo's real models lack, built with torch from seeded random weights and exported to ONNX
(opset 17, ``dynamo=False``), then quantized as a new user would (`qie quantize --per-channel`, MinMax calibration
on seeded random inputs): a torch.nn.TransformerEncoder (2 layers, d=128, 4 heads, erf GELU; fused in-projection
split by Slice, MultiheadAttention's own head split), a MobileNetV2-like CNN (ReLU6, depthwise, residual Adds,
Hardswish, global pooling, Linear, Sigmoid) and a YOLOv8-style detector (Conv + SiLU with BatchNormalization folded
by the export, C2f blocks whose torch.chunk exports as Shape / Slice, residual Adds, SPPF's chained MaxPools and
Concat, nearest 2x Upsample as Resize, two 1x1 heads concatenated). Their accuracy means nothing; they check that qie loads, claims and
computes architectures it was not written against (tests/models/test_torch_models.py) and how fast (bench.models).
Cached by name and ORT version, never committed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qie_ep.demo.fetch import cache_dir

NAMES = ("encoder", "mbnet", "detector")
SHAPES = {"encoder": (1, 20, 64), "mbnet": (1, 3, 96, 96), "detector": (1, 3, 160, 160)}


def _random_batchnorms(m, nn):
    """`m` with its BatchNormalizations' statistics and scales drawn at random (fresh ones are the identity)."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


def _encoder(torch):
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
    # Distinct weights per layer: deep-copied layers share theirs, and torch's export then shares one initializer
    # between layers (ORT's quantizer writes DQ(Q(DQ(W))) for the second use).
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.05) if p.dim() > 1 else torch.nn.init.uniform_(p, -0.1, 0.1)
    return m


def _mbnet(torch):
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
                      block(24, 32, 2), Res(32), block(32, 64, 2), Res(64), nn.Conv2d(64, 128, 1), nn.Hardswish(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 20), nn.Sigmoid()).eval()
    return _random_batchnorms(m, nn)


def _detector(torch):
    nn = torch.nn

    def cbs(ci, co, k=1, s=1):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = cbs(c, c, 3), cbs(c, c, 3)

        def forward(self, x):
            return x + self.b(self.a(x))

    class C2f(nn.Module):
        def __init__(self, ci, co, n=1):
            super().__init__()
            self.c = co // 2
            self.cv1 = cbs(ci, 2 * self.c)
            self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
            self.cv2 = cbs((2 + n) * self.c, co)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.cv1, self.cv2, self.m = cbs(ci, ci // 2), cbs(ci * 2, co), nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))

    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32, 32))
            self.p3 = nn.Sequential(cbs(32, 64, 3, 2), C2f(64, 64, 2))
            self.p4 = nn.Sequential(cbs(64, 128, 3, 2), C2f(128, 128), SPPF(128, 128))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse = C2f(192, 64)
            self.h3, self.h4 = nn.Conv2d(64, 84, 1), nn.Conv2d(128, 84, 1)

        def forward(self, x):
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            f3 = self.fuse(torch.cat([self.up(p4), p3], 1))
            return torch.cat([self.h3(f3).flatten(2), self.h4(p4).flatten(2)], 2)

    m = Det().eval()
    return _random_batchnorms(m, nn)


def inputs(name: str, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPES[name]).astype(np.float32) for _ in range(n)]


def model(name: str) -> tuple[Path, Path]:
    """(FP32, INT8) model files of `name` (one of NAMES), built, exported and quantized once into the cache."""
    import onnxruntime as ort
    import torch

    from qie_ep.quantization.config import DEFAULTS_TAG, QuantizeConfig
    from qie_ep.quantization.quantizer import quantize_file

    d = cache_dir() / "synthetic"
    fp32, int8 = d / f"{name}.fp32.onnx", d / f"{name}.int8-{DEFAULTS_TAG}-ort{ort.__version__}.onnx"
    if fp32.exists() and int8.exists():
        return fp32, int8
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = {"encoder": _encoder, "mbnet": _mbnet, "detector": _detector}[name](torch)
    # (not under no_grad: torch then takes its fused encoder fast path, which has no ONNX export)
    torch.onnx.export(m, (torch.randn(*SHAPES[name]),), str(fp32), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    calib = [{"x": x} for x in inputs(name, 8, seed=1)]
    quantize_file(str(fp32), str(int8), calib, QuantizeConfig(per_channel=True), progress=False, log=lambda m: None)
    return fp32, int8
