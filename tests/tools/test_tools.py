"""The suite's own tools stay usable: the valgrind report filter and the mutation check's mutations."""
from __future__ import annotations

from pathlib import Path

import pytest

import mutation_check
import valgrind_report

ROOT = Path(__file__).resolve().parents[2]


def _report(path: Path, errors: list[tuple[str, str]]) -> Path:
    """A valgrind XML report with one error per (kind, obj of its only frame)."""
    body = "".join(f"<error><kind>{k}</kind><what>bad</what><stack><frame><ip>0x1</ip><obj>{o}</obj><fn>f</fn>"
                   f"</frame></stack></error>" for k, o in errors)
    path.write_text(f"<?xml version='1.0'?><valgrindoutput>{body}</valgrindoutput>")
    return path


def test_valgrind_report_counts_only_errors_in_qie(tmp_path, capsys):
    others = _report(tmp_path / "a.xml", [("UninitValue", "/usr/lib/libpython3.11.so"), ("InvalidRead", "/lib/ld.so")])
    assert valgrind_report.main([str(others)]) == 0
    ours = _report(tmp_path / "b.xml", [("InvalidWrite", "/x/build/valgrind/libqie_ort.so")])
    assert valgrind_report.main([str(others), str(ours)]) == 1
    assert "1 error(s) in qie; 2 elsewhere" in capsys.readouterr().out
    cut = tmp_path / "c.xml"
    cut.write_text("<?xml version='1.0'?><valgrindoutput><error>")  # the run died mid-report
    assert valgrind_report.main([str(cut)]) == 1


@pytest.mark.parametrize("m", mutation_check.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_to_the_sources(m):
    """Every mutation names a line that exists exactly once (else `make mutation` stops on it)."""
    text = (ROOT / "ort_plugin/src" / m.path).read_text()
    assert text.count(m.old) == 1, f"{m.path}: {m.old!r} occurs {text.count(m.old)} times"
    assert m.new != m.old


def test_openvino_crash_probe(tmp_path, monkeypatch):
    """bench.models compiles each file on OpenVINO in a child first (OpenVINO 2026.4 segfaults on DenseNet-121's
    QDQ file): a child killed by a signal is reported by name, a child that ran (or raised) is not a crash."""
    import subprocess

    from qie_ep.hosts import openvino_crash

    codes = iter([-11, 1, 0])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, next(codes), b"", b""))
    assert openvino_crash(b"model", 1) == "OpenVINO crashed compiling the model (SIGSEGV)"
    assert openvino_crash(b"model", 1) is None  # an exception there: the in-process compile reports it
    assert openvino_crash(b"model", 2) is None
