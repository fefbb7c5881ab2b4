"""Which qie kernel family a TVM target gets, and the operand layout each family needs.

One ``Isa`` per instruction family; ``for_target`` picks the best one the target's CPU features (or
CUDA architecture) allow, and ``QIE_TVM_ISA`` forces a path (for tests and benchmarks), as the ORT
library's ``QIE_ISA`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm


@dataclass(frozen=True)
class Isa:
    name: str          # avx512vnni | avxvnni | avx2 | generic | cuda_dp4a | cuda_imma
    kind: str          # x86 | cuda | generic
    lanes: int         # accumulator columns per instruction
    kpack: int         # consecutive k per instruction
    a_dtype: str       # operand type the instruction takes for activations
    intrin: str | None
    features: tuple[str, ...] = ()


AVX512VNNI = Isa("avx512vnni", "x86", 16, 4, "uint8", "qie_dot_16x4_u8s8s32_vnni", ("avx512vnni", "avx512bw"))
AVXVNNI = Isa("avxvnni", "x86", 8, 4, "uint8", "qie_dot_8x4_u8s8s32_avxvnni", ("avxvnni",))
AVX2 = Isa("avx2", "x86", 8, 2, "uint8", "qie_dot_8x2_u8s8s32_avx2", ("avx2",))
GENERIC = Isa("generic", "generic", 8, 1, "uint8", None)
CUDA_DP4A = Isa("cuda_dp4a", "cuda", 1, 4, "int8", "dp4a_s8s8s32")
CUDA_IMMA = Isa("cuda_imma", "cuda", 1, 32, "int8", None)

ALL = {i.name: i for i in (AVX512VNNI, AVXVNNI, AVX2, GENERIC, CUDA_DP4A, CUDA_IMMA)}


def _as_target(target) -> tvm.target.Target:
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        return tvm.target.Target({"kind": target} if " " not in target else target)
    return tvm.target.Target(target)


def has_features(target, features) -> bool:
    from tvm.target import codegen
    with _as_target(target):
        return all(bool(codegen.target_has_features(f)) for f in features)


def for_target(target) -> Isa:
    """The kernel family for ``target`` (a ``tvm.target.Target`` or its dict form)."""
    t = _as_target(target)
    forced = os.environ.get("QIE_TVM_ISA")
    if forced:
        if forced not in ALL:
            raise ValueError(f"QIE_TVM_ISA={forced!r}: expected one of {sorted(ALL)}")
        isa = ALL[forced]
        if (isa.kind == "cuda") != (t.kind.name == "cuda"):
            raise ValueError(f"QIE_TVM_ISA={forced!r} does not fit target kind {t.kind.name!r}")
        return isa
    if t.kind.name == "cuda":
        arch = str(t.attrs.get("arch", "sm_80"))
        return CUDA_IMMA if int(arch.split("_")[1]) >= 80 else CUDA_DP4A
    if t.kind.name != "llvm":
        return GENERIC
    for isa in (AVX512VNNI, AVXVNNI, AVX2):
        if has_features(t, isa.features):
            return isa
    return GENERIC


def host_target() -> tvm.target.Target:
    """An LLVM target for this machine's CPU (``mcpu`` from LLVM's host detection)."""
    from tvm.target import codegen
    return tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
                              "num-cores": os.cpu_count() or 1})


def host_isas() -> list[str]:
    """The x86 kernel families this machine can execute (plus ``generic``), best last."""
    t = host_target()
    return ["generic"] + [i.name for i in (AVX2, AVXVNNI, AVX512VNNI) if has_features(t, i.features)]


def kernel_target(target) -> tvm.target.Target:
    """The target qie's CPU kernels are compiled for: ``target`` with LLVM's loop vectorizer off.

    qie's schedules vectorize explicitly. LLVM 22's loop vectorizer (bundled with TVM 0.27) miscompiles the
    scalar remainder of an auto-vectorized loop that stores uint8/int8 on AVX-512 targets: it stores the
    int32 lane (4 bytes) into the 1-byte element, 3 bytes past the end of a row (found by the guard-byte
    check in tests/tvm/test_tvm_kernels.py; reproduced with a plain unscheduled depthwise PrimFunc).
    """
    t = _as_target(target)
    if t.kind.name != "llvm":
        return t
    cfg = dict(t.export())
    opts = list(cfg.get("cl-opt", []))
    if "-vectorize-loops=false" not in opts:
        opts.append("-vectorize-loops=false")
    cfg["cl-opt"] = opts
    cfg.pop("host", None)
    return tvm.target.Target(cfg)
