"""Tables and plots for `qie compare` and `qie sensitivity`: the summary per host, the per-node kernel
table (ORT's profiler joined with qie's counters), per-layer SQNR, and their PNG plots (matplotlib,
Agg backend; written only when matplotlib is installed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np



SUMMARY_HEADER = ["host", "p50 ms", "p90 ms", "samples/s", "speed-up vs FP32", "model MB", "peak memory MB",
                  "cosine to FP32 (mean / min)", "SQNR dB", "accuracy", "qie kernels"]


def summary_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("failed"):
            out.append([r["host"], "failed: " + r["failed"]] + ["-"] * (len(SUMMARY_HEADER) - 2))
            continue
        acc = "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
        out.append([r["host"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['throughput']:.1f}",
                    f"{r['speedup']:.2f}x" if "speedup" in r else "-", _mb(r["size_mb"]), f"{r['mem_mb']:.0f}",
                    f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}", fmt_db(r["sqnr_db"]), acc, r.get("kernels", "-")])
    return markdown_table(SUMMARY_HEADER, out)


def _mb(v: float) -> str:
    return f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def kernel_rows(ort_profile: dict | None, qie_profile: dict | None, qie_ops: set[str], isa: str) -> list[dict]:
    """Nodes of the INT8 model that qie can run, with the kernel and time on ORT and on ORT + qie."""
    if not qie_profile:
        return []
    from qie_ep import EP_NAME

    base = {r["node"]: r for r in (ort_profile or {}).get("nodes", [])}
    rows = []
    for r in qie_profile["nodes"]:
        if r.get("provider") == EP_NAME:  # a QDQ unit fused by qie's execution provider
            rows.append({"node": r["node"], "op": "QDQ GEMM", "kernel": f"qie EP ({isa})", "ort_us": None,
                         "qie_us": r["us"], "ort_op": None})
            continue
        if r["op"] not in qie_ops:
            continue
        b = base.get(r["node"])
        rows.append({"node": r["node"], "op": r["op"], "kernel": f"qie ({isa})",
                     "ort_us": b["us"] if b else None, "qie_us": r["us"],
                     "ort_op": b["op"] if b else None})
    return rows


def counters_check(rows: list[dict], qie_stats: dict) -> str:
    """Whether the profiler's qie nodes per op match qie's own counters (per inference)."""
    from collections import Counter

    profiled = Counter(r["op"] for r in rows)
    counted: Counter = Counter()
    for key, per_isa in qie_stats.items():
        counted[key.split(":")[-1]] += sum(per_isa.values())
    if all(profiled[op] == counted[op] for op in set(profiled) | set(counted)):
        return f"qie's counters (`qie_ep.stats()`) agree: {sum(profiled.values())} qie kernel calls per inference."
    return ("qie's counters (`qie_ep.stats()`) differ from the profile: "
            + ", ".join(f"{op} profiled {profiled[op]}, counted {counted[op]:g}" for op in sorted(set(profiled) | set(counted))))


def kernel_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ratio = f"{r['ort_us'] / r['qie_us']:.2f}x" if r["ort_us"] and r["qie_us"] else "-"
        body.append([r["node"], r["op"], r["kernel"], "-" if r["ort_us"] is None else f"{r['ort_us']:.1f}",
                     f"{r['qie_us']:.1f}", ratio])
    return markdown_table(["node", "op", "ran on (ORT + qie)", "ORT built-in us", "ORT + qie us", "ORT / qie"], body)


def other_ops_table(profile: dict | None, qie_ops: set[str]) -> str:
    """Time of the nodes qie does not run, by op type (so the report says where the rest goes)."""
    if not profile:
        return ""
    from qie_ep import EP_NAME

    by_op: dict[str, list] = {}
    for r in profile["nodes"]:
        if r["op"] not in qie_ops and r.get("provider") != EP_NAME:
            e = by_op.setdefault(r["op"], [0, 0.0])
            e[0] += 1
            e[1] += r["us"]
    body = [[op, n, f"{us:.1f}"] for op, (n, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])]
    return markdown_table(["op (ORT kernels)", "nodes", "us per sample"], body)


def sqnr_table(rows: list[dict]) -> str:
    return markdown_table(["node", "op", "SQNR dB"], [[r["node"], r["op_type"], fmt_db(r["sqnr_db"])] for r in rows])


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_latency(rows: list[dict], path: Path, title: str) -> bool:
    plt = _plt()
    ok = [r for r in rows if not r.get("failed")]
    if plt is None or not ok:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(ok) + 1.5))
    y = np.arange(len(ok))
    ax.barh(y, [r["p50_ms"] for r in ok], color="#4c72b0", label="p50")
    ax.errorbar([r["p50_ms"] for r in ok], y, xerr=[[0] * len(ok), [r["p90_ms"] - r["p50_ms"] for r in ok]],
                fmt="none", ecolor="black", capsize=3, label="to p90")
    ax.set_yticks(y, [r["host"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("latency per sample (ms)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_layers(values: list[tuple[str, float]], path: Path, xlabel: str, title: str) -> bool:
    """Horizontal bars, one per layer (SQNR per layer, or sensitivity)."""
    plt = _plt()
    if plt is None or not values:
        return False
    vals = [v if math.isfinite(v) else np.nan for _, v in values]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(values) + 1.5))
    y = np.arange(len(values))
    ax.barh(y, vals, color="#55a868")
    ax.set_yticks(y, [n[-48:] for n, _ in values], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sensitivity_table(rows: list[dict]) -> str:
    return markdown_table(["rank", "node", "op", "cosine to FP32 (mean / min)", "SQNR dB", "loss (1 - cosine)"],
                          [[i + 1, r["node"], r["op_type"], f"{r['cos_mean']:.5f} / {r['cos_min']:.5f}",
                            fmt_db(r["sqnr_db"]), f"{r['loss']:.5f}"] for i, r in enumerate(rows)])


def fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (every cell through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
