"""qie for TVM: ONNX import for quantized ops, and a Relax pipeline that runs them on qie's kernels.

    mod = qie_ep.tvm.from_onnx(model)                      # TVM's importer + the quantized ops it lacks
    ex = tvm.compile(mod, target, relax_pipeline=qie_ep.tvm.pipeline(target))

``pipeline(target)`` = qie's rewrite (quantized matmul / conv2d groups -> qie's scheduled PrimFuncs)
followed by the pipeline ``tvm.compile`` would use by default for that target. Relay and
``relay.build`` were removed from TVM in 0.20; ``tvm.compile`` is their successor.
This package (with its ``schedules``) is the only place qie imports TVM.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax

from .schedules import isa as _isa

from .dynamic import dynamic_range_pass
from .frontend import from_onnx
from .legalize import legalize_map
from .rewrite import Unsupported, rewrite
from .shapes import fold_shapes_pass
from .tables import tables_pass

_log = logging.getLogger("qie_ep.tvm")

__all__ = ["from_onnx", "pipeline", "tune", "rewrite_pass", "kernel_calls", "isa_for", "Unsupported"]


def _target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def isa_for(target) -> str:
    """The qie kernel family ``target`` gets (``QIE_TVM_ISA`` forces one)."""
    return _isa.for_target(_target(target)).name


def rewrite_pass(target) -> tvm.transform.Pass:
    """qie's Relax pass alone: sizes the graph computes from its input shapes folded into expressions
    (``qie_ep.tvm.shapes``), then quantized groups -> calls to qie's scheduled PrimFuncs; on CPU targets
    DynamicQuantizeLinear's scale and zero point from one vectorized pass (``qie_ep.tvm.dynamic``)."""
    t = _target(target)
    isa = _isa.for_target(t)
    ktarget = _isa.kernel_target(t) if t.kind.name == "llvm" else None

    @tvm.transform.module_pass(opt_level=0, name="qie.RewriteQuantized")
    def _rewrite(mod, _ctx):
        mod = rewrite(fold_shapes_pass()(mod), isa, ktarget, t)
        return dynamic_range_pass(ktarget)(mod) if ktarget is not None else mod

    return _rewrite


def _default(target: tvm.target.Target) -> tvm.transform.Pass:
    """What ``tvm.compile(..., relax_pipeline="default")`` runs for this target."""
    if "gpu" in target.keys:
        try:
            return relax.get_default_pipeline(target)
        except (ValueError, AttributeError):
            pass
    return relax.get_pipeline("default")


def _pre_schedule(t: tvm.target.Target, fuse: bool, opaque_compound: bool = False) -> list:
    """Library dispatch, legalize (+ fuse; ``opaque_compound``: not the operators with compound symbolic
    sizes): the module whose PrimFuncs the rules (or a tuning database) schedule."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    legalize = [relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(legalize_map()),
                relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant()]
    if fuse:
        legalize += [*([_opaque_compound_shapes()] if opaque_compound else []), relax.transform.FuseOps(),
                     relax.transform.FuseTIR()]
    return cpu_generic.library_dispatch_passes(t) + legalize + [tables_pass(t), _narrow_store_safe(t)]


def _cpu_passes(t: tvm.target.Target, fuse: bool, database: str | None = None, opaque_compound: bool = False) -> list:
    """Legalize (+ fuse), schedule with qie's CPU rules, lower: TVM's CPU pipeline with a scheduler.
    ``database``: a MetaSchedule work directory (``tune``) whose schedules are applied first; the rules
    schedule what it does not hold."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight
    from . import cpu_rules

    tuned = [relax.transform.MetaScheduleApplyDatabase(database)] if database else []
    return (_pre_schedule(t, fuse, opaque_compound) + tuned + [dlight.ApplyDefaultSchedule(*cpu_rules.rules())]
            + cpu_generic.dataflow_lower_passes(t) + cpu_generic.finalize_passes(t))


