"""qie: INT8 GEMM and convolution kernels that plug into ONNX Runtime (and TVM).

One line makes every quantized GEMM node of an ONNX graph run on qie's kernels::

    so = onnxruntime.SessionOptions(); qie_ep.register(so)

``stats()`` tells which (domain, op) ran on qie and on which ISA path.
"""
from __future__ import annotations

from qie_ep._lib import library_path, lib

__all__ = ["register", "ep_available", "ep_stats", "region_profile", "with_contrib_opset", "library_path", "ops", "stats", "reset_stats",
           "active_isa", "supported_isas", "force_isa", "ISAS", "EP_NAME"]
__version__ = "0.1.0"



def __getattr__(name: str):
    if name == "ISAS":  # the library's ISA table, slowest to fastest (read on first use)
        return _isas()
    raise AttributeError(f"module 'qie_ep' has no attribute {name!r}")


def _isas() -> tuple:
    return tuple(lib().qie_isas().decode().split())


_EP_REGISTERED_KEY = "qie.ep_added"


def register(sess_options, ep: bool | None = None, ep_options: dict | None = None) -> None:
    """Register qie with an ``onnxruntime.SessionOptions``.

    ``ep`` (default: wherever ``ep_available()``) adds qie's plugin execution provider ahead of the CPU EP:
    it claims whole QDQ units (DequantizeLinear -> MatMul / Gemm -> QuantizeLinear, and -> Softmax ->) and regions (connected
    groups of QDQ convolutions, activations, BatchNormalization, residual Add / Mul, pools and Concat joined by
    QuantizeLinear -> DequantizeLinear pairs, docs/numerics.md) and runs them in the integer domain before ORT's
    own QDQ fusions (``ep_stats()`` counts what it took; ``stats()`` lists
    its runs under (EP_NAME, ...)). ``ep=True`` where it is not available is an error.

    The custom-op library is registered too: sessions run the ONNX-domain QLinearMatMul, MatMulInteger,
    QLinearConv and ConvInteger nodes the EP does not take on qie, at every graph optimization level (with the EP at
    ORT_ENABLE_ALL, ORT's layout transformer hands QLinearConv to its own com.microsoft NHWC kernel). Without
    the EP (``ep=False``, or ONNX Runtime < 1.27) it also registers the com.microsoft QGemm, QLinearConv (NHWC),
    MatMulIntegerToFloat and DynamicQuantizeMatMul; with the EP it does not, because a custom com.microsoft
    domain breaks ORT's own contrib fusions in models that do not import it (see ``with_contrib_opset``).
    Registering twice on the same options is a no-op.

    ``ep_options`` (strings) tune the EP: ``units`` ("1"/"0": claim MatMul / Gemm, Softmax and attention units),
    ``attention`` ("1"/"0": claim the QDQ attention core, scores MatMul -> mask -> Softmax -> MatMul), ``shapes``
    ("1"/"0": claim Shape -> Gather -> Unsqueeze chains, with a DequantizeLinear only the Shape reads), ``regions`` ("1"/"0":
    claim conv regions), ``tails`` ("1"/"0": MatMul / Gemm units take the QDQ segments after them: bias Add, Gelu,
    head splits, the residual LayerNorm ...), ``min_region_convs`` (convolutions a region needs, default "2"),
    ``profile`` ("1": time the regions' unit kinds, see ``region_profile()``), ``pacing`` ("1"/"0": each region step,
    MatMul / Gemm unit and Softmax unit learns from its first runs whether the intra-op pool pays for its work or runs it on the calling
    thread; results do not depend on it). A bad value fails the session creation with a message naming the option.
    """
    if ep is None:
        ep = ep_available()
    options = _ep_options(ep_options)
    if not _has_config(sess_options, _CUSTOM_OPS_KEY):
        sess_options.add_session_config_entry(_CONTRIB_KEY, "0" if ep else "1")
    sess_options.register_custom_ops_library(library_path())
    if ep and not _has_config(sess_options, _EP_REGISTERED_KEY):
        sess_options.add_provider_for_devices(_ep_devices(), options)
        sess_options.add_session_config_entry(_EP_REGISTERED_KEY, "1")


_EP_OPTIONS = {"units": ("0", "1"), "attention": ("0", "1"), "shapes": ("0", "1"), "regions": ("0", "1"), "tails": ("0", "1"),
               "min_region_convs": None, "profile": ("0", "1"),
               "pacing": ("0", "1"), "conv_tables": ("0", "1"), "team": ("0", "1")}


