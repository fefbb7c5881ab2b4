"""Quantized matmul PrimFuncs: ``O[m, n] = epilogue(sum_k (A[m, k] - za)(B[k, n] - zb[n]))``.

A is [m, K] with symbolic ``m`` (batched operands are reshaped to 2-D by the Relax pass), B is constant
and arrives packed (``gemm.pack_weights``). See ``gemm`` for the math and the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from . import gemm, records
from .gemm import Epilogue, Tile
from .isa import Isa


@dataclass(frozen=True)
class MatmulSpec:
    a_dtype: str
    b_dtype: str
    k: int
    n: int
    epi: Epilogue

    def __post_init__(self):
        gemm.check_qdtypes("matmul", A=self.a_dtype, B=self.b_dtype)

    def kernel_name(self, isa: Isa, tile: Tile) -> str:
        ab = ("u8" if self.a_dtype == "uint8" else "s8") + ("u8" if self.b_dtype == "uint8" else "s8")
        out = {"int32": "s32", "uint8": "u8", "int8": "s8", "float32": "f32"}[self.epi.out]
        return (f"qie_matmul_{ab}_{out}_{tile.rows}x{tile.vecs * isa.lanes}c{isa.kpack}"
                f"_k{self.k}n{self.n}_{self.epi.tag}__{isa.name}")


def tile_for(spec: MatmulSpec, isa: Isa, m_hint: int | None = None) -> Tile:
    """The tuned tile for this shape (from the shipped records), else qie's default for the ISA."""
    return records.lookup(isa, "matmul", (m_hint, spec.n, spec.k)) or records.default_tile(isa, spec.n)


def primfunc(spec: MatmulSpec, isa: Isa, tile: Tile, m: int | None = None) -> tirx.PrimFunc:
    """Unscheduled PrimFunc (A, Bp, colsum, za, [zb], epilogue operands..., O); ``m=None``: symbolic."""
    mv = tirx.Var("m", "int64") if m is None else m
    k, n = spec.k, spec.n
    kp = gemm._ceil(max(k, 1), isa.kpack)
    np_ = gemm._ceil(max(n, 1), isa.lanes * tile.vecs)
    sa, _ = gemm.shifts(isa, spec.a_dtype, spec.b_dtype)
    a = te.placeholder((mv, k), spec.a_dtype, name="A")
    mp = (mv + tile.rows - 1) // tile.rows * tile.rows
    zero = tirx.const(0, isa.a_dtype)

    def shifted(i, kk):
        v = a[i, kk] if sa == 0 else (a[i, kk].astype("int32") + sa).astype(isa.a_dtype)
        return tirx.if_then_else(tirx.all(i < mv, kk < k), v, zero)

    ap = te.compute((mp, kp), shifted, name="Ap")
    width = isa.lanes * tile.vecs
    wshape = (np_ // width, kp // isa.kpack, width, isa.kpack)
    params, o = gemm.gemm_stages(ap, k, wshape, spec.epi, (mv, n), lambda i, j: (i, j), isa, sa)
    return gemm.build_primfunc([a, *params, o], spec.kernel_name(isa, tile))


def scheduled(spec: MatmulSpec, isa: Isa, tile: Tile | None = None, m: int | None = None) -> tirx.PrimFunc:
    tile = tile or tile_for(spec, isa, m)
    return gemm.schedule_primfunc(primfunc(spec, isa, tile, m), isa, tile)
