// The depthwise convolution kernel body (one input and one output channel per group), included by
// one file per ISA and compiled with that file's flags so the channel loops vectorize to its width.
// No std templates here: their out-of-line copies would be shared across ISA files by the linker.
//
// Tiling, in steps:
//  1. Weights were prepacked as int16 (w - w_zp) in tap pairs, [pair][C][2]. For each output pixel an
//     indirection list points each tap at its input row, or at a row of x_zp bytes for padding taps
//     (which then contribute nothing): no bounds checks in the channel loops.
//  2. The int32 accumulators of all C channels start at the bias; each tap pair adds
//     (x0 - x_zp) * w0 + (x1 - x_zp) * w1 over the channels.
//  3. The epilogue requantizes the channel vector: float32(acc) * scale[c], clamped to the output
//     range, rounded half-to-even with the 1.5 * 2^23 trick (exact for |v| < 2^22, so identical to
//     nearbyint after the clamp), plus the zero point.
#pragma once
#include <cstring>

#include "kernels/conv.h"

namespace qie {
namespace {  // internal linkage: each ISA file gets its own copy, compiled with its own flags

// Step 1 of every ISA's kernel: the input row of each tap of output pixel p (the zero-point row for
// taps in the padding); an odd tap count gets one more zero-point entry so taps come in pairs.
// Output pixel coordinates walked without a division per pixel.
struct PixelWalk {
  ptrdiff_t od, oh, ow;
  PixelWalk(const ConvShape& s, size_t p)
      : od(ptrdiff_t(p / (s.out[1] * s.out[2]))),
        oh(ptrdiff_t((p / s.out[2]) % s.out[1])),
        ow(ptrdiff_t(p % s.out[2])) {}
  void Next(const ConvShape& s) {
    if (++ow < ptrdiff_t(s.out[2])) return;
    ow = 0;
    if (++oh < ptrdiff_t(s.out[1])) return;
    oh = 0;
    ++od;
  }
};

inline void SetRow(const uint8_t*& dst, const uint8_t* row) { dst = row; }
inline void SetRow(uintptr_t& dst, const uint8_t* row) { dst = reinterpret_cast<uintptr_t>(row); }

// (Rows as pointers, or as addresses for the kernels that add them to a base.)
template <class Row>
inline void TapPointers(const ConvShape& s, const ConvArgs& a, const uint8_t* zrow, size_t b, const PixelWalk& w,
                        Row* ptrs) {
  // The shape in locals: the stores through ptrs (uintptr_t, the type of size_t) could otherwise alias its fields and
  // reload them on every tap (5x5 windows at the borders of small images made this a visible cost).
  const ptrdiff_t in_d = ptrdiff_t(s.in[0]), in_h = ptrdiff_t(s.in[1]), in_w = ptrdiff_t(s.in[2]);
  const size_t kd_n = s.k[0], kh_n = s.k[1], kw_n = s.k[2], C = s.C;
  const ptrdiff_t dil_d = ptrdiff_t(s.dil[0]), dil_h = ptrdiff_t(s.dil[1]), dil_w = ptrdiff_t(s.dil[2]);
  const ptrdiff_t id0 = w.od * ptrdiff_t(s.stride[0]) - ptrdiff_t(s.pad[0]);
  const ptrdiff_t ih0 = w.oh * ptrdiff_t(s.stride[1]) - ptrdiff_t(s.pad[1]);
  const ptrdiff_t iw0 = w.ow * ptrdiff_t(s.stride[2]) - ptrdiff_t(s.pad[2]);
  const uint8_t* x = a.x;
  size_t t = 0;
  for (size_t kd = 0; kd < kd_n; ++kd) {
    const ptrdiff_t id = id0 + ptrdiff_t(kd) * dil_d;
    for (size_t kh = 0; kh < kh_n; ++kh) {
      const ptrdiff_t ih = ih0 + ptrdiff_t(kh) * dil_h;
      const bool row_in = id >= 0 && id < in_d && ih >= 0 && ih < in_h;
      const uint8_t* row =
          row_in ? x + ((b * size_t(in_d) + size_t(id)) * size_t(in_h) + size_t(ih)) * size_t(in_w) * C : nullptr;
      for (size_t kw = 0; kw < kw_n; ++kw, ++t) {
        const ptrdiff_t iw = iw0 + ptrdiff_t(kw) * dil_w;
        SetRow(ptrs[t], row_in && iw >= 0 && iw < in_w ? row + size_t(iw) * C : zrow);
      }
    }
  }
  if (t % 2) SetRow(ptrs[t], zrow);
}

// Whether output pixel w's whole window lies inside the image (no padding tap).
inline bool WindowInside(const ConvShape& s, const PixelWalk& w) {
  const ptrdiff_t id0 = w.od * ptrdiff_t(s.stride[0]) - ptrdiff_t(s.pad[0]);
  const ptrdiff_t ih0 = w.oh * ptrdiff_t(s.stride[1]) - ptrdiff_t(s.pad[1]);
  const ptrdiff_t iw0 = w.ow * ptrdiff_t(s.stride[2]) - ptrdiff_t(s.pad[2]);
  return id0 >= 0 && id0 + ptrdiff_t((s.k[0] - 1) * s.dil[0]) < ptrdiff_t(s.in[0]) && ih0 >= 0 &&
         ih0 + ptrdiff_t((s.k[1] - 1) * s.dil[1]) < ptrdiff_t(s.in[1]) && iw0 >= 0 &&
         iw0 + ptrdiff_t((s.k[2] - 1) * s.dil[2]) < ptrdiff_t(s.in[2]);
}

// The indirection lists of np consecutive pixels from p0 (row stride `stride` pointers). A pixel
// whose whole window lies inside the image, following one that did too in the same output row, gets
// its predecessor's list advanced by stride_w * C: the full computation runs only near borders.
inline void BuildTable(const ConvShape& s, const ConvArgs& a, const uint8_t* zrow, size_t b, size_t p0, size_t np,
                       const uint8_t** table, size_t stride) {
  const size_t taps = s.taps();
  const ptrdiff_t step = ptrdiff_t(s.stride[2] * s.C);
  PixelWalk walk(s, p0);
  bool prev_inside = false;
  for (size_t i = 0; i < np; ++i, walk.Next(s)) {
    const uint8_t** cur = table + i * stride;
    const bool in = WindowInside(s, walk);
    if (in && prev_inside && walk.ow > 0) {
      const uint8_t* const* prev = cur - stride;
      for (size_t t = 0; t < taps; ++t) cur[t] = prev[t] + step;
      if (taps % 2) cur[taps] = zrow;
    } else {
      TapPointers(s, a, zrow, b, walk, cur);
    }
    prev_inside = in;
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

// Step 3: the epilogue of one pixel's C accumulators.
inline void StorePixel(const int32_t* acc, const ConvArgs& a, size_t C, size_t o) {
  switch (a.kind) {
    case OutKind::kU8:
      Requantize(acc, a.scale, a.y_zp, float(0 - a.y_zp), float(255 - a.y_zp), C, static_cast<uint8_t*>(a.y) + o);
      break;
    case OutKind::kS8:
      Requantize(acc, a.scale, a.y_zp, float(-128 - a.y_zp), float(127 - a.y_zp), C, static_cast<int8_t*>(a.y) + o);
      break;
    default: std::memcpy(static_cast<int32_t*>(a.y) + o, acc, C * sizeof(int32_t));
  }
}

template <bool kXSigned>
void Pixels(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1,
            const DepthwiseScratch& sc) {
  const size_t C = s.C, pairs = (s.taps() + 1) / 2, stride = s.taps() + 1;
  int32_t* __restrict acc = sc.acc;
  BuildTable(s, a, sc.zrow, b, p0, p1 - p0, sc.ptrs, stride);
  for (size_t p = p0; p < p1; ++p) {
    const uint8_t* const* ptrs = sc.ptrs + (p - p0) * stride;
    if (a.bias)
      std::memcpy(acc, a.bias, C * sizeof(int32_t));
    else
      std::memset(acc, 0, C * sizeof(int32_t));
    // Step 2: each tap pair adds (x0 - zp) * w0 + (x1 - zp) * w1 per channel.
    for (size_t tp = 0; tp < pairs; ++tp) {
      const uint8_t* __restrict x0 = ptrs[2 * tp];
      const uint8_t* __restrict x1 = ptrs[2 * tp + 1];
      const int16_t* __restrict wp = dw + tp * C * 2;
      for (size_t c = 0; c < C; ++c) {
        const int32_t v0 = kXSigned ? int32_t(int8_t(x0[c])) : int32_t(x0[c]);
        const int32_t v1 = kXSigned ? int32_t(int8_t(x1[c])) : int32_t(x1[c]);
        acc[c] += (v0 - a.x_zp) * int32_t(wp[2 * c]) + (v1 - a.x_zp) * int32_t(wp[2 * c + 1]);
      }
    }
    StorePixel(acc, a, C, (b * s.out_pixels() + p) * C);
  }
}

void Depthwise(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t b, size_t p0, size_t p1,
               const DepthwiseScratch& sc) {
  if (a.x_signed)
    Pixels<true>(s, w.dw.data(), a, b, p0, p1, sc);
  else
    Pixels<false>(s, w.dw.data(), a, b, p0, p1, sc);
}

}  // namespace
}  // namespace qie
