// The depthwise convolution kernel body (one input and one output channel per group), included by
// one file per ISA and compiled with that file's flags so the channel loops vectorize to its width.
// No std templates here: their out-of-line copies would be shared across ISA files by the linker.
//
// Tiling, in steps:
//  1. Weights were prepacked as int16 (w - w_zp) in [tap][C] order, so each tap is one contiguous
//     channel vector.
//  2. For each output pixel, the int32 accumulators of all C channels start at the bias; each tap
//     whose input pixel lies inside the image adds (x - x_zp) * w' over the channels (padding taps
//     contribute nothing and are skipped).
//  3. The epilogue requantizes the channel vector: float32(acc) * scale[c], clamped to the output
//     range, rounded half-to-even with the 1.5 * 2^23 trick (exact for |v| < 2^22, so identical to
//     nearbyint after the clamp), plus the zero point.
#pragma once
#include <cstring>

#include "kernels/conv.h"

namespace qie {
namespace {  // internal linkage: each ISA file gets its own copy, compiled with its own flags

template <bool kXSigned>
inline void Accumulate(const uint8_t* __restrict xp, const int16_t* __restrict wp, int32_t xzp, size_t C,
                       int32_t* __restrict acc) {
  for (size_t c = 0; c < C; ++c) {
    const int32_t xv = kXSigned ? static_cast<int32_t>(static_cast<int8_t>(xp[c])) : static_cast<int32_t>(xp[c]);
    acc[c] += (xv - xzp) * static_cast<int32_t>(wp[c]);
  }
}

template <class T>
inline void Requantize(const int32_t* __restrict acc, const float* __restrict scale, int32_t zp, float lo, float hi,
                       size_t C, T* __restrict y) {
  for (size_t c = 0; c < C; ++c) {
    float v = static_cast<float>(acc[c]) * scale[c];
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    v = (v + 12582912.0f) - 12582912.0f;
    y[c] = static_cast<T>(static_cast<int32_t>(v) + zp);
  }
}

template <bool kXSigned>
void Pixels(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1, int32_t* acc) {
  const size_t C = s.C;
  const size_t plane = s.out[1] * s.out[2];
  for (size_t p = p0; p < p1; ++p) {
    const ptrdiff_t od = static_cast<ptrdiff_t>(p / plane), oh = static_cast<ptrdiff_t>((p / s.out[2]) % s.out[1]),
                    ow = static_cast<ptrdiff_t>(p % s.out[2]);
    if (a.bias) std::memcpy(acc, a.bias, C * sizeof(int32_t));
    else std::memset(acc, 0, C * sizeof(int32_t));
    size_t tap = 0;
    for (size_t kd = 0; kd < s.k[0]; ++kd) {
      const ptrdiff_t id = od * ptrdiff_t(s.stride[0]) + ptrdiff_t(kd * s.dil[0]) - ptrdiff_t(s.pad[0]);
      for (size_t kh = 0; kh < s.k[1]; ++kh) {
        const ptrdiff_t ih = oh * ptrdiff_t(s.stride[1]) + ptrdiff_t(kh * s.dil[1]) - ptrdiff_t(s.pad[1]);
        for (size_t kw = 0; kw < s.k[2]; ++kw, ++tap) {
          const ptrdiff_t iw = ow * ptrdiff_t(s.stride[2]) + ptrdiff_t(kw * s.dil[2]) - ptrdiff_t(s.pad[2]);
          if (id < 0 || id >= ptrdiff_t(s.in[0]) || ih < 0 || ih >= ptrdiff_t(s.in[1]) || iw < 0 || iw >= ptrdiff_t(s.in[2]))
            continue;
          const size_t pix = ((b * s.in[0] + size_t(id)) * s.in[1] + size_t(ih)) * s.in[2] + size_t(iw);
          Accumulate<kXSigned>(a.x + pix * C, dw + tap * C, a.x_zp, C, acc);
        }
      }
    }
    const size_t o = (b * s.out_pixels() + p) * C;
    switch (a.kind) {
      case OutKind::kU8:
        Requantize(acc, a.scale, a.y_zp, float(0 - a.y_zp), float(255 - a.y_zp), C, static_cast<uint8_t*>(a.y) + o);
        break;
      case OutKind::kS8:
        Requantize(acc, a.scale, a.y_zp, float(-128 - a.y_zp), float(127 - a.y_zp), C, static_cast<int8_t*>(a.y) + o);
        break;
      default:
        std::memcpy(static_cast<int32_t*>(a.y) + o, acc, C * sizeof(int32_t));
    }
  }
}

void Depthwise(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1, int32_t* acc) {
  if (a.x_signed) Pixels<true>(s, dw, a, b, p0, p1, acc);
  else Pixels<false>(s, dw, a, b, p0, p1, acc);
}

}  // namespace
}  // namespace qie
