"""The `qie` command line: quantize an FP32 ONNX model, measure it on each host, find sensitive layers.

    qie quantize model.onnx -o model.int8.onnx --calib DIR [--accuracy-budget 0.01]
    qie compare model.onnx model.int8.onnx --data DIR [--labels FILE] [-o REPORT_DIR]
    qie sensitivity model.onnx --calib DIR

Errors a user can cause exit with status 2 and one line on stderr ("qie: error: ..."), no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from qie_ep.errors import UserError

EXIT_USER_ERROR = 2


def _floats3(text: str) -> tuple:
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return v


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input adapters (for images and text in the data folder)")
    g.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder for .txt inputs (one sample a line)")
    g.add_argument("--mean", type=_floats3, default=(0.0, 0.0, 0.0), metavar="R,G,B",
                   help="images: subtracted after scaling to [0, 1] (default 0,0,0)")
    g.add_argument("--std", type=_floats3, default=(1.0, 1.0, 1.0), metavar="R,G,B", help="images: divisor (default 1,1,1)")
    g.add_argument("--bgr", action="store_true", help="images: channel order BGR instead of RGB")


def _quant_args(p: argparse.ArgumentParser) -> None:
    from qie_ep.quantization.config import DEFAULT_OP_TYPES, FEATURE_MAP_OP_TYPES

    p.add_argument("--dynamic", action="store_true", help="dynamic quantization (activations quantized at run time)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                   help="per-output-channel weight scales (the default)")
    w.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="one scale per weight tensor (ONNX Runtime's quantizer's default)")
    p.add_argument("--format", choices=("qdq", "qoperator"), default="qdq", help="static model format (default qdq)")
    p.add_argument("--op-types", nargs="+", default=None, metavar="OP",
                   help=f"op types to quantize, exactly (default: {' '.join(DEFAULT_OP_TYPES)}, what qie has kernels "
                        f"for, and in static QDQ models {' '.join(FEATURE_MAP_OP_TYPES)} on convolutional feature maps; "
                        "'all' for ORT's default set)")
    p.add_argument("--activation-type", choices=("u8", "s8"), default="u8", help="static activations (default u8)")
    p.add_argument("--weight-type", choices=("u8", "s8"), default="s8", help="weights (default s8)")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="node names to keep in float")
    p.add_argument("--smooth-alpha", type=float, default=0.5, metavar="A",
                   help="static: SmoothQuant's migration strength for the MatMuls reading a LayerNormalization's "
                        "output (default 0.5; 0: off)")
    p.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                   help="quantize the model as given: by default a graph with BatchNormalization first goes through "
                        "ONNX Runtime's quantization pre-processing (shape inference, basic graph optimization), "
                        "which folds it into the Conv before it")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qie", description="Quantize ONNX models and run them on qie's INT8 kernels "
                                 "inside ONNX Runtime and TVM.")
    ap.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize an FP32 model with onnxruntime.quantization",
                       description="Quantize an FP32 ONNX model (static with calibration data, or dynamic).")
    q.add_argument("model", help="FP32 .onnx model")
    q.add_argument("-o", "--output", required=True, help="INT8 .onnx model to write")
    q.add_argument("--calib", metavar="DIR", help="calibration inputs: .npz/.npy files, images or .txt")
    _quant_args(q)
    q.add_argument("--accuracy-budget", type=float, metavar="X",
                   help="mixed precision: keep the most sensitive layers in float until the mean output cosine "
                        "to FP32 on the --calib data is >= 1 - X (e.g. 0.01)")
    q.add_argument("--report", metavar="FILE.json", help="also write what was done as JSON")
    _data_args(q)

    c = sub.add_parser("compare", help="run FP32 and INT8 on every host; latency, memory, agreement, kernels",
                       description="Run the FP32 model on ORT and the INT8 model on ORT's built-in kernels, ORT + qie, "
                                   "TVM + qie and OpenVINO (where installed); write a markdown report and plots.")
    c.add_argument("model", help="FP32 .onnx model")
    c.add_argument("int8", help="INT8 .onnx model (from `qie quantize` or any quantizer)")
    c.add_argument("--data", metavar="DIR", help="inputs (as for --calib); default: random inputs of the model's shapes")
    c.add_argument("--labels", metavar="FILE", help="labels for --data (.npy or one per line): integers give top-1 "
                   "accuracy of output 0; strings give CTC line accuracy (PaddleOCR models)")
    c.add_argument("-o", "--out", default="qie-report", metavar="DIR", help="report folder (default qie-report)")
    c.add_argument("--hosts", nargs="+", choices=["fp32", "ort", "ort+qie", "tvm+qie", "openvino"],
                   help="which hosts to run (default: all; openvino where it is installed)")
    c.add_argument("--runs", type=int, default=20, help="timed passes over the data (default 20)")
    c.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all cores)")
    c.add_argument("--target", help="TVM target as JSON (default: this host's llvm target)")
    _data_args(c)

    s = sub.add_parser("sensitivity", help="per-layer quantization sensitivity (one layer quantized at a time)",
                       description="Quantize one layer at a time and measure the model's output against FP32.")
    s.add_argument("model", help="FP32 .onnx model")
    s.add_argument("--calib", metavar="DIR", required=True, help="calibration / evaluation inputs")
    _quant_args(s)
    s.add_argument("-o", "--out", default="qie-sensitivity", metavar="DIR", help="folder for table and plot")
    s.add_argument("--top", type=int, default=20, help="rows printed (default 20; the report has all)")
    _data_args(s)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.verbose:
        os.environ["QIE_VERBOSE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from qie_ep.cli import commands
        return getattr(commands, args.command.replace("-", "_"))(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"qie: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qie: interrupted", file=sys.stderr)
        return 130
