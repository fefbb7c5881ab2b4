// The GEMM epilogue in portable C++: zero-point compensation, bias, then int32 / float / requantized
// output. The vector kernels implement the same steps with intrinsics; this is also their tail path.
#pragma once
#include <algorithm>
#include <cmath>

#include "kernels/gemm.h"

namespace qie {

inline int32_t CompensatedAcc(int32_t raw, size_t r, size_t j, const Epilogue& ep) {
  // Wrapping int32 arithmetic, as the vector kernels do; exact whenever the true sum fits in int32.
  uint32_t acc = static_cast<uint32_t>(raw);
  if (ep.bias)
    acc +=
        static_cast<uint32_t>(ep.bias[static_cast<ptrdiff_t>(r) * ep.bias_rs + static_cast<ptrdiff_t>(j) * ep.bias_cs]);
  if (ep.zb) acc -= static_cast<uint32_t>(ep.zb[j]) * static_cast<uint32_t>(ep.rs[r]);
  if (!ep.folded) acc -= static_cast<uint32_t>(ep.za[r]) * static_cast<uint32_t>(ep.csk[j]);
  return static_cast<int32_t>(acc);
}

inline int32_t Requantize(int32_t acc, float scale, int32_t zp, int32_t qmin, int32_t qmax) {
  float v = static_cast<float>(acc) * scale;
  v = std::min(std::max(v, static_cast<float>(qmin - zp)), static_cast<float>(qmax - zp));
  return static_cast<int32_t>(std::nearbyint(v)) + zp;
}

// raw: mr x nr int32 sums, row stride ldr.
inline void EpilogueScalar(const int32_t* raw, size_t ldr, size_t mr, size_t nr, const Epilogue& ep) {
  for (size_t r = 0; r < mr; ++r) {
    for (size_t j = 0; j < nr; ++j) {
      const int32_t acc = CompensatedAcc(raw[r * ldr + j], r, j, ep);
      const ptrdiff_t o = static_cast<ptrdiff_t>(r) * ep.ldy + static_cast<ptrdiff_t>(j);
      switch (ep.kind) {
        case OutKind::kInt32: static_cast<int32_t*>(ep.y)[o] = acc; break;
        case OutKind::kFloat: {
          float v = static_cast<float>(acc) * ep.scale[j];
          if (ep.fbias) v = v + ep.fbias[j];
          static_cast<float*>(ep.y)[o] = v;
          break;
        }
        case OutKind::kU8:
          static_cast<uint8_t*>(ep.y)[o] = static_cast<uint8_t>(Requantize(acc, ep.scale[j], ep.y_zp, 0, 255));
          break;
        case OutKind::kS8:
          static_cast<int8_t*>(ep.y)[o] = static_cast<int8_t>(Requantize(acc, ep.scale[j], ep.y_zp, -128, 127));
          break;
      }
    }
  }
}

}  // namespace qie
