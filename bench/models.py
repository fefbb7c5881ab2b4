"""Whole-model latency of the real convolution models: `python -m bench.models`.

PP-OCRv6 text recogniser (one 48x320 line) and PP-LCNet orientation classifier (one 224x224 page),
each as FP32 on ORT, INT8 (quantize_static per-channel, QDQ and QOperator) on ORT's built-in kernels,
and the same INT8 model on ORT + qie's custom ops alone and with qie's execution provider (where ORT has the
EP API); ORT_ENABLE_ALL, 1 and 2 threads, sessions in one process, interleaved, median of >= 20 runs.
Writes bench/out/models.jsonl and models.md.
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
    ep = qie_ep.ep_available()
    for name in ("ppocr_rec", "orientation"):
        x, _ = V.dataset(name, 1, seed=5)
        feeds = {"x": x}
        fp32 = V.model_path(name).read_bytes()
        for fmt in ("qdq", "qoperator"):
            int8 = qie_ep.with_contrib_opset(onnx.load(str(V.quantized(name, fmt)))).SerializeToString()
            for threads in args.threads:
                sessions = [session(fp32, False, threads), session(int8, False, threads),
                            session(int8, True, threads, ep=False)]
                if ep:
                    sessions.append(session(int8, True, threads, ep=True))
                for s in sessions[2:]:
                    assert np.array_equal(sessions[1].run(None, feeds)[0], s.run(None, feeds)[0])
                t = interleaved_median(sessions, feeds, runs=args.runs)
                t_fp32, t_ort, t_qie = t[:3]
                t_ep = t[3] if ep else None
                row = dict(model=name, format=fmt, threads=threads, fp32_ms=t_fp32 * 1e3, ort_int8_ms=t_ort * 1e3,
                           qie_int8_ms=t_qie * 1e3, ratio=t_ort / t_qie, qie_ep_ms=t_ep * 1e3 if ep else None,
                           ratio_ep=t_ort / t_ep if ep else None, **env)
                rows.append(row)
                ep_txt = f" | ORT+qie EP {row['qie_ep_ms']:7.2f} ms ({row['ratio_ep']:.2f}x)" if ep else ""
                print(f"{name:>12} {fmt:>9} {threads} thr: FP32 {row['fp32_ms']:7.2f} ms | ORT INT8 {row['ort_int8_ms']:7.2f} ms"
                      f" | ORT+qie custom ops {row['qie_int8_ms']:7.2f} ms ({row['ratio']:.2f}x){ep_txt}", flush=True)
    write_jsonl(OUT / "models.jsonl", rows)
    lines = [f"Measured {env['date']} on {env['cpu']} (ORT {env['onnxruntime']}, qie {env['commit']}); batch 1, "
             f"ORT_ENABLE_ALL, median of >= {args.runs} interleaved runs.", "",
             "| model | INT8 format | threads | FP32 ms | ORT INT8 ms | ORT+qie custom ops ms | ORT INT8 / custom ops | "
             "ORT+qie EP ms | ORT INT8 / EP |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ep_cells = f"{r['qie_ep_ms']:.2f} | {r['ratio_ep']:.2f}x" if r["qie_ep_ms"] is not None else "- | -"
        lines.append(f"| {r['model']} | {r['format']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['ort_int8_ms']:.2f} | "
                     f"{r['qie_int8_ms']:.2f} | {r['ratio']:.2f}x | {ep_cells} |")
    (OUT / "models.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
