// Depthwise convolution, AVX-512: qie_dwconv_u8s8_s32_16c2__avx512vnni (16 channels x 2 taps per
// instruction). Compiled with this file's own flags.
//
// Tiling, in steps:
//  1. depthwise_inl.h's indirection lists are built for the task's pixels at once; then per block of
//     16 channels (bias, scale and constants in registers) the pixels are swept, accumulators
//     starting at the bias.
//  2. Per tap pair, both taps' 16 input bytes are zero-extended to int32 lanes and merged as int16
//     pairs (x0 | x1 << 16); a signed input is XORed with 0x80 first (x + 128, zero point + 128,
//     differences unchanged). Subtracting the zero point pair (int16) gives (x - x_zp) in
//     [-255, 255], and vpmaddwd with the prepacked (w0, w1) pair adds both products exactly.
//  3. The epilogue requantizes 16 lanes in float32 (multiply, clamp, round half-to-even by the
//     default MXCSR mode, + y_zp) and stores bytes, or stores the int32 accumulators.
#include <immintrin.h>

#include "kernels/depthwise_inl.h"

namespace qie {
namespace {

template <bool kSigned>
inline __m512i LoadPair(const uint8_t* x0, const uint8_t* x1, __mmask16 m) {
  __m128i b0 = _mm_maskz_loadu_epi8(m, x0), b1 = _mm_maskz_loadu_epi8(m, x1);
  if (kSigned) {
    b0 = _mm_xor_si128(b0, _mm_set1_epi8(static_cast<char>(0x80)));
    b1 = _mm_xor_si128(b1, _mm_set1_epi8(static_cast<char>(0x80)));
  }
  return _mm512_or_si512(_mm512_cvtepu8_epi32(b0), _mm512_slli_epi32(_mm512_cvtepu8_epi32(b1), 16));
}

template <bool kSigned>
void Block(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t o0, size_t np, size_t c,
           const uint8_t* const* table, size_t stride) {
  const size_t C = s.C, pairs = (s.taps() + 1) / 2;
  const __mmask16 m = C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
  const int32_t zp = a.x_zp + (kSigned ? 128 : 0);
  const __m512i zpp = _mm512_set1_epi32(zp | (zp << 16));
  const bool quant = a.kind != OutKind::kInt32, u8 = a.kind == OutKind::kU8;
  const __m512 lo = _mm512_set1_ps(static_cast<float>((u8 ? 0 : -128) - a.y_zp));
  const __m512 hi = _mm512_set1_ps(static_cast<float>((u8 ? 255 : 127) - a.y_zp));
  const __m512i yzp = _mm512_set1_epi32(a.y_zp);
  const __m512i bias = a.bias ? _mm512_maskz_loadu_epi32(m, a.bias + c) : _mm512_setzero_si512();
  const __m512 scale = quant ? _mm512_maskz_loadu_ps(m, a.scale + c) : _mm512_setzero_ps();
  const int16_t* w = dw + c * 2;
  for (size_t i = 0; i < np; ++i) {
    const uint8_t* const* ptrs = table + i * stride;
    __m512i acc = bias, acc2 = _mm512_setzero_si512();  // two chains: even and odd pairs
    size_t tp = 0;
    for (; tp + 2 <= pairs; tp += 2) {
      const __m512i x0 = _mm512_sub_epi16(LoadPair<kSigned>(ptrs[2 * tp] + c, ptrs[2 * tp + 1] + c, m), zpp);
      const __m512i x1 = _mm512_sub_epi16(LoadPair<kSigned>(ptrs[2 * tp + 2] + c, ptrs[2 * tp + 3] + c, m), zpp);
      acc = _mm512_add_epi32(acc, _mm512_madd_epi16(x0, _mm512_maskz_loadu_epi32(m, w + tp * C * 2)));
      acc2 = _mm512_add_epi32(acc2, _mm512_madd_epi16(x1, _mm512_maskz_loadu_epi32(m, w + (tp + 1) * C * 2)));
    }
    if (tp < pairs) {
      const __m512i x0 = _mm512_sub_epi16(LoadPair<kSigned>(ptrs[2 * tp] + c, ptrs[2 * tp + 1] + c, m), zpp);
      acc = _mm512_add_epi32(acc, _mm512_madd_epi16(x0, _mm512_maskz_loadu_epi32(m, w + tp * C * 2)));
    }
    acc = _mm512_add_epi32(acc, acc2);
    const size_t o = o0 + i * C + c;
    if (!quant) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(a.y) + o, m, acc);
      continue;
    }
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m128i q = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), yzp));
    KeepInRegister(q);
    _mm_mask_storeu_epi8(static_cast<int8_t*>(a.y) + o, m, q);
  }
}

// The pixel range's indirection table is built once; then each block of 16 channels sweeps the
// pixels with its bias, scale and epilogue constants held in registers.
void DepthwiseAvx512(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1,
                     const DepthwiseScratch& sc) {
  const size_t stride = s.taps() + 1, np = p1 - p0;
  BuildTable(s, a, sc.zrow, b, p0, np, sc.ptrs, stride);
  const size_t o0 = (b * s.out_pixels() + p0) * s.C;
  for (size_t c = 0; c < s.C; c += 16) {
    if (a.x_signed)
      Block<true>(s, dw, a, o0, np, c, sc.ptrs, stride);
    else
      Block<false>(s, dw, a, o0, np, c, sc.ptrs, stride);
  }
}

}  // namespace

extern const DepthwiseFn kDepthwiseAvx512 = DepthwiseAvx512;
}  // namespace qie
