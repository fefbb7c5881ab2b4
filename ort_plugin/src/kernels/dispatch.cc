// ISA dispatch: the one table of ISA paths and their kernels (isa.h), the active entry chosen once from
// cpuid (best available) unless the QIE_ISA environment variable names another path this CPU supports.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/isa.h"

namespace qie {

extern const MicroKernel kGemmScalar, kGemmAvx2, kGemmAvxVnni, kGemmAvx512Vnni;
extern const DepthwiseFn kDepthwiseScalar, kDepthwiseAvx2, kDepthwiseAvx512;
extern const DepthwisePackFn kDepthwisePackAvx512;
void MinMaxAvx512(const float* x, size_t n, float* lo, float* hi);
void QuantizeLinearU8Avx512(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q);
void ChannelLutAvx512(const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y, size_t pixels, size_t ld);

namespace {
bool CpuScalar() { return true; }
bool CpuAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool CpuAvxVnni() { return CpuAvx2() && __builtin_cpu_supports("avxvnni"); }
bool CpuAvx512Vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

// Indexed by Isa; best path last. AVX-VNNI keeps AVX2's depthwise kernel (VNNI has no 16-bit form that
// helps it) and the scalar dynamic quantization (its AVX-512 form is the only vector one).
const IsaKernels kTable[kIsaCount] = {
    {Isa::kScalar, "scalar", CpuScalar, &kGemmScalar, kDepthwiseScalar, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvx2, "avx2", CpuAvx2, &kGemmAvx2, kDepthwiseAvx2, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvxVnni, "avxvnni", CpuAvxVnni, &kGemmAvxVnni, kDepthwiseAvx2, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvx512Vnni, "avx512vnni", CpuAvx512Vnni, &kGemmAvx512Vnni, kDepthwiseAvx512, kDepthwisePackAvx512,
     MinMaxAvx512, QuantizeLinearU8Avx512, ChannelLutAvx512},
};

std::string g_env_error;

Isa ChooseAtLoad() {
  Isa best = Isa::kScalar;
  for (int i = kIsaCount - 1; i >= 0; --i)
    if (IsaSupported(static_cast<Isa>(i))) {
      best = static_cast<Isa>(i);
      break;
    }
  const char* env = std::getenv("QIE_ISA");
  if (env && *env) {
    Isa want;
    if (!IsaFromName(env, &want))
      g_env_error = std::string("QIE_ISA='") + env + "' is not one of scalar, avx2, avxvnni, avx512vnni";
    else if (!IsaSupported(want))
      g_env_error = std::string("QIE_ISA='") + env + "' is not supported by this CPU";
    else
      best = want;
  }
  return best;
}
std::atomic<int> g_active{-1};
}  // namespace

const IsaKernels& KernelsFor(Isa isa) { return kTable[static_cast<int>(isa)]; }
const char* IsaName(Isa isa) { return KernelsFor(isa).name; }

bool IsaFromName(const char* name, Isa* out) {
  for (const IsaKernels& k : kTable)
    if (std::strcmp(name, k.name) == 0) {
      *out = k.isa;
      return true;
    }
  return false;
}

bool IsaSupported(Isa isa) { return KernelsFor(isa).cpu_has(); }

void LookupBlock(Isa isa, const uint8_t* t, size_t tables, uint8_t* y, size_t rows, size_t cols, size_t ldy) {
  if (rows == 0 || cols == 0) return;
  const ChannelLutFn lut = KernelsFor(isa).channel_lut;
  if (tables != 1) {  // per column: the rows ldy apart in one call
    if (lut) return lut(t, cols, y, y, rows, ldy);
    for (size_t r = 0; r < rows; ++r)
      for (size_t j = 0; j < cols; ++j) y[r * ldy + j] = t[j * 256 + y[r * ldy + j]];
    return;
  }
  auto run = [&](uint8_t* row, size_t n) {  // one table over n contiguous bytes
    if (lut) return lut(t, 1, row, row, n, 1);
    for (size_t i = 0; i < n; ++i) row[i] = t[row[i]];
  };
  if (ldy == cols) return run(y, rows * cols);
  for (size_t r = 0; r < rows; ++r) run(y + r * ldy, cols);
}

Isa ActiveIsa() {
  int v = g_active.load();
  if (v < 0) {
    static const Isa chosen = ChooseAtLoad();
    int expected = -1;
    g_active.compare_exchange_strong(expected, static_cast<int>(chosen));
    v = g_active.load();
  }
  return static_cast<Isa>(v);
}

const char* IsaEnvError() {
  ActiveIsa();
  return g_env_error.empty() ? nullptr : g_env_error.c_str();
}

bool ForceIsa(Isa isa) {
  if (!IsaSupported(isa)) return false;
  ActiveIsa();
  g_active.store(static_cast<int>(isa));
  return true;
}

const MicroKernel& GetMicroKernel(Isa isa) { return *KernelsFor(isa).gemm; }
DepthwiseFn GetDepthwiseKernel(Isa isa) { return KernelsFor(isa).depthwise; }
DepthwisePackFn GetDepthwisePack(Isa isa) { return KernelsFor(isa).depthwise_pack; }

}  // namespace qie