def _ep_options(given: dict | None) -> dict:
    """The EP options as strings, checked here so a typo is a ValueError rather than ORT's fallback to its CPU EP
    (the library checks them again)."""
    out = {}
    for key, value in (given or {}).items():
        value = str(int(value) if isinstance(value, bool) else value)
        if key not in _EP_OPTIONS:
            raise ValueError(f"unknown qie EP option {key!r}; known: {', '.join(_EP_OPTIONS)}")
        allowed = _EP_OPTIONS[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"qie EP option {key!r} must be one of {allowed}, got {value!r}")
        if allowed is None and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"qie EP option {key!r} must be an integer >= 1, got {value!r}")
        out[key] = value
    return out


_CUSTOM_OPS_KEY = "qie.custom_ops_registered"  # set by the library (register.cc)
_CONTRIB_KEY = "qie.contrib_ops"


def _has_config(so, key: str) -> bool:
    try:
        return bool(so.get_session_config_entry(key))
    except Exception:  # noqa: BLE001 - ORT raises when the entry is absent
        return False


def ep_available() -> bool:
    """Whether qie's plugin EP can be used here: this ONNX Runtime has the EP API (>= 1.27) and the build
    has libqie_ep.so."""
    import onnxruntime as ort

    from qie_ep._lib import ep_library_path
    return hasattr(ort, "register_execution_provider_library") and ep_library_path() is not None


def _ep_devices():
    """qie's EP devices, registering its library with ONNX Runtime once per process."""
    import onnxruntime as ort

    from qie_ep._lib import ep_library_path
    path = ep_library_path()
    if path is None or not hasattr(ort, "register_execution_provider_library"):
        raise RuntimeError("qie's execution provider is not available: "
                           + ("this build has no libqie_ep.so" if path is None
                              else f"ONNX Runtime {ort.__version__} has no plugin EP API (needs >= 1.27)"))
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        ort.register_execution_provider_library("qie", path)
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    return devices


EP_NAME = "QIE"


def ep_stats() -> dict:
    """qie EP counters since the library was loaded: MatMul/Gemm and Softmax units claimed by GetCapability and
    their runs, attention units (two MatMuls and the softmax between them) and their runs, regions (connected groups
    of QDQ units with convolutions) and their runs. Runs restart at ``reset_stats()``."""
    from qie_ep._lib import ep_lib
    h = ep_lib()
    if h is None:
        return {"claimed": 0, "runs": 0, "attention": 0, "attention_runs": 0, "regions": 0, "region_runs": 0}
    import ctypes
    claimed, runs = ctypes.c_long(), ctypes.c_long()
    h.qie_ep_counters(ctypes.byref(claimed), ctypes.byref(runs))
    regions, region_runs = ctypes.c_long(), ctypes.c_long()
    h.qie_ep_region_counters(ctypes.byref(regions), ctypes.byref(region_runs))
    attention, attention_runs = ctypes.c_long(), ctypes.c_long()
    h.qie_ep_attention_counters(ctypes.byref(attention), ctypes.byref(attention_runs))
    return {"claimed": claimed.value, "runs": runs.value, "attention": attention.value,
            "attention_runs": attention_runs.value, "regions": regions.value, "region_runs": region_runs.value}


def region_profile(steps: bool = False) -> dict:
    """Time in the EP's regions per unit kind (conv, table, binary, gap, concat, maxpool, avgpool, shuffle, lrn, slice, resize, layout: the
    NCHW <-> NHWC transposes at region edges, and conv+table: convs with the following table folded in) since load
    or ``reset_stats()``, for sessions whose EP was created
    with ``ep_options={"profile": "1"}``: {kind: {"runs": n, "ms": total}} for kinds that ran. ``steps``: per step
    instead, keyed by its unit's op node (``"Conv 'stem'"``; a name several regions share adds up), the layout
    changes at region edges left out: which layer is slow, and which does not speed up with a second thread."""
    from qie_ep._lib import ep_lib
    h = ep_lib()
    if h is None:
        return {}
    if steps:
        out = {}
        for line in h.qie_ep_region_step_profile().decode().splitlines():
            name, ns, runs = line.rsplit("\t", 2)
            out[name] = {"runs": int(runs), "ms": int(ns) / 1e6}
        return out
    import ctypes
    names = h.qie_ep_region_profile_names().decode().split()
    ns, calls = (ctypes.c_int64 * len(names))(), (ctypes.c_int64 * len(names))()
    h.qie_ep_region_profile(ns, calls, len(names))
    return {k: {"runs": calls[i], "ms": ns[i] / 1e6} for i, k in enumerate(names) if calls[i]}


