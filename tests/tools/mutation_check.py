"""Mutation check: does the suite catch small, plausible bugs in the kernels and adaptors?

Each mutation below edits one line of a copy of ``ort_plugin`` (the source tree is never touched), the
library is rebuilt incrementally, and the fast numeric tests run against it with ``-x``. A mutation that
no test catches *survives* and is a hole in the suite: name survivors in your issue note and close them.
Run before resolving kernel work (about a minute per mutation on 2 cores)::

    make mutation            # or: .venv/bin/python tests/tools/mutation_check.py [-k NAME] [--keep DIR]

Exit status: 0 when every mutation is caught (or skipped because this CPU lacks its ISA), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/kernels/test_gemm_kernels.py", "tests/kernels/test_conv_kernels.py", "tests/kernels/test_depthwise_kernels.py",
         "tests/kernels/test_rounding_ties.py",
         "tests/ort/test_gemm_ops.py",
         "tests/ort/test_conv_ops.py", "tests/kernels/test_isa_detection.py", "tests/ort/test_reliability.py",
         "tests/ort/test_ep.py", "tests/ort/test_ep_tails.py", "tests/ort/test_ep_norm_tails.py", "tests/ort/test_ep_regions.py",
         "tests/kernels/test_amx.py", "tests/ort/test_ep_attention.py", "tests/ort/test_ep_shapes.py",
         "tests/ort/test_ep_qlinear_binary.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # under ort_plugin/src
    old: str   # must occur exactly once in the file
    new: str
    isa: str = ""  # only meaningful where this CPU runs that path ("" = every CPU)


MUTATIONS = [
    # rounding: half-away-from-zero or truncation instead of round-half-to-even
    Mutation("scalar requantize rounds half away", "kernels/epilogue_scalar.h",
             "std::nearbyint(v)) + zp", "std::round(v)) + zp"),
    Mutation("ymm requantize truncates", "kernels/x86/gemm_ymm_inl.h",
             "_mm256_cvtps_epi32(v), _mm256_set1_epi32(ep.y_zp)", "_mm256_cvttps_epi32(v), _mm256_set1_epi32(ep.y_zp)",
             "avx2"),
    Mutation("zmm general requantize truncates", "kernels/x86/epilogue_avx512_inl.h",
             "_mm512_cvtps_epi32(v), _mm512_set1_epi32(ep.y_zp)", "_mm512_cvttps_epi32(v), _mm512_set1_epi32(ep.y_zp)",
             "avx512vnni"),
    Mutation("zmm fast requantize truncates", "kernels/x86/epilogue_avx512_inl.h",
             "return _mm512_cvtps_epi32(_mm512_min_ps(f.hi,", "return _mm512_cvttps_epi32(_mm512_min_ps(f.hi,", "avx512vnni"),
    Mutation("depthwise zmm requantize truncates", "kernels/x86/dwconv_avx512.cc",
             "_mm512_cvtps_epi32(v), yzp", "_mm512_cvttps_epi32(v), yzp", "avx512vnni"),
    Mutation("depthwise quad-tap requantize truncates", "kernels/x86/dwconv_avx512.cc",
             "return _mm512_cvtps_epi32(_mm512_min_ps(hi,", "return _mm512_cvttps_epi32(_mm512_min_ps(hi,", "avx512vnni"),
    Mutation("depthwise quad-tap drops its top clamp (x >= 2^31 becomes the bottom)", "kernels/x86/dwconv_avx512.cc",
             "_mm512_min_ps(hi, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc))",
             "_mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc)", "avx512vnni"),
    Mutation("depthwise quad-tap rows: interior windows one channel step apart", "kernels/x86/dwconv_avx512.cc",
             "++ow, ++k, at += step) {", "++ow, ++k, at += s.C) {", "avx512vnni"),
    Mutation("depthwise quad-tap zero point without the signed input's +128", "kernels/x86/dwconv_avx512.cc",
             "const int32_t zp = a.x_zp + (a.x_signed ? 128 : 0);", "const int32_t zp = a.x_zp;", "avx512vnni"),
    Mutation("depthwise quad-tap stores a vector's missing pixels", "kernels/x86/dwconv_avx512.cc",
             "for (size_t k = 0; k < nv; ++k) StoreLaneBytes", "for (size_t k = 0; k < kPpv; ++k) StoreLaneBytes",
             "avx512vnni"),
    Mutation("depthwise quad-tap loads pixels that are not side by side as one", "kernels/x86/dwconv_avx512.cc",
             "contiguous = pl[k] == pl[0] && pb[k] == pb[0] + k * C;", "contiguous = pl[k] == pl[0];", "avx512vnni"),
    Mutation("im2col's interior rows step one pixel whatever the stride", "kernels/conv_driver.cc",
             "for (ptrdiff_t ow = lo; ow < hi; ++ow, ++r, base += step) {",
             "for (ptrdiff_t ow = lo; ow < hi; ++ow, ++r, base += C) {"),
    Mutation("im2col's interior starts at the first column whatever the padding", "kernels/conv_driver.cc",
             "const ptrdiff_t first = (pw + st_w - 1) / st_w;", "const ptrdiff_t first = 0;"),
    Mutation("im2col's 16-byte copies put every run at the row's start", "kernels/conv_driver.cc",
             "_mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * run + 16 * c),",
             "_mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16 * c),"),
    Mutation("dynamic quantization rounds half away", "kernels/quantize.cc",
             "static_cast<int32_t>(std::nearbyint(v)) + zp", "static_cast<int32_t>(std::round(v)) + zp"),
    Mutation("dynamic quantization zmm truncates", "kernels/x86/quantize_avx512.cc",
             "_mm512_cvtps_epi32(v), vzp", "_mm512_cvttps_epi32(v), vzp", "avx512vnni"),
    # zero points
    Mutation("zmm fast epilogue adds y_zero_point twice", "kernels/x86/epilogue_avx512_inl.h",
             "f->zp16 = _mm512_set1_epi16(static_cast<int16_t>(ep.y_zp));",
             "f->zp16 = _mm512_set1_epi16(static_cast<int16_t>(2 * ep.y_zp));", "avx512vnni"),
    Mutation("zmm packed row store ignores the column mask", "kernels/x86/epilogue_avx512_inl.h",
             "f->full = nr >= 16 * static_cast<size_t>(V);", "f->full = nr + 15 >= 16 * static_cast<size_t>(V);",
             "avx512vnni"),
    Mutation("per-row a_zero_point not repeated across batches", "ops/matmul_core.cc",
             "ep.za[r % plan.M]", "ep.za[r < plan.M ? r : plan.M - 1]"),
    Mutation("QGemm ignores b_zero_point", "ops/gemm_ops.cc",
             'ep->zb = ZeroPoints(Input(ctx, 5), N, b.type, "b_zero_point");',
             'ep->zb = ZeroPoints(Input(ctx, 5), N, b.type, "b_zero_point"); std::fill(ep->zb.begin(), ep->zb.end(), 0);'),
    Mutation("column term uses K-1 zero-point rows", "kernels/gemm_driver.cc",
             "k32 * static_cast<uint32_t>(zb[n])", "(k32 - 1) * static_cast<uint32_t>(zb[n])"),
    # scales
    Mutation("float output uses b_scale[0] for every column", "ops/matmul_ops.cc",
             "twice ? a_scale : a_scale * sb[n];", "twice ? a_scale : a_scale * sb[0];"),
    Mutation("QGemm multiplier uses b_scale[0]", "ops/gemm_ops.cc",
             "ep->scale[n] = alpha_ * sa * sb[n];", "ep->scale[n] = alpha_ * sa * sb[0];"),
    # tile edges
    Mutation("row tiles lose their last row", "kernels/gemm_driver.cc",
             "rows = std::min(mr, M - m0);", "rows = std::min(mr, M - m0) - (M - m0 < mr && M - m0 > 1);"),
    Mutation("strips lose their last row", "kernels/gemm_driver.cc",
             "rows = std::min(M, mt1 * mr) - m0;", "rows = std::min(M, mt1 * mr) - m0 - (M % mr > 1 && mt1 * mr >= M);"),
    Mutation("column tiles write one column past the right edge", "kernels/gemm_driver.cc",
             "return std::min(nr, N - p * nr); };", "return std::min(nr, N - p * nr + 1); };"),
    Mutation("conv tasks skip the following table", "kernels/conv_driver.cc",
             "      LookupRows(uk.isa, a, s, r0, nrows);", "      (void)nrows;"),
    Mutation("team member claims without checking the section", "ep/team.h",
             "      if (index >= n) return ran;", "      if (index > n) return ran;"),
    # the execution provider's units
    Mutation("EP multiplier uses the first weight scale", "ep/matmul_unit.cc",
             "const float m = fsx * static_cast<const float*>(o.sw.data)[i];",
             "const float m = fsx * static_cast<const float*>(o.sw.data)[0];"),
    Mutation("EP float unit skips the smoothing Mul before its Q", "ep/matmul_unit.cc",
             "for (size_t h = 0; h < N; ++h) o[h] = o[h] * mul[h];", "for (size_t h = 0; h < N; ++h) o[h] = o[h];"),
    Mutation("EP shape unit's Concat reads the first dim", "ep/shapes.cc",
             "values.push_back(Dim(all, p.start, p.end, p.index, c.name));",
             "values.push_back(Dim(all, p.start, p.end, 0, c.name));"),
    Mutation("EP float unit's sum drops the residual", "ep/matmul_unit.cc",
             "for (size_t h = 0; h < N; ++h) v[h] = v[h] + e[h];", "for (size_t h = 0; h < N; ++h) v[h] = v[h];"),
    Mutation("EP drops the Gemm bias", "ep/matmul_unit.cc", "g.bias = c.bias.data();", "g.bias = nullptr;"),
    Mutation("EP tail skips its per-column programs", "ep/matmul_unit.cc",
             "RunChannelPrograms(c.programs, d, src, dst, pfor);", "std::memcpy(dst, src, rows * c.N);"),
    Mutation("EP norm tail drops LayerNorm's beta", "ep/matmul_unit.cc",
             "for (size_t h = 0; h < N; ++h) o[h] = o[h] + beta[h];", "for (size_t h = 0; h < N; ++h) o[h] = o[h];"),
    Mutation("EP layout tail forgets its transpose", "ep/matmul_unit.cc",
             "PermuteBytes(out_codes, shapes[i], perm, dst);", "std::memcpy(dst, out_codes, n);"),
    Mutation("per-channel tables on a column block ignore the row stride", "kernels/dispatch.cc",
             "if (lut) return lut(t, cols, y, y, rows, ldy);", "if (lut) return lut(t, cols, y, y, rows, cols);"),
    Mutation("EP quantizer takes NaN to the zero point (ORT: the bottom code)", "ep/units.h",
             "x = x == x ? x : lo;", "x = x == x ? x : 0.0f;"),
    Mutation("portable input quantizer takes NaN to the zero point", "kernels/quantize.cc",
             "std::min(std::max(f, lo), hi) : lo;", "std::min(std::max(f, lo), hi) : 0.0f;"),
    Mutation("region input quantizer (C = 3) keeps each pixel's fourth byte", "kernels/x86/quantize_avx512.cc",
             "if (C == 3) w = _mm512_permutexvar_epi32", "if (C == 5) w = _mm512_permutexvar_epi32", "avx512vnni"),
    Mutation("region input quantizer clamps NaN to the top code", "kernels/x86/quantize_avx512.cc",
             "_mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, plane + p), vs), vlo), vhi)",
             "_mm512_min_ps(_mm512_max_ps(vlo, _mm512_div_ps(_mm512_maskz_loadu_ps(m, plane + p), vs)), vhi)",
             "avx512vnni"),
    Mutation("EP takes a two-input Sum as a product", "ep/region.cc",
             "s.op = op == \"Add\" || op == \"Sum\" ? '+'", "s.op = op == \"Add\" ? '+'"),
    # QLinear binary arithmetic (session 39)
    Mutation("QLinearAdd never swaps a broadcast first operand", "ep/region_steps.cc",
             "if (Y[i] > 1) return A[i] == 1;", "if (Y[i] > 1) return false;"),
    Mutation("QLinear arithmetic for s8 binary units too", "ep/region.cc",
             "if (s.qout.is_signed || s.qin[0].is_signed || s.qin[1].is_signed) return false;", ""),
    Mutation("QLinear arithmetic under a Relu that clamps codes", "ep/region.cc",
             "if (lo > 0 || hi < 255) return false;", "(void)lo;"),
    Mutation("QLinearAdd adds without fused multiply-adds", "ep/units.h",
             "std::fma(static_cast<float>(x), rx, std::fma(static_cast<float>(y), ry, fixed))",
             "static_cast<float>(x) * rx + (static_cast<float>(y) * ry + fixed)"),
    Mutation("SiLU fold keeps the float product where ORT runs QLinearMul", "ep/region.cc",
             "s->qlinear ? ql(ka, kb)", "false ? ql(ka, kb)"),
    Mutation("quantized-constant table keeps the float graph's product", "ep/units.cc",
             "const bool is_ql = QLinearTable(u, &ql, C_out);", "const bool is_ql = false;"),
    Mutation("quantized-constant table never swaps a constant first operand", "ep/units.cc",
             "const bool swap = const_first && (q.count() == 1 || u.layout.axis != ConstLayout::kLast);",
             "const bool swap = false;"),
    Mutation("GlobalAveragePool keeps the float graph's mean where ORT fuses it", "ep/region_steps.cc",
             "const bool ort_form = !qx.is_signed && !s.qout.is_signed;\n  const float scale",
             "const bool ort_form = false;\n  const float scale"),
    Mutation("AveragePool quantizes as QuantizeLinear where ORT fuses QLinearAveragePool", "ep/region_steps.cc",
             "const bool ort_form = !qx.is_signed && !s.qout.is_signed;\n  const float zy",
             "const bool ort_form = false;\n  const float zy"),
    # AMX (checked only where the CPU has it)
    Mutation("AMX snake multiplies its second 16 rows with the first's A", "kernels/x86/gemm_amx.cc",
             "const uint8_t* a1 = a + kTileRows * lda;", "const uint8_t* a1 = a;", "amx"),
    Mutation("AMX second 16-row pass reads the first rows", "kernels/x86/gemm_amx.cc",
             "Multiply<V>(kp, a + kTileRows * lda, lda, b);", "Multiply<V>(kp, a, lda, b);", "amx"),
    Mutation("AMX leaves a foreign tile configuration behind", "kernels/x86/gemm_amx.cc",
             "if (t.changed && t.saved.palette_id != 0) _tile_loadconfig(&t.saved);",
             "if (false) _tile_loadconfig(&t.saved);", "amx"),
    # dispatch
    Mutation("AVX-512 VNNI never detected", "kernels/dispatch.cc",
             '__builtin_cpu_supports("avx512vnni");', '__builtin_cpu_supports("avx512vnni") && false;'),
]


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs_here(isa: str, flags: set[str]) -> bool:
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    need = {"": set(), "avx2": {"avx2", "fma"}, "avx512vnni": avx512, "amx": avx512 | {"amx_tile", "amx_int8"}}
    return need[isa] <= flags


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--keep", help="build folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    inc = sh(["bash", str(ROOT / "ort_plugin/cmake/fetch_ort_headers.sh"), str(Path.home() / ".cache/qie")], env=env)
    if inc.returncode:
        sys.exit(f"cannot fetch ORT headers: {inc.stderr}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="qie-mutation-"))
    src, build = work / "ort_plugin", work / "build"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "ort_plugin", src)
    cfg = sh(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              f"-DORT_INCLUDE_DIR={inc.stdout.strip()}"], env=env)
    if cfg.returncode:
        sys.exit(cfg.stdout + cfg.stderr)
    test_env = {**env, "QIE_LIBRARY": str(build / "libqie_ort.so"), "PYTHONPATH": str(ROOT)}
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS]

    def build_and_test() -> tuple[bool, str]:
        b = sh(["cmake", "--build", str(build)], env=env)
        if b.returncode:
            return True, "BROKEN: does not compile (update MUTATIONS): " + (b.stdout + b.stderr)[-300:]
        t = sh(pytest, env=test_env, cwd=ROOT)
        tail = (t.stdout.strip().splitlines() or [""])[-1]
        return t.returncode == 0, tail

    ok, tail = build_and_test()
    if not ok:
        sys.exit(f"the unmutated library fails the tests: {tail}")
    flags, survivors, rows = cpu_flags(), [], []
    for m in MUTATIONS:
        if args.k not in m.name:
            continue
        f = src / "src" / m.path
        text = f.read_text()
        if text.count(m.old) != 1:
            sys.exit(f"{m.name}: {m.path} holds {m.old!r} {text.count(m.old)} times (update MUTATIONS)")
        if not runs_here(m.isa, flags):
            rows.append((m.name, f"skipped (CPU lacks {m.isa})", 0.0))
            continue
        t0 = time.time()
        f.write_text(text.replace(m.old, m.new))
        try:
            passed, tail = build_and_test()
        finally:
            f.write_text(text)
        verdict = (tail if tail.startswith("BROKEN") else "SURVIVED") if passed else ("caught: " + tail)
        if passed:
            survivors.append(m.name)
        rows.append((m.name, verdict, time.time() - t0))
        print(f"{m.name:55s} {verdict[:90]} ({rows[-1][2]:.0f} s)", flush=True)
    sh(["cmake", "--build", str(build)], env=env)  # leave the kept folder's library unmutated
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(rows)} mutations, {len(survivors)} survived" + (": " + "; ".join(survivors) if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
