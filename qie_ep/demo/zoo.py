"""Classic CNN architectures from the onnx wheel's backend test data (``onnx/backend/test/data/light``: ResNet-50,
SqueezeNet, ShuffleNet, Inception v1 / v2, DenseNet-121, ... as Caffe2 exported them, opset 9), whose weights the
wheel replaced by ``ConstantOfShape`` nodes. Here each weight becomes a seeded random initializer of its shape
(He-scaled convolution and dense weights, BatchNormalization statistics near the identity), the model is saved as
IR 7 (IR 3 listed every initializer as an input), and quantized as a new user would (`qie quantize --per-channel`,
MinMax on seeded random inputs). Their accuracy means nothing; they are real graphs qie was not written against
(legacy ops: two-input ``Sum`` residuals, grouped convolutions and channel shuffles, LRN, Caffe2's BatchNormalization
+ Mul + Add, concatenations in float): tests/models/test_onnx_zoo_models.py. Cached by name and ORT version.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qie_ep.demo.fetch import cache_dir

NAMES = ("resnet50", "squeezenet", "shufflenet", "inception_v1", "inception_v2", "densenet121")


def light_path(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def _weight(name: str, shape: list[int], rng) -> np.ndarray:
    low = name.lower()
    if len(shape) >= 2:
        return rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / int(np.prod(shape[1:]))))
    if "var" in low or low.endswith("riv_0"):
        return (np.abs(rng.standard_normal(shape)) * 0.2 + 0.8).astype(np.float32)
    if "scale" in low or low.endswith("_s_0") or "gamma" in low:
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def materialize(name: str, seed: int = 0):
    """The light model ``name`` with its ``ConstantOfShape`` weights as seeded random initializers."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    m = onnx.load(str(light_path(name)))
    inits = {i.name: i for i in m.graph.initializer}
    kept = []
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = numpy_helper.to_array(inits[n.input[0]]).astype(int).tolist()
            m.graph.initializer.append(numpy_helper.from_array(_weight(n.output[0], shape, rng), n.output[0]))
        else:
            kept.append(n)
    del m.graph.node[:]
    m.graph.node.extend(kept)
    used = {i for n in m.graph.node for i in n.input}
    live = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    names = {i.name for i in live}
    real = [i for i in m.graph.input if i.name in used and i.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(real)
    m.ir_version = max(m.ir_version, 7)
    return m


def input_shape(model) -> list[int]:
    return [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]


def inputs(model, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    name, shape = model.graph.input[0].name, input_shape(model)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def model(name: str) -> tuple[Path, Path]:
    """(FP32, INT8) model files of ``name`` (one of NAMES), materialized and quantized once into the cache."""
    import onnx
    import onnxruntime as ort

    from qie_ep.quantization.config import DEFAULTS_TAG, QuantizeConfig
    from qie_ep.quantization.quantizer import quantize_file

    d = cache_dir() / "zoo"
    fp32, int8 = d / f"{name}.fp32.onnx", d / f"{name}.int8-{DEFAULTS_TAG}-ort{ort.__version__}.onnx"
    if fp32.exists() and int8.exists():
        return fp32, int8
    d.mkdir(parents=True, exist_ok=True)
    m = materialize(name)
    onnx.save(m, str(fp32))
    quantize_file(str(fp32), str(int8), inputs(m, 6, seed=1), QuantizeConfig(per_channel=True), progress=False,
                  log=lambda _: None)
    return fp32, int8
