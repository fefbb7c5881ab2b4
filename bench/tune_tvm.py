"""Tile tuning for qie's x86 kernels: `python -m bench.tune_tvm [--quick]`.

For each GEMM shape of bench/shapes/gemm.csv, each weight matrix of MiniLM-L6 (symbolic rows, tuned at
128 and 1), and each conv layer of bench/shapes/conv.csv, every candidate register tile of the host's
kernel family is compiled and timed (TVM's time_evaluator, median); the fastest is written to
``qie_ep/tvm/schedules/tuned/<isa>.json`` with the CPU it was measured on. ``records.lookup`` applies them at
compile time; shapes without a record get ``records.default_tile``.

Why not MetaSchedule's search: the register tile fixes the packed-weight layout and the row padding,
which are part of the PrimFunc's signature (its workload), while MetaSchedule searches schedules of one
fixed workload. A grid over the few legal tiles, each a different workload, is the honest search here.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from qie_ep.tvm.schedules import conv, isa as isa_mod, kernels, matmul, records
from qie_ep.tvm.schedules.gemm import Epilogue, Tile

MINILM = [(384, 384), (384, 1536), (1536, 384)]     # (k, n) of its 36 weight matrices


def _time(kernel: kernels.Kernel, args) -> float:
    import tvm
    ev = kernel.lib.time_evaluator("main", tvm.cpu(), number=3, repeat=5, min_repeat_ms=20)
    return float(ev(*args).median)


def _best(spec, isa, target, candidates, x, w) -> tuple[Tile, dict]:
    """Time every candidate tile on one input; the fastest tile and all the timings (seconds)."""
    times = {}
    for tile in candidates:
        kk = kernels.Kernel(spec, isa, target, tile)
        times[f"{tile.rows}x{tile.vecs}"] = _time(kk, kk.args(x, kk.pack(w, 0), 5, mult=np.float32(1e-4), zy=3))
    best = min(times, key=times.get)
    r, v = (int(t) for t in best.split("x"))
    return Tile(r, v), times


def tune_matmul(isa, target, m: int, k: int, n: int, candidates) -> tuple[Tile, dict]:
    rng = np.random.default_rng(0)
    spec = matmul.MatmulSpec("uint8", "int8", k, n, Epilogue("uint8"))
    return _best(spec, isa, target, candidates, rng.integers(0, 256, (m, k)).astype(np.uint8),
                 rng.integers(-128, 128, (k, n)).astype(np.int8))


def tune_conv(isa, target, s: dict, candidates) -> tuple[Tile, dict]:
    rng = np.random.default_rng(0)
    spec = conv.ConvSpec("uint8", "int8", s["c"], s["m"], s["h"], s["w"], (s["k"], s["k"]), (s["stride"],) * 2,
                         (s["pad"],) * 4, (1, 1), s["group"], Epilogue("uint8"))
    return _best(spec, isa, target, candidates, rng.integers(0, 256, (1, s["c"], s["h"], s["w"])).astype(np.uint8),
                 rng.integers(-128, 128, (s["m"], s["c"] // s["group"], s["k"], s["k"])).astype(np.int8))


def main(argv=None) -> None:
    from bench.common import cpu_model, read_csv, read_shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM and two GEMM shapes only")
    args = ap.parse_args(argv)
    target = isa_mod.host_target()
    isa = isa_mod.for_target(target)
    if isa.kind != "x86":
        raise SystemExit(f"qie tune: host kernel family {isa.name} has no tiles to tune")
    candidates = records._DEFAULTS[isa.name]
    out = records.TUNED / f"{isa.name}.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    cpu = cpu_model()
    gemms = [(r["m"], r["k"], r["n"]) for r in read_shapes("gemm")]
    if args.quick:
        gemms = [g for g in gemms if g in ((128, 768, 768), (1024, 1024, 1024))]
    jobs = [("matmul", (m, n, k), (m, k, n)) for m, k, n in gemms]
    jobs += [("matmul", (None, n, k), (128, k, n)) for k, n in MINILM]
    jobs += [("matmul", (1, n, k), (1, k, n)) for k, n in MINILM]
    for op, key_shape, (m, k, n) in jobs:
        t0 = time.time()
        tile, times = tune_matmul(isa, target, m, k, n, candidates)
        table[records.key(op, key_shape)] = {"rows": tile.rows, "vecs": tile.vecs, "cpu": cpu, "times_s": times}
        print(f"{records.key(op, key_shape):>24}: {tile.rows}x{tile.vecs * isa.lanes} "
              f"({', '.join(f'{t}={v * 1e6:.0f}us' for t, v in times.items())}) [{time.time() - t0:.1f}s]", flush=True)
    if not args.quick:
        for s in read_csv("conv"):
            if s["group"] != 1:
                continue
            tile, times = tune_conv(isa, target, s, candidates)
            oh = (s["h"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
            ow = (s["w"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
            k = records.key("conv", (oh * ow, s["m"], s["c"] * s["k"] * s["k"]))
            table[k] = {"rows": tile.rows, "vecs": tile.vecs, "cpu": cpu, "times_s": times}
            print(f"{k:>24}: {tile.rows}x{tile.vecs * isa.lanes}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(table)} records to {out}")


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    main()
