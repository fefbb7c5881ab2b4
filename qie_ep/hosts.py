"""The hosts `qie compare` runs a model on, each in its own worker process.

Hosts: ``fp32`` (the FP32 model on ORT), ``ort`` (the INT8 model on ORT's built-in kernels),
``ort+qie`` (the INT8 model on ORT with qie registered), ``tvm+qie`` (the INT8 model imported into
TVM with ``qie_ep.tvm.from_onnx`` and compiled with ``qie_ep.tvm.pipeline``) and ``openvino`` (the same
INT8 file on OpenVINO's CPU plugin with its defaults for latency: the runtime users pick for INT8 on CPUs;
optional, ``pip install openvino``).

Why processes: each host's peak memory is its own process's high-water mark (``VmHWM``) while it
runs inference (reset after loading / compiling), less what the process held with the runtime imported
and the data received, before the model was loaded, and TVM's spinning thread pool cannot steal cores from
an ORT session in the middle of a timed run. The parent drives the workers over pipes and times them
in rounds -- one pass over the data on each host in turn -- so slow drifts of a shared machine hit
every host alike. ORT sessions never spin (``session.intra_op.allow_spinning=0``).
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

HOSTS = {"fp32": "FP32, ORT", "ort": "INT8, ORT built-in", "ort+qie": "INT8, ORT + qie", "tvm+qie": "INT8, TVM + qie",
         "openvino": "INT8, OpenVINO"}
OPTIONAL = {"tvm+qie": ("tvm", "apache-tvm is not installed (pip install 'qie[tvm]')"),
            "openvino": ("openvino", "openvino is not installed (pip install 'qie[openvino]')")}


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak() -> bool:
    """Restart the process's VmHWM from its current RSS (Linux >= 4.0), so that loading / compiling
    peaks and the outputs already sent do not count; False where the kernel refuses. Freed heap goes
    back to the system first (glibc keeps freed multi-MB blocks once its mmap threshold has grown)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ort_session(model_path: str, host: str, threads: int, profile_dir: str | None = None):
    import onnx

    import qie_ep
    from qie_ep.session import session

    model = onnx.load(model_path)
    if host != "fp32":
        model = qie_ep.with_contrib_opset(model)  # same graph for ORT and ORT + qie (see README)
    return session(model, qie=host == "ort+qie", threads=threads, log_level=3, spinning=False, profile_dir=profile_dir)


def _ort_runner(model_path: str, host: str, threads: int):
    sess = _ort_session(model_path, host, threads)
    return (lambda feed: sess.run(None, feed)), {}


def _tvm_runner(model_path: str, threads: int, target_json: str | None, feeds: list[dict]):
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's pool starts
    import onnx

    from qie_ep.tvm import runner

    target = json.loads(target_json) if target_json else None  # a target's JSON form (``--target``)
    shapes = runner.fixed_shapes(feeds)
    static = len(shapes) == len(feeds[0])
    c = runner.compile_onnx(onnx.load(model_path), target, shape_dict=shapes if static else None, cache_inputs=True)
    return c.run, c.info()


class OpenVINOModel:
    """An ONNX file compiled by OpenVINO's CPU plugin for latency (one stream, ``threads`` inference threads,
    the plugin's default inference precision: bf16 where the CPU has it, as a user gets it). ``run(None, feed)``
    returns the outputs in the model's order, as ORT's ``InferenceSession.run`` does."""

    def __init__(self, model: str | bytes, threads: int):
        import openvino as ov

        core = ov.Core()
        if isinstance(model, bytes):  # read_model takes a path for ONNX (external data resolved beside it)
            with tempfile.TemporaryDirectory(prefix="qie-ov-") as d:
                path = os.path.join(d, "model.onnx")
                with open(path, "wb") as f:
                    f.write(model)
                model = core.read_model(path)
        else:
            model = core.read_model(model)
        self.compiled = core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(threads)})
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"

    def run(self, _names, feed: dict) -> list:
        result = self.request.infer(feed)
        return [np.asarray(result[o]) for o in self.outputs]


def openvino_crash(model: bytes, threads: int) -> str | None:
    """Whether OpenVINO's CPU plugin crashes the process compiling ``model`` (OpenVINO 2026.4 segfaults on some QDQ
    files, e.g. DenseNet-121 with its concatenations quantized): compiled once in a child process first, so that an
    in-process user (bench.models) reports it instead of dying. The crash as one line, or None."""
    import signal
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="qie-ov-") as d:
        path = os.path.join(d, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)
        code = "import sys; from qie_ep.hosts import OpenVINOModel; OpenVINOModel(sys.argv[1], int(sys.argv[2]))"
        r = subprocess.run([sys.executable, "-c", code, path, str(threads)], capture_output=True, timeout=1800)
    if r.returncode >= 0:
        return None
    return f"OpenVINO crashed compiling the model ({signal.Signals(-r.returncode).name})"


