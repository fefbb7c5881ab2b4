// Team: one wake-up of ORT's intra-op pool per region run instead of one per parallel section.
//
// A region runs tens of steps, each with one or more parallel sections; a pool that does not spin (the setting
// for sessions that share cores) wakes its workers for every section (~10 us each on the development VM: PP-LCNet's
// region lost ~0.7 ms of 1.8 to them at 2 threads). Team::Run asks the pool once for `width` tasks. The first task
// to start becomes the leader and runs the whole body (the region's steps, in order); the body's sections go to
// the team through the ParallelFor it is given: the leader publishes (fn, n), and every member, leader included,
// claims indices until none is left, then the leader waits until all are done. The other tasks are members: they
// spin (pause) waiting for sections until the leader finishes, and leave after kIdleSpins without one.
//
// Never a deadlock: the leader runs every index nobody else claims, so it needs no member to start (ORT may run the
// tasks one after another on the calling thread: the later ones then find the run finished and return). A claim
// is a compare-and-swap on one word holding (section, index), so a member can never run an index of a section
// other than the one whose fn / n it read (a section ends only after all its indices were claimed and run).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QIE_TEAM_PAUSE() _mm_pause()
#else
#define QIE_TEAM_PAUSE() ((void)0)
#endif

#include "kernels/gemm.h"

namespace qie_ep {

class Team {
 public:
  // Spins without a section before a member leaves (~0.1-1 ms: the leader's serial code between sections is short;
  // a member that leaves costs nothing but its help).
  static constexpr long kIdleSpins = 1L << 16;
  // Pauses between yields of the CPU while waiting: with more pool threads than cores (oversubscribed sessions) a
  // spinning member would otherwise take the leader's core for whole time slices.
  static constexpr long kYieldEvery = 64;

  // Runs body(team_for) once on one of `width` pool tasks; rethrows what the body threw. Returns whether another task
  // joined before the body finished (never, on a pool of one thread: the caller runs the tasks one after another).
  static bool Run(const qie::ParallelFor& pool, size_t width,
                  const std::function<void(const qie::ParallelFor&)>& body) {
    Team t;
    const qie::ParallelFor team_for = [&t](size_t n, const std::function<void(size_t)>& fn) { t.Section(n, fn); };
    pool(width, [&](size_t) {
      if (t.leader_taken_.exchange(true, std::memory_order_acq_rel)) return t.Member();
      try {
        body(team_for);
      } catch (...) { t.error_ = std::current_exception(); }
      t.finished_.store(true, std::memory_order_release);
    });
    if (t.error_) std::rethrow_exception(t.error_);
    return t.joined_.load(std::memory_order_relaxed);
  }

 private:
  static constexpr uint64_t kLocked = 0xFFFFFFFFu;  // an index past every section's end
  static uint64_t Word(uint64_t section, uint64_t index) { return section << 32 | index; }

  // The leader: lock the claim word, publish fn / n, open it; claim with the members; wait for every index.
  void Section(size_t n, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    if (n == 1 || n >= kLocked) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    const uint64_t s = ++section_;
    // Locked before fn / n change: a member that reads the new fn / n (acquire) then fails its claim on the old word.
    next_.store(Word(s, kLocked), std::memory_order_relaxed);
    n_.store(n, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_release);
    next_.store(Word(s, 0), std::memory_order_release);
    Claim();
    for (long spins = 1; done_.load(std::memory_order_acquire) < n; ++spins) Wait(spins);
    if (section_error_) {  // an index threw (on any member): the section is over, the body sees the exception
      std::exception_ptr e = section_error_;
      section_error_ = nullptr;
      failed_.store(false, std::memory_order_relaxed);
      std::rethrow_exception(e);
    }
  }

  // Claims and runs indices of the current section until none is left; true if it ran any.
  bool Claim() {
    bool ran = false;
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      const std::function<void(size_t)>* fn = fn_.load(std::memory_order_acquire);
      const size_t n = n_.load(std::memory_order_acquire);
      const uint64_t index = v & kLocked;
      if (index >= n) return ran;
      // Success means the word is still v: v's section is current and fn / n are its own. Had the leader moved on,
      // the word would have changed (a later section's fn / n, once read, imply its locked word is visible).
      if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      try {
        (*fn)(static_cast<size_t>(index));
      } catch (...) {  // kept for the leader (first one wins); the index still counts as done, so nobody waits on it
        if (!failed_.exchange(true, std::memory_order_acq_rel)) section_error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      ran = true;
      v = next_.load(std::memory_order_acquire);
    }
  }

  void Member() {
    if (!finished_.load(std::memory_order_acquire)) joined_.store(true, std::memory_order_relaxed);
    long idle = 0;
    while (!finished_.load(std::memory_order_acquire) && idle < kIdleSpins) {
      if (Claim())
        idle = 0;
      else
        Wait(++idle);
    }
  }

  static void Wait(long spins) {
    if (spins % kYieldEvery == 0)
      std::this_thread::yield();
    else
      QIE_TEAM_PAUSE();
  }

  std::atomic<bool> leader_taken_{false}, finished_{false}, joined_{false}, failed_{false};
  std::exception_ptr section_error_;  // written by the first index that threw, read by the leader after done_
  std::atomic<uint64_t> next_{0};     // (section, next index to claim)
  std::atomic<size_t> done_{0}, n_{0};
  std::atomic<const std::function<void(size_t)>*> fn_{nullptr};
  uint64_t section_ = 0;  // the leader's
  std::exception_ptr error_;
};

}  // namespace qie_ep
