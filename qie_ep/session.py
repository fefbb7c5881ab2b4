"""The one place qie builds ONNX Runtime sessions (the CLI, the hosts, the quantizer, bench and tests).

``options()`` gives SessionOptions with qie registered or not; ``session()`` builds a CPU session from a
path, bytes or a ModelProto; ``run_outputs()`` runs a model over feeds and keeps the float outputs.
"""
from __future__ import annotations

import os
from pathlib import Path

LEVELS = ("disable", "basic", "extended", "all")


def options(*, qie: bool = False, level: str = "all", threads: int | None = None, arena: bool = True,
            log_level: int | None = None, spinning: bool | None = None, profile_dir: str | None = None,
            ep: bool | None = None):
    """``onnxruntime.SessionOptions``: optimization ``level`` (one of LEVELS), ``threads`` intra-op threads
    (None: ORT's default) and one inter-op thread, ``arena=False`` for one allocation per buffer (memory
    checks), ``log_level`` ORT's ``log_severity_level`` (3: errors only, 4: fatal only), ``spinning=False`` so idle
    pool threads sleep (timed runs beside other runtimes), ORT's profiler writing into ``profile_dir``,
    and qie registered when ``qie`` (``ep`` as ``qie_ep.register`` takes it: None = wherever available)."""
    import onnxruntime as ort

    import qie_ep

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    if log_level is not None:
        so.log_severity_level = log_level
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "profile")
    if qie:
        qie_ep.register(so, ep=ep)
    return so


def session(model, so=None, **kw):
    """A CPU ``InferenceSession`` for ``model`` (path, bytes or ModelProto) with ``so`` or ``options(**kw)``."""
    import onnxruntime as ort

    if so is None:
        so = options(**kw)
    if isinstance(model, Path):
        model = str(model)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    if getattr(so, "has_providers", lambda: False)():  # qie's EP added (register(so, ep=True)): ORT appends the CPU EP
        return ort.InferenceSession(data, so)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def float_outputs(outputs) -> list:
    """The floating-point arrays among one sample's outputs (integer outputs are not compared)."""
    import numpy as np

    return [np.asarray(o) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]


def run_outputs(model_path, feeds: list[dict], qie: bool = True) -> list[list]:
    """Every feed's float outputs from an ORT session (ORT_ENABLE_ALL; with qie registered when ``qie``).
    The com.microsoft opset import is added first (see ``qie_ep.with_contrib_opset``)."""
    import onnx

    import qie_ep

    model = qie_ep.with_contrib_opset(onnx.load(str(model_path)))
    sess = session(model, qie=qie, log_level=3)
    return [float_outputs(sess.run(None, f)) for f in feeds]
