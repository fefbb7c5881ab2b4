"""qie's INT8 operator set as TVM TIR: quantized GEMM / conv2d compute, qie's dot-product intrinsics,
per-ISA schedules (x86 AVX-512 VNNI, AVX-VNNI, AVX2; CUDA dp4a, IMMA) and tuned tile records.

``gemm``: the shared math and stages; ``matmul`` / ``conv``: the PrimFuncs; ``isa``: which family a
target gets; ``records``: tuned tiles; ``kernels``: compile one kernel and call it on numpy arrays.
The Relax integration lives in ``qie_ep.tvm``.
"""
