"""ONNX import for the quantized ops TVM's Relax frontend lacks, as standard Relax.

Each op becomes the dequantize -> op -> quantize (or widened integer) form that TVM already compiles,
so a module imported here is correct under TVM's default pipeline too; ``qie_ep.tvm.pipeline`` then
recognises those groups and sends them to qie's kernels.

- QLinearMatMul:  quantize(matmul(dq(a), dq(b)), y_scale, y_zp)
- QLinearConv (ONNX, and com.microsoft's NHWC form): quantize(conv2d(dq(x), dq(w)) + dq(bias), ...)
- ConvInteger:    conv2d(int32(x) - x_zp, int32(w) - w_zp, out_dtype=int32) (as TVM imports MatMulInteger)
- QGemm (com.microsoft): [quantize](alpha * matmul(dq(a'), dq(b')) + dq(c, a_scale * b_scale))
- MatMulIntegerToFloat: matmul(dq(a), dq(b)) (+ bias)
- DynamicQuantizeMatMul: DynamicQuantizeLinear(a), then MatMulIntegerToFloat
- DynamicQuantizeLinear: replaces TVM's converter with ONNX Runtime's rule (scale 1 on an empty range,
  zero point rounded half to even)
"""

from __future__ import annotations

import contextlib

import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as _F


def _dtype(e) -> str:
    return e.ty.dtype.dtype


def _zp(zp, data):
    return zp if zp is not None else relax.const(0, _dtype(data))


def _opt(inputs, i):
    return inputs[i] if len(inputs) > i else None


def _dq(x, scale, zp, axis=-1):
    return relax.op.dequantize(x, scale, _zp(zp, x), axis=axis, out_dtype="float32")


def _q(x, scale, zp):
    return relax.op.quantize(x, scale, zp, axis=-1, out_dtype=_dtype(zp))


_Q = ("uint8", "int8")


def _check(attr, op: str, **operands) -> None:
    """A clear error naming the node for dtype combinations no host defines (ONNX type constraints)."""
    name = attr.get("tvm_custom", {}).get("name", "?")
    for what, (e, allowed) in operands.items():
        if e is None:
            continue
        dt = _dtype(e)
        if dt not in allowed:
            raise ValueError(f"qie: node '{name}' ({op}): {what} has dtype {dt}, expected one of {list(allowed)}")


def _channel_axis(scale, axis: int) -> int:
    """A per-channel scale's axis; per-tensor scales ignore it."""
    return axis if scale.ty.ndim == 1 and _static_len(scale) > 1 else -1


def _static_len(e) -> int:
    try:
        return int(e.ty.shape[0])
    except (TypeError, IndexError, AttributeError):
        return -1


def _conv_nchw(bb, x, w, attr):
    """TVM's own Conv converter on already-dequantized (or widened) operands."""
    return _F.Conv._impl_v11(bb, [bb.normalize(x), bb.normalize(w), None], dict(attr), None)


