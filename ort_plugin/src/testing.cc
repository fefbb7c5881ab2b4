// Kernel-level entry points for the kernel tests and benchmarks, built into libqie_testing.so (a library of
// its own with the same kernels, CMake option QIE_BUILD_TESTING) and never into the shipped libqie_ort.so.
// Each call names its ISA path; this library's ISA state is its own.
#include <atomic>
#include <thread>
#include <vector>

#include <stdexcept>

#include "ep/team.h"
#include "kernels/conv.h"
#include "kernels/isa.h"

#define QIE_EXPORT extern "C" __attribute__((visibility("default")))

namespace qie {
double MeasureVnniPeakGops();

namespace {
// For the kernel-level test entries: `threads` std::threads sharing a ParallelFor's tasks.
ParallelFor ThreadPoolFor(int threads) {
  return [threads](size_t total, const std::function<void(size_t)>& fn) {
    std::atomic<size_t> next{0};
    auto worker = [&] {
      for (size_t i; (i = next.fetch_add(1)) < total;) fn(i);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
  };
}

}  // namespace
}  // namespace qie

// Kernel-level entry for the exhaustive kernel tests: one GEMM on a named ISA path, with `threads`
// std::threads sharing its tasks. Returns 0, or -1 when the ISA is unknown or unsupported here.
QIE_EXPORT int qie_test_gemm(const char* isa_name, size_t M, size_t N, size_t K, const uint8_t* a, int a_signed,
                             const uint8_t* b, int b_signed, const int32_t* za, int za_per_row, const int32_t* zb,
                             const int32_t* bias, ptrdiff_t bias_rs, int bias_cs, int out_kind, const float* scale,
                             const float* fbias, int32_t y_zp, void* y, int threads) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::IsaSupported(isa)) return -1;
  const qie::MicroKernel& uk = qie::GetMicroKernel(isa);
  qie::PackedB pb;
  qie::PackB(uk, b, b_signed != 0, K, N, static_cast<ptrdiff_t>(N), 1, &pb);
  const qie::PackedB* bp = &pb;
  qie::GemmArgs g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = a;
  g.lda = K;
  g.a_signed = a_signed != 0;
  g.za = za;
  g.za_per_row = za_per_row;
  g.zb = zb;
  g.bias = bias;
  g.bias_rs = bias_rs;
  g.bias_cs = bias_cs;
  g.kind = static_cast<qie::OutKind>(out_kind);
  g.scale = scale;
  g.fbias = fbias;
  g.y_zp = y_zp;
  g.y = y;
  g.ldy = N;
  g.batch = 1;
  g.b = &bp;
  qie::Gemm(uk, g, qie::ThreadPoolFor(threads));
  return 0;
}

// Kernel-level entry for the convolution kernel tests: one NHWC convolution on a named ISA path.
// geom: 3 spatial dims each of in, out, k, stride, dil, pad (leading pads), D/H/W order. Returns 0, 1
// when a depthwise convolution ran on its ISA's own weight form (PackedConv::dw_isa), -1 when the ISA is
// unknown or unsupported here.
QIE_EXPORT int qie_test_conv(const char* isa_name, size_t batch, size_t C, size_t M, size_t group, const size_t* geom,
                             const uint8_t* x, int x_signed, int32_t x_zp, const uint8_t* w, int w_signed,
                             const int32_t* w_zp, const int32_t* bias, int out_kind, const float* scale, int32_t y_zp,
                             void* y, int threads, const uint8_t* lut, size_t lut_tables) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::IsaSupported(isa)) return -1;
  const qie::MicroKernel& uk = qie::GetMicroKernel(isa);
  qie::ConvShape s;
  s.batch = batch;
  s.C = C;
  s.M = M;
  s.group = group;
  for (int d = 0; d < 3; ++d) {
    s.in[d] = geom[d];
    s.out[d] = geom[3 + d];
    s.k[d] = geom[6 + d];
    s.stride[d] = geom[9 + d];
    s.dil[d] = geom[12 + d];
    s.pad[d] = geom[15 + d];
  }
  qie::PackedConv pw;
  qie::PackConv(uk, s, w, w_signed != 0, w_zp, &pw);
  qie::ConvArgs a;
  a.x = x;
  a.x_signed = x_signed != 0;
  a.x_zp = x_zp;
  a.w_zp = w_zp;
  a.bias = bias;
  a.kind = static_cast<qie::OutKind>(out_kind);
  a.scale = scale;
  a.y_zp = y_zp;
  a.y = y;
  a.lut = lut;
  a.lut_tables = lut_tables;
  qie::Conv(uk, s, pw, a, qie::ThreadPoolFor(threads));
  return pw.depthwise && !pw.dw_isa.empty() ? 1 : 0;
}

