"""`qie quantize`: an FP32 ONNX model -> an INT8 model, through ``onnxruntime.quantization``.

qie does not re-implement calibration or graph rewriting: static models come from
``quantize_static`` (MinMax calibration over the user's data, QDQ or QOperator format, per-tensor or
per-channel weights) and dynamic ones from ``quantize_dynamic``. What qie adds:

0. ONNX Runtime's recommended pre-processing first (``quant_pre_process``: shape inference, basic graph
   optimization) for graphs with BatchNormalization, which it folds into the Conv before it, unless
   ``--no-preprocess``.
1. The defaults that suit its kernels: the op types qie has kernels for (MatMul, Conv, Gemm), uint8
   activations and int8 weights (the u8 x s8 form VNNI multiplies natively); in static QDQ models also the
   pools, concatenations, residual adds, products and clamps between convolutions (``feature_map_nodes``),
   so that qie's EP runs a CNN from convolution to convolution in integers. ORT's full default set also
   wraps Softmax, normalizations and a transformer's adds in Q/DQ pairs, which costs accuracy (MiniLM's
   output cosine to FP32 0.92 -> 0.80) and speed.
2. Calibration data from a folder (``data.load_feeds``), with a progress bar; calibration runs once and
   its ranges are cached (ORT's ``calibration_cache_path``), so the accuracy-budget search below
   re-quantizes without re-calibrating.
3. ``--accuracy-budget`` (mixed precision, ``sensitivity.search_budget``): layers are kept in float,
   most sensitive first, until the INT8 model's outputs are within the budget of FP32's.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qie_ep.errors import UserError
from qie_ep.files import atomic_output
from qie_ep.quantization.sensitivity import search_budget
from qie_ep.quantization.smooth import graph_links, smooth_norm_inputs
from qie_ep.quantization.config import FEATURE_MAP_OP_TYPES, QTYPES, QuantizeConfig
from qie_ep.quantization.metrics import agreement
from qie_ep.session import run_outputs


@dataclass
class Quantizer:
    """One FP32 model and its calibration, ready to be quantized with different exclusions.

    ``source`` is the model as quantized (unnamed nodes get names, so every layer can be addressed).
    """
    model_path: Path
    config: QuantizeConfig
    feeds: list = field(default_factory=list)
    progress: bool = True

    def __post_init__(self):
        import onnx
        import onnx.version_converter

        self._tmp = tempfile.TemporaryDirectory(prefix="qie-quantize-")
        model = onnx.load(str(self.model_path))
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        if opset < 13 and self.config.per_channel and not self.config.dynamic:
            # Per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs opset 13.
            logging.getLogger("qie").info("converting %s from opset %d to 13 for per-channel weights", self.model_path, opset)
            model = onnx.version_converter.convert_version(model, 13)
        names = _name_nodes(model)
        self.cache = Path(self._tmp.name) / "calibration.json"
        unknown = [n for n in self.config.exclude if n not in names]
        if unknown:
            raise UserError(f"--exclude: no node named {unknown[0]!r} in {self.model_path}")
        if self.config.fmt not in ("qdq", "qoperator"):
            raise UserError(f"--format must be qdq or qoperator, not {self.config.fmt!r}")
        if not self.config.dynamic and not self.feeds:
            raise UserError("static quantization needs calibration data: --calib DIR (or --dynamic)")
        self.source = Path(self._tmp.name) / "source.onnx"
        onnx.save(model, str(self.source))
        # Where it folds BatchNormalization (measured gains there); transformer graphs are quantized as given: ORT's
        # basic optimizations rewrite their shape subgraphs into forms TVM 0.27's ONNX importer rejects (relax.concat).
        self.preprocessed = (self.config.preprocess and any(n.op_type == "BatchNormalization" for n in model.graph.node)
                             and _preprocess(self.source, self.model_path))
        if self.preprocessed:  # the graph as quantized: its layers (BatchNormalization gone, names kept)
            model = onnx.load(str(self.source))
            before = [n.name for n in model.graph.node]
            if _name_nodes(model) != set(before) or len(before) != len(set(before)):
                onnx.save(model, str(self.source))
        self.model = model
        c = self.config
        self.feature_maps = (feature_map_nodes(model) if c.feature_maps and c.op_types and not c.dynamic
                             and c.fmt == "qdq" else frozenset())
        if c.smooth and not c.dynamic:  # SmoothQuant on what reads a LayerNormalization (smooth.py)
            if not 0 < c.smooth < 1:
                raise UserError(f"--smooth-alpha must be in (0, 1) (0: off), not {c.smooth}")
            self.smoothed = smooth_norm_inputs(model, self.feeds, {n for n, _ in self.layers()}, c.smooth)
            if self.smoothed:
                onnx.save(model, str(self.source))
        else:
            self.smoothed = []

    def layers(self) -> list[tuple[str, str]]:
        """(node name, op type) of every node this configuration quantizes, in graph order."""
        ops = set(self.config.op_types) if self.config.op_types else None
        skip = set(self.config.exclude)
        out = []
        for n in self.model.graph.node:
            if n.name in skip or (ops is not None and n.op_type not in ops):
                continue
            if ops is None and n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
                continue
            out.append((n.name, n.op_type))
        return out

    def write(self, out: Path, exclude=(), only=None) -> Path:
        """Quantize into ``out`` (a path written as is), keeping ``exclude`` nodes in float, or
        quantizing ``only`` those nodes. The first static call calibrates (progress bar)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        c = self.config
        excluded = set(c.exclude) | set(exclude)
        op_types = list(c.op_types) or None
        if self.feature_maps:  # the feature-map op types, their nodes elsewhere (a transformer's adds) kept float
            extra = [t for t in FEATURE_MAP_OP_TYPES if t not in op_types]
            op_types += extra
            excluded |= {n.name for n in self.model.graph.node if n.op_type in extra and n.name not in self.feature_maps}
        excluded = sorted(excluded)
        wtype = getattr(QuantType, QTYPES[c.weight_type])
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" warnings, every call
        try:
            if c.dynamic:
                quantize_dynamic(self.source, out, op_types_to_quantize=op_types, per_channel=c.per_channel,
                                 weight_type=wtype, nodes_to_quantize=list(only or []), nodes_to_exclude=excluded)
            else:
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[c.calibration]
                reader = None if self.cache.exists() else _Reader(self.feeds, self.progress)
                extra = {}
                if c.calibration != "minmax" and len({_shapes(f) for f in self.feeds}) > 1:
                    # ORT's histogram calibrators stack each tensor over the samples of one collection and fail
                    # on samples of different shapes (sentences of different lengths); collected one sample at
                    # a time (ORT's strided collection), the histograms are merged across samples instead.
                    extra["CalibStridedMinMax"] = 1
                try:
                    quantize_static(self.source, out, reader,
                                    quant_format=QuantFormat.QDQ if c.fmt == "qdq" else QuantFormat.QOperator,
                                    op_types_to_quantize=op_types, per_channel=c.per_channel,
                                    activation_type=getattr(QuantType, QTYPES[c.activation_type]), weight_type=wtype,
                                    nodes_to_quantize=list(only or []), nodes_to_exclude=excluded,
                                    calibrate_method=method, calibration_cache_path=self.cache, extra_options=extra)
                except _ort_errors() as e:
                    if reader is None:
                        raise
                    msg = str(e).split(" : ")[-1].strip().splitlines()[0][:300]
                    raise UserError(f"{self.model_path}: ONNX Runtime fails running the FP32 model on the calibration "
                                    f"data ({msg}); a shape fixed when the model was exported that the samples do not "
                                    "match is the usual cause") from None
        finally:
            logging.getLogger().setLevel(quiet)
        if not c.dynamic and c.fmt == "qdq" and c.float_residuals:
            import onnx

            model = onnx.load(str(out))
            if float_residual_outputs(model):
                onnx.save(model, str(out))
        return out

    def reference(self) -> list:
        """FP32's float outputs for every feed (ORT's own kernels, the user's model as given), computed once."""
        if not hasattr(self, "_ref"):
            self._ref = run_outputs(self.model_path, self.feeds, qie=False)
        return self._ref

    def tmp_path(self, name: str) -> Path:
        return Path(self._tmp.name) / name

    def close(self):
        self._tmp.cleanup()


