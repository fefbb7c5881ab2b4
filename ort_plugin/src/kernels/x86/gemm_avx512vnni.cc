// AVX-512 VNNI microkernel: qie_gemm_u8s8_s32_8x32c4__avx512vnni. Compiled with this file's own flags.
//
// Tiling, in steps:
//  1. A tile of up to 8 rows x 32 columns lives in 16 zmm accumulators (2 per row).
//  2. Per K-group of 4: two zmm loads of packed B (32 columns x 4 bytes), and for each row one 32-bit
//     broadcast of its 4 A bytes folded into vpdpbusd; vpdpbusd sums u8*s8 products into int32
//     without intermediate saturation, so the result is exact.
//  3. The epilogue compensates zero points, adds bias and writes int32, float or requantized u8/s8
//     with masked stores for the right-edge columns.
#include <immintrin.h>

#include <cstring>

#include "kernels/gemm.h"

namespace qie {
namespace {

constexpr int kMr = 8, kNr = 32, kVecs = kNr / 16;

inline __m512i LoadOrZero(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

inline void StoreRow(__m512i acc, size_t r, size_t c0, __mmask16 m, const Epilogue& ep) {
  if (ep.bias) {
    const int32_t* bp = ep.bias + static_cast<ptrdiff_t>(r) * ep.bias_rs;
    acc = _mm512_add_epi32(acc, ep.bias_cs ? LoadOrZero(bp + c0, m) : _mm512_set1_epi32(bp[0]));
  }
  if (ep.zb) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(LoadOrZero(ep.zb + c0, m), _mm512_set1_epi32(ep.rs[r])));
  acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(LoadOrZero(ep.csk + c0, m), _mm512_set1_epi32(ep.za[r])));
  const ptrdiff_t o = static_cast<ptrdiff_t>(r) * ep.ldy + static_cast<ptrdiff_t>(c0);
  switch (ep.kind) {
    case OutKind::kInt32: _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.y) + o, m, acc); return;
    case OutKind::kFloat: {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(m, ep.scale + c0));
      if (ep.fbias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, ep.fbias + c0));
      _mm512_mask_storeu_ps(static_cast<float*>(ep.y) + o, m, v);
      return;
    }
    default: {
      const bool u8 = ep.kind == OutKind::kU8;
      const float lo = static_cast<float>((u8 ? 0 : -128) - ep.y_zp), hi = static_cast<float>((u8 ? 255 : 127) - ep.y_zp);
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(m, ep.scale + c0));
      v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(ep.y_zp));
      _mm512_mask_cvtepi32_storeu_epi8(static_cast<int8_t*>(ep.y) + o, m, q);
      return;
    }
  }
}

template <int R>
void TileRows(size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  __m512i acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_si512();
  const size_t kgroups = kp / 4;
  for (size_t kb = 0; kb < kgroups; ++kb) {
    const int8_t* bk = b + kb * (kNr * 4);
    const __m512i b0 = _mm512_load_si512(bk);
    const __m512i b1 = _mm512_load_si512(bk + 64);
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + kb * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    const size_t c0 = static_cast<size_t>(v) * 16;
    if (c0 >= nr) break;
    const __mmask16 m = nr - c0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nr - c0)) - 1);
    for (int r = 0; r < R; ++r) StoreRow(acc[r][v], r, c0, m, ep);
  }
}

void Tile(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  switch (mr) {
    case 1: TileRows<1>(nr, kp, a, lda, b, ep); break;
    case 2: TileRows<2>(nr, kp, a, lda, b, ep); break;
    case 3: TileRows<3>(nr, kp, a, lda, b, ep); break;
    case 4: TileRows<4>(nr, kp, a, lda, b, ep); break;
    case 5: TileRows<5>(nr, kp, a, lda, b, ep); break;
    case 6: TileRows<6>(nr, kp, a, lda, b, ep); break;
    case 7: TileRows<7>(nr, kp, a, lda, b, ep); break;
    default: TileRows<8>(nr, kp, a, lda, b, ep); break;
  }
}

}  // namespace

extern const MicroKernel kGemmAvx512Vnni = {Isa::kAvx512Vnni, "qie_gemm_u8s8_s32_8x32c4__avx512vnni", kMr, kNr, 4, false, Tile};

}  // namespace qie
