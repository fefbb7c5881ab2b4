"""Device side of the CUDA check (see build_cuda_check.py): run one exported Relax VM library with
tvm_ffi + TVM's runtime libraries only (no TVM compiler, no ``import tvm``), compare its output with
ORT's bit for bit, and time it.

    PYTHONPATH=py python3 run_cuda_check.py cuda /abs/path/cuda_dp4a-large.so cuda_dp4a-large.npz
"""
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tvm_ffi  # loads libtvm_ffi.so, which TVM's runtime libraries link against

HERE = os.path.dirname(os.path.abspath(__file__))
KIND, SO, NPZ = sys.argv[1], sys.argv[2], sys.argv[3]
_LIBS = sorted(os.listdir(os.path.join(HERE, "lib")))
for name in [n for n in _LIBS if n.startswith("libcudart")] + ["libtvm_runtime.so", "libtvm_runtime_extra.so",
                                                                 "libtvm_runtime_cuda.so"]:
    path = os.path.join(HERE, "lib", name)
    if os.path.exists(path) and ("cuda" not in name or KIND == "cuda"):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def _nvcc(code, *_):
    """What tvm.support.nvcc does in nvcc mode: the module carries CUDA source, compiled when loaded."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.cu"), "w") as f:
            f.write(code)
        subprocess.run([nvcc, "--fatbin", "-O3", "-arch=sm_90", "-o", os.path.join(d, "k.fatbin"),
                        os.path.join(d, "k.cu")], check=True, capture_output=True)
        with open(os.path.join(d, "k.fatbin"), "rb") as f:
            return bytearray(f.read())


ALLOC = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
COPY_IN = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
COPY_OUT = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
DEV = tvm_ffi.device("cuda" if KIND == "cuda" else "cpu", 0)


def to_device(a):
    t = ALLOC(tvm_ffi.Shape(a.shape), str(a.dtype), DEV, None)
    COPY_IN(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return t


def to_numpy(t, like):
    out = np.empty(like.shape, like.dtype)
    COPY_OUT(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)  # synchronises
    return out


def main():
    vm = tvm_ffi.load_module(SO)["vm_load_executable"]()
    # (device type, id, pooled allocator) for the device, then the CPU for shape functions
    vm["vm_initialization"](*([2, 0, 2, 1, 0, 2] if KIND == "cuda" else [1, 0, 2]))
    d = np.load(NPZ)
    x = to_device(d["a"])
    got = to_numpy(vm["main"](x), d["want"])
    diff = np.abs(got.astype(np.int32) - d["want"].astype(np.int32)).max()
    print(f"{os.path.basename(SO)}: {'EXACT match with ORT' if diff == 0 else 'MISMATCH'}; max |diff| {diff}, "
          f"shape {got.shape}")
    for _ in range(5):
        r = vm["main"](x)
    to_numpy(r, d["want"])
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        r = vm["main"](x)
    to_numpy(r, d["want"])
    dt = (time.perf_counter() - t0) / n
    m, k, nn = int(np.prod(d["a"].shape[:-1])), d["a"].shape[-1], d["want"].shape[-1]
    print(f"  {dt * 1e6:.1f} us per call (VM + prep + core + epilogue), {2 * m * k * nn / dt / 1e12:.3f} TOPS, "
          f"M={m} K={k} N={nn}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
