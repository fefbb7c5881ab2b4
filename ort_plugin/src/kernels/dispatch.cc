// ISA dispatch: the one table of ISA paths and their kernels (isa.h), the active entry chosen once from
// cpuid (best available) unless the QIE_ISA environment variable names another path this CPU supports.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/isa.h"

namespace qie {

extern const MicroKernel kGemmScalar, kGemmAvx2, kGemmAvxVnni, kGemmAvx512Vnni, kGemmAmx;
extern const DepthwiseFn kDepthwiseScalar, kDepthwiseAvx2, kDepthwiseAvx512;
extern const DepthwisePackFn kDepthwisePackAvx512;
void MinMaxAvx512(const float* x, size_t n, float* lo, float* hi);
void QuantizeLinearU8Avx512(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q);
void QuantizeNhwcAvx512(const float* x, size_t C, size_t hw, size_t p0, size_t p1, float scale, int32_t zp,
                        bool is_signed, uint8_t* y);
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
// AMX-INT8 with AVX-512 VNNI (its epilogue and small tiles), the OS saving the tile state (XCR0 bits 17-18), and
// this process allowed to use tile data (Linux's ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; ONNX Runtime asks the
// same). Valgrind hides AVX-512, so it never runs this path.
bool CpuAmx() {
  static const bool ok = [] {
    if (!CpuAvx512Vnni()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), int8 = d & (1u << 25);
    if (!tile || !int8) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Indexed by Isa; best path last. AMX keeps every AVX-512 kernel but GEMM's. AVX-VNNI keeps AVX2's depthwise kernel
// (VNNI has no 16-bit form that helps it) and the scalar dynamic quantization (its AVX-512 form is the only vector
// one).
const IsaKernels kTable[kIsaCount] = {
    {Isa::kScalar, "scalar", CpuScalar, &kGemmScalar, kDepthwiseScalar, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvx2, "avx2", CpuAvx2, &kGemmAvx2, kDepthwiseAvx2, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvxVnni, "avxvnni", CpuAvxVnni, &kGemmAvxVnni, kDepthwiseAvx2, nullptr, nullptr, nullptr, nullptr},
    {Isa::kAvx512Vnni, "avx512vnni", CpuAvx512Vnni, &kGemmAvx512Vnni, kDepthwiseAvx512, kDepthwisePackAvx512,
     MinMaxAvx512, QuantizeLinearU8Avx512, ChannelLutAvx512, QuantizeNhwcAvx512},
    {Isa::kAmx, "amx", CpuAmx, &kGemmAmx, kDepthwiseAvx512, kDepthwisePackAvx512, MinMaxAvx512, QuantizeLinearU8Avx512,
     ChannelLutAvx512, QuantizeNhwcAvx512},
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
      g_env_error = std::string("QIE_ISA='") + env + "' is not one of scalar, avx2, avxvnni, avx512vnni, amx";
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
