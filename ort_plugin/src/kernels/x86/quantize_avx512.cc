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

}  // namespace qie
