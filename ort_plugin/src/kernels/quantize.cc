// Dynamic quantization of a float tensor to u8, exactly as ONNX Runtime's DynamicQuantizeLinear /
// DynamicQuantizeMatMul compute it:
//   lo = min(0, min x), hi = max(0, max x), scale = (hi - lo) / 255 (1 when hi == lo),
//   zp = round_half_even(clamp(0 - lo / scale, 0, 255)), q = saturate(round_half_even(x / scale) + zp).
#include <algorithm>
#include <cmath>

#include "kernels/isa.h"

namespace qie {

void DynamicQuantizeParams(const float* x, size_t n, float* scale, uint8_t* zp) {
  float lo = 0.0f, hi = 0.0f;
  const MinMaxFn minmax = KernelsFor(ActiveIsa()).minmax;
  if (n > 0 && minmax) {
    minmax(x, n, &lo, &hi);
  } else if (n > 0) {
    lo = hi = x[0];
    for (size_t i = 1; i < n; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
  }
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  const float s = hi == lo ? 1.0f : (hi - lo) / 255.0f;
  const float z0 = 0.0f - lo / s;
  *scale = s;
  *zp = static_cast<uint8_t>(std::nearbyint(std::max(0.0f, std::min(255.0f, z0))));
}

void QuantizeLinearU8(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q) {
  if (const QuantizeU8Fn vec = KernelsFor(ActiveIsa()).quantize_u8) return vec(x, n, scale, zp, q);
  const float lo = 0.0f - zp, hi = 255.0f - zp;
  for (size_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    if (v != v) v = 0.0f;  // NaN: defined result (zero point) instead of an undefined conversion
    v = std::min(std::max(v, lo), hi);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(v)) + zp);
  }
}

void QuantizeToNhwc(const float* x, size_t C, size_t hw, size_t p0, size_t p1, float scale, int32_t zp, bool is_signed,
                    uint8_t* y) {
  if (const QuantizeNhwcFn vec = KernelsFor(ActiveIsa()).quantize_nhwc)
    return vec(x, C, hw, p0, p1, scale, zp, is_signed, y);
  const float lo = static_cast<float>((is_signed ? -128 : 0) - zp),
              hi = static_cast<float>((is_signed ? 127 : 255) - zp);
  for (size_t p = p0; p < p1; ++p)
    for (size_t c = 0; c < C; ++c) {
      const float f = x[c * hw + p] / scale;
      const float clamped = f == f ? std::min(std::max(f, lo), hi) : lo;  // NaN: the bottom code, as ORT's
      y[p * C + c] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(clamped)) + zp);
    }
}

}  // namespace qie
