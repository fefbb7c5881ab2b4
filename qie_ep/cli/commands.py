"""The three subcommands behind `qie`: argument checking, the work, what is printed and written."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx

from qie_ep.quantization import data as D
from qie_ep.errors import UserError
from qie_ep.files import atomic_output, check_distinct, check_loadable, check_writable, load_model, model_size_mb
from qie_ep.hosts import cpu_model, host_rows
from qie_ep.quantization.config import QuantizeConfig
from qie_ep.quantization.metrics import task_accuracy
from qie_ep.quantization.quantizer import quantize_file
from qie_ep.session import float_outputs


def _image_options(args) -> D.ImageOptions:
    return D.ImageOptions(mean=args.mean, std=args.std, bgr=args.bgr)


def _config(args) -> QuantizeConfig:
    if args.op_types is None:  # qie's default: its kernels' op types and the feature-map ops around them
        ops = {}
    else:  # exactly what was asked
        ops = {"op_types": () if [o.lower() for o in args.op_types] == ["all"] else tuple(args.op_types),
               "feature_maps": False}
    return QuantizeConfig(dynamic=args.dynamic, per_channel=args.per_channel, fmt=args.format, **ops,
                          activation_type=args.activation_type, weight_type=args.weight_type,
                          exclude=tuple(args.exclude), calibration=args.calibration, smooth=args.smooth_alpha,
                          preprocess=getattr(args, "preprocess", True))


def _out_dir(path: str) -> Path:
    """The report folder, checked but not created: ``_make_dir`` creates it once the inputs are valid."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: exists and is not a folder")
    check_writable(p / "report.md") if p.is_dir() else check_writable(p)
    return p


def _make_dir(p: Path) -> Path:
    p.mkdir(exist_ok=True)
    return p


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)



def quantize(args) -> int:
    check_distinct(input_model=args.model, output_model=args.output, report=args.report)
    model = load_model(args.model, load_external_data=False)
    check_loadable(args.model)
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    cfg = _config(args)
    feeds = D.load_feeds(args.calib, model, args.tokenizer, _image_options(args)) if args.calib else []
    if args.calib:
        print(f"{len(feeds)} calibration samples from {args.calib}")
    t0 = time.perf_counter()
    res = quantize_file(args.model, args.output, feeds, cfg, args.accuracy_budget, progress=True, log=print)
    kind = "dynamic" if cfg.dynamic else f"static {cfg.fmt.upper()}, {cfg.calibration} calibration"
    print(f"wrote {args.output}: {kind}, {'per-channel' if cfg.per_channel else 'per-tensor'} "
          f"{cfg.weight_type} weights, {res['layers'] - len(res['kept_float'])} of {res['layers']} layers quantized"
          + (f" and {res['feature_maps']} feature-map ops between them" if res["feature_maps"] else "")
          + (f", the MatMuls after {len(res['smoothed'])} LayerNorms smoothed" if res.get("smoothed") else "")
          + f" ({time.perf_counter() - t0:.1f} s)")
    print(f"size: {model_size_mb(args.model):.1f} MB -> {model_size_mb(args.output):.1f} MB")
    if "agreement" in res:
        a = res["agreement"]
        print(f"output agreement with FP32 on the calibration data: cosine {a['cos_mean']:.4f} (min {a['cos_min']:.4f}), "
              f"SQNR {a['sqnr_db']:.1f} dB")
    if args.accuracy_budget is not None:
        if res["kept_float"]:
            print(f"kept in float to meet the budget (cosine >= {1 - args.accuracy_budget:.4f}): "
                  + ", ".join(res["kept_float"]))
        else:
            print(f"no layer needed to stay in float (cosine >= {1 - args.accuracy_budget:.4f})")
        if not res.get("met", True):
            print("note: the budget is met only with every layer in float")
    if args.report:
        _write_text(Path(args.report), json.dumps(res, indent=1, default=float) + "\n")
    return 0


