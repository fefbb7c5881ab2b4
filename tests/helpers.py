"""Shared test helpers: the kernel-level ctypes entry, ONNX model builders, session runners."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

from qie_ep._lib import testing_lib
from qie_ep.session import session as qie_session

# Memory-safety jobs (`make memcheck`, `make valgrind`) set QIE_TEST_NO_ARENA=1: every ORT buffer is its own
# allocation, so a write past one lands in a redzone instead of the arena's slack.
NO_ARENA = os.environ.get("QIE_TEST_NO_ARENA") == "1"
# Without AVX-512 VNNI or AVX-VNNI (an AVX2-only CPU, or under valgrind, which hides them) ORT's MLAS runs its
# AVX2 u8s8 kernels, whose vpmaddubsw saturates the sum of two u8 x s8 products: ORT's own results then differ
# from the integer reference (an ORT limitation it documents; qie widens to int16 and stays exact). There, and
# when QIE_TEST_NO_BUILTIN=1 (`make valgrind`), qie is still checked against the reference; ORT's built-in is not.


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True  # unknown: compare, and let a mismatch be seen
    return "avx512_vnni" in flags or "avx_vnni" in flags


COMPARE_BUILTIN = os.environ.get("QIE_TEST_NO_BUILTIN") != "1" and _cpu_has_vnni()

OUT_KINDS = {"int32": 0, "float": 1, "uint8": 2, "int8": 3}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _ptr(x):
    return None if x is None else x.ctypes.data_as(ctypes.c_void_p)


GUARD = 64  # bytes of a known pattern on each side of a kernel's output


def guarded_output(shape, dtype, fill):
    """(output array filled with ``fill``, the buffer it lies in with GUARD pattern bytes on each side)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    raw = np.full(nbytes + 2 * GUARD, 0xA5, np.uint8)
    y = raw[GUARD:GUARD + nbytes].view(dt).reshape(shape)
    y[...] = fill
    return y, raw


def check_guards(raw, what):
    """A kernel that wrote outside its output changed the guard bytes: fail naming where."""
    for side, g in (("before", raw[:GUARD]), ("after", raw[-GUARD:])):
        bad = np.flatnonzero(g != 0xA5)
        if bad.size:
            raise AssertionError(f"{what} wrote {bad.size} byte(s) {side} its output")


def kernel_gemm(isa, a, b, za, zb, bias=None, bias_rs=0, bias_cs=0, out="int32", scale=None, fbias=None,
                y_zp=0, threads=1):
    """Run qie's kernel layer on one 2-D GEMM on ISA path `isa` (returns None if unsupported)."""
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    m, k = a.shape
    n = b.shape[1]
    za = np.ascontiguousarray(np.asarray(za, np.int32).reshape(-1))
    zb = np.ascontiguousarray(np.broadcast_to(np.asarray(zb, np.int32).reshape(-1), (n,)))
    scale = None if scale is None else np.ascontiguousarray(np.broadcast_to(np.asarray(scale, np.float32), (n,)))
    fbias = None if fbias is None else np.ascontiguousarray(np.asarray(fbias, np.float32))
    bias = None if bias is None else np.ascontiguousarray(np.asarray(bias, np.int32))
    ydt = {"int32": np.int32, "float": np.float32, "uint8": np.uint8, "int8": np.int8}[out]
    y, raw = guarded_output((m, n), ydt, 0x5A if ydt in (np.uint8, np.int8) else 12345)
    rc = testing_lib().qie_test_gemm(isa.encode(), m, n, k, _ptr(a), int(a.dtype == np.int8), _ptr(b), int(b.dtype == np.int8),
                             _ptr(za), int(za.size > 1), _ptr(zb), _ptr(bias), bias_rs, bias_cs, OUT_KINDS[out],
                             _ptr(scale), _ptr(fbias), int(y_zp), _ptr(y), threads)
    check_guards(raw, f"GEMM m={m} n={n} k={k} on {isa}")
    return None if rc != 0 else y


def kernel_quantize_dynamic(isa, x):
    """DynamicQuantizeMatMul's quantization of ``x`` on ISA path ``isa``: (q, scale, zero point), or None
    when the CPU lacks the ISA. The output is guarded."""
    x = np.ascontiguousarray(x, np.float32)
    q, raw = guarded_output((x.size,), np.uint8, 0)
    scale, zp = np.zeros(1, np.float32), np.zeros(1, np.uint8)
    rc = testing_lib().qie_test_quantize_dynamic(isa.encode(), _ptr(x), x.size, _ptr(scale), _ptr(zp), _ptr(q))
    check_guards(raw, f"dynamic quantization of {x.size} values on {isa}")
    return None if rc != 0 else (q, scale[0], zp[0])