def _opaque_compound_shapes() -> tvm.transform.Pass:
    """Operators TVM 0.27 cannot lower fused with symbolic shapes stay unfused: those with a tensor dimension
    computed from symbolic sizes (``8 * (n * m)``), and those defining a size no other tensor of theirs
    has (``arange`` with data-dependent bounds, whose length is bound after the call). Fused, VMShapeLower
    fails with "PrimExpr ... has not been computed" (TVM issues 20195 / 20177); the rest still fuses."""

    def shapes(f):
        out = []
        for p in f.params:
            buf = p if hasattr(p, "shape") else (f.buffer_map.get(p) if hasattr(f, "buffer_map") else None)
            if buf is not None:
                out.append(list(buf.shape))
        return out

    def unfusable(f) -> bool:
        dims = shapes(f)
        if any(not isinstance(d, (tvm.tirx.IntImm, tvm.tirx.Var)) for ds in dims for d in ds):
            return True
        for i, ds in enumerate(dims):
            others = {d.name for j, o in enumerate(dims) if j != i for d in o if isinstance(d, tvm.tirx.Var)}
            if any(isinstance(d, tvm.tirx.Var) and d.name not in others for d in ds):
                return True
        return False

    @tvm.transform.module_pass(opt_level=0, name="qie.OpaqueCompoundShapes")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tvm.tirx.PrimFunc) and unfusable(f):
                mod[gv] = f.with_attr("op_pattern", 8)
        return mod

    return _pass


def _stores_narrow(f: tvm.tirx.PrimFunc) -> bool:
    """Whether ``f`` writes any element narrower than 32 bits: every store and every block's write region
    in its statement tree (TVM 0.27 exposes no TIR visitor to Python)."""
    stack = [f.body]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, tvm.tirx.BufferStore) and tvm.DataType(node.buffer.dtype).bits < 32:
            return True
        for region in getattr(node, "writes", None) or []:
            if tvm.DataType(region.source.dtype).bits < 32:
                return True
        for field in ("body", "block", "init", "then_case", "else_case"):
            stack.append(getattr(node, field, None))
        stack.extend(getattr(node, "seq", None) or [])
    return False


def _narrow_store_safe(t: tvm.target.Target) -> tvm.transform.Pass:
    """Every PrimFunc that stores 8- or 16-bit elements compiled with LLVM's loop vectorizer off (qie's
    rules vectorize explicitly): LLVM 22 miscompiles the scalar remainder of auto-vectorized uint8/int8
    stores on AVX-512. The others keep it: it vectorizes the loops no rule could (a symbolic width)."""
    kt = _isa.kernel_target(t)

    @tvm.transform.module_pass(opt_level=0, name="qie.NarrowStoreSafe")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if (isinstance(f, tvm.tirx.PrimFunc) and (f.attrs is None or "target" not in f.attrs)
                    and _stores_narrow(f)):
                mod[gv] = f.with_attr("target", kt)
        return mod

    return _pass


def _cpu_pipeline(t: tvm.target.Target, database: str | None = None) -> tvm.transform.Pass:
    """Fused when TVM can lower the fused module; else fused but for the operators with compound symbolic
    sizes; else unfused (each fallback logged on ``qie_ep.tvm``). With symbolic shapes TVM 0.27's FuseOps
    may move a binding that uses a size bound by a later ``match_cast`` (a data-dependent ``arange``
    length) above that ``match_cast``; VMShapeLower then fails with "PrimExpr ... has not been computed"
    (TVM issues 20195 / 20177). ``qie_ep.tvm.shapes`` folds the shape arithmetic that caused it in the
    demo's models (which now all fuse whole: PP-OCRv6 with a symbolic width ran ~2,000 operator calls
    unfused, ~1 ms of VM overhead)."""
    attempts = [dict(fuse=True), dict(fuse=True, opaque_compound=True), dict(fuse=False)]

    @tvm.transform.module_pass(opt_level=0, name="qie.CpuPipeline")
    def _pass(mod, _ctx):
        with t:
            for i, how in enumerate(attempts):
                try:
                    return tvm.transform.Sequential(_cpu_passes(t, database=database, **how))(mod)
                except Exception as e:  # noqa: BLE001 - TVM raises builtin error types; the next one lowers
                    if i == len(attempts) - 1:
                        raise
                    _log.info("qie: lowering (%s) failed (%s); trying %s", how, str(e).splitlines()[0] if str(e)
                              else type(e).__name__, attempts[i + 1])

    return _pass