def sensitivity(args) -> int:
    from qie_ep.cli import report as R
    from qie_ep.quantization.quantizer import Quantizer
    from qie_ep.quantization.sensitivity import layer_sensitivity

    model = load_model(args.model, load_external_data=False)
    check_loadable(args.model)
    out = _out_dir(args.out)
    cfg = _config(args)
    feeds = D.load_feeds(args.calib, model, args.tokenizer, _image_options(args))
    q = Quantizer(Path(args.model), cfg, feeds)
    try:
        if not q.layers():
            raise UserError(f"{args.model}: no layer of type {' '.join(cfg.op_types) or 'any'} to quantize")
        print(f"{len(q.layers())} layers, {len(feeds)} samples: quantizing one layer at a time")
        rows = layer_sensitivity(q)
    finally:
        q.close()
    table = R.sensitivity_table(rows)
    print(R.sensitivity_table(rows[: args.top]))
    _make_dir(out)
    if len(rows) > args.top:
        print(f"({len(rows) - args.top} more in {out / 'sensitivity.md'})")
    plotted = R.plot_layers([(r["node"], r["loss"]) for r in rows], out / "sensitivity.png",
                            "output loss when only this layer is quantized (1 - cosine to FP32)",
                            f"{Path(args.model).name}: per-layer sensitivity")
    md = [f"# Per-layer sensitivity: {Path(args.model).name}", "",
          f"Each layer quantized alone ({'dynamic' if cfg.dynamic else 'static ' + cfg.fmt.upper()}, "
          f"{'per-channel' if cfg.per_channel else 'per-tensor'}), the model run on {len(feeds)} samples from "
          f"`{args.calib}`, outputs compared with FP32. Most harmful first.", ""]
    if plotted:
        md += ["![sensitivity](sensitivity.png)", ""]
    _write_text(out / "sensitivity.md", "\n".join(md + [table, ""]))
    _write_text(out / "sensitivity.json", json.dumps(rows, indent=1) + "\n")
    print(f"report: {out / 'sensitivity.md'}")
    return 0