def microkernel_tile(isa) -> tuple[int, int, int]:
    """(MR, NR, K-group) of ISA path ``isa``'s GEMM microkernel, as the library declares it."""
    mr, nr, kg = (ctypes.c_int() for _ in range(3))
    assert testing_lib().qie_test_microkernel(isa.encode(), ctypes.byref(mr), ctypes.byref(nr), ctypes.byref(kg)) == 0
    return mr.value, nr.value, kg.value


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def single_node_model(op, inputs, initializers, out_dtype, domain="", attrs=None, opset=21, out_shape=None):
    """One node; `inputs`: list of (name, array-or-None) fed at run time (None = empty optional slot);
    `initializers`: {name: array} constants (also listed in `inputs` order by name)."""
    names = [n for n, _ in inputs]
    graph_inputs = [helper.make_tensor_value_info(n, tensor_type(v.dtype), list(v.shape))
                    for n, v in inputs if v is not None and n not in initializers and n]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers.items()]
    node = helper.make_node(op, names, ["y"], domain=domain, **(attrs or {}))
    y = helper.make_tensor_value_info("y", tensor_type(out_dtype), out_shape)
    graph = helper.make_graph([node], f"{op}_test", graph_inputs, [y], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def session(model, qie=True, level="all", threads=1, arena=True, quiet=False, ep=False):
    """An InferenceSession on the CPU EP; ``arena=False`` puts every buffer in its own allocation, so a
    write past one is not hidden in the arena's slack (reliability and fuzz tests, ASan). With ``qie``, the
    custom-op library alone by default (every op it registers, com.microsoft's too, as on ORT builds without
    the EP API); ``ep=None`` is what ``qie_ep.register(so)`` does (the EP wherever available)."""
    return qie_session(model, qie=qie, level=level, threads=threads, arena=arena and not NO_ARENA,
                       log_level=4 if quiet else None, ep=ep)


def run(model, feeds, qie=True, level="all", threads=1, ep=False):
    return session(model, qie, level, threads, ep=ep).run(None, feeds)


def assert_exact(got, want, context=""):
    """atol=0 comparison whose failure names the first mismatch."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape} {context}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype} {context}"
    bad = np.argwhere(got != want) if got.dtype.kind != "f" else np.argwhere(~((got == want) | (np.isnan(got) & np.isnan(want))))
    if bad.size:
        i = tuple(bad[0])
        raise AssertionError(f"{len(bad)} mismatches; first at {i}: expected {want[i]!r}, got {got[i]!r} {context}")


def kernel_conv(isa, x, w, x_zp, w_zp, *, group=1, strides=None, dilations=None, pads=None, bias=None,
                out="int32", scale=None, y_zp=0, threads=1, with_form=False, lut=None):
    """Run qie's NHWC convolution kernel layer on ISA path `isa` (returns None if unsupported).

    ``x``: NHWC (N, *spatial, C) with 1-3 spatial dims; ``w``: ONNX (M, C/group, *kernel);
    ``pads``: ONNX [begin..., end...]. ``with_form``: also return whether a depthwise convolution ran on
    its ISA's own weight form (the AVX-512 VNNI quad-tap kernel) rather than the int16 pair form. ``lut``: byte
    tables applied to u8 / s8 output codes inside the kernel's tasks, (256,) for one or (M, 256) for one per channel.
    """
    from qie_ep.reference import conv_geometry
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    n, c = x.shape[0], x.shape[-1]
    m = w.shape[0]
    sp, k = list(x.shape[1:-1]), list(w.shape[2:])
    r = len(sp)
    strides, dilations = list(strides or [1] * r), list(dilations or [1] * r)
    o, pb, _ = conv_geometry(sp, k, strides, dilations, pads)
    pad3 = lambda v, f: [f] * (3 - r) + list(v)  # noqa: E731
    geom = np.array(pad3(sp, 1) + pad3(o, 1) + pad3(k, 1) + pad3(strides, 1) + pad3(dilations, 1) + pad3(pb, 0), np.uintp)
    w_zp = np.ascontiguousarray(np.broadcast_to(np.asarray(w_zp, np.int32).reshape(-1), (m,)))
    scale = None if scale is None else np.ascontiguousarray(np.broadcast_to(np.asarray(scale, np.float32), (m,)))
    bias = None if bias is None else np.ascontiguousarray(np.asarray(bias, np.int32))
    ydt = {"int32": np.int32, "uint8": np.uint8, "int8": np.int8}[out]
    y, raw = guarded_output([n] + o + [m], ydt, 0x5A if ydt != np.int32 else 12345)
    tables = None if lut is None else np.concatenate([np.asarray(lut, np.uint8).ravel(), np.zeros(3, np.uint8)])
    rc = testing_lib().qie_test_conv(isa.encode(), n, c, m, group, _ptr(geom), _ptr(x), int(x.dtype == np.int8), int(x_zp),
                             _ptr(w), int(w.dtype == np.int8), _ptr(w_zp), _ptr(bias), OUT_KINDS[out], _ptr(scale),
                             int(y_zp), _ptr(y), threads, _ptr(tables), 1 if lut is None else np.asarray(lut).size // 256)
    check_guards(raw, f"conv x{list(x.shape)} w{list(w.shape)} group={group} on {isa}")
    y = None if rc < 0 else y
    return (y, rc == 1) if with_form else y
