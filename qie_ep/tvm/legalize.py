"""Quantize lowered with ONNX Runtime's rounding (qie's numerics contract, ``qie_ep.reference``).

TVM 0.27 legalizes ``relax.quantize`` as ``clip(round(x / scale) + zp)`` with ``round`` = half away from
zero (LLVM's ``llvm.round``, which x86 has no vector instruction for: each lane becomes a libm call).
ONNX QuantizeLinear and ONNX Runtime round half to even (``nearbyint``: one ``vrndscaleps``), so a value
exactly between two codes (``x / scale = k + 0.5``) got a different code on TVM than on ORT.
``legalize_map()`` is passed to ``relax.transform.LegalizeOps`` by ``qie_ep.tvm.pipeline``.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.transform.legalize_ops.common import _try_convert_to_scalar_const
from tvm.relax.transform.legalize_ops.qdq import _is_singleton_qparam, clip_cast, is_const_scalar


def _qparam(p, indices, axis):
    if is_const_scalar(p):
        return p
    if isinstance(p, te.Tensor) and _is_singleton_qparam(p):
        return p[(0,) * len(p.shape)]
    return p[indices[axis]]


def quantize(bb, call):
    """``saturate(nearbyint(x / scale) + zp)``: ORT's QuantizeLinear (MLAS divides, then rounds to even)."""
    axis, out_dtype = call.attrs.axis, call.attrs.out_dtype

    def te_quantize(data, scale, zp):
        def compute(*idx):
            scaled = data[idx] / _qparam(scale, idx, axis)
            v = tirx.nearbyint(scaled) if "int" in out_dtype else scaled
            return clip_cast(v + _qparam(zp, idx, axis), out_dtype)

        return te.compute(data.shape, compute, name="quantized")

    return bb.call_te(te_quantize, call.args[0], _try_convert_to_scalar_const(call.args[1]),
                      _try_convert_to_scalar_const(call.args[2]), primfunc_name_hint="quantize")


def legalize_map() -> dict:
    return {"relax.quantize": quantize}
