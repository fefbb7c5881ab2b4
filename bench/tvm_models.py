"""The demo's models on TVM + qie vs ORT INT8, static and dynamic shapes; float GEMM rules vs MLAS FP32.

`python -m bench.tvm_models [--threads N]` (TVM's pool size is fixed when it starts, so one process per
thread count; `make bench` runs 1 and 2). Models: the demo's five INT8 files (MiniLM-L6 quantize_dynamic,
static QDQ, static QDQ with `--accuracy-budget 0.01`, PP-OCRv6 recogniser and PP-LCNet, quantized by
`qie quantize`'s code and cached by the demo), batch 1 on one demo sample (MiniLM: its longest sentence).
Each model is compiled by TVM + qie twice: for the sample's static shape (``shape_dict``) and with the
model's own symbolic dimensions ("dynamic"; an import that TVM cannot do without shapes is a failed row).
Timing: TVM + qie, ORT built-in INT8 and ORT + qie in one process, each host in blocks of runs, three
rounds, a pause between hosts so that TVM's spinning pool workers are asleep when ORT runs; the median.

Float rows: one float32 MatMul (+ bias) per shape (the accuracy-budget MiniLM's kept projections and
BERT-base-like ones), TVM + qie's ``Matmul`` rule vs ORT's FP32 MLAS kernel, in GFLOPS.
Writes bench/out/tvm_models_<threads>t.jsonl and .md.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.common import OUT, environment, session, write_jsonl

FLOAT_SHAPES = [(15, 384, 1536), (15, 1536, 384), (128, 384, 384), (128, 384, 1536), (128, 1536, 384)]


def _median_of_blocks(fns: list, feeds: dict, rounds: int = 3, block: int = 15) -> list[float]:
    times = [[] for _ in fns]
    for f in fns:
        for _ in range(3):
            f(feeds)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            time.sleep(0.3)             # TVM's workers spin after a call; let them sleep first
            for _ in range(block):
                t0 = time.perf_counter()
                f(feeds)
                times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def model_rows(threads: int, target, only: str = "", modes=("static", "dynamic")) -> list[dict]:
    from qie_ep.demo import __main__ as demo
    from qie_ep.tvm.runner import compile_onnx
    cases = demo.minilm_cases() + [demo.vision_case("ppocr_rec", 2), demo.vision_case("orientation", 2)]
    rows = []
    for c in cases:
        if only and only.lower() not in f"{c.model} {c.scheme}".lower():
            continue
        feed = max(c.feeds, key=lambda f: max(v.size for v in f.values()))
        model = onnx.load(str(c.int8))
        data = model.SerializeToString()
        ort_s, qie_s = session(data, False, threads), session(data, True, threads)
        for mode in modes:
            row = dict(model=c.model, scheme=c.scheme, shapes=mode, threads=threads,
                       shape={k: list(v.shape) for k, v in feed.items()})
            try:
                comp = compile_onnx(model, target, shape_dict=row["shape"] if mode == "static" else None,
                                    cache_inputs=True)
            except Exception as e:  # noqa: BLE001 - an import / compile failure is a row
                row["failed"] = str(e).splitlines()[0][:200]
                rows.append(row)
                print(f"{c.model:>22} {c.scheme[:34]:34} {mode:8} TVM+qie failed: {row['failed']}", flush=True)
                continue
            t_tvm, t_ort, t_qie = _median_of_blocks(
                [comp.call, lambda f, s=ort_s: s.run(None, f), lambda f, s=qie_s: s.run(None, f)], feed)
            row.update(tvm_qie_ms=t_tvm * 1e3, ort_ms=t_ort * 1e3, ort_qie_ms=t_qie * 1e3,
                       tvm_vs_ort_time=t_tvm / t_ort, compile_s=comp.compile_s)
            rows.append(row)
            print(f"{c.model:>22} {c.scheme[:34]:34} {mode:8} TVM+qie {t_tvm * 1e3:8.2f} ms  ORT INT8 "
                  f"{t_ort * 1e3:8.2f}  ORT+qie {t_qie * 1e3:8.2f}  TVM/ORT time {t_tvm / t_ort:5.2f}", flush=True)
    return rows


def float_matmul(m: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(m + k + n)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                          "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], initializer=[w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def float_rows(threads: int, target) -> list[dict]:
    from qie_ep.tvm.runner import compile_onnx
    rows = []
    for m, k, n in FLOAT_SHAPES:
        model = float_matmul(m, k, n)
        feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
        comp = compile_onnx(model, target, shape_dict={"x": [m, k]}, cache_inputs=True)
        s = session(model.SerializeToString(), False, threads)
        t_tvm, t_ort = _median_of_blocks([comp.call, lambda f, s=s: s.run(None, f)], feed, block=40)
        flops = 2.0 * m * k * n
        rows.append(dict(case=f"{m}x{k}x{n}", threads=threads, tvm_gflops=flops / t_tvm / 1e9,
                         mlas_gflops=flops / t_ort / 1e9, tvm_us=t_tvm * 1e6, mlas_us=t_ort * 1e6))
        r = rows[-1]
        print(f"float32 MatMul {r['case']:>14}  TVM+qie rule {r['tvm_gflops']:6.1f} GFLOPS  ORT FP32 (MLAS) "
              f"{r['mlas_gflops']:6.1f} GFLOPS", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-models", dest="models", action="store_false")
    ap.add_argument("--no-float", dest="float", action="store_false")
    ap.add_argument("--only", default="", help="models whose name or quantization contains this text")
    ap.add_argument("--shapes", choices=["static", "dynamic", "both"], default="both")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)      # read when TVM's pool starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tvm

    from qie_ep.tvm.schedules.isa import host_target
    target = host_target()
    env = environment()
    env["tvm"] = tvm.__version__
    print(f"# {env['cpu']} | TVM {env['tvm']} | ORT {env['onnxruntime']} | {args.threads} threads")
    frows = float_rows(args.threads, target) if args.float else []
    modes = ("static", "dynamic") if args.shapes == "both" else (args.shapes,)
    mrows = model_rows(args.threads, target, args.only, modes) if args.models else []
    write_jsonl(OUT / f"tvm_models_{args.threads}t.jsonl", [dict(r, **env) for r in mrows + frows])
    lines = [f"Measured {env['date']} on {env['cpu']} (TVM {env['tvm']}, ORT {env['onnxruntime']}, commit "
             f"{env['commit']}); {args.threads} thread(s), one process, median of 3 rounds x 15 runs per host.", "",
             "| model | quantization | shapes | TVM + qie ms | ORT INT8 ms | ORT + qie ms | TVM+qie / ORT INT8 time |",
             "|---|---|---|---|---|---|---|"]
    for r in mrows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['scheme']} | {r['shapes']} | failed: {r['failed']} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['scheme']} | {r['shapes']} | {r['tvm_qie_ms']:.2f} | {r['ort_ms']:.2f} "
                         f"| {r['ort_qie_ms']:.2f} | {r['tvm_vs_ort_time']:.2f} |")
    lines += ["", "| float32 MatMul M x K x N | TVM + qie rule GFLOPS | ORT FP32 (MLAS) GFLOPS |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['tvm_gflops']:.1f} | {r['mlas_gflops']:.1f} |" for r in frows]
    (OUT / f"tvm_models_{args.threads}t.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