class QLinearMatMul(_F.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, sa, za, b, sb, zb, sy, zy = inputs[:8]
        _check(attr, "QLinearMatMul", a=(a, _Q), b=(b, _Q), a_zero_point=(za, (_dtype(a),)),
               b_zero_point=(zb, (_dtype(b),)), y_zero_point=(zy, _Q))
        mm = relax.op.matmul(_dq(a, sa, za), _dq(b, sb, zb, _channel_axis(sb, -1)))
        return _q(mm, sy, zy)


class QLinearConv(_F.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, sx, zx, w, sw, zw, sy, zy = inputs[:8]
        bias = _opt(inputs, 8)
        _check(attr, "QLinearConv", x=(x, _Q), w=(w, _Q), x_zero_point=(zx, (_dtype(x),)),
               w_zero_point=(zw, (_dtype(w),)), y_zero_point=(zy, _Q), B=(bias, ("int32",)))
        attr = dict(attr)
        channels_last = attr.pop("channels_last", 0)
        if channels_last:
            nd = x.ty.ndim
            x = bb.normalize(relax.op.permute_dims(x, [0, nd - 1] + list(range(1, nd - 1))))
        out = bb.normalize(_conv_nchw(bb, _dq(x, sx, zx), _dq(w, sw, zw, _channel_axis(sw, 0)), attr))
        if bias is not None:
            nd = out.ty.ndim
            bscale = relax.op.multiply(sx, sw)
            b = bb.normalize(_dq(bias, bb.normalize(bscale), relax.const(0, "int32"), _channel_axis(sw, 0)))
            out = relax.op.add(out, relax.op.reshape(b, [1, -1] + [1] * (nd - 2)))
        out = bb.normalize(_q(out, sy, zy))
        if channels_last:
            nd = out.ty.ndim
            out = relax.op.permute_dims(out, [0] + list(range(2, nd)) + [1])
        return out


class ConvInteger(_F.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, w = inputs[0], inputs[1]
        zx, zw = _opt(inputs, 2), _opt(inputs, 3)
        _check(attr, "ConvInteger", x=(x, _Q), w=(w, _Q), x_zero_point=(zx, (_dtype(x),)),
               w_zero_point=(zw, (_dtype(w),)))
        xi = relax.op.astype(x, "int32")
        wi = relax.op.astype(w, "int32")
        if zx is not None:
            xi = relax.op.subtract(xi, relax.op.astype(zx, "int32"))
        if zw is not None:
            zwi = bb.normalize(relax.op.astype(zw, "int32"))
            if zwi.ty.ndim == 1:
                zwi = relax.op.reshape(zwi, [-1, 1, 1, 1])
            wi = relax.op.subtract(wi, zwi)
        attr = dict(attr)
        out = _conv_nchw(bb, bb.normalize(xi), bb.normalize(wi), attr)
        return out


class MatMulIntegerToFloat(_F.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, b, sa, sb = inputs[:4]
        za, zb, bias = _opt(inputs, 4), _opt(inputs, 5), _opt(inputs, 6)
        _check(attr, "MatMulIntegerToFloat", A=(a, _Q), B=(b, _Q), a_scale=(sa, ("float32",)),
               b_scale=(sb, ("float32",)), bias=(bias, ("float32",)))
        out = relax.op.matmul(_dq(a, sa, za), _dq(b, sb, zb, _channel_axis(sb, -1)))
        return relax.op.add(out, bias) if bias is not None else out


class DynamicQuantizeLinear(_F.OnnxOpConverter):
    """As ONNX Runtime computes it (``qie_ep.reference.dynamic_quantize_linear``): scale 1 when the range
    is empty (TVM's converter divides by zero there), zero point rounded half to even (TVM's: away
    from zero), the data quantized with qie's round-half-even legalization."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        _check(attr, "DynamicQuantizeLinear", x=(x, ("float32",)))
        zero = relax.const(0.0, "float32")
        lo = relax.op.minimum(zero, relax.op.min(x))
        hi = relax.op.maximum(zero, relax.op.max(x))
        span = relax.op.subtract(hi, lo)
        scale = bb.normalize(relax.op.where(relax.op.equal(span, zero), relax.const(1.0, "float32"),
                                            relax.op.divide(span, relax.const(255.0, "float32"))))
        zp = bb.normalize(relax.op.quantize(relax.op.negative(lo), scale, relax.const(0, "uint8"), axis=0,
                                            out_dtype="uint8"))
        y = relax.op.quantize(x, scale, zp, axis=0, out_dtype="uint8")
        return relax.Tuple([y, scale, zp])


class DynamicQuantizeMatMul(_F.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, b, sb = inputs[:3]
        zb, bias = _opt(inputs, 3), _opt(inputs, 4)
        _check(attr, "DynamicQuantizeMatMul", A=(a, ("float32",)), B=(b, _Q))
        q = bb.normalize(DynamicQuantizeLinear._impl_v11(bb, [a], {}, params))
        qa, sa, za = (relax.TupleGetItem(q, i) for i in range(3))
        return MatMulIntegerToFloat._impl_v1(bb, [qa, b, sa, sb, za, zb, bias], attr, params)


class QGemm(_F.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, sa, za, b, sb, zb = inputs[:6]
        c, sy, zy = _opt(inputs, 6), _opt(inputs, 7), _opt(inputs, 8)
        _check(attr, "QGemm", A=(a, _Q), B=(b, _Q), C=(c, ("int32",)), y_zero_point=(zy, _Q))
        if attr.get("transA", 0):
            a = relax.op.permute_dims(a, [1, 0])
        if attr.get("transB", 0):
            b = relax.op.permute_dims(b, [1, 0])
        out = relax.op.matmul(_dq(a, sa, za), _dq(b, sb, zb, _channel_axis(sb, -1)))
        alpha = float(attr.get("alpha", 1.0))
        if alpha != 1.0:
            out = relax.op.multiply(out, relax.const(alpha, "float32"))
        if c is not None:
            out = relax.op.add(out, _dq(c, relax.op.multiply(sa, sb), relax.const(0, "int32"), _channel_axis(sb, -1)))
        return _q(out, sy, zy) if sy is not None else out


def _same_pads(attr, shape) -> tuple | None:
    """Explicit pads for ``auto_pad`` SAME_UPPER / SAME_LOWER where TVM's converter needs every spatial size
    as an int: an axis of stride 1 pads ``(k - 1) * d`` whatever its size, a static axis as ONNX says; None
    when a symbolic axis has a stride (its padding depends on the size at run time)."""
    mode = attr.get("auto_pad", b"NOTSET").decode("utf-8")
    kernel = list(attr["kernel_shape"])
    nd = len(kernel)
    strides = list(attr.get("strides", [1] * nd))
    dil = list(attr.get("dilations", [1] * nd))
    before, after = [], []
    for i in range(nd):
        size = shape[2 + i]
        if strides[i] == 1:
            total = (kernel[i] - 1) * dil[i]
        elif isinstance(size, tirx.IntImm):
            n = int(size.value)
            total = max((-(-n // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - n, 0)
        else:
            return None
        lo, hi = total // 2, total - total // 2
        before.append(hi if mode == "SAME_LOWER" else lo)
        after.append(lo if mode == "SAME_LOWER" else hi)
    return tuple(before + after)


def _same_pool(base):
    """TVM's Max/AveragePool converter, with SAME auto-padding given as explicit pads where the input has
    symbolic spatial sizes (its converter calls int() on them: PP-OCRv6's MaxPool with a dynamic width)."""

    class SamePool(base):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            mode = attr.get("auto_pad", b"NOTSET").decode("utf-8")
            shape = getattr(inputs[0].ty.shape, "values", None)
            if mode.startswith("SAME") and shape is not None and any(
                    not isinstance(d, tirx.IntImm) for d in shape[2:]):
                pads = _same_pads(attr, shape)
                if pads is not None:
                    attr = dict(attr, auto_pad=b"NOTSET", pads=pads)
            return super()._impl_v1(bb, inputs, attr, params)

    SamePool.__name__ = base.__name__
    return SamePool


class Reshape(_F.Reshape):
    """TVM's Reshape converter, plus a symbolic scalar (a shape element computed from a symbolic dim, e.g.
    PP-OCRv6's sequence length from its dynamic width) reshaped to a scalar (itself) or to one element (a
    one-element shape value, as TVM's Unsqueeze gives for axis 0): its Reshape refused the scalar ("Reshape requires
    the input data to be Tensor")."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        if tvm.ir.is_prim_expr(data):
            target = _F.get_constant(inputs[1], params)
            dims = target.value.numpy().tolist() if isinstance(target, tvm.ir.GenericConst) else None
            if dims == []:  # a scalar stays the scalar
                return data
            if dims in ([1], [-1]):
                return relax.ShapeExpr([data])
        return super()._impl_v13(bb, inputs, attr, params)


class Sum(_F.Sum):
    """Pairwise adds, left to right (ONNX's broadcasting Sum; ORT's order). TVM's converter stacks the
    inputs (each broadcast to the output shape, copied) and reduces over the new axis: a residual Sum of two
    56 x 56 x 256 activations took ~1.5 ms on it, ~16 of ResNet-50's (Caffe2 export) 47 ms; as an add it
    fuses with its neighbours."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
            return super()._impl_v1(bb, inputs, attr, params)
        return cls._impl_dynamic(bb, inputs)


CONVERTERS = {
    "Sum": Sum,
    "Reshape": Reshape,
    "MaxPool": _same_pool(_F.MaxPool),
    "AveragePool": _same_pool(_F.AveragePool),
    "QLinearMatMul": QLinearMatMul,
    "QLinearConv": QLinearConv,
    "ConvInteger": ConvInteger,
    "MatMulIntegerToFloat": MatMulIntegerToFloat,
    "DynamicQuantizeMatMul": DynamicQuantizeMatMul,
    "DynamicQuantizeLinear": DynamicQuantizeLinear,
    "QGemm": QGemm,
}


@contextlib.contextmanager
def _with_converters():
    original = _F._get_convert_map

    def extended():
        table = original()
        table.update(CONVERTERS)
        return table

    _F._get_convert_map = extended
    try:
        yield
    finally:
        _F._get_convert_map = original


def _drop_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Identity nodes removed (their consumers read the input), except where the output is a graph output
    or a subgraph reads it. TVM 0.27's importer lets only a fixed list of ops take a shape value, and
    Identity is not on it: a model that passes a shape through one (PP-OCRv6's recogniser as ORT's
    quantize_static writes it) failed to import even with a fixed input shape unless its shape arithmetic
    was folded ("Node Identity ... cannot handle ShapeExpr inputs")."""
    g = model.graph
    keep = {o.name for o in g.output}
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                keep |= {i for sn in sub.node for i in sn.input}
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output[0] not in keep}
    if not alias:
        return model

    def root(name):
        while name in alias:
            name = alias[name]
        return name

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = root(name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _explicit_same_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv / QLinearConv / ConvInteger nodes with ``auto_pad`` SAME_UPPER / SAME_LOWER and every stride 1 get the
    explicit ``pads`` ONNX defines for them (``(k - 1) * d`` per axis, the odd one after for SAME_UPPER, before for
    SAME_LOWER: the same at every input size). TVM's Conv converter turns auto_pad into a separate pad of the
    dequantized input, which hid such convolutions from qie's quantized-conv matcher (PP-OCRv6's two 2x2 stem
    convolutions ran as float conv2d); with explicit pads they are ordinary QDQ convolutions."""
    from onnx import helper

    changed = False
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.op_type not in ("Conv", "QLinearConv", "ConvInteger") or n.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in n.attribute}
        mode = helper.get_attribute_value(attrs["auto_pad"]).decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER") or "kernel_shape" not in attrs:
            continue
        kernel = list(helper.get_attribute_value(attrs["kernel_shape"]))
        strides = list(helper.get_attribute_value(attrs["strides"])) if "strides" in attrs else [1] * len(kernel)
        dil = list(helper.get_attribute_value(attrs["dilations"])) if "dilations" in attrs else [1] * len(kernel)
        if any(s != 1 for s in strides):
            continue
        total = [(k - 1) * d for k, d in zip(kernel, dil)]
        small = [t // 2 for t in total]
        before = small if mode == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        after = [t - b for t, b in zip(total, before)]
        kept = [a for a in n.attribute if a.name not in ("auto_pad", "pads")]
        del n.attribute[:]
        n.attribute.extend(kept + [helper.make_attribute("pads", before + after)])
        changed = True
    return out if changed else model


def _fold_constant_of_shape(model: onnx.ModelProto) -> onnx.ModelProto:
    """ConstantOfShape of a constant shape -> a Constant. TVM 0.27 fails on an empty shape (a scalar
    result: "broadcast_to expects the input shape to have the number of ndim at least ..."), which
    torch's exporter emits in BERT-style attention masks (MiniLM)."""
    import numpy as np
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    changed = False
    nodes = []
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape" and n.input and n.input[0] in consts:
            shape = numpy_helper.to_array(consts[n.input[0]]).astype(np.int64)
            fill = numpy_helper.to_array(n.attribute[0].t) if n.attribute else np.zeros(1, np.float32)
            value = np.full(tuple(shape), fill.reshape(-1)[0], fill.dtype)
            nodes.append(helper.make_node("Constant", [], [n.output[0]], name=n.name,
                                          value=numpy_helper.from_array(value)))
            changed = True
        else:
            nodes.append(n)
    if changed:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def fold_static_shapes(model: onnx.ModelProto, shape_dict: dict) -> onnx.ModelProto:
    """The model with its inputs fixed to ``shape_dict`` and shape arithmetic folded away.

    TVM 0.27's importer cannot follow some shape-computing subgraphs ("Node Identity.148 cannot handle
    ShapeExpr inputs" on PP-OCRv6's recogniser). With every input shape fixed, ONNX Runtime's basic
    optimizer (constant folding, Identity / redundant-node elimination; semantics-preserving, standard
    ONNX ops only, DequantizeLinear kept) turns those subgraphs into constants.
    """
    import tempfile
    from pathlib import Path

    from qie_ep.session import options, session

    m = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in m.graph.input:
        if vi.name in shape_dict:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) != len(shape_dict[vi.name]):
                raise ValueError(f"input {vi.name!r} has rank {len(dims)}, shape_dict gives {shape_dict[vi.name]}")
            for d, v in zip(dims, shape_dict[vi.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    with tempfile.TemporaryDirectory(prefix="qie-tvm-") as tmp:
        so = options(level="basic", log_level=3)
        so.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        session(m, so)
        return onnx.load(so.optimized_model_filepath)


def _static_shapes(model: onnx.ModelProto, shape_dict: dict | None) -> dict | None:
    """Every graph input's shape, from ``shape_dict`` or the model's own static dims; None if one is open."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        if shape_dict and i.name in shape_dict:
            shapes[i.name] = list(shape_dict[i.name])
            continue
        dims = i.type.tensor_type.shape.dim if i.type.HasField("tensor_type") else None
        if dims is None or not i.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            return None
        shapes[i.name] = [d.dim_value for d in dims]
    return shapes


def from_onnx(model, shape_dict=None, dtype_dict="float32", fold_shapes: bool | None = None, **kwargs):
    """``tvm.relax.frontend.onnx.from_onnx`` plus qie's converters for the quantized ops TVM lacks.

    ``model``: an ``onnx.ModelProto`` or a path. ``fold_shapes``: fold the graph's shape arithmetic first
    (``fold_static_shapes``); by default (None) whenever every input's shape is fixed, by ``shape_dict`` or
    by the model itself (TVM 0.27's importer fails on shape arithmetic it could fold, e.g. PP-OCRv6's
    recogniser). An import that fails with open input dims says which to fix. Other arguments are passed
    through.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    static = _static_shapes(model, shape_dict)
    if fold_shapes and static is None:
        inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
        raise ValueError(f"fold_shapes needs a shape_dict fixing every input ({sorted(inputs)})")
    if fold_shapes or (fold_shapes is None and static is not None):
        try:
            model, shape_dict = fold_static_shapes(model, static), static
        except Exception:  # noqa: BLE001 - by default folding is best effort (ORT may not load the file)
            if fold_shapes:
                raise
    model = _drop_identities(_explicit_same_pads(_fold_constant_of_shape(model)))
    try:
        with _with_converters():
            return _F.from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, **kwargs)
    except Exception as e:  # noqa: BLE001 - TVM raises builtin error types; say what the user can do
        if static is not None:
            raise
        open_dims = {i.name: [d.dim_param or "?" for d in i.type.tensor_type.shape.dim if not d.HasField("dim_value")]
                     for i in model.graph.input if i.type.HasField("tensor_type")}
        open_dims = {k: v for k, v in open_dims.items() if v}
        raise ValueError(f"TVM's ONNX importer failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}. "
                         f"The inputs {open_dims} have open dims: pass shape_dict={{name: shape}} fixing them, and "
                         "qie folds the graph's shape arithmetic before importing (fold_shapes)") from e
