"""Tuning records: the best tile per (target, op, shape), found by ``python -m bench.tune_tvm``.

Records ship in the package as ``tuned/<isa>.json`` (one file per kernel family; the measured CPU model
is stored with each entry). A shape without a record gets qie's default tile for its ISA, never TVM's
unscheduled loop nest.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from .gemm import Tile
from .isa import Isa

TUNED = Path(__file__).with_name("tuned")

# Default tiles: accumulators fill most of the vector register file (32 zmm / 16 ymm), leaving
# room for the weight vectors and the broadcast activation.
_DEFAULTS = {
    "avx512vnni": [Tile(8, 3), Tile(6, 4), Tile(12, 2), Tile(16, 1)],
    "avxvnni": [Tile(4, 3), Tile(6, 2), Tile(12, 1)],
    "avx2": [Tile(4, 3), Tile(6, 2), Tile(12, 1)],
    "generic": [Tile(4, 1)],
}


def default_tile(isa: Isa, n: int) -> Tile:
    """The default tile whose column width wastes the least padding on ``n`` (ties: the first)."""
    best = None
    for t in _DEFAULTS[isa.name]:
        width = t.vecs * isa.lanes
        waste = -(-n // width) * width - n
        if best is None or waste < best[0]:
            best = (waste, t)
    return best[1]


@cache
def _load(isa_name: str) -> dict:
    path = TUNED / f"{isa_name}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def key(op: str, shape) -> str:
    return f"{op}:" + "x".join("m" if s is None else str(s) for s in shape)


def lookup(isa: Isa, op: str, shape) -> Tile | None:
    """The tuned tile for ``(op, shape)``, trying the exact key and then the one with symbolic M."""
    table = _load(isa.name)
    for s in (tuple(shape), (None, *tuple(shape)[1:])):
        entry = table.get(key(op, s))
        if entry:
            return Tile(entry["rows"], entry["vecs"])
    return None
