// Invocation counters behind qie_ep.stats(): how many times each (domain, op) ran on each ISA.
// Read from Python through the small exported C API (qie_stats_snapshot / qie_stats_reset).
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "ops/common.h"

namespace qie {
namespace {
constexpr int kMaxOps = 32;
struct OpName {
  std::string domain, op;
};
std::mutex g_mu;
std::vector<OpName> g_names;
std::atomic<uint64_t> g_counts[kMaxOps][kIsaCount];
}  // namespace

int StatsOpId(const char* domain, const char* op) {
  std::lock_guard<std::mutex> lock(g_mu);
  for (size_t i = 0; i < g_names.size(); ++i)
    if (g_names[i].domain == domain && g_names[i].op == op) return static_cast<int>(i);
  if (g_names.size() >= kMaxOps) return -1;
  g_names.push_back({domain, op});
  return static_cast<int>(g_names.size() - 1);
}

void StatsCount(int op_id, Isa isa) {
  if (op_id >= 0 && op_id < kMaxOps) g_counts[op_id][static_cast<int>(isa)].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace qie

extern "C" {

// Writes "domain\top\tisa\tcount\n" lines for every non-zero counter into buf (NUL-terminated,
// truncated to cap); returns the length the full text needs, without the NUL.
__attribute__((visibility("default"))) size_t qie_stats_snapshot(char* buf, size_t cap) {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(qie::g_mu);
    for (size_t i = 0; i < qie::g_names.size(); ++i)
      for (int isa = 0; isa < qie::kIsaCount; ++isa) {
        const uint64_t n = qie::g_counts[i][isa].load();
        if (!n) continue;
        out += qie::g_names[i].domain + "\t" + qie::g_names[i].op + "\t" + qie::IsaName(static_cast<qie::Isa>(isa)) +
               "\t" + std::to_string(n) + "\n";
      }
  }
  if (buf && cap) {
    const size_t n = std::min(cap - 1, out.size());
    std::memcpy(buf, out.data(), n);
    buf[n] = '\0';
  }
  return out.size();
}

__attribute__((visibility("default"))) void qie_stats_reset() {
  for (auto& row : qie::g_counts)
    for (auto& c : row) c.store(0);
}

}  // extern "C"
