"""qie vs ONNX Runtime's built-in kernels on quantized convolution: `python -m bench.conv`.

Layers (bench/shapes/conv.csv: ResNet-50-like, MobileNet-like depthwise and pointwise) as one NCHW
QLinearConv node each (uint8 activations, int8 per-channel weights, int32 bias), run at
ORT_ENABLE_ALL, where ORT rewrites the node into its NHWC contrib op between Transposes for both
sessions; the same layers as ConvInteger (uint8 x uint8, per-tensor) against ORT's ConvInteger. Two
sessions in one process, interleaved, warm, median of >= 20 runs, at 1 and 2 threads. Writes
bench/out/conv.jsonl, conv.md and conv.png. Whole-model latency of the real models is in bench.models.
"""
from __future__ import annotations

import argparse

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.common import OUT, environment, interleaved_median, read_csv, session, write_jsonl


def conv_model(s: dict, op: str, seed: int = 0) -> tuple[bytes, dict]:
    rng = np.random.default_rng(seed)
    c, m, k, g = s["c"], s["m"], s["k"], s["group"]
    x = rng.integers(0, 256, (1, c, s["h"], s["w"])).astype(np.uint8)
    attrs = dict(strides=[s["stride"]] * 2, pads=[s["pad"]] * 4, group=g)
    if op == "QLinearConv":
        w = rng.integers(-127, 128, (m, c // g, k, k)).astype(np.int8)
        inits = [numpy_helper.from_array(v, n) for v, n in [
            (np.array(0.02, np.float32), "sx"), (np.array(120, np.uint8), "zx"), (w, "w"),
            (rng.uniform(0.001, 0.01, m).astype(np.float32), "sw"), (np.zeros(m, np.int8), "zw"),
            (np.array(0.05 * np.sqrt(c // g * k * k), np.float32), "sy"), (np.array(128, np.uint8), "zy"),
            (rng.integers(-1000, 1000, m).astype(np.int32), "b")]]
        node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"], **attrs)
        ydt = TensorProto.UINT8
    else:
        w = rng.integers(0, 256, (m, c // g, k, k)).astype(np.uint8)
        inits = [numpy_helper.from_array(v, n) for v, n in [(w, "w"), (np.array(120, np.uint8), "zx"),
                                                             (np.array(128, np.uint8), "zw")]]
        node = helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["y"], **attrs)
        ydt = TensorProto.INT32
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", ydt, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString(), {"x": x}


def real_layers(name: str) -> list[tuple[dict, bytes, dict]]:
    """Each distinct QLinearConv of a real model (QOperator, batch 1) as a one-node NCHW model."""
    import onnx
    from onnx import shape_inference

    from qie_ep.demo import vision as V
    from qie_ep.reference import conv_geometry

    model = onnx.load(str(V.quantized(name, "qoperator")))
    x, _ = V.dataset(name, 1, seed=5)
    model.graph.input[0].type.tensor_type.shape.CopyFrom(
        onnx.TensorShapeProto(dim=[onnx.TensorShapeProto.Dimension(dim_value=d) for d in x.shape]))
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    inits = {t.name: t for t in model.graph.initializer}
    out, seen = [], set()
    rng = np.random.default_rng(0)
    for node in model.graph.node:
        if node.op_type != "QLinearConv" or node.input[0] not in shapes:
            continue
        xs = shapes[node.input[0]]
        w = onnx.numpy_helper.to_array(inits[node.input[3]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        key = (tuple(xs), w.shape, str(sorted(attrs.items())))
        if key in seen or len(xs) != 4 or not all(xs):
            continue
        seen.add(key)
        g = onnx.helper.make_graph(
            [onnx.helper.make_node("QLinearConv", ["x"] + list(node.input[1:]), ["y"], **attrs)], "g",
            [onnx.helper.make_tensor_value_info("x", TensorProto.UINT8, xs)],
            [onnx.helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
            initializer=[inits[i] for i in node.input[1:] if i])
        m = onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        k = w.shape[2]
        out_sp, _, _ = conv_geometry(xs[2:], list(w.shape[2:]), attrs.get("strides"), attrs.get("dilations"),
                                     attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
        n_macs = float(np.prod(out_sp)) * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3]
        desc = dict(macs=n_macs, name=f"{'rec' if name == 'ppocr_rec' else 'lcnet'}_{xs[2]}x{xs[3]}_{xs[1]}-{w.shape[0]}_k{k}"
                         f"{'_dw' if attrs.get('group', 1) > 1 else ''}{'_s2' if max(attrs.get('strides', [1])) > 1 else ''}",
                    h=xs[2], w=xs[3], c=xs[1], m=w.shape[0], k=k, group=attrs.get("group", 1),
                    stride=max(attrs.get("strides", [1])), pad=max(attrs.get("pads", [0])), source=name)
        out.append((desc, m.SerializeToString(), {"x": rng.integers(0, 256, xs).astype(np.uint8)}))
    return out


def macs(s: dict) -> float:
    if "macs" in s:
        return s["macs"]
    oh = (s["h"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
    ow = (s["w"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
    return float(oh * ow * s["m"] * (s["c"] // s["group"]) * s["k"] * s["k"])


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sub = [r for r in rows if r["op"] == op]
        names = list(dict.fromkeys(r["name"] for r in sub))
        x = np.arange(len(names))
        for i, t in enumerate(sorted({r["threads"] for r in sub})):
            ratio = [next(r["ratio"] for r in sub if r["name"] == n and r["threads"] == t) for n in names]
            ax.bar(x + (i - 0.5) * 0.4, ratio, 0.4, label=f"{t} thread{'s' if t > 1 else ''}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{op}: qie / ORT built-in (higher is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ops", nargs="+", default=["QLinearConv", "ConvInteger"])
    ap.add_argument("--only", nargs="*", help="layer names to run")
    ap.add_argument("--no-real", dest="real", action="store_false", help="skip the real models' conv layers")
    args = ap.parse_args(argv)
    env = environment()
    print(f"# {env['cpu']} | ORT {env['onnxruntime']} | qie {env['qie']} ({env['isa']}) | ORT_ENABLE_ALL")
    layers = [s for s in read_csv("conv") if not args.only or s["name"] in args.only]
    cases = [(s, op, *conv_model(s, op)) for op in args.ops for s in layers]
    if args.real:
        cases += [(d, "QLinearConv", m, f) for name in ("orientation", "ppocr_rec") for d, m, f in real_layers(name)]
    print(f"{'layer':>16} {'op':>12} {'thr':>3} {'ORT ms':>8} {'qie ms':>8} {'ORT GOPS':>9} {'qie GOPS':>9} {'ratio':>6}")
    rows = []
    for s, op, model, feeds in cases:
        for threads in args.threads:
                # qie's custom ops alone: with the EP registered, register() adds no com.microsoft kernels and ORT's
                # NHWC transformer hands QLinearConv to its own com.microsoft NHWC kernel (ORT against ORT).
                ort_s, qie_s = session(model, False, threads), session(model, True, threads, ep=False)
                assert np.array_equal(ort_s.run(None, feeds)[0], qie_s.run(None, feeds)[0]), s["name"]
                t_ort, t_qie = interleaved_median([ort_s, qie_s], feeds, runs=args.runs)
                ops = 2.0 * macs(s)
                row = dict(s, op=op, threads=threads, ort_s=t_ort, qie_s=t_qie, ort_gops=ops / t_ort / 1e9,
                           qie_gops=ops / t_qie / 1e9, ratio=t_ort / t_qie, **env)
                rows.append(row)
                print(f"{s['name']:>16} {op:>12} {threads:>3} {t_ort * 1e3:8.3f} {t_qie * 1e3:8.3f} "
                      f"{row['ort_gops']:9.1f} {row['qie_gops']:9.1f} {row['ratio']:6.2f}", flush=True)
    write_jsonl(OUT / "conv.jsonl", rows)
    lines = [f"Measured {env['date']} on {env['cpu']} (ORT {env['onnxruntime']}, qie {env['commit']}, ISA {env['isa']}); "
             f"one node per layer at ORT_ENABLE_ALL, median of >= {args.runs} interleaved runs.", "",
             "| layer | op | threads | ORT ms | qie ms | ORT GOPS | qie GOPS | qie / ORT |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['op']} | {r['threads']} | {r['ort_s'] * 1e3:.3f} | {r['qie_s'] * 1e3:.3f} | "
                     f"{r['ort_gops']:.0f} | {r['qie_gops']:.0f} | {r['ratio']:.2f}x |")
    lines.append("")
    for op in args.ops:
        rat = np.array([r["ratio"] for r in rows if r["op"] == op])
        if rat.size:
            lines.append(f"{op}: geometric mean qie / ORT **{np.exp(np.log(rat).mean()):.2f}x**, "
                         f"min {rat.min():.2f}x, max {rat.max():.2f}x over {rat.size} cases.")
    (OUT / "conv.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / "conv.png")
    print("\n".join(lines[-len(args.ops):]))


if __name__ == "__main__":
    main()
