"""How close a quantized model's outputs are to FP32's: SQNR, cosine, their summary over samples, and
task accuracy (argmax classes, or CTC text lines for recognisers that carry their character set).
"""
from __future__ import annotations

import math

import numpy as np

from qie_ep.errors import UserError


def _flat(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs]) if outputs else np.zeros(0)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 20 log10(|ref| / |ref - got|), in dB (inf when equal)."""
    ref = np.asarray(ref, np.float64).ravel()
    got = np.asarray(got, np.float64).ravel()
    noise = np.linalg.norm(ref - got)
    if noise == 0:
        return math.inf
    return 20 * math.log10(max(np.linalg.norm(ref), np.finfo(np.float64).tiny) / noise)


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64).ravel()
    got = np.asarray(got, np.float64).ravel()
    den = np.linalg.norm(ref) * np.linalg.norm(got)
    if den == 0:
        return 1.0 if np.array_equal(ref, got) else 0.0
    return float(ref @ got / den)


def agreement(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict:
    """Agreement of ``got`` with ``ref`` (per sample, the list of its float outputs).

    Returns ``cos_mean`` / ``cos_min`` (cosine of each sample's outputs, flattened together) and
    ``sqnr_db`` over all samples at once.
    """
    if len(ref) != len(got):
        raise ValueError(f"{len(ref)} reference samples but {len(got)} to compare")
    for i, (r, g) in enumerate(zip(ref, got)):
        shapes_r, shapes_g = [x.shape for x in r], [x.shape for x in g]
        if shapes_r != shapes_g:
            raise UserError(f"sample {i}: float outputs of shapes {shapes_g} where the reference has {shapes_r}: "
                            "not the same model")
    cos = [cosine(_flat(r), _flat(g)) for r, g in zip(ref, got)]
    return {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
            "sqnr_db": sqnr_db(np.concatenate([_flat(r) for r in ref]), np.concatenate([_flat(g) for g in got]))}


def charset(model) -> list[str]:
    """A PaddleOCR recogniser's CTC classes from its metadata 'character' (``model``: path or ModelProto);
    KeyError when the model has none."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: best class per step, repeats merged, blanks (index 0) dropped."""
    out = []
    for seq in probs.argmax(axis=-1):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append("".join(chars[i] for i in seq[keep & (seq != 0)]))
    return out


def task_accuracy(outputs: list[list[np.ndarray]], labels: list, model) -> float:
    """Top-1 of output 0 for integer labels; greedy-CTC exact line match for string labels."""
    if all(isinstance(lb, (int, np.integer)) for lb in labels):
        pred = [int(np.asarray(o[0]).reshape(-1, np.asarray(o[0]).shape[-1]).argmax(-1)[0]) for o in outputs]
        return float(np.mean([p == lb for p, lb in zip(pred, labels)]))
    try:
        chars = charset(model)
    except KeyError:
        raise UserError("string labels need a CTC text recogniser whose metadata has 'character' (PaddleOCR's)") from None
    pred = [ctc_decode(np.asarray(o[0]), chars)[0] for o in outputs]
    return float(np.mean([p == str(lb) for p, lb in zip(pred, labels)]))
