// Pacing: whether a fused step (the EP's region steps and units) or a custom op's kernel runs on the intra-op pool or
// on the calling thread, learnt per step from its first runs. A pool that does not spin costs a wake-up per parallel
// section (~10 us on the development VM, as much as a small step's work), one that spins much less; no step's results
// depend on how its work is split.
#pragma once
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "kernels/gemm.h"

namespace qie {

// Per power-of-two size class of the step's input (so sequences of varying length share decisions instead of
// learning again at every length).
struct Pacing {
  struct Class {
    std::atomic<int> runs{0};  // calibration runs so far (alternating pool / calling thread)
    std::atomic<int64_t> ns[2] = {{INT64_MAX}, {INT64_MAX}};  // the fastest timed run each way (robust to preemption)
    std::atomic<int> mode{0};                                 // 0: calibrating, 1: pool, 2: calling thread
  };
  static constexpr size_t kClasses = 48;
  Class classes[kClasses];
  static size_t ClassOf(size_t elements) {
    size_t c = 0;
    while (elements > 1 && c + 1 < kClasses) {
      elements >>= 1;
      ++c;
    }
    return c;
  }
};

// One run of a step (construct before, Done() after): while its size class calibrates, alternate runs take each way
// (the class's first kWarmup runs are not counted), kCalibration of each are timed, then the way with the faster
// best run is kept. Races between concurrent runs of one session only cost calibration runs.
class Pace {
 public:
  static constexpr int kWarmup = 2, kCalibration = 6;
  Pace(Pacing& pc, bool adaptive, size_t elements, const qie::ParallelFor& pool)
      : pc_(pc.classes[Pacing::ClassOf(elements)]), pool_(pool) {
    if (!adaptive) return;
    const int mode = pc_.mode.load(std::memory_order_relaxed);
    if (mode != 0) {
      serial_ = mode == 2;
      return;
    }
    run_ = pc_.runs.fetch_add(1);
    serial_ = run_ % 2 == 1;
    timing_ = run_ >= kWarmup && run_ < kWarmup + 2 * kCalibration;
    if (timing_) t0_ = std::chrono::steady_clock::now();
  }
  const qie::ParallelFor& For() const { return serial_ ? Inline() : pool_; }
  void Done() {
    if (!timing_) return;
    const int64_t ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count();
    std::atomic<int64_t>& best = pc_.ns[serial_ ? 1 : 0];
    for (int64_t b = best.load(); ns < b && !best.compare_exchange_weak(b, ns);) {}
    if (run_ == kWarmup + 2 * kCalibration - 1)  // the last calibration run decides
      pc_.mode.store(pc_.ns[1].load() < pc_.ns[0].load() ? 2 : 1);
  }

 private:
  static const qie::ParallelFor& Inline() {
    static const qie::ParallelFor f = [](size_t n, const std::function<void(size_t)>& fn) {
      for (size_t i = 0; i < n; ++i) fn(i);
    };
    return f;
  }
  Pacing::Class& pc_;
  const qie::ParallelFor& pool_;
  bool serial_ = false, timing_ = false;
  int run_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace qie

namespace qie_ep {
using qie::Pace;
using qie::Pacing;
}  // namespace qie_ep
