"""CUDA paths: qie's dp4a and tensor-core (IMMA) kernels compile for sm_80 and sm_90, and the generated
code contains the instructions (CUDA source; PTX through nvcc where it is installed). These machines have
no GPU: numerics of the CUDA group (shift to s8, packing, zero-point terms, epilogue) are checked by
running the same PrimFuncs with the unscheduled core on the CPU; the run on a GPU is skipped unless
one is present. ``tests/gpu/`` runs the compiled graphs on a lent GPU without installing TVM there
(measured on an H100, 2026-11-26: dp4a and IMMA bit-exact with ORT on three shapes).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from tvm_helpers import HOST, assert_within_fma, qtvm, tvm
from qie_ep import reference as ref
from qie_ep.tvm.schedules import cuda, gemm, isa as tisa
from qie_ep.tvm.schedules.gemm import Epilogue

ARCHS = ["sm_80", "sm_90"]
NVCC = shutil.which("nvcc")


def target(arch):
    return tvm.target.Target({"kind": "cuda", "arch": arch})


@pytest.mark.parametrize("arch", ARCHS)
def test_dp4a_core_compiles_to_dp4a(arch, tmp_path):
    f = cuda.scheduled_core(768, 768, tisa.CUDA_DP4A, target(arch))
    src = cuda.source(f, target(arch))
    body = src[src.index("extern \"C\" __global__"):]
    assert len(re.findall(r"__dp4a\(", body)) >= 16          # 4 x 4 outputs per thread, unrolled
    if NVCC:
        ptx = _ptx(src, arch, tmp_path)
        assert re.search(r"dp4a\.s32\.s32", ptx), "no dp4a instruction in the PTX"


def test_dp4a_core_stages_the_whole_block_tile():
    """Each shared-memory stage holds the block's 64 rows x 4 words of A and of B, fetched once by all
    256 threads with no predicate. The first dp4a schedule staged only one thread's rows (its block and
    thread loops were bound after compute_at), so the other threads read shared memory no one wrote:
    wrong results on an H100 (2026-11-26), invisible to the CPU checks; fixed by binding first."""
    f = cuda.scheduled_core(768, 768, tisa.CUDA_DP4A, target("sm_90"))
    script = f.script()
    for buf in ("A_shared", "B_shared"):
        block = script[script.index(f'T.sblock("{buf}")'):]
        block = block[:block.index(f"{buf}[v0, v1] = ")]
        assert "T.where" not in block, f"{buf}: a predicated (partial) fetch\n{block}"
    src = cuda.source(f, target("sm_90"))
    stores = re.findall(r"([AB])_shared_ptr\[\(\(\(\(int64_t\)threadIdx\.y\) \* \(int64_t\)16\) \+ \(\(int64_t\)threadIdx\.x\)\)\] =", src)
    assert sorted(stores) == ["A", "B"], "shared tiles must be written at threadIdx.y * 16 + threadIdx.x by every thread"


@pytest.mark.parametrize("arch", ARCHS)
def test_imma_core_compiles_to_tensor_core_s8(arch, tmp_path):
    f = cuda.scheduled_core(768, 768, tisa.CUDA_IMMA, target(arch))
    src = cuda.source(f, target(arch))
    assert "wmma::mma_sync" in src
    assert re.search(r"wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, signed char", src)
    if NVCC:
        ptx = _ptx(src, arch, tmp_path)
        assert re.search(r"mma\.sync\.aligned\.\S*s8", ptx) or re.search(r"wmma\.mma\.sync\S*s8", ptx), \
            "no s8 tensor-core mma in the PTX"


def _ptx(src: str, arch: str, tmp_path) -> str:
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    out = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-o", str(out), str(cu)], check=True, capture_output=True)
    return out.read_text()


@pytest.mark.parametrize("isa", ["cuda_dp4a", "cuda_imma"])
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_compiles_for_cuda(isa, arch, monkeypatch):
    from test_tvm_graphs import qlinear_matmul_model
    monkeypatch.setenv("QIE_TVM_ISA", isa)
    model = qlinear_matmul_model(np.uint8, np.uint8, 96, 72, per_column=True)
    mod = qtvm.from_onnx(model)
    assert qtvm.kernel_calls(qtvm.rewrite_pass(target(arch))(mod)) == [f"qie_gemm_s8s8_s32_k96n128__{isa}"]
    tvm.compile(mod, target(arch), relax_pipeline=qtvm.pipeline(target(arch)))


def test_default_isa_by_arch():
    assert qtvm.isa_for(target("sm_80")) == "cuda_imma"
    assert qtvm.isa_for(tvm.target.Target({"kind": "cuda", "arch": "sm_75"})) == "cuda_dp4a"


def _epilogue_operands(rng, out, n):
    """(Epilogue, operands after the zero-point ones, reference kwargs) for output dtype ``out``. The
    requantize multiplier 0.5 makes every odd accumulator an exact tie (x.5), so half-to-even rounding is
    checked, with a bias that moves some outputs past both saturation ends."""
    if out == "int32":
        return Epilogue("int32"), [], {}
    if out == "float32":
        scale = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
        fbias = rng.normal(size=n).astype(np.float32)
        return Epilogue("float32", per_channel=True, bias=True), [scale, fbias], {"out": "float", "scale": scale,
                                                                                 "fbias": fbias}
    mult = np.full(n, 0.5, np.float32)
    mult[::3] = rng.uniform(1e-3, 0.05, len(mult[::3])).astype(np.float32)
    bias = rng.integers(-400, 400, n).astype(np.int32)
    zy = 100 if out == "uint8" else -3
    return (Epilogue(out, per_channel=True, bias=True), [mult, bias, np.asarray([zy], np.int32)],
            {"out": out, "scale": mult, "bias": bias, "y_zero_point": zy})


@pytest.mark.parametrize("isa", ["cuda_dp4a", "cuda_imma"])
@pytest.mark.parametrize("out", ["int32", "uint8", "int8", "float32"])
@pytest.mark.parametrize("adt,bdt", [("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8"), ("int8", "uint8")])
def test_cuda_group_numerics_on_cpu(isa, out, adt, bdt):
    """prep -> core -> rowsum -> epilogue, the CUDA group's PrimFuncs, built for the CPU, equal the
    reference: the shift to s8, dp4a's packing into int32 words (its ``__dp4a`` emulated in TIR), row
    padding to the 64-row tile, the zero-point terms, and every epilogue (int32, requantized u8/s8 with
    exact ties and saturation, float with per-column scale and bias within one FMA rounding, as on x86).
    The scheduling is not exercised
    here (the GPU check in tests/gpu/ runs it)."""
    rng = np.random.default_rng(4)
    m, k, n = 13, 70, 50
    lo = {"uint8": 0, "int8": -128}
    a = rng.integers(lo[adt], lo[adt] + 256, (m, k)).astype(adt)
    b = rng.integers(lo[bdt], lo[bdt] + 256, (k, n)).astype(bdt)
    za, zb = np.asarray(7, adt), rng.integers(lo[bdt], lo[bdt] + 256, n).astype(bdt)
    tiles = {"cuda_dp4a": tisa.CUDA_DP4A, "cuda_imma": tisa.CUDA_IMMA}[isa]
    dp4a = isa == "cuda_dp4a"
    packed, colsum, zbs, kp, np_ = cuda.pack_weights(b, zb, tiles)
    sa, _ = gemm.shifts(tiles, adt, bdt)
    acc_ref = ref.gemm_u8s8(a, b, int(za), zb.astype(np.int32))
    epi, operands, kw = _epilogue_operands(rng, out, n)
    epi = Epilogue(epi.out, per_channel=epi.per_channel, bias=epi.bias, zb=bool(np.any(zbs)))
    funcs = [cuda.prep_primfunc(adt, k, kp, tiles), cuda.core_primfunc(kp, np_, "core", dp4a, emulate=True),
             cuda.rowsum_primfunc(adt, k, sa), cuda.epilogue_primfunc(k, n, np_, epi, sa, "epi")]
    libs = [tvm.tirx.build(tvm.IRModule({"main": f}), target=HOST) for f in funcs]
    t = lambda x: tvm.runtime.tensor(np.ascontiguousarray(x))  # noqa: E731
    if dp4a:  # rows padded to the 64-row block tile, four bytes to a word
        mt = (m + 63) // 64
        ap = t(np.zeros((mt * 64, kp // 4), np.int32))
        libs[0]["main"](t(a), mt, ap)
        acc = t(np.zeros((mt * 64, np_), np.int32))
        libs[1]["main"](ap, t(packed), mt, acc)
    else:
        ap = t(np.zeros((m, kp), np.int8))
        libs[0]["main"](t(a), ap)
        acc = t(np.zeros((m, np_), np.int32))
        libs[1]["main"](ap, t(packed), acc)
    rows = t(np.zeros(m, np.int32))
    libs[2]["main"](t(a), rows)
    ydt = {"int32": np.int32, "uint8": np.uint8, "int8": np.int8, "float32": np.float32}[out]
    y = t(np.zeros((m, n), ydt))
    extra = [t(zbs), rows] if epi.zb else []
    libs[3]["main"](acc, t(colsum), t(np.asarray([za], np.int32)), *extra, *map(t, operands), y)
    want = ref.gemm_u8s8(a, b, int(za), zb.astype(np.int32), **kw)
    if out == "float32":
        assert_within_fma(y.numpy(), want, kw["fbias"])
        return
    np.testing.assert_array_equal(y.numpy(), want)
    if out in ("uint8", "int8"):
        qlo, qhi = ref.QRANGE[np.dtype(out)]
        exact = (acc_ref + kw["bias"]) * 0.5 + kw["y_zero_point"]
        assert (want == qlo).any() and (want == qhi).any(), "test did not saturate both ends"
        assert (np.abs(exact - np.round(exact)) == 0.5)[:, kw["scale"] == 0.5].any(), "test has no exact tie"


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("isa", ["cuda_dp4a", "cuda_imma"])
def test_cuda_graph_matches_ort_on_gpu(isa, monkeypatch):
    from helpers import run
    from test_tvm_graphs import qlinear_matmul_model
    monkeypatch.setenv("QIE_TVM_ISA", isa)
    model = qlinear_matmul_model(np.uint8, np.int8, 256, 192, per_column=True)
    dev = tvm.cuda(0)
    tgt = tvm.target.Target.from_device(dev) if hasattr(tvm.target.Target, "from_device") else target("sm_80")
    ex = tvm.compile(qtvm.from_onnx(model), tgt, relax_pipeline=qtvm.pipeline(tgt))
    vm = tvm.relax.VirtualMachine(ex, dev)
    a = np.random.default_rng(0).integers(0, 256, (2, 5, 256)).astype(np.uint8)
    got = vm["main"](tvm.runtime.tensor(a, dev)).numpy()
    want, = run(model, {"a": a}, qie=False, level="disable")
    np.testing.assert_array_equal(got, want)