# Float operations a feature-map node must not touch: their inputs and outputs keep float precision (attention
# scores on their way to Softmax, normalizations and their statistics, GELU's erf, exponentials).
_FLOAT_ONLY = frozenset((
    "Softmax", "LogSoftmax", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "ReduceMean", "ReduceSum", "ReduceL2", "Erf",
    "Pow", "Sqrt", "Div", "Exp", "Log", "Reciprocal"))


# Operations through which a convolution's output stops being an NCHW feature map (layout and shape changes, dense
# products): a transformer's tensors are 4-D in places too (attention scores, heads), never a convolution's.
_LAYOUT = frozenset(("MatMul", "Gemm", "Einsum", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape",
                     "Gather", "GatherElements", "GatherND", "SpaceToDepth", "DepthToSpace", "Expand", "Tile"))


def feature_map_nodes(model) -> frozenset:
    """Names of the nodes of FEATURE_MAP_OP_TYPES quantized with the convolutions by default. A feature map is a
    convolution's output and the 4-D outputs of whatever reads feature maps short of a layout change (``_LAYOUT``):
    batch norms, activations, pools, concatenations, SE products. Feature-map op nodes joined by tensors form groups
    (a residual trunk's Add / Relu chain, a concatenation with its pools); a group is quantized when every output in
    it is a feature map and no float-only operation (``_FLOAT_ONLY``) feeds it or reads it. A transformer's adds and
    products stay float; so does everything where ONNX shape inference fails."""
    from collections import defaultdict

    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - shapes unknown (a model over 2 GB, an op inference rejects): nothing extra
        return frozenset()
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in (*g.value_info, *g.input, *g.output)
            if v.type.tensor_type.HasField("shape")}
    fmap = set()
    for n in g.node:  # topological order (ONNX requires it)
        if n.op_type in ("Conv", "ConvTranspose") or (n.op_type not in _LAYOUT and any(i in fmap for i in n.input)):
            fmap.update(o for o in n.output if rank.get(o) == 4)
    producer, consumers = graph_links(g)
    fm = [n for n in g.node if n.op_type in FEATURE_MAP_OP_TYPES]
    root = {n.name: n.name for n in fm}

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for n in fm:
        for i in n.input:
            p = producer.get(i)
            if p is not None and p.name in root:
                root[find(p.name)] = find(n.name)
    groups = defaultdict(list)
    for n in fm:
        groups[find(n.name)].append(n)
    chosen = set()
    for group in groups.values():
        names = {n.name for n in group}
        feeds = [producer[i] for n in group for i in n.input if i in producer and producer[i].name not in names]
        reads = [c for n in group for o in n.output for c in consumers.get(o, []) if c.name not in names]
        if all(n.output[0] in fmap for n in group) and not any(x.op_type in _FLOAT_ONLY for x in (*feeds, *reads)):
            chosen |= names
    return frozenset(chosen)


