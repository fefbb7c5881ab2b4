"""qie's quantize-and-measure engine, behind `qie quantize`, `qie sensitivity` and the demo.

* ``config``: what to quantize and how (``QuantizeConfig``, qie's default op types).
* ``quantizer``: ``Quantizer`` (ORT's quantize_static / quantize_dynamic with one cached calibration) and
  ``quantize_file`` (the whole `qie quantize`, including the accuracy-budget search).
* ``sensitivity``: per-layer sensitivity, the budget search, per-layer SQNR.
* ``data``: calibration / evaluation data from a folder (.npy / .npz / images / text) fitted to a model.
* ``metrics``: SQNR, cosine, agreement over samples, task accuracy.
"""
from __future__ import annotations

from qie_ep.quantization.config import DEFAULT_OP_TYPES, QuantizeConfig
from qie_ep.quantization.quantizer import Quantizer, quantize_file

__all__ = ["DEFAULT_OP_TYPES", "QuantizeConfig", "Quantizer", "quantize_file"]