def pipeline(target, fast_math: bool = True, database: str | None = None) -> tvm.transform.Pass:
    """The one change for a TVM user: ``tvm.compile(mod, target, relax_pipeline=pipeline(target))``.

    qie's rewrite, then (``fast_math``) TVM's FastMathTransform on the float ops left (erf, exp, tanh,
    softmax become polynomial approximations instead of scalar libm calls: MiniLM's GELU erf was its largest
    cost; relative error ~1e-6, bounded in tests/tvm/test_tvm_graphs.py). On CPU (llvm) targets the rest is
    TVM's CPU pipeline (legalize, fuse) with every PrimFunc scheduled by qie's CPU rules
    (``qie_ep.tvm.cpu_rules``); on other targets, TVM's default pipeline for the target.
    ``database``: the work directory ``tune`` wrote (CPU targets): its tuned schedules are applied to the
    PrimFuncs it holds, the rules schedule the rest.
    """
    t = _target(target)
    passes = _front(t, fast_math)
    if t.kind.name == "llvm":
        passes.append(_cpu_pipeline(t, database))
    else:  # quantize with ORT's rounding, then the target's own pipeline (which legalizes the rest)
        if database:
            raise ValueError("qie_ep.tvm.pipeline: a tuning database applies to CPU (llvm) targets only")
        passes += [relax.transform.LegalizeOps(legalize_map()), _default(t)]
    return tvm.transform.Sequential(passes, name="qie.pipeline")


def _front(t: tvm.target.Target, fast_math: bool) -> list:
    return [rewrite_pass(t)] + ([relax.transform.FastMathTransform()] if fast_math else [])


def tune(mod: tvm.IRModule, target, trials: int, work_dir: str, fast_math: bool = True,
         cost_model: str | None = None, **tune_relax_options) -> str:
    """MetaSchedule-tune, for ``pipeline(target, database=work_dir)``, the PrimFuncs qie's CPU pipeline
    leaves to TVM (float layers, elementwise and reduction functions; qie's own kernels are already
    scheduled and are not tasks). ``trials``: MetaSchedule's global trial budget (each one builds and runs a
    candidate in a worker process: about a second or more each on a small host; a useful search takes
    hundreds per task). Static shapes only (MetaSchedule's limit). Needs ``psutil`` (and ``xgboost`` for
    the default cost model; without it the search is random); ``tune_relax_options`` go to MetaSchedule's
    ``tune_relax`` (``builder``, ``runner``, ``max_trials_per_task``, ...). Returns ``work_dir``. A function
    whose tuned schedule is slower than the rule's is still applied: tune with enough trials, or not at all."""
    from tvm.s_tir import meta_schedule as ms

    t = _target(target)
    if t.kind.name != "llvm":
        raise ValueError("qie_ep.tvm.tune: CPU (llvm) targets only")
    if cost_model is None:
        try:
            import xgboost  # noqa: F401
            cost_model = "xgb"
        except ImportError:
            cost_model = "random"
    with t:
        pre = tvm.transform.Sequential(_front(t, fast_math) + _pre_schedule(t, fuse=True))(mod)
    options = {"num_trials_per_iter": min(64, max(1, trials)), "cost_model": cost_model, **tune_relax_options}
    ms.relax_integration.tune_relax(pre, {}, t, work_dir, max_trials_global=trials, **options)
    return work_dir


def kernel_calls(mod: tvm.IRModule) -> list[str]:
    """Names of the qie kernels a (rewritten) module calls, one entry per call site."""
    names = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            gv = e.args[0]
            f = mod[gv]
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "qie.kernel" in f.attrs:
                names.append(str(f.attrs["qie.kernel"]))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return names
