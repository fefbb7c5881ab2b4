"""qie's dot-product intrinsics for TIR tensorization, one per instruction family.

Each intrinsic computes ``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` for one vector of accumulators
(``lanes`` columns) and one group of ``kpack`` consecutive k. A holds unsigned bytes (the x86 paths take
activations shifted to u8), B signed bytes packed ``[lanes, kpack]`` so one vector load reads them; C is
a "local" (register) accumulator tile, written back once per tile by the schedule.

- ``qie_dot_16x4_u8s8s32_vnni``: one ``vpdpbusd zmm`` (AVX-512 VNNI). TVM's stock ``dot_16x4_vnni``
  passes ``<16 x i32>`` where the bundled LLVM's intrinsic wants ``<64 x i8>`` and fails in codegen.
- ``qie_dot_8x4_u8s8s32_avxvnni``: ``vpdpbusd ymm`` (AVX-VNNI, VEX encoded on CPUs without AVX-512).
- ``qie_dot_8x2_u8s8s32_avx2``: bytes widened to int16, then ``vpmaddwd``: each 32-bit lane gets
  ``a0*b0 + a1*b1`` exactly. AVX2's ``vpmaddubsw`` would sum two u8*s8 products in int16 and saturate
  (ORT issues 6004, 5849, 16105); it is deliberately not used.
- CUDA ``dp4a`` comes from TVM's own ``dp4a_s8s8s32`` (its codegen is correct).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_16x4 = "qie_dot_16x4_u8s8s32_vnni"
AVXVNNI_8x4 = "qie_dot_8x4_u8s8s32_avxvnni"
AVX2_8x2 = "qie_dot_8x2_u8s8s32_avx2"


def _desc(lanes: int, kpack: int):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((kpack,), "uint8", offset_factor=1),
             B: T.Buffer((lanes, kpack), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kpack], B[0:lanes, 0:kpack])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, kpack):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
    return desc


def _vpdpbusd(lanes: int, llvm_name: str):
    nbytes = lanes * 4

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a, lanes), dtype=f"int8x{nbytes}"),
                B.vload([0, 0], dtype=f"int8x{nbytes}"),
                dtype=f"int32x{lanes}")
    return impl


@T.prim_func(s_tir=True)
def _avx2_impl(A: T.Buffer((2,), "uint8", offset_factor=1),
               B: T.Buffer((8, 2), "int8", offset_factor=1),
               C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        a_pair = T.reinterpret(T.Cast("int16x2", A.vload([0], "uint8x2")), dtype="int32")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16"),
            T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")),
            dtype="int32x8")


_REGISTERED = False


def register() -> None:
    """Register qie's intrinsics with TVM once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    TensorIntrin.register(VNNI_16x4, _desc(16, 4), _vpdpbusd(16, "llvm.x86.avx512.vpdpbusd.512"), override=True)
    TensorIntrin.register(AVXVNNI_8x4, _desc(8, 4), _vpdpbusd(8, "llvm.x86.avx512.vpdpbusd.256"), override=True)
    TensorIntrin.register(AVX2_8x2, _desc(8, 2), _avx2_impl, override=True)
    _REGISTERED = True
