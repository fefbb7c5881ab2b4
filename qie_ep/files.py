"""Model files in and out: loading with user errors, checking ORT can load a model, and writing outputs
atomically (next to their final path under a temporary name, renamed into place only when complete,
so a failed command never leaves a partial file behind).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from qie_ep.errors import UserError


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
    from qie_ep.session import session

    try:
        session(str(path), level="disable", log_level=4)
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


def model_size_mb(path: str | os.PathLike) -> float:
    """Size of an ONNX model file in MB, with the external-data file ORT's quantizer may write beside it."""
    p = Path(path)
    return sum(f.stat().st_size for f in [p, *p.parent.glob(p.name + ".data")] if f.exists()) / 2**20
