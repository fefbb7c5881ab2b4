"""CUDA kernels: the integer core ``C[m, n] = sum_k A[m, k] * B[n, k]`` (s8 x s8 -> s32) on dp4a or on
tensor cores (IMMA, ``mma.sync`` s8 through WMMA fragments), for sm_80 and sm_90.

On CUDA a qie group is three PrimFuncs (the Relax pass emits them in a row): ``prep`` shifts the
activations to s8 and pads K (conv: builds the patch rows), ``core`` (here, scheduled), and ``epilogue``
(zero-point terms, requantization, layout). ``prep`` and ``epilogue`` are plain elementwise /
reduction PrimFuncs that TVM's CUDA pipeline schedules itself (dlight); only the core is qie's.

1. dp4a: 64 x 64 output tile per block, 16 x 16 threads, 4 x 4 outputs per thread in registers; A and
   B (int8 packed four to an int32 word) staged in shared memory 16 k at a time; each thread's inner
   step is one ``__dp4a`` per output. (TVM's ``dp4a_s8s8s32`` tensor intrinsic does not match a cached
   block here, so the instruction is the reduction's body instead of a tensorized loop.)
2. IMMA: TVM's int8 tensor-core rule (dlight ``MatmulInt8Tensorization``: 16x16x16 s8 WMMA fragments,
   shared-memory staging) without its software-pipeline annotations, whose injection fails in TVM 0.27
   ("GetWmmaFragmentSize ... fragment_info_"), so loads are not overlapped with math yet.
The development and CI machines have no GPU: these kernels are compiled and their CUDA source checked
(tests/tvm/test_tvm_cuda.py); ``tests/gpu/`` runs them on a lent GPU (H100, 2026-11-26: both bit-exact with
ORT after the dp4a staging fix in ``schedule_dp4a``).
"""

from __future__ import annotations

import re

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from .gemm import i64
from .isa import Isa

KPAD = 16      # K padding of the CUDA core (16 k per shared-memory stage)
NPAD = 64      # column padding (one block tile)

_PIPELINE_KEYS = ("software_pipeline_stage", "software_pipeline_order", "software_pipeline_async_stages")


def _dp4a_emulated(a, b):
    """``__dp4a(a, b, 0)`` in plain TIR: the four sign-extended byte products of two int32 words summed
    (bytes little-endian, as ``prep`` and ``pack_weights`` pack them). For running the dp4a core on a CPU."""
    def byte(w, j):
        return (w << (24 - 8 * j)) >> 24  # arithmetic shift: sign-extends byte j
    return sum(byte(a, j) * byte(b, j) for j in range(4))


