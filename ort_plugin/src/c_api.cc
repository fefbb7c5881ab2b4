// The small C API the Python package reads with ctypes (qie_ep/_lib.py): the registered ops, the ISA
// paths, and forcing one. The stats counters' entries live with them in stats.cc. RegisterCustomOps,
// ORT's entry point, is in register.cc.
#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/isa.h"
#include "ops/ops.h"

#define QIE_EXPORT extern "C" __attribute__((visibility("default")))

// Writes "domain\top\n" for every (domain, op) the library registers (NUL-terminated, truncated to
// cap); returns the length the full text needs, without the NUL. qie_ep.ops() reads it.
QIE_EXPORT size_t qie_ops(char* buf, size_t cap) {
  const std::string out = qie::RegisteredOps();
  if (buf && cap) {
    const size_t n = std::min(cap - 1, out.size());
    std::memcpy(buf, out.data(), n);
    buf[n] = '\0';
  }
  return out.size();
}

QIE_EXPORT const char* qie_active_isa() { return qie::IsaName(qie::ActiveIsa()); }

// The ISA paths this library has, best last, one name per line (qie_ep.ISAS).
QIE_EXPORT const char* qie_isas() {
  static const std::string names = [] {
    std::string s;
    for (int i = 0; i < qie::kIsaCount; ++i) s += std::string(qie::IsaName(static_cast<qie::Isa>(i))) + "\n";
    return s;
  }();
  return names.c_str();
}

QIE_EXPORT int qie_isa_supported(const char* name) {
  qie::Isa isa;
  return qie::IsaFromName(name, &isa) && qie::IsaSupported(isa) ? 1 : 0;
}

// Forces the ISA used by kernels from now on (tests, benchmarks). 0 on success, -1 if unknown or
// not supported by this CPU.
QIE_EXPORT int qie_force_isa(const char* name) {
  qie::Isa isa;
  if (!qie::IsaFromName(name, &isa) || !qie::ForceIsa(isa)) return -1;
  return 0;
}