// The EP's region team (ep/team.h) on `threads` std::threads: `sections` sections of n indices, each index adding
// s * n + i + 1 to a sum; the index numbered `throw_at` (if < sections * n) throws. Returns the sum (every index run
// exactly once: sum of 1..sections*n), or -1 when the exception reached the caller (the run still ends: no index is
// waited on forever).
QIE_EXPORT long long qie_test_team(int threads, size_t sections, size_t n, long long throw_at) {
  std::atomic<long long> sum{0};
  try {
    qie_ep::Team::Run(qie::ThreadPoolFor(threads), static_cast<size_t>(threads), [&](const qie::ParallelFor& team) {
      for (size_t s = 0; s < sections; ++s)
        team(n, [&, s](size_t i) {
          const long long k = static_cast<long long>(s * n + i);
          if (k == throw_at) throw std::runtime_error("index throws");
          sum.fetch_add(k + 1);
        });
    });
  } catch (const std::runtime_error&) { return -1; }
  return sum.load();
}

namespace qie {
double MeasureAmxPeakGops();
}
// Measured single-core tdpbusd peak (benchmarks); 0 without AMX-INT8.
QIE_EXPORT double qie_bench_amx_peak_gops() {
  return qie::IsaSupported(qie::Isa::kAmx) ? qie::MeasureAmxPeakGops() : 0.0;
}

// Measured single-core vpdpbusd peak (benchmarks); 0 when the CPU lacks AVX-512 VNNI.
QIE_EXPORT double qie_bench_vnni_peak_gops() {
  return qie::IsaSupported(qie::Isa::kAvx512Vnni) ? qie::MeasureVnniPeakGops() : 0.0;
}

// DynamicQuantizeLinear as the DynamicQuantizeMatMul kernel applies it on ISA path `isa_name` (for the
// reference tests). Returns 0, or -1 when the ISA is unknown or unsupported here.
QIE_EXPORT int qie_test_quantize_dynamic(const char* isa_name, const float* x, size_t n, float* scale, uint8_t* zp,
                                         uint8_t* q) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::ForceIsa(isa)) return -1;  // this library's own ISA state
  qie::DynamicQuantizeParams(x, n, scale, zp);
  qie::QuantizeLinearU8(x, n, *scale, *zp, q);
  return 0;
}

// The GEMM microkernel of ISA path `isa_name`: its tile (rows x columns) and K-group, from which the
// kernel tests generate their tile-edge shapes. Returns 0, or -1 when the ISA is unknown.
namespace qie {
int AmxForeignConfigCheck();
}
// The AMX kernel on a thread with another library's tile configuration: -1 without AMX, else
// qie::AmxForeignConfigCheck's code (0: right output, configuration put back).
QIE_EXPORT int qie_test_amx_foreign_config() {
  return qie::IsaSupported(qie::Isa::kAmx) ? qie::AmxForeignConfigCheck() : -1;
}

QIE_EXPORT int qie_test_microkernel(const char* isa_name, int* mr, int* nr, int* kgroup) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa)) return -1;
  const qie::MicroKernel& uk = qie::GetMicroKernel(isa);
  *mr = uk.mr;
  *nr = uk.nr;
  *kgroup = uk.kgroup;
  return 0;
}

// Kernel-level entry for the byte-table tests: y[p][c] = t[c][x[p][c]] (t: C tables of 256 bytes and 3 bytes of
// padding, or one table when C == 1; rows ld bytes apart) on a named ISA path, with or without AVX512-VBMI.
// Returns 0, or -1 when the ISA is unknown, unsupported here, or has no table kernel.
QIE_EXPORT int qie_test_channel_lut(const char* isa_name, const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y,
                                    size_t pixels, size_t ld, int vbmi) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::IsaSupported(isa)) return -1;
  const qie::ChannelLutFn lut = qie::KernelsFor(isa).channel_lut;
  if (!lut) return -1;
  qie::SetLutVbmi(vbmi != 0);
  lut(t, C, x, y, pixels, ld);
  qie::SetLutVbmi(true);
  return 0;
}

// Kernel-level entry for the byte transpose the EP's regions use at their edges: dst[j][i] = src[i][j].
QIE_EXPORT void qie_test_transpose_bytes(const uint8_t* src, size_t src_stride, uint8_t* dst, size_t dst_stride,
                                         size_t rows, size_t cols) {
  qie::TransposeBytes(src, src_stride, dst, dst_stride, rows, cols);
}
