// Per-channel byte lookup on AVX-512: y[p][c] = t[c][x[p][c]] over NHWC rows (the EP's quantized tables).
//
// One table (C = 1): sixteen contiguous bytes per gather. Per channel:
// 1. Sixteen channels at a time: their 16 input bytes widened to int32 indices (vpmovzxbd).
// 2. Each lane's index offset by its channel's table base (c * 256, a constant vector per channel block).
// 3. One dword gather (scale 1) from the byte table, padded by 3 bytes so every dword read stays inside it;
//    the low byte of each dword is the result, narrowed with vpmovdb and stored (masked at the channel tail).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "kernels/isa.h"

namespace qie {

void ChannelLutAvx512(const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y, size_t pixels) {
  if (C == 1) {  // one table over contiguous bytes: sixteen pixels per gather
    size_t p = 0;
    for (; p + 16 <= pixels; p += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + p)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + p), _mm512_cvtepi32_epi8(_mm512_i32gather_epi32(idx, t, 1)));
    }
    for (; p < pixels; ++p) y[p] = t[x[p]];
    _mm256_zeroupper();
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (size_t c0 = 0; c0 < C; c0 += 16) {
    const size_t n = C - c0 < 16 ? C - c0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    const __m512i base =
        _mm512_slli_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(C == 1 ? 0 : c0))), 8);
    const __m512i base_eff = C == 1 ? _mm512_setzero_si512() : base;
    for (size_t p = 0; p < pixels; ++p) {
      const __m128i xb = _mm_maskz_loadu_epi8(m, x + p * C + c0);
      const __m512i idx = _mm512_add_epi32(_mm512_cvtepu8_epi32(xb), base_eff);
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, t, 1);
      _mm_mask_storeu_epi8(y + p * C + c0, m, _mm512_cvtepi32_epi8(v));
    }
  }
  _mm256_zeroupper();
}

}  // namespace qie
