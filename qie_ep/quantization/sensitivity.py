"""Per-layer quantization sensitivity, the accuracy-budget search, and per-layer SQNR.

Two views of where quantization error comes from:

1. ``layer_sensitivity``, one layer at a time: quantize only that layer (ranges from the one cached
   calibration), run the model, and compare its outputs with FP32's. Isolates each layer's own harm;
   ``qie sensitivity`` prints it sorted, and ``search_budget`` uses it for mixed precision.
2. ``activation_sqnr``, every layer of a quantized model at once: the SQNR of each quantized node's
   output against the same tensor of the FP32 model, with ORT's own ``qdq_loss_debug`` helpers
   (intermediate tensors made outputs, optimizations off). Shows how error builds up through the
   graph; ``qie compare`` plots it.

``search_budget`` (``qie quantize --accuracy-budget X``): quantize every layer; while the mean output
cosine to FP32 is below 1 - X, keep one more layer in float, most sensitive first.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from qie_ep.quantization.config import DEFAULT_OP_TYPES
from qie_ep.quantization.metrics import agreement, sqnr_db
from qie_ep.session import run_outputs


def _progress(iterable, desc: str, progress: bool, total=None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None if progress else True)


def layer_sensitivity(q, progress: bool = True) -> list[dict]:
    """One row per quantizable layer of ``q`` (a ``quantizer.Quantizer``): the agreement with FP32
    when only that layer is quantized; most harmful first."""
    ref = q.reference()
    rows = []
    path = q.tmp_path("one-layer.onnx")
    for name, op in _progress(q.layers(), "sensitivity", progress):
        q.write(path, only=[name])
        a = agreement(ref, run_outputs(path, q.feeds))
        rows.append({"node": name, "op_type": op, **a, "loss": 1.0 - a["cos_mean"]})
    rows.sort(key=lambda r: (-r["loss"], r["node"]))
    return rows


def search_budget(q, budget: float, out: Path, log=print, progress: bool = True) -> dict:
    """Write into ``out`` the model with the fewest float layers whose mean output cosine to FP32 on
    ``q.feeds`` is >= 1 - ``budget``, keeping layers in float in order of sensitivity."""
    ref = q.reference()
    trial = q.tmp_path("trial.onnx")
    q.write(trial)
    first = agreement(ref, run_outputs(trial, q.feeds))
    history = [{"kept_float": 0, **first}]
    n_layers = len(q.layers())
    log(f"all {n_layers} layers quantized: output cosine to FP32 {first['cos_mean']:.4f} "
        f"(budget: >= {1 - budget:.4f})")
    if 1.0 - first["cos_mean"] <= budget:
        shutil.copyfile(trial, out)
        return {"kept_float": [], "layers": n_layers, "history": history, "sensitivity": []}
    sens = layer_sensitivity(q, progress)
    kept = []
    met = False
    for row in sens:
        kept.append(row["node"])
        q.write(trial, exclude=kept)
        a = agreement(ref, run_outputs(trial, q.feeds))
        history.append({"kept_float": len(kept), **a})
        log(f"  + keep {row['node']} ({row['op_type']}, alone costs {row['loss']:.4f}) in float: "
            f"cosine {a['cos_mean']:.4f}")
        if 1.0 - a["cos_mean"] <= budget:
            met = True
            break
    shutil.copyfile(trial, out)
    return {"kept_float": kept, "layers": n_layers, "history": history, "sensitivity": sens, "met": met}


def activation_sqnr(fp32_path: Path, int8_path: Path, feeds: list[dict], op_types=None) -> list[dict]:
    """SQNR (dB) of every matched quantized-layer output of ``int8_path`` against ``fp32_path``.

    Rows follow the FP32 graph order: ``node``, ``op_type``, ``tensor``, ``sqnr_db``. A layer's INT8 value
    is its output after Q/DQ (QDQ models) or the tensor of the same name (dynamic models); layers with no
    float counterpart in the INT8 graph (QOperator models keep them as integers) are left out.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    op_types = set(op_types or DEFAULT_OP_TYPES)
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    wanted = [(n.name or n.output[0], n.op_type, n.output[0]) for n in fp32.graph.node if n.op_type in op_types]
    with tempfile.TemporaryDirectory(prefix="qie-sqnr-") as d:
        acts = {}
        for tag, path in (("fp32", fp32_path), ("int8", int8_path)):
            aug = Path(d) / f"{tag}.onnx"
            modify_model_output_intermediate_tensors(str(path), str(aug))
            acts[tag] = collect_activations(str(aug), iter(feeds))
    rows = []
    for node, op, tensor in wanted:
        ref = acts["fp32"].get(tensor)
        got = acts["int8"].get(tensor + "_DequantizeLinear_Output")
        if got is None and tensor in acts["int8"]:
            got = acts["int8"][tensor]
        if ref is None or got is None:
            continue
        rows.append({"node": node, "op_type": op, "tensor": tensor,
                     "sqnr_db": sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([g.ravel() for g in got]))})
    return rows
