"""The ISA paths the library reports match the CPU's flags read independently (/proc/cpuinfo).

The ISA-parametrized kernel tests skip the paths the library says the CPU lacks, so a regression in
the library's own detection (say, AVX-512 VNNI no longer found) would turn them into skips and leave
the suite green while everything ran on AVX2. This test decides from the kernel's flag list instead.
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

import qie_ep

# Linux /proc/cpuinfo flag names each path needs (the extensions its files are compiled with).
NEEDS = {
    "avx2": {"avx2", "fma"},
    "avxvnni": {"avx2", "fma", "avx_vnni"},
    "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "amx_tile", "amx_int8"},
}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").exists(),
                    reason="x86-64 Linux only")
def test_supported_isas_match_cpu_flags():
    flags = cpu_flags()
    want = ["scalar"] + [isa for isa in qie_ep.ISAS[1:] if NEEDS[isa] <= flags]
    assert qie_ep.supported_isas() == want, f"library reports {qie_ep.supported_isas()}, /proc/cpuinfo says {want}"


def test_default_isa_is_the_best_supported(monkeypatch):
    """Without QIE_ISA the library runs the fastest path the CPU has (checked in a fresh process)."""
    import subprocess
    import sys

    monkeypatch.delenv("QIE_ISA", raising=False)
    out = subprocess.run([sys.executable, "-c", "import qie_ep; print(qie_ep.active_isa())"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == qie_ep.supported_isas()[-1]


def test_isa_specific_files_run_nothing_at_load():
    """Files compiled with an ISA's flags (kernels/x86/*.cc) have no static initializers: one would run that ISA's
    instructions when the library loads, on every CPU (an AMX file's constant table built at load time was an
    illegal instruction without AVX-512; valgrind, which hides AVX-512, found it). Read from the unstripped
    libraries `make build` leaves in build/."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[2]
    libs = sorted(root.glob("build/*/libqie_ort.so")) + sorted(root.glob("build/*/libqie_ep.so"))
    if not libs or not shutil.which("nm"):
        pytest.skip("no unstripped build in build/ or no nm")
    isa_files = {p.name for p in (root / "ort_plugin/src/kernels/x86").glob("*.cc")}
    assert {"gemm_amx.cc", "gemm_avx512vnni.cc", "gemm_avx2.cc"} <= isa_files
    for lib in libs:
        syms = subprocess.run(["nm", str(lib)], capture_output=True, text=True, check=True).stdout
        inits = {line.split("_GLOBAL__sub_I_", 1)[1] for line in syms.splitlines() if "_GLOBAL__sub_I_" in line}
        assert not (inits & isa_files), f"{lib.name}: static initializers in {sorted(inits & isa_files)}"
        assert inits, f"{lib.name}: no static initializers at all: the symbol table was not read"
