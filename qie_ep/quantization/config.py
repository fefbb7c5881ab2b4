"""What `qie quantize` is asked to do: the op types, formats and data types, with qie's defaults."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OP_TYPES = ("MatMul", "Conv", "Gemm")
# Quantized too by default (static QDQ), on convolutional feature maps only (``quantizer.feature_map_nodes``): with
# them a region of qie's EP runs from convolution to convolution through pools, concatenations, residual adds and
# SE / SiLU products instead of ending at each float one (DenseNet-121 3.2x faster, a YOLO-style detector 1.4x).
FEATURE_MAP_OP_TYPES = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Add", "Mul")
QTYPES = {"u8": "QUInt8", "s8": "QInt8"}
# Names cached files quantized with qie's defaults (the demo's, the test models'): changed with the defaults, so no
# file quantized under older ones is reused. "pp": ORT's pre-processing first; "fm": the feature-map op types; "pc":
# per-channel weights; "res": float outputs into residual sums (``quantizer.float_residual_outputs``); "sq": SmoothQuant
# on LayerNormalization outputs (``smooth``).
DEFAULTS_TAG = "pp-fm-pc-res-sq"


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize. ``op_types=()`` means ORT's full default set."""
    dynamic: bool = False
    per_channel: bool = True               # per-output-channel weight scales (ORT's quantizer defaults to per-tensor)
    fmt: str = "qdq"                       # "qdq" or "qoperator" (static only)
    op_types: tuple = DEFAULT_OP_TYPES
    activation_type: str = "u8"            # static only; dynamic activations are always u8
    weight_type: str = "s8"
    exclude: tuple = ()                    # node names kept in float
    calibration: str = "minmax"            # minmax | entropy | percentile
    preprocess: bool = True                # ORT's quant_pre_process first where it folds BatchNormalization
    feature_maps: bool = True              # static QDQ: also FEATURE_MAP_OP_TYPES on convolutional feature maps
    float_residuals: bool = True           # static QDQ: no Q / DQ on a MatMul / Gemm output entering a residual sum
    smooth: float = 0.5                    # static: SmoothQuant's alpha for MatMuls reading a LayerNorm (0: off)
