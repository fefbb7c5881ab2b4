"""`qie quantize --accuracy-budget` on the real MiniLM-L6: static QDQ of every MatMul loses the embedding
(raw-output cosine 0.89 on the calibration sentences); the budget search keeps the most sensitive layers
(the FFN output projections, whose GELU inputs carry outliers) in float until the output cosine is >= 0.99,
and the sentence embeddings of held-out sentences are then >= 0.99 cosine to FP32 (measured 0.995)."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import qie_ep
from qie_ep.cli import main
from qie_ep.session import session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from qie_ep.demo import models  # noqa: E402

pytestmark = pytest.mark.slow


def _embeddings(path, qie: bool) -> np.ndarray:
    s = session(qie_ep.with_contrib_opset(onnx.load(str(path))), qie=qie)
    out = []
    for a, b in models.PARAPHRASES:  # held out: calibration uses models.SENTENCES
        for text in (a, b):
            f = models.minilm_feeds([text])
            out.append(models.sentence_embeddings(s.run(None, f)[0], f["attention_mask"])[0])
    return np.stack(out)


def test_minilm_accuracy_budget_reaches_cosine_099(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "sentences.txt").write_text("\n".join(models.SENTENCES) + "\n")
    out, rep = tmp_path / "minilm.int8.onnx", tmp_path / "report.json"
    fp32 = models.minilm_onnx()
    assert main(["quantize", str(fp32), "-o", str(out), "--calib", str(calib), "--tokenizer", str(models.minilm_dir()),
                 "--accuracy-budget", "0.01", "--report", str(rep)]) == 0
    res = json.loads(rep.read_text())
    assert res["history"][0]["cos_mean"] < 0.95  # every MatMul quantized: far off
    kept = res["kept_float"]
    assert 0 < len(kept) <= 12 and res["met"], kept
    assert all(k.endswith("/MatMul") for k in kept) and kept[0].endswith("output/dense/MatMul")
    assert "kept in float to meet the budget" in capsys.readouterr().out
    ref, got = _embeddings(fp32, qie=False), _embeddings(out, qie=True)
    cos = (ref * got).sum(1)
    assert cos.mean() >= 0.99, cos.mean()
    assert models.retrieval_accuracy(got[0::2], got[1::2]) == models.retrieval_accuracy(ref[0::2], ref[1::2])
    qie_ep.reset_stats()
    _embeddings(out, qie=True)
    st = qie_ep.stats()  # every quantized MatMul on qie: QDQ units with constant weights on its EP (where ORT
    # has the EP API), the attention MatMuls (two activations) in its attention units (two each), or as ORT's
    # QLinearMatMul on its custom op
    on_qie = (sum(st.get(("", "QLinearMatMul"), {}).values()) + sum(st.get((qie_ep.EP_NAME, "QDQ GEMM"), {}).values())
              + 2 * sum(st.get((qie_ep.EP_NAME, "QDQ attention"), {}).values()))
    assert on_qie == (48 - len(kept)) * 2 * len(models.PARAPHRASES), st