def core_primfunc(kp: int, np_: int, name: str, dp4a: bool, emulate: bool = False) -> tirx.PrimFunc:
    """Unscheduled s8 x s8 -> s32 core with symbolic rows (``kp`` % 16 == 0, ``np_`` % 64 == 0).

    dp4a: A and B arrive as int32 words of 4 packed int8 (``[m, kp/4]``, ``[np_, kp/4]``) and each
    reduction step is ``__dp4a(a, b, 0)`` (``emulate``: the same in plain TIR, so that the core with its
    packing runs on a CPU); IMMA: plain int8 ``[m, kp]`` and ``[np_, kp]``.
    """
    if dp4a:
        # Rows are a multiple of the 64-row block tile (``prep`` pads them), passed as ``mt`` blocks (a
        # scalar parameter before the output): with
        # a plain symbolic row count TVM sizes the shared-memory tiles dynamically and its CUDA codegen
        # fails ("bad optional access").
        mt = tirx.Var("mt", "int64")
        a = te.placeholder((mt * 64, i64(kp // 4)), "int32", name="A")
        b = te.placeholder((i64(np_), i64(kp // 4)), "int32", name="B")
        q = te.reduce_axis((i64(0), i64(kp // 4)), name="q")
        def step(i, j):
            if emulate:
                return _dp4a_emulated(a[i, q], b[j, q])
            return tirx.call_pure_extern("int32", "__dp4a", a[i, q], b[j, q], tirx.const(0, "int32"))
        c = te.compute((mt * 64, i64(np_)), lambda i, j: te.sum(step(i, j), axis=q), name="C")
        return te.create_prim_func([a, b, mt, c]).with_attr("global_symbol", name)
    else:
        m = tirx.Var("m", "int64")
        a = te.placeholder((m, i64(kp)), "int8", name="A")
        b = te.placeholder((i64(np_), i64(kp)), "int8", name="B")
        k = te.reduce_axis((i64(0), i64(kp)), name="k")
        c = te.compute((m, i64(np_)), lambda i, j: te.sum(
            a[i, k].astype("int32") * b[j, k].astype("int32"), axis=k), name="C")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", name)


def schedule_dp4a(f: tirx.PrimFunc) -> tirx.PrimFunc:
    s = Schedule(tvm.IRModule({"main": f}))
    cb = s.get_sblock("C")
    i, j, q = s.get_loops(cb)
    by, ty, ii = s.split(i, [None, 16, 4])
    bx, tx, jj = s.split(j, [None, 16, 4])
    qo, qi = s.split(q, [None, KPAD // 4])
    s.reorder(by, bx, ty, tx, qo, qi, ii, jj)
    local = s.cache_write(cb, 0, "local")
    s.reverse_compute_at(local, tx)
    # Bind the block and thread loops before staging: compute_at then relaxes the shared tiles over the
    # thread axes (the whole block's 64 x 4 words of A and of B, fetched by all 256 threads). Bound
    # after, each tile would cover one thread's rows only, and the other threads would read shared
    # memory no one wrote (wrong results on a GPU; caught on an H100, not by CPU emulation).
    s.bind(by, "blockIdx.y")
    s.bind(bx, "blockIdx.x")
    s.bind(ty, "threadIdx.y")
    s.bind(tx, "threadIdx.x")
    for idx in (0, 1):
        sh = s.cache_read(cb, idx, "shared")
        s.compute_at(sh, qo)
        fused = s.fuse(*s.get_loops(sh)[-2:])
        _, fty, ftx = s.split(fused, [None, 16, 16])
        s.bind(fty, "threadIdx.y")
        s.bind(ftx, "threadIdx.x")
    s.decompose_reduction(cb, qo)
    s.unroll(ii)
    s.unroll(jj)
    return s.mod["main"]


def schedule_imma(f: tirx.PrimFunc, target) -> tirx.PrimFunc:
    from tvm.s_tir.dlight.gpu.matmul import MatmulInt8Tensorization

    t = tvm.target.Target(target)
    with t:
        s = MatmulInt8Tensorization().apply(f, t, False)
    if s is None:
        raise ValueError("qie CUDA: TVM's int8 tensor-core rule does not apply to this core")
    names = set(re.findall(r'T\.sblock\("([^"]+)"', s.mod.script()))
    for name in names:
        for loop in s.get_loops(s.get_sblock(name)):
            ann = s.get(loop).annotations
            for key in _PIPELINE_KEYS:
                if key in ann:
                    s.unannotate(loop, key)
    return s.mod["main"]


def scheduled_core(kp: int, np_: int, isa: Isa, target) -> tirx.PrimFunc:
    """The scheduled core for ``isa`` (cuda_dp4a / cuda_imma), marked so TVM's pipeline leaves it alone."""
    if isa.name not in ("cuda_dp4a", "cuda_imma"):
        raise ValueError(f"qie CUDA: {isa.name} is not a CUDA kernel family")
    if kp % KPAD or np_ % NPAD:
        raise ValueError(f"qie CUDA: core K={kp} / N={np_} must be multiples of {KPAD} / {NPAD}")
    name = f"qie_gemm_s8s8_s32_k{kp}n{np_}__{isa.name}"
    f = core_primfunc(kp, np_, name, isa.name == "cuda_dp4a")
    f = schedule_dp4a(f) if isa.name == "cuda_dp4a" else schedule_imma(f, target)
    return f.with_attr("tirx.is_scheduled", True).with_attr("qie.kernel", name).with_attr("global_symbol", name)


def source(func: tirx.PrimFunc, target) -> str:
    """The CUDA C source TVM generates for one scheduled PrimFunc (compiles it; needs no GPU)."""
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=tvm.target.Target(target))
    return lib.imports[0].inspect_source()


# -- the three PrimFuncs of a matmul group on CUDA ------------------------------------------------------

def pack_weights(b, zb, isa: Isa):
    """Constant [K, N] weights -> (B' as the core takes it, colsum[Np], zb'[Np]); B' is [Np, Kp] int8
    (IMMA) or the same bytes as int32 words [Np, Kp/4] (dp4a)."""
    import numpy as np

    from . import gemm
    k, n = b.shape
    _, sb = gemm.shifts(isa, "int8", str(b.dtype))
    kp, np_ = gemm._ceil(max(k, 1), KPAD), gemm._ceil(max(n, 1), NPAD)
    bt = np.zeros((np_, kp), np.int8)
    bt[:n, :k] = (b.astype(np.int32) + sb).astype(np.int8).T
    colsum = bt[:, :k].astype(np.int32).sum(axis=1, dtype=np.int32)
    zbs = np.zeros(np_, np.int32)
    zbs[:n] = np.broadcast_to(np.asarray(zb, np.int32).reshape(-1), (n,)) + sb
    packed = np.ascontiguousarray(bt.view(np.int32)) if isa.name == "cuda_dp4a" else bt
    return packed, colsum, zbs, kp, np_


def prep_primfunc(a_dtype: str, k: int, kp: int, isa: Isa) -> tirx.PrimFunc:
    """A [m, K] u8/s8 -> the core's A: shifted to s8 and zero padded to Kp (dp4a: also rows to the 64-row
    tile, packed four to an int32 word little-endian, params (A, mt, A32))."""
    from . import gemm
    sa, _ = gemm.shifts(isa, a_dtype, "int8")
    m = tirx.Var("m", "int64")
    a = te.placeholder((m, i64(k)), a_dtype, name="A")

    def byte(i, kk):
        v = a[i, kk].astype("int32") + sa
        return tirx.if_then_else(tirx.all(i < m, kk < k), v, 0)

    if isa.name == "cuda_dp4a":
        mt = tirx.Var("mt", "int64")
        out = te.compute((mt * 64, i64(kp // 4)), lambda i, w: (
            (byte(i, w * 4) & 0xFF) | ((byte(i, w * 4 + 1) & 0xFF) << 8) | ((byte(i, w * 4 + 2) & 0xFF) << 16)
            | (byte(i, w * 4 + 3) << 24)), name="A32")
        return te.create_prim_func([a, mt, out]).with_attr("global_symbol", f"qie_prep_{a_dtype}_k{k}__{isa.name}")
    out = te.compute((m, i64(kp)), lambda i, kk: byte(i, kk).astype("int8"), name="Ap")
    return te.create_prim_func([a, out]).with_attr("global_symbol", f"qie_prep_{a_dtype}_k{k}__{isa.name}")


def rowsum_primfunc(a_dtype: str, k: int, sa: int) -> tirx.PrimFunc:
    """rowsum(a')[m] = sum_k (a[m, k] + sa), for the zero-point term of weights with zb' != 0."""
    m = tirx.Var("m", "int64")
    a = te.placeholder((m, i64(k)), a_dtype, name="A")
    r = te.reduce_axis((i64(0), i64(k)), name="r")
    out = te.compute((m,), lambda i: te.sum(a[i, r].astype("int32") + sa, axis=r), name="rowsum")
    return te.create_prim_func([a, out]).with_attr("global_symbol", f"qie_rowsum_{a_dtype}_k{k}")


def epilogue_primfunc(k: int, n: int, np_: int, epi, sa: int, name: str) -> tirx.PrimFunc:
    """(C [rows, Np] int32, colsum, za, [zb, rowsum], epilogue operands...) -> O [m, N]."""
    from . import gemm
    m, rows = tirx.Var("m", "int64"), tirx.Var("rows", "int64")
    c = te.placeholder((rows, i64(np_)), "int32", name="C")
    colsum = te.placeholder((i64(np_),), "int32", name="colsum")
    za = te.placeholder((i64(1),), "int32", name="za")
    params = [c, colsum, za]
    if epi.zb:
        zb = te.placeholder((i64(np_),), "int32", name="zb")
        rowsum = te.placeholder((m,), "int32", name="rowsum")
        params += [zb, rowsum]
    zap = za[0] + sa

    def acc(i, j):
        v = c[i, j] - zap * colsum[j]
        if epi.zb:
            v = v - zb[j] * rowsum[i] + tirx.const(k, "int32") * zap * zb[j]
        return v

    eparams, o = gemm.epilogue_stage(acc, lambda i, j: j, epi, (m, i64(n)), n)
    return te.create_prim_func([*params, *eparams, o]).with_attr("global_symbol", name)
