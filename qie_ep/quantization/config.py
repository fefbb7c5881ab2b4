"""What `qie quantize` is asked to do: the op types, formats and data types, with qie's defaults."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OP_TYPES = ("MatMul", "Conv", "Gemm")
QTYPES = {"u8": "QUInt8", "s8": "QInt8"}


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize. ``op_types=()`` means ORT's full default set."""
    dynamic: bool = False
    per_channel: bool = False
    fmt: str = "qdq"                       # "qdq" or "qoperator" (static only)
    op_types: tuple = DEFAULT_OP_TYPES
    activation_type: str = "u8"            # static only; dynamic activations are always u8
    weight_type: str = "s8"
    exclude: tuple = ()                    # node names kept in float
    calibration: str = "minmax"            # minmax | entropy | percentile
    preprocess: bool = True                # ORT's quant_pre_process first where it folds BatchNormalization
