"""qie's CPU schedule rules for what a model leaves to TVM after qie's kernels took the quantized layers.

TVM 0.27 has no untuned CPU scheduler: ``tvm.compile``'s default pipeline runs every legalized operator as
written (one scalar, single-threaded loop nest per operator), and dlight's CPU rules cover only GEMV and
reductions. These rules follow dlight's contract (``apply`` returns a schedule, or ``None`` when the rule
does not fit the PrimFunc; the first rule that fits wins) and are applied by
``dlight.ApplyDefaultSchedule`` in ``qie_ep.tvm.pipeline``:

* ``Matmul``: float32 matmul / dense / batch matmul (and fused epilogues): register tile of ``rows`` x
  ``vecs`` vectors kept in a local buffer over K, column tiles in parallel, the epilogue per tile;
* ``Conv2d``: float32 NCHW conv2d (incl. depthwise / grouped): output rows vectorized along the width, a
  register tile of output channels, the padded input materialised once;
* ``Injective``: producers inlined into their consumer, the loop nest fused, vectorized by the widest
  lane count that divides it exactly and run in parallel above ``PARALLEL_MIN`` elements;
* ``Reduction``: softmax / LayerNorm / mean-style functions (dlight's CPU rule, rows vectorized with a
  scalar tail), then
* ``Fallback``: anything else: producers inlined where legal, each remaining block's leading spatial
  loops fused and run in parallel.

Vector loops are only ever emitted with an extent the lane count divides: TVM 0.27 lowers a predicated
(partial) vector store of narrow types as an unmasked one, and LLVM 22's own loop vectorizer miscompiles
the scalar remainder of uint8 stores on AVX-512, so every PrimFunc these rules schedule is compiled with
LLVM's loop vectorizer off (see ``qie_ep.tvm.schedules.isa.kernel_target``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.s_tir.dlight.base.utils import get_extent
from tvm.s_tir.dlight.cpu import Reduction as _DlightReduction
from tvm.target import Target

PARALLEL_MIN = 1 << 14   # loop nests with fewer output elements run on the calling thread


@dataclass(frozen=True)
class CpuParams:
    """Per-ISA parameters: float32 lanes per vector register, and the float register tiles."""
    lanes: int            # float32 lanes (16 on AVX-512, 8 on AVX2, 4 otherwise)
    mm_rows: int          # matmul register tile rows
    mm_vecs: int          # matmul register tile vectors per row
    conv_oc: int          # conv2d register tile output channels


STACK_BYTES = 1024     # TVM 0.27 allocates a constant-size "global" buffer under this on the stack
PARAMS = {512: CpuParams(16, 4, 4, 6), 256: CpuParams(8, 4, 3, 6), 128: CpuParams(4, 4, 3, 4)}


def params(target: Target) -> CpuParams:
    """The row of ``PARAMS`` for the target's widest float vector."""
    from tvm.target.codegen import llvm_get_vector_width
    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe gets the portable row
        bits = 128
    return PARAMS[512 if bits >= 512 else 256 if bits >= 256 else 128]


def _const(x) -> int | None:
    if isinstance(x, int):
        return x
    return int(x.value) if isinstance(x, tirx.IntImm) else None