def with_contrib_opset(model):
    """Return ``model`` (an ``onnx.ModelProto``) importing the ``com.microsoft`` opset (version 1).

    Needed only without qie's execution provider (``register(so, ep=False)`` or ONNX Runtime < 1.27), at
    ORT_ENABLE_EXTENDED / ORT_ENABLE_ALL, for models that do not import that opset and in which ORT's
    optimizer creates com.microsoft nodes (e.g. Gelu, QLinearSoftmax): once a library registers
    com.microsoft kernels, ORT 1.31 resolves those fused nodes only when the model imports the domain
    ("com.microsoft:Gelu(-1) is not a registered function/op" otherwise). With the EP, ``register`` adds no
    com.microsoft kernels and no model needs this. A model that already imports the domain is returned
    unchanged.
    """
    import onnx.helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def _read_lines(fn) -> list[str]:
    """Read a text the library writes into a caller's buffer (returning the length it needs).

    The text can grow between the sizing call and the copy (counters advancing while sessions run):
    a copy that did not fit whole is retried with the larger size, so no line is ever cut.
    """
    import ctypes

    cap = 4096
    while True:
        buf = ctypes.create_string_buffer(cap)
        need = fn(buf, cap)
        if need < cap:
            return buf.raw[:need].decode().splitlines()
        cap = need + 1024


def ops() -> list[tuple[str, str]]:
    """Every (domain, op) qie registers with ONNX Runtime, from the library's own table.

    A node of such a (domain, op) in a session made with ``register(so)`` runs on qie.
    """
    return [tuple(line.split("\t")) for line in _read_lines(lib().qie_ops)]


def stats() -> dict[tuple[str, str], dict[str, int]]:
    """Kernel invocations since load or the last ``reset_stats()``: {(domain, op): {isa: count}}.

    The domain of standard ONNX ops is "" (as in the graph); contrib ops have "com.microsoft". Units run by
    qie's execution provider are counted under (EP_NAME, "QDQ GEMM") (MatMul / Gemm and Softmax units),
    (EP_NAME, "QDQ attention") (attention units: two MatMuls each) and (EP_NAME, "QDQ region").
    """
    out: dict[tuple[str, str], dict[str, int]] = {}
    for line in _read_lines(lib().qie_stats_snapshot):
        domain, op, isa, count = line.split("\t")
        out.setdefault((domain, op), {})[isa] = int(count)
    eps = ep_stats()
    for key, name in (("runs", "QDQ GEMM"), ("attention_runs", "QDQ attention"), ("region_runs", "QDQ region")):
        if eps[key]:
            from qie_ep._lib import ep_lib
            out[(EP_NAME, name)] = {ep_lib().qie_ep_active_isa().decode(): eps[key]}
    return out


def reset_stats() -> None:
    """Zero every counter reported by ``stats()``."""
    lib().qie_stats_reset()
    from qie_ep._lib import ep_lib
    if ep_lib() is not None:
        ep_lib().qie_ep_reset()


def active_isa() -> str:
    """The ISA path kernels use now: the best this CPU has, or the one ``QIE_ISA`` / ``force_isa`` chose."""
    return lib().qie_active_isa().decode()


def supported_isas() -> list[str]:
    """ISA paths this CPU can run, from slowest to fastest."""
    return [i for i in _isas() if lib().qie_isa_supported(i.encode())]


def force_isa(name: str) -> None:
    """Run every qie kernel on ISA path ``name`` from now on (tests and benchmarks; overrides ``QIE_ISA``).

    Raises ``ValueError`` if the name is unknown or the CPU lacks that ISA.
    """
    if name not in _isas():
        raise ValueError(f"unknown ISA {name!r}; expected one of {_isas()}")
    if lib().qie_force_isa(name.encode()) != 0:
        raise ValueError(f"ISA {name!r} is not supported by this CPU (supported: {supported_isas()})")
