"""qie vs ONNX Runtime's built-in kernel on quantized GEMM: `python -m bench.gemm`.

Each case is one QLinearMatMul node (constant B, prepacked by both) run as two sessions in one process,
interleaved and warm, median of >= 25 runs, at 1 and 2 intra-op threads, for u8s8, u8u8 and s8s8.
Writes bench/out/gemm.jsonl, gemm.md (the README table) and gemm.png, and prints GOPS, the ratio to
ORT and the % of the active path's measured per-core peak (tdpbusd on AMX, vpdpbusd on AVX-512 VNNI).
"""
from __future__ import annotations

import argparse

import numpy as np
from onnx import helper, numpy_helper

import qie_ep
from bench.common import OUT, environment, interleaved_median, read_shapes, session, write_jsonl
from qie_ep._lib import testing_lib

COMBOS = {"u8s8": (np.uint8, np.int8), "u8u8": (np.uint8, np.uint8), "s8s8": (np.int8, np.int8)}


def qlinear_matmul(m: int, n: int, k: int, adt, bdt, seed: int = 0) -> tuple[bytes, dict]:
    rng = np.random.default_rng(seed)
    ai, bi = np.iinfo(adt), np.iinfo(bdt)
    a = rng.integers(ai.min, ai.max + 1, (m, k)).astype(adt)
    b = rng.integers(bi.min, bi.max + 1, (k, n)).astype(bdt)
    za, zb = np.array(ai.min + 100, adt), np.array(bi.min + 128, bdt) if bdt == np.uint8 else np.array(0, bdt)
    inits = [numpy_helper.from_array(x, name) for x, name in [
        (np.array(0.02, np.float32), "sa"), (za, "za"), (b, "b"), (np.array(0.01, np.float32), "sb"), (zb, "zb"),
        (np.array(0.001 * k, np.float32), "sy"), (np.array(0, adt), "zy")]]
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(np.dtype(adt)), [m, k])],
                          [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(adt)), [m, n])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString(), {"a": a}


def peak_gops() -> tuple[str, float]:
    """The active path's measured single-core peak, 2 ops per multiply-add: tdpbusd on AMX, vpdpbusd (zmm) on
    AVX-512 VNNI; 0 on the others."""
    isa = qie_ep.active_isa()
    if isa == "amx":
        return "tdpbusd", float(testing_lib().qie_bench_amx_peak_gops())
    if isa == "avx512vnni":
        return "vpdpbusd", float(testing_lib().qie_bench_vnni_peak_gops())
    return "no", 0.0


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, threads in zip(axes, (1, 2)):
        sub = [r for r in rows if r["threads"] == threads]
        shapes = sorted({(r["m"], r["n"], r["k"]) for r in sub}, key=lambda s: (s[0] * s[1] * s[2], s))
        x = np.arange(len(shapes))
        for i, combo in enumerate(c for c in COMBOS if any(r["combo"] == c for r in sub)):  # those measured
            ratio = [next(r["ratio"] for r in sub if (r["m"], r["n"], r["k"]) == s and r["combo"] == combo) for s in shapes]
            ax.bar(x + (i - 1) * 0.27, ratio, 0.27, label=combo)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{m}x{k}x{n}" for m, n, k in shapes], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"qie / ORT speed, {threads} thread{'s' if threads > 1 else ''} (higher is better)")
        ax.set_xlabel("M x K x N")
    axes[0].set_ylabel("speed-up over ORT built-in QLinearMatMul")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--combos", nargs="+", default=list(COMBOS))
    ap.add_argument("--quick", action="store_true", help="only the first four shapes")
    args = ap.parse_args(argv)
    env = environment()
    unit, peak = peak_gops()
    print(f"# {env['cpu']} | ORT {env['onnxruntime']} | qie {env['qie']} ({env['isa']}) | "
          f"measured per-core {unit} peak {peak:.0f} GOPS")
    rows = []
    shapes = read_shapes("gemm")[: 4 if args.quick else None]
    hdr = f"{'shape MxKxN':>16} {'combo':>5} {'thr':>3} {'ORT GOPS':>9} {'qie GOPS':>9} {'ratio':>6} {'%peak':>6}"
    print(hdr)
    for s in shapes:
        for combo in args.combos:
            model, feeds = qlinear_matmul(s["m"], s["n"], s["k"], *COMBOS[combo])
            for threads in args.threads:
                ort_s, qie_s = session(model, False, threads), session(model, True, threads)
                assert np.array_equal(ort_s.run(None, feeds)[0], qie_s.run(None, feeds)[0])
                t_ort, t_qie = interleaved_median([ort_s, qie_s], feeds, runs=args.runs)
                ops = 2.0 * s["m"] * s["n"] * s["k"]
                row = dict(s, combo=combo, threads=threads, ort_s=t_ort, qie_s=t_qie, ort_gops=ops / t_ort / 1e9,
                           qie_gops=ops / t_qie / 1e9, ratio=t_ort / t_qie,
                           pct_peak=100.0 * ops / t_qie / 1e9 / (peak * threads) if peak else None, **env)
                rows.append(row)
                pk = f"{row['pct_peak']:6.1f}" if peak else "   n/a"
                print(f"{s['m']:>5}x{s['k']:>4}x{s['n']:>5} {combo:>5} {threads:>3} {row['ort_gops']:9.1f} "
                      f"{row['qie_gops']:9.1f} {row['ratio']:6.2f} {pk}", flush=True)
    write_jsonl(OUT / "gemm.jsonl", rows)
    ratios = np.array([r["ratio"] for r in rows])
    geo = float(np.exp(np.log(ratios).mean()))
    lines = [f"Measured {env['date']} on {env['cpu']} (ORT {env['onnxruntime']}, qie {env['commit']}, ISA {env['isa']}); "
             f"per-core {unit} peak {peak:.0f} GOPS. QLinearMatMul, median of >= {args.runs} interleaved runs.", "",
             "| M x K x N | combo | threads | ORT GOPS | qie GOPS | qie / ORT | % of peak |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pk = f"{r['pct_peak']:.0f}%" if r["pct_peak"] is not None else "n/a"
        lines.append(f"| {r['m']}x{r['k']}x{r['n']} | {r['combo']} | {r['threads']} | {r['ort_gops']:.0f} | "
                     f"{r['qie_gops']:.0f} | {r['ratio']:.2f}x | {pk} |")
    lines += ["", f"Geometric mean of qie / ORT over {len(rows)} cases: **{geo:.2f}x**."]
    (OUT / "gemm.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / "gemm.png")
    print(f"\ngeometric mean qie/ORT: {geo:.2f}x over {len(rows)} cases; wrote {OUT}/gemm.jsonl, gemm.md, gemm.png")


if __name__ == "__main__":
    main()