class CpuRule(ScheduleRule):
    """A rule for LLVM targets; subclasses implement ``schedule(sch, target)``."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            sch = s_tir.Schedule(func)
            return self.schedule(sch, target)
        except Exception:  # noqa: BLE001 - a rule that does not fit a PrimFunc declines it
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target):
        raise NotImplementedError


def _write_dtype(sch: s_tir.Schedule, block) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


def _bits(dtype: str) -> int:
    digits = "".join(c for c in dtype if c.isdigit())
    return max(8, int(digits)) if digits else 8


def vectorize_exact(sch: s_tir.Schedule, loop, lanes: int):
    """Split ``loop`` by the widest of ``lanes``, ``lanes/2``, ``lanes/4`` (>= 4) that divides its constant
    extent and vectorize the inner part; returns the outer loop (``loop`` itself if none divides)."""
    extent = _const(get_extent(sch, loop))
    if extent is None:
        return loop
    for v in (lanes, lanes // 2, lanes // 4):
        if v >= 4 and extent % v == 0 and extent >= v:
            if extent == v:
                sch.vectorize(loop)
                return None
            outer, inner = sch.split(loop, factors=[None, v])
            sch.vectorize(inner)
            return outer
    return loop


def vectorize_with_tail(sch: s_tir.Schedule, loop, lanes: int):
    """``vectorize_exact``, and where no lane count divides the extent: the loop partitioned into a part
    the widest fitting count divides (vectorized) and a scalar tail. Returns the loop above which loops
    may still be fused (``None`` when the loop was partitioned or vectorized whole)."""
    rest = vectorize_exact(sch, loop, lanes)
    if rest is not loop:
        return rest
    extent = _const(get_extent(sch, loop))
    v = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and extent is not None and extent > v), None)
    if v is None:
        return loop
    main, _tail = sch.loop_partition(loop, [extent // v * v, None])
    _, inner = sch.split(main, factors=[None, v])
    sch.vectorize(inner)
    return None


def _work(sch: s_tir.Schedule, loops) -> int | None:
    """The number of iterations of a loop nest, or None when an extent is symbolic."""
    work = 1
    for lp in loops:
        e = _const(get_extent(sch, lp))
        work = None if e is None or work is None else work * e
    return work


def _parallel(sch: s_tir.Schedule, loop, work) -> None:
    if loop is not None and (work is None or work >= PARALLEL_MIN):
        sch.parallel(loop)


def _spatial_nest(sch: s_tir.Schedule, block, lanes: int) -> None:
    """An all-spatial block: its innermost loop vectorized (``vectorize_with_tail``), every other loop
    fused and parallel. (Fusing the innermost loop with the others before vectorizing would turn
    contiguous loads into gathers: TVM cannot simplify the fused index back to a ramp.)"""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = _work(sch, loops)
    if len(loops) > 1 and _const(get_extent(sch, loops[-1])) is None:
        # A symbolic innermost extent (a text line's width): the other loops fused and parallel, the
        # innermost one left whole (LLVM vectorizes it where the function stores no 8-bit type, see
        # ``qie_ep.tvm._narrow_store_safe``); fused with the others it would cost a division per element.
        _parallel(sch, sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0], total)
        return
    bits = _bits(_write_dtype(sch, block))
    width = min(64, lanes * 32 // bits) if bits < 32 else lanes
    rest = vectorize_with_tail(sch, loops[-1], width)
    outer = [*loops[:-1], *([rest] if rest is not None else [])]
    if outer:
        _parallel(sch, sch.fuse(*outer) if len(outer) > 1 else outer[0], total)


class Injective(CpuRule):
    """Elementwise / broadcast / layout functions (every block spatial)."""

    def schedule(self, sch, target):
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(b.is_injective() for b in infos):
            return None
        infos = try_inline(sch, infos)
        lanes = params(target).lanes
        for b in infos:
            _spatial_nest(sch, b.block_rv, lanes)
        return sch


def _one_float_reduction(sch):
    """(producers, the one reduction block, consumers) when the PrimFunc has exactly one reduction block
    and it writes float32; else None."""
    infos = normalize_prim_func(sch)
    red = [i for i, b in enumerate(infos or []) if not b.is_injective()]
    if len(red) != 1 or _write_dtype(sch, infos[red[0]].block_rv) != "float32":
        return None
    i = red[0]
    return infos[:i], infos[i], infos[i + 1:]


def _producers(sch, before, lanes, main=None) -> bool:
    """Producers of the reduction's operands (padding, dequantize) stay materialised, each a parallel
    vectorized nest; a producer only the epilogue reads (a dequantized residual) is inlined into it, since
    the epilogue runs per tile inside the reduction's loops where a root block cannot be reached."""
    reads = {r.source.name for r in sch.get(main.block_rv).reads} if main is not None else None
    for b in before:
        if not all(k == "S" for k in b.dom_kind()):
            return False
        if reads is not None and sch.get(b.block_rv).writes[0].source.name not in reads:
            try:
                sch.compute_inline(b.block_rv)
                continue
            except Exception:  # noqa: BLE001 - not inlinable: the rule declines below
                return False
        _spatial_nest(sch, b.block_rv, lanes)
    return True


