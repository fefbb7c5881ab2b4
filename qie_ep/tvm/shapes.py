"""Sizes that an ONNX graph computes from its own input shapes, given back to TVM as expressions.

Exported transformers compute sizes from their inputs' shapes (``Range(0, Shape(x)[1])`` for position
ids or a causal mask, ``Shape -> Gather -> Unsqueeze -> Concat`` for reshapes). TVM 0.27's ONNX importer
turns each such size into a tensor, back into a shape (``tensor_to_shape``) and a fresh symbolic variable
bound by ``match_cast``: for TVM it is data-dependent. Two things then go wrong with symbolic input shapes:
FuseOps orders bindings by their tensor dependencies only, so it moves a call that uses such a variable
above the ``match_cast`` that binds it, and VMShapeLower fails ("PrimExpr ... has not been computed",
TVM issues 20195 / 20177); qie then compiled the whole model unfused. And every use of the variable is
checked and allocated at run time as if its value were unknown.

This pass evaluates that shape arithmetic symbolically (the ops such subgraphs use, on int64 tensors of at
most 8 elements: shape_of, shape_to_tensor, reshape, integer astype, take, concat, add / subtract /
multiply / floor_divide / negative / maximum / minimum, constants) and replaces each variable a
``match_cast`` binds to a known value by that value (``seq`` instead of ``range_len_0``). The ``match_cast``
itself stays, now a check. Anything it cannot evaluate is left as it was.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer, ConstIntBound

MAX_LEN = 8

_BINARY = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": tirx.floordiv,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}


def _i64(v):
    """An int64 expression: Python / numpy integers and int32 constants as int64 constants."""
    if isinstance(v, tirx.IntImm):
        return tirx.IntImm("int64", int(v.value))
    return v if isinstance(v, tvm.ir.Expr) else tirx.IntImm("int64", int(v))


def _const_values(c):
    arr = c.value.numpy()
    if arr.dtype.kind not in "iu" or arr.ndim > 1 or arr.size > MAX_LEN:
        return None
    return [_i64(v) for v in arr.reshape(-1)], arr.ndim == 0


class _Eval:
    """Symbolic values of small int64 tensors and shapes: var -> (list of PrimExpr, is_scalar)."""

    def __init__(self, sig_vars):
        self.vals: dict = {}
        self.ana = Analyzer()
        for v in sig_vars:
            self.ana.update(v, ConstIntBound(0, ConstIntBound.POS_INF))

    def safe_value(self, e):
        """``value``, or None where the evaluator cannot read the expression: it is then simply not folded."""
        try:
            return self.value(e)
        except Exception:  # noqa: BLE001 - TVM raises builtin types on attrs / fields it lacks
            return None

    def value(self, e):
        if isinstance(e, tvm.ir.Constant):
            return _const_values(e)
        if isinstance(e, relax.ShapeExpr):
            return list(e.values), False
        if isinstance(e, relax.Var):
            return self.vals.get(e)
        if isinstance(e, relax.Call):
            return self.call(e)
        return None

    def call(self, call: relax.Call):
        op = getattr(call.op, "name", None)
        args = list(call.args)
        if op == "relax.shape_of":
            ty = args[0].ty
            shape = getattr(ty, "shape", None)
            values = getattr(shape, "values", None) if shape is not None else None
            return (list(values), False) if values is not None and len(values) <= MAX_LEN else None
        if op == "relax.astype" and not str(getattr(call.attrs, "dtype", "")).startswith(("int", "uint")):
            return None                 # a float cast: its arithmetic is not integer arithmetic
        if op in ("relax.shape_to_tensor", "relax.tensor_to_shape", "relax.astype"):
            v = self.value(args[0])
            return None if v is None else (v[0], v[1] and op != "relax.tensor_to_shape")
        if op == "relax.reshape":
            v = self.value(args[0])
            shape = getattr(call.ty, "shape", None)
            ndim = len(shape.values) if shape is not None and getattr(shape, "values", None) is not None else None
            return None if v is None or ndim is None or ndim > 1 else (v[0], ndim == 0)
        if op == "relax.negative":
            v = self.value(args[0])
            return None if v is None else ([-x for x in v[0]], v[1])
        if op in _BINARY:
            a, b = self.value(args[0]), self.value(args[1])
            if a is None or b is None:
                return None
            (xa, sa), (xb, sb) = a, b
            if len(xa) != len(xb) and 1 not in (len(xa), len(xb)):
                return None
            n = max(len(xa), len(xb))
            xa, xb = (xa * n if len(xa) == 1 else xa), (xb * n if len(xb) == 1 else xb)
            return [_BINARY[op](_i64(p), _i64(q)) for p, q in zip(xa, xb)], sa and sb
        if op == "relax.take":
            v, idx = self.value(args[0]), self.value(args[1])
            if v is None or idx is None or not all(isinstance(i, tirx.IntImm) for i in idx[0]):
                return None
            n = len(v[0])
            picked = [v[0][int(i.value) % n] for i in idx[0] if -n <= int(i.value) < n]
            return (picked, idx[1]) if len(picked) == len(idx[0]) else None
        if op == "relax.concat":
            parts = [self.value(a) for a in (args[0].fields if isinstance(args[0], relax.Tuple) else [])]
            if not parts or any(p is None for p in parts):
                return None
            return [x for p in parts for x in p[0]], False
        return None

    def simplify(self, e):
        return self.ana.simplify(e)


def _signature_vars(f: relax.Function) -> list:
    out = []
    for p in f.params:
        shape = getattr(p.ty, "shape", None)
        for d in (getattr(shape, "values", None) or []) if shape is not None else []:
            if isinstance(d, tirx.Var) and not any(d.same_as(o) for o in out):
                out.append(d)
    return out


def fold_function(f: relax.Function) -> relax.Function:
    """``f`` with every variable a ``match_cast`` binds to a symbolically known size replaced by that size."""
    sig = _signature_vars(f)
    ev = _Eval(sig)
    defined = list(sig)
    mapping: dict = {}
    body = f.body
    for blk in getattr(body, "blocks", []):
        for b in blk.bindings:
            if isinstance(b, relax.MatchCast):
                known = ev.safe_value(b.value)
                target = b.ty
                values = getattr(target, "values", None) if isinstance(target, relax.ShapeType) else None
                if known is not None and values is not None and len(values) == len(known[0]):
                    for want, have in zip(values, known[0]):
                        if isinstance(want, tirx.Var) and not any(want.same_as(d) for d in defined):
                            mapping[want] = ev.simplify(have)   # in terms of the signature's sizes
                            ev.ana.bind(want, mapping[want])
                ev.vals[b.var] = known
                if values is not None:
                    defined += [v for v in values if isinstance(v, tirx.Var)]
            else:
                val = ev.safe_value(b.value)
                if val is not None:
                    ev.vals[b.var] = val
    if not mapping:
        return f
    return _Reinfer().visit_expr(f.bind_symbolic_vars(mapping))


@relax.expr_functor.mutator
class _Reinfer(relax.PyExprMutator):
    """Operator calls rebuilt so their result types are inferred again from the now known sizes (a tensor
    broadcast against a data-dependent one had an unknown shape)."""

    def visit_call_(self, call):  # noqa: D401 - PyExprMutator hook
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name.startswith("relax.") and call.op.name not in _KEEP:
            return self.builder_.normalize(relax.Call(call.op, call.args, call.attrs, call.ty_args))
        return call


_KEEP = ("relax.call_tir", "relax.call_pure_packed", "relax.call_packed", "relax.call_dps_packed")


def fold_shapes_pass() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="qie.FoldShapeArithmetic")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, relax.Function):
                mod[gv] = fold_function(f)
        return mod

    return _pass


__all__ = ["fold_shapes_pass", "fold_function"]
