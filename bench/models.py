"""Whole-model latency of the demo's real models: `python -m bench.models`.

PP-OCRv6 text recogniser (one 48x320 line) and PP-LCNet orientation classifier (one 224x224 page), each as FP32 on
ORT and INT8 (quantize_static per-channel with ORT's op set, QDQ and QOperator; and the demo's `qie quantize
--per-channel` file, "qdq qie-quantize"); MiniLM-L6 (one sentence) as the
demo quantizes it (`qie quantize`'s code: static QDQ of every MatMul, and with --accuracy-budget 0.01); two
torch-built architectures the demo lacks (qie_ep.demo.synthetic: a TransformerEncoder, a MobileNetV2-like CNN;
seeded weights, `qie quantize --per-channel`); on request (`--models resnet50 ...`) the onnx wheel's Caffe2 CNNs
(qie_ep.demo.zoo, random weights, `qie quantize --per-channel`). Each INT8
model on ORT's built-in kernels, on ORT + qie's custom ops alone and with qie's execution provider (where ORT has
the EP API), and the same INT8 file on OpenVINO where it is installed (its CPU plugin's latency defaults, in the
same process, interleaved); ORT_ENABLE_ALL, 1 and 2 threads, sessions in one process, interleaved (pools not spinning, so no
session steals the other's core), median of >= 20 runs.
The custom ops must give ORT INT8's outputs bit for bit; the EP's regions (tables built with libm where ORT uses
MLAS's Sigmoid / Erf) are reported by output cosine and largest difference to ORT INT8. For QDQ models the EP's
time in its regions is split per unit kind (its `profile` option, a separate session) so the next bottleneck
shows. Writes bench/out/models.jsonl, models.md and models.png (docs/bench-models.png is a copy).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

import qie_ep
from bench.common import OUT, environment, interleaved_median, session, write_jsonl
from qie_ep.demo import vision as V
from qie_ep.demo import zoo
from qie_ep.hosts import OpenVINOModel, failure_line, has_module, openvino_crash


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=0, help="also list each EP row's N slowest region steps")
    ap.add_argument("--models", nargs="+", default=["ppocr_rec", "orientation", "minilm", "encoder", "mbnet", "detector"],
                    help="demo models, qie_ep.demo.synthetic's torch-built encoder / mbnet / detector (seeded weights), and "
                         f"the onnx wheel's Caffe2 CNNs (qie_ep.demo.zoo: {', '.join(zoo.NAMES)})")
    args = ap.parse_args(argv)
    env = environment()
    print(f"# {env['cpu']} | ORT {env['onnxruntime']} | qie {env['qie']} ({env['isa']}) | ORT_ENABLE_ALL, batch 1")
    rows = []
    ep = qie_ep.ep_available()
    ov = has_module("openvino")
    for name, fmt, fp32, int8, feeds in cases(args.models):
        for threads in args.threads:
            sessions = [session(fp32, False, threads), session(int8, False, threads),
                        session(int8, True, threads, ep=False)]
            if ep:
                sessions.append(session(int8, True, threads, ep=True))
            want = sessions[1].run(None, feeds)[0]
            assert np.array_equal(want, sessions[2].run(None, feeds)[0])
            cosine = max_diff = None
            if ep:
                cosine, max_diff = _agreement(want, sessions[3].run(None, feeds)[0])
            ov_model, ov_failed, ov_cosine = None, None, None
            if ov:
                try:
                    ov_failed = openvino_crash(int8, threads)  # a crash would end this process: probed apart
                    ov_model = None if ov_failed else OpenVINOModel(int8, threads)
                    ov_cosine = _agreement(want, ov_model.run(None, feeds)[0])[0] if ov_model else None
                except Exception as e:  # a model OpenVINO cannot read or compile: said in the row, not a crash
                    ov_model, ov_failed = None, failure_line(e)
            t = interleaved_median(sessions + ([ov_model] if ov_model else []), feeds, runs=args.runs)
            t_fp32, t_ort, t_qie = t[:3]
            t_ep = t[3] if ep else None
            t_ov = t[-1] if ov_model else None
            row = dict(model=name, format=fmt, threads=threads, fp32_ms=t_fp32 * 1e3, ort_int8_ms=t_ort * 1e3,
                       qie_int8_ms=t_qie * 1e3, ratio=t_ort / t_qie, qie_ep_ms=t_ep * 1e3 if ep else None,
                       ratio_ep=t_ort / t_ep if ep else None, ep_vs_fp32=t_fp32 / t_ep if ep else None,
                       ep_cosine=cosine, ep_max_diff=max_diff,
                       openvino_ms=t_ov * 1e3 if t_ov else None, openvino_failed=ov_failed, openvino_cosine=ov_cosine,
                       openvino_precision=ov_model.precision if ov_model else None,
                       ep_vs_openvino=t_ov / t_ep if t_ov and ep else None,
                       **env)
            if ep and fmt != "qoperator":
                row["region_shares"], steps = region_shares(int8, threads, feeds, steps=True)
                row["region_steps"] = sorted(steps.items(), key=lambda kv: -kv[1])[:args.steps]
            rows.append(row)
            ep_txt = (f" | ORT+qie EP {row['qie_ep_ms']:7.2f} ms ({row['ratio_ep']:.2f}x ORT INT8, "
                      f"{row['ep_vs_fp32']:.2f}x FP32, cosine {cosine:.5f})") if ep else ""
            if t_ov:
                ep_txt += f" | OpenVINO {row['openvino_ms']:7.2f} ms" + (f" (EP {row['ep_vs_openvino']:.2f}x)" if ep else "")
            elif ov_failed:
                ep_txt += f" | OpenVINO failed: {ov_failed}"
            print(f"{name:>12} {fmt:>9} {threads} thr: FP32 {row['fp32_ms']:7.2f} ms | ORT INT8 {row['ort_int8_ms']:7.2f} ms"
                  f" | ORT+qie custom ops {row['qie_int8_ms']:7.2f} ms ({row['ratio']:.2f}x){ep_txt}", flush=True)
    write_jsonl(OUT / "models.jsonl", rows)
    lines = [f"Measured {env['date']} on {env['cpu']} (ORT {env['onnxruntime']}, qie {env['commit']}); batch 1, "
             f"ORT_ENABLE_ALL, median of >= {args.runs} interleaved runs.", "",
             "| model | INT8 format | threads | FP32 ms | ORT INT8 ms | ORT+qie custom ops ms | ORT INT8 / custom ops | "
             "ORT+qie EP ms | ORT INT8 / EP | FP32 / EP | EP cosine to ORT INT8 | OpenVINO ms | OpenVINO / EP | "
             "OpenVINO cosine to ORT INT8 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ep_cells = (f"{r['qie_ep_ms']:.2f} | {r['ratio_ep']:.2f}x | {r['ep_vs_fp32']:.2f}x | {r['ep_cosine']:.5f}"
                    if r["qie_ep_ms"] is not None else "- | - | - | -")
        ov_cells = (f"{r['openvino_ms']:.2f} | " + (f"{r['ep_vs_openvino']:.2f}x" if r["ep_vs_openvino"] else "-") +
                    f" | {r['openvino_cosine']:.5f}" if r["openvino_ms"] else
                    ("failed (below) | - | -" if r["openvino_failed"] else "- | - | -"))
        lines.append(f"| {r['model']} | {r['format']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['ort_int8_ms']:.2f} | "
                     f"{r['qie_int8_ms']:.2f} | {r['ratio']:.2f}x | {ep_cells} | {ov_cells} |")
    precisions = sorted({r["openvino_precision"] for r in rows if r.get("openvino_precision")})
    if precisions:
        import openvino

        lines += ["", f"OpenVINO {openvino.__version__}, CPU plugin, PERFORMANCE_HINT=LATENCY, one stream, the session's "
                  f"threads; its default inference precision on this CPU: {', '.join(precisions)} (its float parts, "
                  "hence its cosine)."]
    for r in rows:
        if r.get("openvino_failed") and r["threads"] == rows[0]["threads"]:
            lines += ["", f"OpenVINO failed on {r['model']} {r['format']}: {r['openvino_failed']}"]
    shared = [r for r in rows if r.get("region_shares")]
    if shared:
        kinds = sorted({k for r in shared for k in r["region_shares"]}, key=lambda k: -max(
            r["region_shares"].get(k, 0) for r in shared))
        lines += ["", "Share of the EP run's time per region unit kind (the rest: ORT's nodes outside the regions):", "",
                  "| model | threads | " + " | ".join(kinds) + " | outside regions |", "|---|---|" + "---|" * (len(kinds) + 1)]
        for r in shared:
            sh = r["region_shares"]
            lines.append(f"| {r['model']} | {r['threads']} | " + " | ".join(f"{100 * sh.get(k, 0):.0f}%" for k in kinds) +
                         f" | {100 * max(0.0, 1 - sum(sh.values())):.0f}% |")
    if args.steps:
        lines += ["", f"The {args.steps} slowest region steps of each EP row (us per run; a step is its unit's op node):",
                  "", "| model | INT8 format | threads | steps |", "|---|---|---|---|"]
        for r in rows:
            if r.get("region_steps"):
                lines.append(f"| {r['model']} | {r['format']} | {r['threads']} | " +
                             ", ".join(f"{k} {us:.0f}" for k, us in r["region_steps"]) + " |")
    (OUT / "models.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / "models.png")


def plot(rows: list[dict], path) -> None:
    """Speed-ups of ORT + qie's EP over FP32, ORT INT8 and OpenVINO per QDQ model row (bars; 1 = as fast), the
    issue's targets as lines (2x FP32 for CNNs, 1.5x MiniLM, 1.2x / 1.5x geomean ORT INT8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("qie_ep_ms") and "qoperator" not in r["format"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate([("ep_vs_fp32", "vs FP32"), ("ratio_ep", "vs ORT INT8"),
                                      ("ep_vs_openvino", "vs OpenVINO")]):
        ax.bar(x + (i - 1) * 0.27, [r.get(key) or 0 for r in rows], 0.27, label=label)
    for y, style in ((1.0, "-"), (1.2, ":"), (1.5, "--"), (2.0, "-.")):
        ax.axhline(y, color="grey", lw=0.8, ls=style)
    ax.set_xticks(x, [f"{r['model']} {r['format']} {r['threads']}t" for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speed-up of ORT + qie EP (x)")
    ax.set_title(f"ORT + qie EP, batch 1, ORT_ENABLE_ALL ({rows[0]['cpu']}, {rows[0]['date']}): higher is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _agreement(want, got) -> tuple[float, float]:
    """Cosine and largest absolute difference of two outputs."""
    a, b = np.asarray(want, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)), float(np.abs(a - b).max())


def cases(names):
    """(model, INT8 format, FP32 bytes, INT8 bytes, feeds) per measured model: the vision models quantized by
    quantize_static with ORT's op set (QDQ and QOperator), MiniLM as the demo quantizes it (`qie quantize`'s code:
    static QDQ of every MatMul, and with --accuracy-budget 0.01), one sentence."""
    for name in names:
        if name in ("encoder", "mbnet", "detector"):  # architectures the demo lacks (qie_ep.demo.synthetic), qie quantize'd
            from qie_ep.demo import synthetic

            fp32, int8 = synthetic.model(name)
            int8_bytes = qie_ep.with_contrib_opset(onnx.load(str(int8))).SerializeToString()  # the custom-ops column
            yield name, "qdq", fp32.read_bytes(), int8_bytes, {"x": synthetic.inputs(name, 1, seed=5)[0]}
            continue
        if name in zoo.NAMES:  # the onnx wheel's Caffe2 CNNs, random weights, qie quantize'd (qie_ep.demo.zoo)
            fp32, int8 = zoo.model(name)
            model = qie_ep.with_contrib_opset(onnx.load(str(int8)))
            yield name, "qdq", fp32.read_bytes(), model.SerializeToString(), zoo.inputs(model, 1, seed=5)[0]
            continue
        if name == "minilm":
            from qie_ep.demo.__main__ import minilm_cases

            for case in minilm_cases()[1:]:  # the two static QDQ models (the dynamic one has no QDQ units)
                fmt = "qdq budget" if "budget" in case.scheme else "qdq"
                int8 = qie_ep.with_contrib_opset(onnx.load(str(case.int8))).SerializeToString()
                yield name, fmt, case.fp32.read_bytes(), int8, case.feeds[0]
            continue
        x, _ = V.dataset(name, 1, seed=5)
        for fmt in ("qdq", "qoperator"):
            int8 = qie_ep.with_contrib_opset(onnx.load(str(V.quantized(name, fmt)))).SerializeToString()
            yield name, fmt, V.model_path(name).read_bytes(), int8, {"x": x}
        # The same model as `qie quantize --per-channel` writes it (the demo's file: ORT's pre-processing folds
        # BatchNormalization into the convs; Conv / MatMul / Gemm and the feature-map ops between them quantized),
        # what a new user runs.
        from qie_ep.demo.__main__ import vision_case

        int8 = qie_ep.with_contrib_opset(onnx.load(str(vision_case(name, 1).int8))).SerializeToString()
        yield name, "qdq qie-quantize", V.model_path(name).read_bytes(), int8, {"x": x}


def region_shares(model: bytes, threads: int, feeds: dict, runs: int = 20, steps: bool = False):
    """Fraction of an EP run's time spent in each region unit kind, from a session with the EP's profile option;
    ``steps``: also each region step's microseconds per run ({step: us})."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    qie_ep.register(so, ep_options={"profile": "1"})
    s = ort.InferenceSession(model, so)
    s.run(None, feeds)
    qie_ep.reset_stats()
    t0 = time.perf_counter()
    for _ in range(runs):
        s.run(None, feeds)
    wall = time.perf_counter() - t0  # this session's own time: the shares are of it
    shares = {k: v["ms"] / 1e3 / wall for k, v in qie_ep.region_profile().items()}
    if not steps:
        return shares
    return shares, {k: v["ms"] * 1e3 / runs for k, v in qie_ep.region_profile(steps=True).items()}


if __name__ == "__main__":
    main()
