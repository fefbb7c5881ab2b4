"""Input adapters: a folder of files -> a list of input feeds that fit the model, checked.

What a folder may hold (files are taken in name order; ``labels.*`` files are never inputs):

* ``.npz``: one archive per feed, arrays keyed by the model's input names;
* ``.npy``: one array per file, for a model with a single input;
* images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``): for a model whose single input is an image batch
  (N, 3, H, W) or (N, H, W, 3); resized to the model's H x W when those are fixed, scaled to [0, 1], then
  ``(x - mean) / std`` (``ImageOptions``);
* ``.txt``: one sample per non-empty line, tokenized by a Hugging Face tokenizer folder
  (``--tokenizer``), for transformer models whose inputs are the tokenizer's outputs.

An array whose leading (batch) size is larger than a fixed batch the model declares, or any array for
a model with a symbolic batch, is split into single-sample feeds. Every feed is checked against the
model's inputs (names, rank, fixed dimensions, kind of element type) and cast to the exact element
type; a mismatch is a ``UserError`` naming the file and the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zipfile

import numpy as np

from qie_ep.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}
DATA_EXTS = {".npy", ".npz", ".txt"} | IMAGE_EXTS


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None for symbolic ones


@dataclass(frozen=True)
class ImageOptions:
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    bgr: bool = False


def input_specs(model) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def _split(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec]) -> list[dict[str, np.ndarray]]:
    """Single-sample feeds when every array carries the same batch n > 1 where the model's batch is
    symbolic or 1; the feed unchanged otherwise."""
    sizes = {a.shape[0] if a.ndim == len(specs[k].shape) and a.ndim and specs[k].shape[0] in (None, 1) else None
             for k, a in arrays.items()}
    if len(sizes) != 1 or None in sizes or sizes == {1}:
        return [arrays]
    (n,) = sizes
    return [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(n)]


def check_feed(feed: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    """``feed`` cast to the model's element types, or a UserError saying what does not fit."""
    by_name = {s.name: s for s in specs}
    missing = [s.name for s in specs if s.name not in feed]
    extra = [k for k in feed if k not in by_name]
    if missing or extra:
        raise UserError(f"{source}: inputs {sorted(feed)} do not match the model's inputs {[s.name for s in specs]}"
                        + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
    out = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        if a.ndim == len(s.shape) - 1:  # one sample without its batch dimension
            a = a[None]
        if a.ndim != len(s.shape):
            raise UserError(f"{source}: input '{s.name}' has shape {list(a.shape)}, the model expects rank {len(s.shape)} "
                            f"{_shape_str(s.shape)}")
        bad = [i for i, (d, m) in enumerate(zip(a.shape, s.shape)) if m is not None and d != m]
        if bad:
            raise UserError(f"{source}: input '{s.name}' has shape {list(a.shape)}, the model expects {_shape_str(s.shape)}")
        if a.dtype != s.dtype:
            same_kind = (np.issubdtype(a.dtype, np.floating) and np.issubdtype(s.dtype, np.floating)) or \
                        (np.issubdtype(a.dtype, np.integer) and np.issubdtype(s.dtype, np.integer)) or \
                        (a.dtype == np.bool_ and s.dtype == np.bool_)
            if not same_kind:
                raise UserError(f"{source}: input '{s.name}' is {a.dtype}, the model expects {s.dtype}")
            a = a.astype(s.dtype)
        out[s.name] = np.ascontiguousarray(a)
    return out


def _shape_str(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_image(path: Path, spec: InputSpec, opt: ImageOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    shape = spec.shape
    if len(shape) != 4 or (shape[1] != 3 and shape[3] != 3):
        raise UserError(f"{path}: images need a model input of shape (N, 3, H, W) or (N, H, W, 3); "
                        f"'{spec.name}' is {_shape_str(shape)}")
    nchw = shape[1] == 3
    h, w = (shape[2], shape[3]) if nchw else (shape[1], shape[2])
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None
    if h is not None and w is not None:
        img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img, np.float32) / 255.0
    if opt.bgr:
        a = a[:, :, ::-1]
    a = (a - np.asarray(opt.mean, np.float32)) / np.asarray(opt.std, np.float32)
    return (a.transpose(2, 0, 1) if nchw else a)[None].astype(np.float32)


def _load_text(path: Path, specs: list[InputSpec], tokenizer: str | None) -> list[dict[str, np.ndarray]]:
    if not tokenizer:
        raise UserError(f"{path}: text inputs need --tokenizer DIR (a Hugging Face tokenizer folder)")
    tok = load_tokenizer(tokenizer)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    names = {s.name for s in specs}
    feeds = []
    for line in lines:
        enc = tok([line], return_tensors="np")
        feeds.append({k: np.asarray(v) for k, v in enc.items() if k in names})
    return feeds


def load_tokenizer(folder: str):
    if not Path(folder).is_dir():
        raise UserError(f"--tokenizer {folder}: no such folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("text inputs need the 'transformers' package (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {folder}: not a tokenizer folder ({str(e).splitlines()[0][:200]})") from None


def data_files(folder: str | Path) -> list[Path]:
    p = Path(folder)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    files = [f for f in files if f.suffix.lower() in DATA_EXTS and f.stem != "labels"]
    if not files:
        raise UserError(f"{p}: no inputs found (expected .npz, .npy, images or .txt files)")
    return files


def load_feeds(folder: str | Path, model, tokenizer: str | None = None,
               image: ImageOptions = ImageOptions()) -> list[dict[str, np.ndarray]]:
    """Every feed in ``folder`` (or one file), checked against ``model``'s inputs, in file order."""
    specs = input_specs(model)
    by_name = {s.name: s for s in specs}
    feeds = []
    for f in data_files(folder):
        ext = f.suffix.lower()
        try:
            if ext == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    raw = [{k: z[k] for k in z.files}]
            elif ext == ".npy":
                if len(specs) != 1:
                    raise UserError(f"{f}: a .npy file holds one array, the model has inputs "
                                    f"{[s.name for s in specs]}: use .npz files keyed by input name")
                raw = [{specs[0].name: np.load(f, allow_pickle=False)}]
            elif ext == ".txt":
                raw = _load_text(f, specs, tokenizer)
            else:
                if len(specs) != 1:
                    raise UserError(f"{f}: images need a model with one input; it has {[s.name for s in specs]}")
                raw = [{specs[0].name: _load_image(f, specs[0], image)}]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:  # corrupt .npy/.npz, pickled objects
            raise UserError(f"{f}: cannot read ({str(e)[:200]})") from None
        for r in raw:
            parts = _split(r, by_name) if set(r) <= set(by_name) else [r]
            for i, part in enumerate(parts):
                where = f"{f} (sample {i + 1} of {len(parts)})" if len(parts) > 1 else str(f)
                feeds.append(check_feed(part, specs, where))
    return feeds


def load_labels(path: str | Path, n: int) -> list:
    """Labels for ``n`` samples from a ``.npy`` array or a text file (one per line); integers when they
    all are, strings otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such labels file")
    if p.suffix == ".npy":
        labels = np.load(p, allow_pickle=False).reshape(-1).tolist()
    else:
        labels = [ln.rstrip("\n") for ln in p.read_text(encoding="utf-8").splitlines()]
        while labels and labels[-1] == "":
            labels.pop()
        if all(lb.strip().lstrip("-").isdigit() for lb in labels):
            labels = [int(lb) for lb in labels]
    if len(labels) != n:
        raise UserError(f"{p}: {len(labels)} labels for {n} samples")
    return labels