def failure_line(e: Exception) -> str:
    """One line for a runtime's exception: OpenVINO's importer puts the ops it could not convert on a
    "Conversion is failed for:" line after pages of checks; otherwise the message's first line."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = next((ln.lstrip("- ") for ln in lines if "Conversion is failed for" in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {why[:300]}"


def _openvino_runner(model_path: str, threads: int):
    import openvino

    m = OpenVINOModel(model_path, threads)
    return (lambda feed: m.run(None, feed)), {"openvino": openvino.__version__, "precision": m.precision}


def _profile(model_path: str, host: str, threads: int, feeds: list[dict]) -> dict:
    """Per-node mean time (us) and op from ORT's profiler."""
    with tempfile.TemporaryDirectory(prefix="qie-profile-") as d:
        sess = _ort_session(model_path, host, threads, profile_dir=d)
        for f in feeds:
            sess.run(None, f)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    nodes: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        row = nodes.setdefault(name, {"node": name, "op": e["args"].get("op_name", "?"),
                                      "provider": e["args"].get("provider", "?"), "us": 0.0, "calls": 0})
        row["us"] += float(e.get("dur", 0))
        row["calls"] += 1
    for row in nodes.values():
        row["us"] /= max(1, len(feeds))
    return {"nodes": list(nodes.values())}


def _silence_native_stderr() -> None:
    """Send the worker's file descriptor 2 to /dev/null: TVM and ORT log from C++ straight to it (e.g.
    TVM's "Fast mode segfaults when there are out-of-bounds indices" for every Gather). Python-level
    failures still reach the parent through the pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _import_runtime(host: str) -> None:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    import qie_ep  # noqa: F401
    if host == "tvm+qie":
        import qie_ep.tvm  # noqa: F401
    if host == "openvino":
        import openvino  # noqa: F401


def _worker(conn, host: str, model_path: str, threads: int, target_json: str | None) -> None:
    """Child process: build the host's runner, then answer the parent's commands until "quit"."""
    if not os.environ.get("QIE_VERBOSE"):
        _silence_native_stderr()
    try:
        feeds = conn.recv()
        _import_runtime(host)
        base_kb = _status_kb("VmRSS")  # the runtime's libraries and the data: not the model's memory
        t0 = time.perf_counter()
        if host == "tvm+qie":
            run, info = _tvm_runner(model_path, threads, target_json, feeds)
        elif host == "openvino":
            run, info = _openvino_runner(model_path, threads)
        else:
            run, info = _ort_runner(model_path, host, threads)
        info.setdefault("load_s", time.perf_counter() - t0)
        if host == "ort+qie":
            import qie_ep
            info["isa"] = qie_ep.active_isa()
            qie_ep.reset_stats()
        # Copies: an ORT output array keeps its block of ORT's CPU arena, and an arena never shrinks;
        # holding every sample's output would grow the session's memory by all of them (PP-OCRv6:
        # 100 x 2.9 MB) and inflate the memory figure.
        outputs = [[np.array(o, copy=True) for o in run(f)] for f in feeds]
        if host == "ort+qie":  # qie's own counters, per inference: which ops ran on which ISA path
            info["qie_stats"] = {f"{d}:{o}" if d else o: {isa: n / len(feeds) for isa, n in v.items()}
                                 for (d, o), v in qie_ep.stats().items()}
        conn.send(("ready", {"info": info, "outputs": outputs}))
        del outputs  # the memory figure is the steady state of inference, not of holding every output
        gc.collect()
        peak_reset = _reset_peak()
    except Exception as e:  # reported as the host's failure in the report, not a crash of `qie compare`
        conn.send(("error", failure_line(e), traceback.format_exc()))
        return
    while True:
        cmd = conn.recv()
        if isinstance(cmd, tuple) and cmd[0] == "time":
            times = []
            for f in feeds[: cmd[1]]:
                t = time.perf_counter()
                run(f)
                times.append(time.perf_counter() - t)
            conn.send(times)
        elif cmd == "memory":
            conn.send({"peak_mb": _status_kb("VmHWM") / 1024, "base_mb": base_kb / 1024, "peak_reset": peak_reset})
        elif cmd == "profile":
            conn.send(_profile(model_path, host, threads, feeds) if host in ("fp32", "ort", "ort+qie") else None)
        else:
            conn.send(None)
            return


@dataclass
class Host:
    """A running worker for one host; ``failed`` holds the reason when it could not start."""
    key: str
    model_path: str
    info: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    times: list = field(default_factory=list)   # one list of per-feed seconds per timed pass
    memory: dict = field(default_factory=dict)
    profile: dict | None = None
    failed: str | None = None
    detail: str = ""

    @property
    def label(self) -> str:
        return HOSTS[self.key]


def start(key: str, model_path: str, feeds: list[dict], threads: int, target_json: str | None = None) -> tuple:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, key, model_path, threads, target_json), daemon=True)
    proc.start()
    child.close()
    parent.send(feeds)
    return proc, parent


def run_hosts(keys: list[str], fp32_path: str, int8_path: str, feeds: list[dict], threads: int, runs: int,
              target_json: str | None = None, profile: bool = True, log=print, timed: int | None = None) -> list[Host]:
    """Start every host, collect outputs on every feed, time ``runs`` interleaved passes over the first
    ``timed`` feeds (all by default), read memory and profiles."""
    hosts, procs = [], {}
    for key in keys:
        path = fp32_path if key == "fp32" else int8_path
        h = Host(key, path)
        if key in OPTIONAL and not has_module(OPTIONAL[key][0]):
            h.failed = OPTIONAL[key][1]
            hosts.append(h)
            continue
        log(f"  starting {h.label} ...")
        proc, conn = start(key, path, feeds, threads, target_json)
        msg = _ask(conn, proc, None)
        if msg[0] == "error":
            h.failed, h.detail = msg[1], msg[2]
            proc.join(5)
        else:
            h.info, h.outputs = msg[1]["info"], msg[1]["outputs"]
            procs[key] = (proc, conn)
        hosts.append(h)
    live = [h for h in hosts if h.key in procs]
    from tqdm import tqdm

    for _ in tqdm(range(runs), desc="timing", leave=False, disable=None):
        for h in live:
            if not h.failed:
                h.times.append(_reply(h, *procs[h.key], ("time", timed or len(feeds))))
    for h in live:
        proc, conn = procs[h.key]
        h.memory = _reply(h, proc, conn, "memory") or {}
        if profile:
            h.profile = _reply(h, proc, conn, "profile")
        _reply(h, proc, conn, "quit")
        proc.join(10)
    for h in live:
        if h.failed:
            h.times = []
    return hosts


def _ask(conn, proc, cmd):
    """Send ``cmd`` (unless None) and return the reply, or ("error", why, "") if the worker died."""
    try:
        if cmd is not None:
            conn.send(cmd)
        return conn.recv()
    except (EOFError, OSError, BrokenPipeError):
        proc.join(5)
        return ("error", f"the worker process died (exit code {proc.exitcode})", "")


def _reply(h: Host, proc, conn, cmd):
    if h.failed:
        return None
    r = _ask(conn, proc, cmd)
    if isinstance(r, tuple) and r and r[0] == "error":
        h.failed = r[1]
        return None
    return r


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def default_hosts() -> list[str]:
    """`qie compare`'s hosts: ORT's three, TVM + qie (reported as not installed when absent), OpenVINO where installed."""
    return ["fp32", "ort", "ort+qie", "tvm+qie"] + (["openvino"] if has_module("openvino") else [])


def cpu_model() -> str:
    """The CPU's model name (reports and benchmarks say which machine measured)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def latency_stats(times: list[list[float]]) -> dict:
    """p50 / p90 per-sample latency (ms) and throughput (samples/s, from the median pass time)."""
    flat = np.asarray([t for p in times for t in p]) * 1e3
    passes = np.asarray([sum(p) for p in times])
    n = len(times[0]) if times else 0
    return {"p50_ms": float(np.percentile(flat, 50)), "p90_ms": float(np.percentile(flat, 90)),
            "throughput": n / float(np.median(passes)) if n else 0.0}



