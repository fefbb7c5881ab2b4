"""TVM default pipeline vs TVM + qie pipeline vs ORT built-in vs ORT + qie: `python -m bench.tvm`.

Cases: the GEMM shapes of bench/shapes/gemm.csv (one QLinearMatMul u8s8, constant B), the conv layers of
bench/shapes/conv.csv (one QLinearConv, per-channel), and two real models (MiniLM-L6 quantize_dynamic,
sequence batch of the demo sentences; PP-LCNet orientation quantize_static QDQ, batch 1). TVM imports
each model with ``qie_ep.tvm.from_onnx`` (TVM's own importer cannot read QLinearMatMul / QLinearConv);
"TVM default" is ``tvm.compile(..., relax_pipeline="default")``, "TVM + qie" is
``relax_pipeline=qie_ep.tvm.pipeline(target)``. All four run in one process, warm, median of >= 20 runs,
each host's pair interleaved (TVM's pool workers spin between runs, ORT's do not); TVM's default
lowering is so slow that it gets fewer runs (the table says how many). Threads: ORT intra-op and TVM's
pool both set to ``--threads``. TVM is timed on tvm Tensors made once (its output stays a tvm Tensor);
ORT's run() takes and returns numpy arrays. Writes bench/out/tvm.jsonl, tvm.md and tvm.png.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx

from bench.common import OUT, environment, read_csv, read_shapes, session, write_jsonl
from bench.conv import conv_model, macs
from bench.gemm import qlinear_matmul


def tvm_runner(model: onnx.ModelProto, qie: bool, target):
    """``run(feeds, to_numpy=False)``: inputs become TVM tensors once per feed dict (a deployment keeps
    its tensors; converting a numpy array costs ~0.03 ms, as much as a whole 1x768x768 GEMM)."""
    from qie_ep.tvm.runner import compile_onnx
    c = compile_onnx(model, target, qie=qie, cache_inputs=True)

    def run(feeds, to_numpy=False):
        return c.run(feeds)[0] if to_numpy else c.call(feeds)

    return run


def timed(runners: list, feeds: dict, runs: int, slow_budget: float) -> tuple[list[float], list[int]]:
    """Median seconds of each runner, interleaved. A runner whose first run exceeds 50 ms is timed
    separately with as many runs as fit in ``slow_budget`` seconds (at least 1)."""
    first = []
    for r in runners:
        r(feeds)
        t0 = time.perf_counter()
        r(feeds)
        first.append(time.perf_counter() - t0)
    fast = [i for i, t in enumerate(first) if t < 0.05 or runs <= 1]
    slow = [i for i in range(len(runners)) if i not in fast]
    times = {i: [] for i in range(len(runners))}
    for _ in range(runs):
        for i in fast:
            t0 = time.perf_counter()
            runners[i](feeds)
            times[i].append(time.perf_counter() - t0)
    for i in slow:
        times[i].append(first[i])
        n = max(0, min(runs, int(slow_budget / first[i])) - 1)
        for _ in range(n):
            t0 = time.perf_counter()
            runners[i](feeds)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(times[i])) for i in range(len(runners))], [len(times[i]) for i in range(len(runners))]


def cases(args):
    for s in read_shapes("gemm"):
        if args.only and f"{s['m']}x{s['n']}x{s['k']}" not in args.only:
            continue
        model, feeds = qlinear_matmul(s["m"], s["n"], s["k"], np.uint8, np.int8)
        yield "gemm", f"{s['m']}x{s['n']}x{s['k']}", onnx.load_from_string(model), feeds, 2.0 * s["m"] * s["n"] * s["k"]
    for s in read_csv("conv"):
        if args.only and s["name"] not in args.only:
            continue
        model, feeds = conv_model(s, "QLinearConv")
        yield "conv", s["name"], onnx.load_from_string(model), feeds, 2.0 * macs(s)
    if args.models:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import qie_ep
        from qie_ep.demo import models
        from qie_ep.demo import vision as V
        minilm = qie_ep.with_contrib_opset(onnx.load(str(models.minilm_int8_dynamic("int8"))))
        yield "model", "minilm-dynamic", minilm, models.minilm_feeds(), 0.0
        x, _ = V.dataset("orientation", 1, seed=5)
        yield ("model", "orientation-qdq", qie_ep.with_contrib_opset(onnx.load(str(V.quantized("orientation", "qdq")))),
               {"x": x}, 0.0)


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate([("tvm_default_ms", "TVM default"), ("tvm_qie_ms", "TVM + qie"),
                                      ("ort_ms", "ORT built-in"), ("ort_qie_ms", "ORT + qie")]):
        ax.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [r["case"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("ms (log)")
    ax.set_title(f"TVM vs TVM + qie vs ORT ({rows[0]['threads']} threads): latency, lower is better")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--slow-budget", type=float, default=10.0, help="seconds for each TVM-default case")
    ap.add_argument("--only", nargs="*", help="case names (MxNxK or conv layer names)")
    ap.add_argument("--no-models", dest="models", action="store_false")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)     # read when TVM's pool starts
    import tvm

    import qie_ep.tvm as qtvm
    from qie_ep.tvm.schedules.isa import host_target
    target = host_target()
    env = environment()
    env.update(tvm=tvm.__version__, tvm_isa=qtvm.isa_for(target), target=str(target.attrs.get("mcpu", "")))
    print(f"# {env['cpu']} | TVM {env['tvm']} ({env['tvm_isa']}) | ORT {env['onnxruntime']} | {args.threads} threads")
    print(f"{'case':>18} {'TVM ms':>10} {'(runs)':>6} {'TVM+qie':>9} {'ORT':>9} {'ORT+qie':>9} {'qie/TVM':>8} "
          f"{'ORT/TVM+qie':>11} {'TVM+qie GOPS':>12}")
    rows = []
    for kind, name, model, feeds, ops in cases(args):
        runners = [tvm_runner(model, False, target), tvm_runner(model, True, target)]
        data = model.SerializeToString()
        ort_s, qie_s = session(data, False, args.threads), session(data, True, args.threads)
        runners += [lambda f, s=ort_s: s.run(None, f)[0], lambda f, s=qie_s: s.run(None, f)[0]]
        # TVM's pool workers spin between parallel regions (its default, and what makes small kernels
        # fast); ORT's are set not to. Each host's pair is interleaved on its own so that a spinning TVM
        # worker never competes with an ORT run.
        (t_def, t_qie), n = timed(runners[:2], feeds, args.runs, args.slow_budget)
        (t_ort, t_oq), n2 = timed(runners[2:], feeds, args.runs, args.slow_budget)
        n = n + n2
        row = dict(kind=kind, case=name, threads=args.threads, tvm_default_ms=t_def * 1e3, tvm_default_runs=n[0],
                   tvm_qie_ms=t_qie * 1e3, ort_ms=t_ort * 1e3, ort_qie_ms=t_oq * 1e3, runs=min(n[1:]),
                   speedup_vs_tvm=t_def / t_qie, vs_ort=t_ort / t_qie,
                   tvm_qie_gops=ops / t_qie / 1e9 if ops else None, **env)
        rows.append(row)
        g = f"{row['tvm_qie_gops']:12.1f}" if ops else f"{'':>12}"
        print(f"{name:>18} {row['tvm_default_ms']:10.3f} {n[0]:6d} {row['tvm_qie_ms']:9.3f} {row['ort_ms']:9.3f} "
              f"{row['ort_qie_ms']:9.3f} {row['speedup_vs_tvm']:7.0f}x {row['vs_ort']:10.2f}x {g}", flush=True)
    write_jsonl(OUT / "tvm.jsonl", rows)
    lines = [f"Measured {env['date']} on {env['cpu']} (TVM {env['tvm']}, qie kernels {env['tvm_isa']}, ORT "
             f"{env['onnxruntime']}, commit {env['commit']}); {args.threads} threads, one process, median of "
             f">= {args.runs} interleaved runs (TVM default: the runs shown).", "",
             "| case | TVM default ms (runs) | TVM + qie ms | ORT built-in ms | ORT + qie ms | TVM+qie vs TVM | "
             "ORT / TVM+qie | TVM+qie GOPS |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = f"{r['tvm_qie_gops']:.0f}" if r["tvm_qie_gops"] else ""
        lines.append(f"| {r['case']} | {r['tvm_default_ms']:.2f} ({r['tvm_default_runs']}) | {r['tvm_qie_ms']:.3f} | "
                     f"{r['ort_ms']:.3f} | {r['ort_qie_ms']:.3f} | {r['speedup_vs_tvm']:.0f}x | {r['vs_ort']:.2f}x | {g} |")
    (OUT / "tvm.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / "tvm.png")


if __name__ == "__main__":
    main()
