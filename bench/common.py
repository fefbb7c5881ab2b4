"""Shared benchmark machinery: interleaved, warm, median timing of two ORT sessions in one process."""
from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qie_ep
from qie_ep.hosts import cpu_model
from qie_ep.session import session as qie_session

OUT = Path(__file__).resolve().parent / "out"


def read_shapes(name: str) -> list[dict]:
    with open(Path(__file__).resolve().parent / "shapes" / f"{name}.csv") as f:
        return [{k: (int(v) if k in "mnk" else v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_csv(name: str) -> list[dict]:
    """bench/shapes/<name>.csv with integer columns converted."""
    with open(Path(__file__).resolve().parent / "shapes" / f"{name}.csv") as f:
        return [{k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in row.items()} for row in csv.DictReader(f)]


def session(model_bytes: bytes, qie: bool, threads: int, ep: bool | None = None) -> ort.InferenceSession:
    """``qie``: with ``qie_ep.register`` (``ep``: its execution provider too; None = wherever available)."""
    # Both sessions live in one process and are run alternately: a spinning idle worker of one would
    # steal the second core from the other, so neither spins.
    return qie_session(model_bytes, qie=qie, threads=threads, spinning=False, ep=ep)


def interleaved_median(sessions: list, feeds: dict, runs: int = 25, min_time: float = 0.2) -> list[float]:
    """Median seconds per run of each session, alternating between them every run after a warm-up."""
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    times = [[] for _ in sessions]
    t_end = time.perf_counter() + min_time
    i = 0
    while i < runs or time.perf_counter() < t_end:
        for j, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[j].append(time.perf_counter() - t0)
        i += 1
        if i >= 2000:
            break
    return [float(np.median(t)) for t in times]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        return ""


def environment() -> dict:
    return {"cpu": cpu_model(), "commit": commit(), "onnxruntime": ort.__version__, "qie": qie_ep.__version__,
            "isa": qie_ep.active_isa(), "date": time.strftime("%Y-%m-%d")}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
