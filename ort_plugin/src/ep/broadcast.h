// Numpy broadcasting of two run-time shapes for the EP's fused nodes that read a second float operand (an
// attention mask, a residual): the result's shape and each operand's element strides along its axes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qie_ep {

struct Broadcast {
  std::vector<int64_t> shape;
  std::vector<size_t> sx, sm;  // strides of x and m in the result's axes (0 where the operand repeats)
  // The element offsets in x and m of the first element of row `r` (every axis but the last).
  void RowOffsets(size_t r, size_t* ox, size_t* om) const {
    *ox = *om = 0;
    for (size_t d = shape.size() - 1; d-- > 0;) {
      const size_t i = r % static_cast<size_t>(shape[d]);
      r /= static_cast<size_t>(shape[d]);
      *ox += i * sx[d];
      *om += i * sm[d];
    }
  }
};

// x and m broadcast together; false when they cannot.
inline bool BroadcastOf(const std::vector<int64_t>& x, const std::vector<int64_t>& m, Broadcast* b) {
  const size_t r = x.size() > m.size() ? x.size() : m.size();
  b->shape.assign(r, 1);
  b->sx.assign(r, 0);
  b->sm.assign(r, 0);
  size_t kx = 1, km = 1;
  for (size_t i = r; i-- > 0;) {
    const int64_t dx = i + x.size() >= r ? x[i + x.size() - r] : 1;
    const int64_t dm = i + m.size() >= r ? m[i + m.size() - r] : 1;
    if (dx != dm && dx != 1 && dm != 1) return false;
    b->shape[i] = dx == 1 ? dm : dx;
    b->sx[i] = dx == 1 ? 0 : kx;
    b->sm[i] = dm == 1 ? 0 : km;
    kx *= static_cast<size_t>(dx);
    km *= static_cast<size_t>(dm);
  }
  return true;
}

}  // namespace qie_ep
