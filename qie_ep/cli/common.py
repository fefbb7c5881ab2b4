"""What every `qie` subcommand shares: user errors, loading a model, writing output files atomically,
and the agreement metrics (SQNR, cosine) between a model's outputs and FP32's.

A ``UserError`` is a mistake the user can fix (a missing file, a model that is not ONNX, data that does
not fit the model, an output path that cannot be written): the command line prints its message on
one line and exits with status 2, without a traceback. Output files are written next to their final
path under a temporary name and renamed into place only when complete, so a failed command never
leaves a partial file behind.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np


class UserError(Exception):
    """An error the user caused and can fix; shown as one line, no traceback."""


def load_model(path: str | os.PathLike, load_external_data: bool = True):
    """``onnx.load`` with user errors for a missing file or a file that is not an ONNX model."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected an .onnx model file")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        raise UserError(f"{p}: not an ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{p}: not an ONNX model (no graph)")
    return model


def check_loadable(path: str | os.PathLike) -> None:
    """A UserError unless ONNX Runtime can build a session from the model (types, opsets, shapes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph / ... types, all "cannot load"
        msg = str(e).split(" : ")[-1].strip().splitlines()[0][:300]
        raise UserError(f"{path}: ONNX Runtime cannot load this model: {msg}") from None


def check_distinct(**paths) -> None:
    """Refuse two of the named paths being one file (``-o`` onto the input model, ``--report`` onto ``-o``)."""
    seen: dict[Path, str] = {}
    for flag, p in paths.items():
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise UserError(f"{p}: {flag} would overwrite the {seen[key]}; choose another path")
        seen[key] = flag.replace("_", " ")


def check_writable(path: str | os.PathLike) -> Path:
    """The output ``path`` as a Path, after checking its folder exists and can be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected an output file name")
    if not parent.is_dir():
        raise UserError(f"{p}: cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{p}: cannot write: folder {parent} is not writable")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    final = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent if str(final.parent) else ".")
    except OSError as e:
        raise UserError(f"{final}: cannot write ({e.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0600; outputs get the usual 0666 less the umask (a model server running
        # as another user must be able to read them)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        for extra in tmp_path.parent.glob(tmp_path.name + ".data"):
            os.chmod(extra, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
        # ORT's quantizer may write external data next to its output; a failed run leaves none.
        for extra in tmp_path.parent.glob(tmp_path.name + ".data"):
            extra.unlink(missing_ok=True)


def _flat(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs]) if outputs else np.zeros(0)


def float_outputs(outputs) -> list[np.ndarray]:
    """The floating-point arrays among one sample's outputs (integer outputs are not compared)."""
    return [np.asarray(o) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]


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


def fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def cpu_model() -> str:
    """The CPU's model name (reports and benchmarks say which machine measured)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (every cell through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
