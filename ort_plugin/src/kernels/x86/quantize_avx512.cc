// AVX-512 versions of the dynamic-quantization helpers in quantize.cc, bit-identical to them:
// min/max ignore NaN the way std::min/std::max with the accumulator first do; x / scale is an IEEE
// division like the scalar one; NaN quotients become 0; vcvtps2dq rounds half to even.
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qie {

void MinMaxAvx512(const float* x, size_t n, float* lo_out, float* hi_out) {
  float lo = x[0], hi = x[0];
  size_t i = 0;
  if (n >= 16) {
    __m512 vlo = _mm512_set1_ps(lo), vhi = vlo;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      vlo = _mm512_min_ps(v, vlo);  // NaN in v: keeps vlo (the second operand)
      vhi = _mm512_max_ps(v, vhi);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
  }
  for (; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  *lo_out = lo;
  *hi_out = hi;
}

void QuantizeLinearU8Avx512(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q) {
  const __m512 vs = _mm512_set1_ps(scale), vlo = _mm512_set1_ps(0.0f - zp), vhi = _mm512_set1_ps(255.0f - zp);
  const __m512i vzp = _mm512_set1_epi32(zp);
  size_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vs);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
    v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
    const __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(v), vzp);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, m, r);
  }
}

// 16 pixels at a time: each plane's 16 floats quantized to int32 codes (masked past p1); C = 3 and 4 (images) pack
// each pixel's codes into one dword and, for 3, squeeze the dwords' fourth bytes out (in-lane shuffle, then dword
// permute) before one masked store; other C go through a [C][16] byte block.
void QuantizeNhwcAvx512(const float* x, size_t C, size_t hw, size_t p0, size_t p1, float scale, int32_t zp,
                        bool is_signed, uint8_t* y) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>((is_signed ? -128 : 0) - zp));
  const __m512 vhi = _mm512_set1_ps(static_cast<float>((is_signed ? 127 : 255) - zp));
  const __m512i vzp = _mm512_set1_epi32(zp), low = _mm512_set1_epi32(0xFF);
  const auto codes = [&](const float* plane, size_t p, __mmask16 m) {
    // max first, NaN in v giving its second operand: NaN -> the bottom code, as ORT's QuantizeLinear (MLAS)
    const __m512 f = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, plane + p), vs), vlo), vhi);
    return _mm512_and_si512(_mm512_add_epi32(_mm512_cvtps_epi32(f), vzp), low);  // the code's byte
  };
  // Per 128-bit lane, its four pixels' three bytes first; then lanes' first three dwords side by side.
  const __m512i squeeze = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
  const __m512i gather = _mm512_setr_epi32(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15, 15, 15, 15);
  for (size_t p = p0; p < p1; p += 16) {
    const size_t n = std::min<size_t>(16, p1 - p);
    const __mmask16 m = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    uint8_t* out = y + p * C;
    if (C == 3 || C == 4) {
      __m512i w = codes(x, p, m);
      for (size_t c = 1; c < C; ++c) w = _mm512_or_si512(w, _mm512_slli_epi32(codes(x + c * hw, p, m), int(8 * c)));
      if (C == 3) w = _mm512_permutexvar_epi32(gather, _mm512_shuffle_epi8(w, squeeze));
      const size_t bytes = n * C;
      const __mmask64 bm = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
      _mm512_mask_storeu_epi8(out, bm, w);
      continue;
    }
    alignas(64) uint8_t blk[16 * 64];
    for (size_t c0 = 0; c0 < C; c0 += 64) {  // at most 64 planes per block
      const size_t cn = std::min<size_t>(64, C - c0);
      for (size_t c = 0; c < cn; ++c) _mm512_mask_cvtepi32_storeu_epi8(blk + c * 16, m, codes(x + (c0 + c) * hw, p, m));
      for (size_t j = 0; j < n; ++j)
        for (size_t c = 0; c < cn; ++c) out[j * C + c0 + c] = blk[c * 16 + j];
    }
  }
}

}  // namespace qie
