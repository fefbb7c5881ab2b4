"""Whole-model latency of the real convolution models: `python -m bench.models`.

PP-OCRv6 text recogniser (one 48x320 line) and PP-LCNet orientation classifier (one 224x224 page),
each as FP32 on ORT, INT8 (quantize_static per-channel, QDQ and QOperator) on ORT's built-in kernels,
and the same INT8 model on ORT + qie; ORT_ENABLE_ALL, 1 and 2 threads, sessions in one process,
interleaved, median of >= 20 runs. Writes bench/out/models.jsonl and models.md.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx

import qie_ep
from bench.common import OUT, environment, interleaved_median, session, write_jsonl
from qie_ep.demo import vision as V


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    env = environment()
    print(f"# {env['cpu']} | ORT {env['onnxruntime']} | qie {env['qie']} ({env['isa']}) | ORT_ENABLE_ALL, batch 1")
    rows = []
    for name in ("ppocr_rec", "orientation"):
        x, _ = V.dataset(name, 1, seed=5)
        feeds = {"x": x}
        fp32 = V.model_path(name).read_bytes()
        for fmt in ("qdq", "qoperator"):
            int8 = qie_ep.with_contrib_opset(onnx.load(str(V.quantized(name, fmt)))).SerializeToString()
            for threads in args.threads:
                sessions = [session(fp32, False, threads), session(int8, False, threads), session(int8, True, threads)]
                assert np.array_equal(sessions[1].run(None, feeds)[0], sessions[2].run(None, feeds)[0])
                t_fp32, t_ort, t_qie = interleaved_median(sessions, feeds, runs=args.runs)
                row = dict(model=name, format=fmt, threads=threads, fp32_ms=t_fp32 * 1e3, ort_int8_ms=t_ort * 1e3,
                           qie_int8_ms=t_qie * 1e3, ratio=t_ort / t_qie, **env)
                rows.append(row)
                print(f"{name:>12} {fmt:>9} {threads} thr: FP32 {row['fp32_ms']:7.2f} ms | ORT INT8 {row['ort_int8_ms']:7.2f} ms"
                      f" | ORT+qie INT8 {row['qie_int8_ms']:7.2f} ms | qie speed-up {row['ratio']:.2f}x", flush=True)
    write_jsonl(OUT / "models.jsonl", rows)
    lines = [f"Measured {env['date']} on {env['cpu']} (ORT {env['onnxruntime']}, qie {env['commit']}); batch 1, "
             f"ORT_ENABLE_ALL, median of >= {args.runs} interleaved runs.", "",
             "| model | INT8 format | threads | FP32 ms | ORT INT8 ms | ORT+qie INT8 ms | qie / ORT INT8 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['ort_int8_ms']:.2f} | "
                     f"{r['qie_int8_ms']:.2f} | {r['ratio']:.2f}x |")
    (OUT / "models.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