def float_residual_outputs(model) -> int:
    """Drops, in place, the QuantizeLinear -> DequantizeLinear pair on the output of each quantized MatMul / Gemm (its
    weights a DequantizeLinear'd initializer) whose output, through an optional bias Add of a constant, enters an Add
    of two computed tensors, a residual sum, that is not quantized itself; returns how many.

    ONNX Runtime's quantizer quantizes a MatMul's output whatever reads it. In a transformer those outputs are the
    updates of the residual stream, whose few outlier channels set a per-tensor scale far too coarse for the others
    (MiniLM: output scale 0.77 for values mostly under 1): all-MatMul MiniLM's output cosine to FP32 0.921 -> 0.983
    (per-channel weights), and ``--accuracy-budget 0.01`` keeps 3 layers float instead of 8. The sum reads the
    MatMul's float output, as ORT runs it (MatMulIntegerToFloat), and qie's EP (the unit's norm tail)."""
    g = model.graph
    const = {i.name for i in g.initializer}
    producer, consumers = graph_links(g)
    outputs = {o.name for o in g.output}

    def sole(t):
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in outputs else None

    def quantized_weights(n):
        w = producer.get(n.input[1]) if len(n.input) > 1 else None
        return w is not None and w.op_type == "DequantizeLinear" and w.input[0] in const

    drop = []
    for op in g.node:
        if op.op_type not in ("MatMul", "Gemm") or not quantized_weights(op):
            continue
        q = sole(op.output[0])
        dq = sole(q.output[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
            continue
        t, add = dq.output[0], sole(dq.output[0])
        if add is not None and add.op_type == "Add" and any(i in const for i in add.input) and t in add.input:
            t, add = add.output[0], sole(add.output[0])  # the bias
        if (add is None or add.op_type != "Add" or len(add.input) != 2 or any(i in const for i in add.input)
                or add.input[0] == add.input[1]
                or any(c.op_type == "QuantizeLinear" for c in consumers.get(add.output[0], []))):
            continue
        for c in consumers[dq.output[0]]:
            for k, i in enumerate(c.input):
                if i == dq.output[0]:
                    c.input[k] = op.output[0]
        drop += [q, dq]
    for n in drop:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}  # the pairs' scales and zero points
    for init in [i for n in drop for i in n.input[1:] if i in const and i not in used]:
        if any(x.name == init for x in g.initializer):
            g.initializer.remove(next(x for x in g.initializer if x.name == init))
    return len(drop) // 2


def _name_nodes(model) -> set:
    """Names every unnamed or repeated node (op type and index), so every layer can be addressed; the names."""
    names = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in names:
            n.name = f"{n.op_type}_{i}"
        names.add(n.name)
    return names


# ONNX Runtime's pre-processing saves the model in one protobuf: larger models are quantized as given.
_PREPROCESS_MAX_BYTES = 1 << 30


def _preprocess(source: Path, model_path: Path) -> bool:
    """ONNX Runtime's recommended quantization pre-processing (``quant_pre_process``) of ``source`` in place: ONNX
    shape inference and ORT's basic graph optimizations, which fold BatchNormalization into the Conv before it (one
    rounding fewer per layer: PP-OCRv6's line accuracy 94% -> 99% on the demo's lines, and the EP's per-channel
    tables become single ones), fold constants and drop no-op nodes. Symbolic shape inference is skipped (it
    fails on models with data-dependent shapes, PP-OCRv6's among them). Where pre-processing fails the model is
    quantized as given; returns whether it ran."""
    if source.stat().st_size > _PREPROCESS_MAX_BYTES:
        logging.getLogger("qie").info("%s: over 1 GiB, quantized without pre-processing", model_path)
        return False
    from onnxruntime.quantization.shape_inference import quant_pre_process

    done = source.with_name("preprocessed.onnx")
    try:
        quant_pre_process(str(source), str(done), skip_symbolic_shape=True)
    except Exception as e:  # ORT's optimizer / onnx shape inference on a model they do not handle: quantize as given
        logging.getLogger("qie").warning("%s: ONNX Runtime's quantization pre-processing failed (%s); quantizing the "
                                         "model as given", model_path, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
        return False
    done.replace(source)
    return True


def _ort_errors() -> tuple:
    """ONNX Runtime's own exception types (Fail, InvalidArgument, ...: none derives from RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented", "EPFail", "EngineError")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def _shapes(feed: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in feed.items()))


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds, with a bar; ``set_range``
    and ``len`` for ORT's strided collection."""

    def __init__(self, feeds, progress: bool):
        from tqdm import tqdm

        self._feeds = feeds
        self._bar = tqdm(total=len(feeds), desc="calibrating", unit="sample", disable=None if progress else True,
                         leave=False)
        self._it = iter(feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        feed = next(self._it, None)
        if feed is not None:
            self._bar.update(1)
        if feed is None or self._bar.n >= len(self._feeds):  # the end (of the last range, when strided)
            self._bar.close()
        return feed

    def __iter__(self):
        return iter(self.get_next, None)


def quantize_file(model_path: str, output: str, feeds: list[dict], config: QuantizeConfig,
                  budget: float | None = None, progress: bool = True, log=print) -> dict:
    """The whole `qie quantize`: write ``output`` (atomically) and return what was done.

    With ``budget`` (maximum loss of mean output cosine to FP32 on ``feeds``), layers are kept in
    float, most sensitive first, until the budget is met; the result lists them.
    """
    if budget is not None and not feeds:
        raise UserError("--accuracy-budget needs data to measure accuracy on: --calib DIR")
    if budget is not None and not 0 < budget < 1:
        raise UserError(f"--accuracy-budget is a loss of cosine similarity in (0, 1), e.g. 0.01; got {budget}")
    q = Quantizer(Path(model_path), config, feeds, progress)
    try:
        if not q.layers():  # an "INT8" copy that is the FP32 model is not a result
            raise UserError(f"{model_path}: no layer of type {' '.join(config.op_types) or 'any'} to quantize")
        with atomic_output(output) as tmp:
            if budget is None:
                q.write(tmp)
                result = {"kept_float": [], "layers": len(q.layers())}
            else:
                result = search_budget(q, budget, tmp, log=log, progress=progress)
        result["output"] = str(output)
        result["feature_maps"] = len(q.feature_maps)
        result["smoothed"] = q.smoothed
        if feeds:
            result["agreement"] = agreement(q.reference(), run_outputs(Path(output), feeds))
        return result
    finally:
        q.close()