def host_rows(hosts, ref: list, accuracy=None) -> list[dict]:
    """One summary row per host (``hosts.run_hosts``' result): latency, agreement with ``ref`` (FP32's
    float outputs per feed), size, memory, ``accuracy(outputs, host)`` when given, kernels, and the
    speed-up in throughput over the FP32 host when it ran."""
    from qie_ep.quantization.metrics import agreement
    from qie_ep.files import model_size_mb
    from qie_ep.session import float_outputs

    rows = []
    for h in hosts:
        row = {"host": h.label, "key": h.key}
        if h.failed:
            rows.append({**row, "failed": h.failed})
            continue
        row.update(latency_stats(h.times))
        row.update(agreement(ref, [float_outputs(o) for o in h.outputs]))
        row["size_mb"] = model_size_mb(h.model_path)
        row["mem_mb"] = h.memory.get("peak_mb", 0) - h.memory.get("base_mb", 0)
        row["mem_steady_state"] = bool(h.memory.get("peak_reset"))  # False: the peak includes loading
        row["accuracy"] = accuracy(h.outputs, h) if accuracy else None
        if h.key == "ort+qie":
            row["kernels"] = ", ".join(f"{op} x{sum(v.values()):g} ({'/'.join(v)})"
                                       for op, v in sorted(h.info["qie_stats"].items())) or "none"
        elif h.key == "tvm+qie":
            row["kernels"] = f"{h.info['qie_kernels']} TIR calls ({h.info['isa']})"
        elif h.key == "openvino":
            row["kernels"] = f"OpenVINO {h.info['openvino']} CPU plugin ({h.info['precision']} inference precision)"
        row["info"] = h.info
        rows.append(row)
    base = next((r["throughput"] for r in rows if r["key"] == "fp32" and not r.get("failed")), None)
    for r in rows:
        if not r.get("failed") and base:
            r["speedup"] = r["throughput"] / base
    return rows
