"""Build the CUDA check for a lent GPU machine: qie's TVM CUDA graphs, compiled here, run there.

    .venv/bin/python tests/gpu/build_cuda_check.py .gpucheck      # then, on the device (carry .gpucheck):
    cd .gpucheck && mkdir -p py && python3 -m zipfile -e whl/*.whl py && \
      for f in cuda_*.so; do PYTHONPATH=py python3 run_cuda_check.py cuda $PWD/$f ${f%.so}.npz; done

TVM (305 MB) cannot travel to the device (64 MiB carry limit, no package index there), so this compiles
QLinearMatMul graphs for sm_90 with ``qie_ep.tvm.pipeline`` on each CUDA kernel family, exports them,
and stores ORT's expected outputs beside them; the device needs only apache-tvm-ffi (a 3 MB wheel for its
Python, downloaded here), TVM's runtime libraries and libcudart (~6 MB), and nvcc, which compiles the
CUDA source TVM embeds when the module is loaded. Add ``.gpucheck/`` to ``.git/info/exclude``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tvm")]

CASES = {"small": (256, 192, (2, 5, 256)), "large": (768, 768, (4, 128, 768)), "odd": (100, 70, (3, 7, 100))}


def main(out: Path, arch: str = "sm_90", device_python: str = "3.12") -> None:
    import tvm

    import qie_ep.tvm as qtvm
    from helpers import run
    from test_tvm_graphs import qlinear_matmul_model

    out.mkdir(parents=True, exist_ok=True)
    for isa in ("cuda_dp4a", "cuda_imma"):
        os.environ["QIE_TVM_ISA"] = isa
        for name, (k, n, shape) in CASES.items():
            model = qlinear_matmul_model(np.uint8, np.int8, k, n, per_column=True, batch_dims=shape[:2])
            a = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
            tgt = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
            mod = qtvm.from_onnx(model)
            calls = qtvm.kernel_calls(qtvm.rewrite_pass(tgt)(mod))
            assert calls and all(isa in c for c in calls), calls
            tvm.compile(mod, tgt, relax_pipeline=qtvm.pipeline(tgt)).export_library(str(out / f"{isa}-{name}.so"))
            want, = run(model, {"a": a}, qie=False, level="disable")
            np.savez(out / f"{isa}-{name}.npz", a=a, want=want)
            print(f"{isa} {name}: {calls}")
    lib = out / "lib"
    lib.mkdir(exist_ok=True)
    for f in Path(tvm.__file__).parent.glob("lib/libtvm_runtime*.so"):
        shutil.copyfile(f, lib / f.name)
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    cudart = sorted(f for h in homes if h for f in Path(h).glob("lib*/libcudart.so.*") if f.name.count(".") == 2)
    if not cudart:
        raise SystemExit("libcudart.so.<major> not found: set CUDA_HOME")
    shutil.copyfile(cudart[0], lib / cudart[0].name)  # libtvm_runtime_cuda.so links against it
    import tvm_ffi
    version = subprocess.run([sys.executable, "-m", "pip", "show", "apache-tvm-ffi"], capture_output=True,
                             text=True).stdout.split("Version: ")[1].split()[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"apache-tvm-ffi=={version}", "--no-deps",
                    "--only-binary=:all:", "--python-version", device_python, "-d", str(out / "whl")], check=True)
    shutil.copyfile(HERE / "run_cuda_check.py", out / "run_cuda_check.py")
    print(f"{out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MB (tvm_ffi {tvm_ffi.__version__})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpucheck"))