def _shape(sch, info) -> list:
    return [_const(d) for d in sch.get(info.block_rv).writes[0].source.shape]


class _Block:
    """A block made by a schedule primitive, where the helpers take a dlight BlockInfo."""

    def __init__(self, block_rv):
        self.block_rv = block_rv


def _epilogue_at(sch, main, after, loop, lanes, shape=None) -> None:
    """Consumers of ``main``'s output shape (an elementwise chain) inlined into the chain's last block,
    which is computed per tile under ``loop``; consumers of another shape (padding for the next layer)
    stay at the root as parallel vectorized nests."""
    shape = shape or _shape(sch, main)
    n = 0
    while n < len(after) and _shape(sch, after[n]) == shape:
        n += 1
    chain, tail = after[:n], after[n:]
    placed = []
    for b in chain[:-1]:
        try:
            sch.compute_inline(b.block_rv)
        except Exception:  # noqa: BLE001 - a block read twice stays a block
            placed.append(b)
    for b in [*placed, *chain[-1:]]:
        sch.reverse_compute_at(b.block_rv, loop)
        vectorize_exact(sch, sch.get_loops(b.block_rv)[-1], lanes)
    for b in tail:
        _spatial_nest(sch, b.block_rv, lanes)


def _col_tile(extent: int | None, lanes: int, vecs: int) -> tuple[int, int] | None:
    """(vector width, vectors per tile) for an output axis of ``extent``, or None (not vectorizable)."""
    if extent is None:
        return None
    for v in (lanes, lanes // 2, lanes // 4):
        if v >= 4 and extent % v == 0:
            n = next(n for n in range(min(vecs, extent // v), 0, -1) if extent % (v * n) == 0)
            return v, n
    return None


def _register_tile(sch, rows_loop, rows: int, col_loop, v: int, nv: int):
    """Split rows by ``rows`` and columns by ``v * nv``: (rows outer, rows inner, columns outer,
    vectors, lanes)."""
    ro, ri = sch.split(rows_loop, factors=[None, rows])
    co, ci = sch.split(col_loop, factors=[None, v * nv])
    cvo, cv = sch.split(ci, factors=[None, v])
    return ro, ri, co, cvo, cv


def _finish_tile(sch, block, r_first, ri, cvo, cv, at, vector: bool = True):
    """Accumulators in a local buffer written back per tile under ``at``; the reduction's body unrolled
    over the tile and vectorized (before the init is split off: TVM vectorizes a reduction block only
    while it is whole). ``vector=False``: the tile's columns are unrolled instead (a predicated tail)."""
    wb = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(wb, at)
    for lp in (ri, cvo) if vector else (ri, cvo, cv):
        sch.unroll(lp)
    if vector:
        sch.vectorize(cv)
    init = sch.decompose_reduction(block, r_first)
    if vector:
        sch.vectorize(sch.get_loops(init)[-1])
    vectorize_exact(sch, sch.get_loops(wb)[-1], 64)
    return wb


def _rows_dividing(m: int | None, rows: int, vecs: int, registers: int) -> int:
    """The register tile's rows: ``rows``, or where it does not divide a static row count the largest
    count near it that does and whose tile (``r * vecs`` accumulators, ``vecs`` loads, a broadcast) fits
    the registers. A tile that does not divide the rows leaves a predicated last tile: every FMA of the
    K loop under a row test (MiniLM's 15-token float projections ran at half speed that way)."""
    if m is None or m % rows == 0:
        return rows
    for r in sorted(range(2, 9), key=lambda r: (abs(r - rows), -r)):
        if m % r == 0 and r * vecs + vecs + 1 <= registers:
            return r
    return rows


class Matmul(CpuRule):
    """float32 matmul / batch matmul ``C[.., i, j] += A[.., i, k] * B[.., k, j]`` (+ fused epilogue): a
    ``mm_rows`` x ``mm_vecs`` vector register tile kept over K, the batch and column tiles in parallel."""

    def schedule(self, sch, target):
        parts = _one_float_reduction(sch)
        if not parts:
            return None
        before, mm, after = parts
        kinds = mm.dom_kind()
        if kinds.count("R") != 1 or not kinds.endswith("SSR"):
            return None
        blk = sch.get(mm.block_rv)
        if len(blk.reads) != 2 or len(blk.writes) != 1:
            return None
        ivars = [iv.var for iv in blk.iter_vars]
        j, k = ivars[-2], ivars[-1]

        def last_index_is(region, var):
            idx = region.region[-1].min
            return isinstance(idx, tirx.Var) and idx.same_as(var)

        a, b = blk.reads
        if not (last_index_is(a, k) and last_index_is(b, j) and last_index_is(blk.writes[0], j)):
            return None
        p = params(target)
        loops = sch.get_loops(mm.block_rv)
        if len(loops) != len(kinds):
            return None
        tile = _col_tile(_const(get_extent(sch, loops[-2])), p.lanes, p.mm_vecs)
        if tile is None or not _producers(sch, before, p.lanes, mm):
            return None
        v, nv = tile
        m = _const(get_extent(sch, loops[-3]))
        rows = _rows_dividing(m, p.mm_rows, nv, 32 if p.lanes == 16 else 16)
        shape = _shape(sch, mm)
        if m is None:
            # A symbolic row count: rows padded to the register tile (the operand copied into a padded
            # buffer, the result read back for the epilogue). Split unpadded, the last row tile was
            # predicated and its accumulators could not be given a constant-size (register) buffer:
            # 35 GFLOPS instead of ~110 on 15 x 1536 x 384. The accumulator tile is kept under 1 KB so
            # TVM allocates it on the stack: on its workspace heap LLVM cannot tell it from the padded
            # operand (another workspace buffer) and keeps it in memory.
            rows = max(1, min(rows, (STACK_BYTES - 1) // (nv * v * 4)))
            sch.pad_einsum(mm.block_rv, [1] * (len(loops) - 3) + [rows, 1, 1])
            for pad in sch.get_producers(mm.block_rv):
                _spatial_nest(sch, pad, p.lanes)
            after = [_Block(b) for b in sch.get_consumers(mm.block_rv)] + list(after)
            loops = sch.get_loops(mm.block_rv)
        batch, (ro, ri, co, cvo, cv) = loops[:-3], _register_tile(sch, loops[-3], rows, loops[-2], v, nv)
        sch.reorder(*batch, co, ro, loops[-1], ri, cvo, cv)
        sch.parallel(sch.fuse(*batch, co) if batch else co)
        _finish_tile(sch, mm.block_rv, loops[-1], ri, cvo, cv, ro)
        if after:
            _epilogue_at(sch, mm, after, ro, p.lanes, shape)
        return sch


class Conv2d(CpuRule):
    """float32 NCHW conv2d / grouped / depthwise and NCHW pooling windows (4 spatial axes n, c, h, w, then
    the reduction axes): ``conv_oc`` output channels x one row of ``w`` vectors in registers over the
    reduction, the padded input materialised once, (n, channel tile, h) in parallel."""

    def schedule(self, sch, target):
        parts = _one_float_reduction(sch)
        if not parts:
            return None
        before, cv_, after = parts
        kinds = cv_.dom_kind()
        ns = len(kinds) - len(kinds.lstrip("S"))
        if ns not in (3, 4) or set(kinds[ns:]) != {"R"}:
            return None
        blk = sch.get(cv_.block_rv)
        ivars = [iv.var for iv in blk.iter_vars]
        loops = sch.get_loops(cv_.block_rv)
        if len(loops) != len(kinds) or not all(r.region[-1].min.same_as(ivars[ns - 1]) for r in blk.writes):
            return None
        p = params(target)
        batch, (c, h, w), red = loops[:ns - 3], loops[ns - 3:ns], loops[ns:]
        if any(_const(get_extent(sch, lp)) is None for lp in loops):
            return self._symbolic(sch, cv_, before, after, batch, c, h, w, red, p)
        if not _producers(sch, before, p.lanes):
            return None
        # a width no vector divides: one 16-wide tile per step, unrolled, its tail predicated
        v, nv = _col_tile(_const(get_extent(sch, w)), p.lanes, 2) or (p.lanes, 0)
        rows = 1 if len(red) == 2 else p.conv_oc   # depthwise / pooling: one channel per tile
        ro, ri, co, cvo, cvi = _register_tile(sch, c, rows, w, v, max(nv, 1))
        sch.reorder(*batch, ro, h, co, *red, ri, cvo, cvi)
        sch.parallel(sch.fuse(*batch, ro, h))
        _finish_tile(sch, cv_.block_rv, red[0], ri, cvo, cvi, co, vector=nv > 0)
        if after:
            _epilogue_at(sch, cv_, after, co, p.lanes)
        return sch

    @staticmethod
    def _symbolic(sch, cv_, before, after, batch, c, h, w, red, p):
        """Symbolic sizes (a text line's width): per (n, channel tile, h) task, the output row accumulated
        in place over the reduction, ``conv_oc`` channels a task where they divide the channel count; the
        row loop is left whole for LLVM's loop vectorizer (the function stores float32 only, so
        ``qie_ep.tvm._narrow_store_safe`` leaves it on). Windowed functions only (two or three reduction
        axes): the register-tile schedule's predicated tiles wrote out of bounds on a batch matmul with
        sizes from a symbolic width (PP-OCRv6's attention probabilities x V, 4 spatial axes + 1 reduction:
        heap corruption), so those are left to the rules after this one."""
        if len(red) not in (2, 3) or not _producers(sch, before, p.lanes):
            return None
        oc = _const(get_extent(sch, c))
        rows = p.conv_oc if len(red) == 3 and oc is not None and oc % p.conv_oc == 0 else 1
        co, ci = sch.split(c, factors=[None, rows])
        sch.reorder(*batch, co, h, *red, ci, w)
        sch.parallel(sch.fuse(*batch, co, h))
        sch.unroll(ci)
        sch.decompose_reduction(cv_.block_rv, red[0])
        for b in after:
            _spatial_nest(sch, b.block_rv, p.lanes)
        return sch


class _TailVectorizedReduction(_DlightReduction):
    """dlight's CPU reduction rule with qie's vectorization: dlight splits a row by the lane count with a
    predicate, which TVM lowers as scalar code (PP-OCRv6's 18710-class softmax ran at ~4 ns an element);
    here each injective block's row is partitioned into a vectorized part and a scalar tail, once every
    block has been placed (a partitioned consumer no longer anchors compute_at)."""

    def __init__(self):
        self.pending = []

    def _vectorize_inner(self, sch, block_rv, vec_lanes):
        self.pending.append((block_rv, vec_lanes))

    def apply(self, func, target, tunable):
        self.pending = []
        sch = super().apply(func, target, tunable)
        if isinstance(sch, s_tir.Schedule):
            for block_rv, lanes in self.pending:
                loops = sch.get_loops(block_rv)
                if len(loops) > 1:
                    vectorize_with_tail(sch, loops[-1], lanes)
        return sch


class Reduction(CpuRule):
    """Softmax, LayerNorm, mean over the last axes: dlight's CPU rule, rows vectorized with a tail."""

    def schedule(self, sch, target):
        return _TailVectorizedReduction().apply(sch.mod["main"], target, False)


class RowReduction(CpuRule):
    """Functions of row reductions over the innermost axis (softmax, LayerNorm, mean) and elementwise
    blocks, whose rows are long (>= ``ROW_MIN`` elements): each reduction vectorized through a
    ``lanes``-wide partial result (rfactor: one vector of maxima / sums per row, combined at the end),
    the part of the row the lanes divide vectorized and the rest a scalar tail; every elementwise block a
    parallel vectorized nest, materialised when more than one block reads it (softmax's exponentials are
    computed once). dlight's reduction rule (``Reduction``, next) keeps each reduction a serial scalar
    chain: PP-OCRv6's 40 x 18710-class softmax took 1.5 ms that way. Declines functions with any other
    kind of block."""

    ROW_MIN = 256

    def schedule(self, sch, target):
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        lanes = params(target).lanes
        reds = []
        for b in infos:
            kinds = b.dom_kind()
            if all(k == "S" for k in kinds):
                continue
            row = _const(get_extent(sch, sch.get_loops(b.block_rv)[-1]))
            if (kinds[-1] != "R" or "R" in kinds[:-1] or not _write_dtype(sch, b.block_rv).startswith("float")
                    or row is None or row < self.ROW_MIN or len(sch.get_loops(b.block_rv)) != len(kinds)):
                return None
            reds.append(b)
        if not reds:
            return None
        for b in infos:
            if b in reds or len(sch.get_consumers(b.block_rv)) != 1:
                continue
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001 - a block that cannot be inlined stays a block
                pass
        spatial = []
        for b in infos:
            if b not in reds:
                try:
                    spatial.append(sch.get(b.block_rv).name_hint)
                except ValueError:      # inlined above
                    pass
        for b in reds:
            _vector_reduction(sch, b.block_rv, lanes)
        for name in spatial:
            _spatial_nest(sch, sch.get_sblock(name), lanes)
        return sch


def _vector_reduction(sch, block, lanes: int) -> None:
    """``block`` (rows x one innermost reduction) as rows x (row / lanes vectors reduced lane-wise, the
    remainder as a scalar tail) into a [rows, lanes] partial buffer, then the lanes reduced per row."""
    loops = sch.get_loops(block)
    k = loops[-1]
    row = _const(get_extent(sch, k))
    work = _work(sch, loops)
    _, ki = sch.split(k, factors=[None, lanes])
    rf = sch.rfactor(ki, len(sch.get(block).writes[0].source.shape))
    *rows, rko, rki = sch.get_loops(rf)
    sch.vectorize(rki)               # while the block still has its init (TVM's rule for reductions)
    init = sch.decompose_reduction(rf, rko)
    sch.vectorize(sch.get_loops(init)[-1])
    if row % lanes:
        sch.loop_partition(rko, [row // lanes, None])   # the tail's vector loop is lowered as scalars
    if rows:
        _parallel(sch, sch.fuse(*rows) if len(rows) > 1 else rows[0], work)


class Fallback(CpuRule):
    """Anything else: inline what can be, then each block's leading spatial loops in parallel."""

    def schedule(self, sch, target):
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        lanes = params(target).lanes
        for b in infos:
            kinds = b.dom_kind()
            if kinds and all(k == "S" for k in kinds):
                _spatial_nest(sch, b.block_rv, lanes)
                continue
            loops = sch.get_loops(b.block_rv)
            lead = len(kinds) - len(kinds.lstrip("S"))
            if lead == 0 or len(loops) != len(kinds):
                continue
            work = _work(sch, loops)    # before fusing: the fused loops are gone after
            _parallel(sch, sch.fuse(*loops[:lead]) if lead > 1 else loops[0], work)
        return sch


def rules() -> list[ScheduleRule]:
    """qie's CPU rules in the order they are tried."""
    return [Injective(), Matmul(), Conv2d(), RowReduction(), Reduction(), Fallback()]
