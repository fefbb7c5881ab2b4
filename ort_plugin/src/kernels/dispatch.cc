// ISA dispatch: one table of microkernels, the active entry chosen once from cpuid (best available)
// unless the QIE_ISA environment variable names another path this CPU supports.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/gemm.h"

namespace qie {

extern const MicroKernel kGemmScalar, kGemmAvx2, kGemmAvxVnni, kGemmAvx512Vnni;

namespace {
const char* const kNames[kIsaCount] = {"scalar", "avx2", "avxvnni", "avx512vnni"};
std::string g_env_error;

Isa ChooseAtLoad() {
  Isa best = Isa::kScalar;
  for (int i = kIsaCount - 1; i >= 0; --i)
    if (IsaSupported(static_cast<Isa>(i))) { best = static_cast<Isa>(i); break; }
  const char* env = std::getenv("QIE_ISA");
  if (env && *env) {
    Isa want;
    if (!IsaFromName(env, &want)) g_env_error = std::string("QIE_ISA='") + env + "' is not one of scalar, avx2, avxvnni, avx512vnni";
    else if (!IsaSupported(want)) g_env_error = std::string("QIE_ISA='") + env + "' is not supported by this CPU";
    else best = want;
  }
  return best;
}
std::atomic<int> g_active{ -1 };
}  // namespace

const char* IsaName(Isa isa) { return kNames[static_cast<int>(isa)]; }

bool IsaFromName(const char* name, Isa* out) {
  for (int i = 0; i < kIsaCount; ++i)
    if (std::strcmp(name, kNames[i]) == 0) { *out = static_cast<Isa>(i); return true; }
  return false;
}

bool IsaSupported(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar: return true;
    // Each path needs every extension its files are compiled with (CMakeLists.txt).
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
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

const MicroKernel& GetMicroKernel(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return kGemmAvx2;
    case Isa::kAvxVnni: return kGemmAvxVnni;
    case Isa::kAvx512Vnni: return kGemmAvx512Vnni;
    default: return kGemmScalar;
  }
}

}  // namespace qie
