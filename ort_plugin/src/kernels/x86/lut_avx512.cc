// Per-channel byte lookup on AVX-512: y[p][c] = t[c][x[p][c]] over NHWC rows (the EP's quantized tables).
//
// One table (C = 1): 64 bytes per two vpermi2b where the CPU has AVX512-VBMI, else sixteen contiguous bytes per
// gather. Per channel with AVX512-VBMI: 64-pixel tiles transposed to channel rows, each row looked up with its
// channel's table by vpermi2b (ChannelLutVbmi). Per channel without it:
// 1. Sixteen channels at a time: their 16 input bytes widened to int32 indices (vpmovzxbd).
// 2. Each lane's index offset by its channel's table base (c * 256, a constant vector per channel block).
// 3. One dword gather (scale 1) from the byte table, padded by 3 bytes so every dword read stays inside it;
//    the low byte of each dword is the result, narrowed with vpmovdb and stored (masked at the channel tail).
#include <immintrin.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "kernels/conv.h"
#include "kernels/isa.h"

namespace qie {

namespace {

// One 256-entry table over contiguous bytes with AVX512-VBMI: the table in four registers, two vpermi2b per 64
// bytes (index bit 6 picks the register of a pair) and a blend on index bit 7.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline __m512i Lut64(__m512i t0, __m512i t1, __m512i t2,
                                                                            __m512i t3, __m512i v) {
  const __m512i lo = _mm512_permutex2var_epi8(t0, v, t1), hi = _mm512_permutex2var_epi8(t2, v, t3);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi);
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void LutVbmi(const uint8_t* t, const uint8_t* x, uint8_t* y,
                                                                    size_t n) {
  const __m512i t0 = _mm512_loadu_si512(t), t1 = _mm512_loadu_si512(t + 64);
  const __m512i t2 = _mm512_loadu_si512(t + 128), t3 = _mm512_loadu_si512(t + 192);
  size_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(y + i, Lut64(t0, t1, t2, t3, _mm512_loadu_si512(x + i)));
  if (i < n) {
    const __mmask64 m = (uint64_t{1} << (n - i)) - 1;  // n - i < 64
    _mm512_mask_storeu_epi8(y + i, m, Lut64(t0, t1, t2, t3, _mm512_maskz_loadu_epi8(m, x + i)));
  }
}

// Per-channel tables with AVX512-VBMI: tiles of 64 pixels x 16 channels transposed to channel rows (16 x 16 SSE2
// byte transposes), each channel's 64 bytes looked up in its own table (four registers, as above), transposed
// back. ~6x fewer cycles than the dword gathers on Zen 4; the tables (C x 256 bytes) are read once per tile.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void ChannelLutVbmi(const uint8_t* t, size_t C, const uint8_t* x,
                                                                           uint8_t* y, size_t pixels) {
  alignas(64) uint8_t buf[16 * 64];
  for (size_t p0 = 0; p0 < pixels; p0 += 64) {
    const size_t np = pixels - p0 < 64 ? pixels - p0 : 64;
    const __mmask64 m = np == 64 ? ~uint64_t{0} : (uint64_t{1} << np) - 1;
    for (size_t c0 = 0; c0 < C; c0 += 16) {
      const size_t n = C - c0 < 16 ? C - c0 : 16;
      TransposeBytes(x + p0 * C + c0, C, buf, 64, np, n);  // buf[c][i] = x[p0 + i][c0 + c]
      for (size_t c = 0; c < n; ++c) {
        const uint8_t* tc = t + (c0 + c) * 256;
        const __m512i v = _mm512_maskz_loadu_epi8(m, buf + c * 64);
        _mm512_store_si512(buf + c * 64, Lut64(_mm512_loadu_si512(tc), _mm512_loadu_si512(tc + 64),
                                               _mm512_loadu_si512(tc + 128), _mm512_loadu_si512(tc + 192), v));
      }
      TransposeBytes(buf, 64, y + p0 * C + c0, C, n, np);
    }
  }
}

std::atomic<bool> g_vbmi_off{false};  // the kernel tests' switch to the gather path

bool HasVbmi() {
  static const bool has = __builtin_cpu_supports("avx512vbmi");
  return has && !g_vbmi_off.load(std::memory_order_relaxed);
}

}  // namespace

void SetLutVbmi(bool on) { g_vbmi_off.store(!on); }

void ChannelLutAvx512(const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y, size_t pixels) {
  if (C == 1 && HasVbmi()) {
    LutVbmi(t, x, y, pixels);
    _mm256_zeroupper();
    return;
  }
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
  if (HasVbmi()) {
    ChannelLutVbmi(t, C, x, y, pixels);
    _mm256_zeroupper();
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (size_t c0 = 0; c0 < C; c0 += 16) {
    const size_t n = C - c0 < 16 ? C - c0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    const __m512i base = _mm512_slli_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(c0))), 8);
    auto one = [&](size_t p) {
      const __m128i xb = _mm_maskz_loadu_epi8(m, x + p * C + c0);
      const __m512i idx = _mm512_add_epi32(_mm512_cvtepu8_epi32(xb), base);
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, t, 1);
      _mm_mask_storeu_epi8(y + p * C + c0, m, _mm512_cvtepi32_epi8(v));
    };
    size_t p = 0;
    for (; p + 4 <= pixels; p += 4) {  // four independent gathers in flight
      one(p);
      one(p + 1);
      one(p + 2);
      one(p + 3);
    }
    for (; p < pixels; ++p) one(p);
  }
  _mm256_zeroupper();
}

}  // namespace qie