def _random_feeds(model, n: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(n):
        f = {}
        for s in D.input_specs(model):
            shape = [1 if d is None else d for d in s.shape]
            if np.issubdtype(s.dtype, np.floating):
                f[s.name] = rng.standard_normal(shape).astype(s.dtype)
            else:
                f[s.name] = np.ones(shape, s.dtype)
        feeds.append(f)
    return feeds


def _output_types(model) -> dict:
    """{output name: (element type, dims with None where not a fixed number, or None when rank unknown)}."""
    out = {}
    for o in model.graph.output:
        t = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        out[o.name] = (t.elem_type, dims)
    return out


def _check_same_outputs(fp32, int8, fp32_path, int8_path) -> None:
    """The INT8 model must declare the FP32 model's outputs: same names, element types and every fixed dim."""
    a, b = _output_types(fp32), _output_types(int8)
    if sorted(a) != sorted(b):
        raise UserError(f"{int8_path}: outputs {sorted(b)} differ from {fp32_path}'s {sorted(a)}: not the same model")
    for name, (ta, da) in a.items():
        tb, db = b[name]
        clash = (ta != tb or (da is not None and db is not None and
                              (len(da) != len(db) or any(x is not None and y is not None and x != y for x, y in zip(da, db)))))
        if clash:
            fmt = lambda t, d: f"{onnx.TensorProto.DataType.Name(t).lower()}{d if d is not None else '[?]'}"  # noqa: E731
            raise UserError(f"{int8_path}: output '{name}' is {fmt(tb, db)} but {fp32_path}'s is {fmt(ta, da)}: "
                            "not the same model")


def compare(args) -> int:
    import qie_ep
    from qie_ep import hosts as H
    from qie_ep.cli import report as R
    from qie_ep.quantization.sensitivity import activation_sqnr

    fp32 = load_model(args.model, load_external_data=False)
    int8 = load_model(args.int8, load_external_data=False)
    check_loadable(args.model)
    check_loadable(args.int8)
    in_fp32 = [s.name for s in D.input_specs(fp32)]
    in_int8 = [s.name for s in D.input_specs(int8)]
    if sorted(in_fp32) != sorted(in_int8):
        raise UserError(f"{args.int8}: inputs {in_int8} differ from {args.model}'s {in_fp32}: not the same model")
    _check_same_outputs(fp32, int8, args.model, args.int8)
    out = _out_dir(args.out)
    if args.data:
        feeds = D.load_feeds(args.data, fp32, args.tokenizer, _image_options(args))
        source = f"{len(feeds)} samples from `{args.data}`"
    else:
        feeds = _random_feeds(fp32)
        source = f"{len(feeds)} random inputs (no --data: agreement figures are on random data)"
    labels = D.load_labels(args.labels, len(feeds)) if args.labels else None
    if args.runs < 1:
        raise UserError("--runs must be >= 1")
    threads = args.threads or os.cpu_count() or 1
    _make_dir(out)
    print(f"{Path(args.model).name} vs {Path(args.int8).name}: {source}, {threads} threads, {args.runs} timed passes")
    hosts = H.run_hosts(args.hosts or H.default_hosts(), str(args.model), str(args.int8), feeds, threads, args.runs, args.target)
    by_key = {h.key: h for h in hosts}
    ref_host = by_key.get("fp32")
    if ref_host and not ref_host.failed:
        ref = [float_outputs(o) for o in ref_host.outputs]
    else:
        from qie_ep.session import run_outputs
        ref = run_outputs(Path(args.model), feeds, qie=False)
    qie_ops = {op for _, op in qie_ep.ops()}
    rows = host_rows(hosts, ref,
                     (lambda outs, h: task_accuracy(outs, labels, int8 if h.key != "fp32" else fp32)) if labels else None)
    print()
    print(R.summary_table(rows))
    sqnr = activation_sqnr(Path(args.model), Path(args.int8), feeds[:16])
    qh, oh = by_key.get("ort+qie"), by_key.get("ort")
    krows = R.kernel_rows(oh.profile if oh and not oh.failed else None, qh.profile if qh and not qh.failed else None,
                          qie_ops, qh.info.get("isa", "?") if qh and not qh.failed else "?")
    plots = {"latency": R.plot_latency(rows, out / "latency.png", f"{Path(args.int8).name}: latency per sample"),
             "sqnr": R.plot_layers([(r["node"], r["sqnr_db"]) for r in sqnr], out / "sqnr.png",
                                   "SQNR of the layer's INT8 output vs FP32 (dB)", "per-layer SQNR")}
    md = [f"# qie compare: {Path(args.model).name} vs {Path(args.int8).name}", "",
          f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {threads} threads, ONNX Runtime {_ort_version()}, "
          f"qie {qie_ep.__version__} (ISA {qie_ep.active_isa()}). Data: {source}. Latency: every sample of "
          f"{args.runs} passes, hosts interleaved pass by pass, each in its own process; speed-up is throughput "
          "over FP32's; peak memory is the host process's high-water mark while running inference less what it "
          "held before loading the model.", "", R.summary_table(rows), ""]
    for r in rows:
        if r.get("failed"):
            md += [f"{r['host']} failed: {r['failed']}", ""]
        elif r["key"] == "tvm+qie":
            md += [f"TVM + qie: target `{r['info']['target']}`, compiled in {r['info']['compile_s']:.1f} s; "
                   f"qie kernels: {', '.join(r['info']['kernel_names']) or 'none'}.", ""]
    if plots["latency"]:
        md += ["![latency](latency.png)", ""]
    if krows:
        md += ["## Which kernel ran, per node (ORT's profiler)", "", R.counters_check(krows, qh.info["qie_stats"]), "",
               R.kernel_table(krows), "", "Time of the other nodes (ORT + qie):", "",
               R.other_ops_table(qh.profile, qie_ops), ""]
    if sqnr:
        md += ["## Per-layer SQNR (each quantized layer's output vs the FP32 model's)", ""]
        md += (["![sqnr](sqnr.png)", ""] if plots["sqnr"] else []) + [R.sqnr_table(sqnr), ""]
    _write_text(out / "report.md", "\n".join(md))
    _write_text(out / "results.json", json.dumps({"rows": rows, "kernels": krows, "sqnr": sqnr}, indent=1,
                                                 default=float) + "\n")
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__
