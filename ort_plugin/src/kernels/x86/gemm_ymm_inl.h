// Shared body of the 256-bit (ymm) microkernels, included by gemm_avx2.cc and gemm_avxvnni.cc, each
// compiled with its own ISA flags. Everything here has internal linkage so the two copies never mix.
//
// Tiling, in steps:
//  1. Up to 6 rows x 16 columns in 12 ymm accumulators (2 per row, 8 int32 columns each).
//  2. Per K-group (2 int16 for AVX2, 4 bytes for AVX-VNNI): two ymm loads of packed B, one 32-bit
//     broadcast of A per row, then Policy::Dot (vpmaddwd+vpaddd, or vpdpbusd), exact in int32.
//  3. The epilogue compensates zero points, adds bias, and writes int32 / float / u8 / s8.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "kernels/gemm.h"

namespace qie {
namespace {

constexpr int kYmmMr = 6, kYmmNr = 16;

inline __m256i YmmMask(size_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

inline void YmmStoreRow(__m256i acc, size_t r, size_t c0, size_t n, const Epilogue& ep) {
  const __m256i m = YmmMask(n);
  if (ep.bias) {
    const int32_t* bp = ep.bias + static_cast<ptrdiff_t>(r) * ep.bias_rs;
    acc = _mm256_add_epi32(acc, ep.bias_cs ? _mm256_maskload_epi32(bp + c0, m) : _mm256_set1_epi32(bp[0]));
  }
  if (ep.zb)
    acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_maskload_epi32(ep.zb + c0, m), _mm256_set1_epi32(ep.rs[r])));
  if (!ep.folded)
    acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_maskload_epi32(ep.csk + c0, m), _mm256_set1_epi32(ep.za[r])));
  const ptrdiff_t o = static_cast<ptrdiff_t>(r) * ep.ldy + static_cast<ptrdiff_t>(c0);
  if (ep.kind == OutKind::kInt32) {
    _mm256_maskstore_epi32(static_cast<int32_t*>(ep.y) + o, m, acc);
    return;
  }
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_maskload_ps(ep.scale + c0, m));
  if (ep.kind == OutKind::kFloat) {
    if (ep.fbias) v = _mm256_add_ps(v, _mm256_maskload_ps(ep.fbias + c0, m));
    _mm256_maskstore_ps(static_cast<float*>(ep.y) + o, m, v);
    return;
  }
  const bool u8 = ep.kind == OutKind::kU8;
  const float lo = static_cast<float>((u8 ? 0 : -128) - ep.y_zp), hi = static_cast<float>((u8 ? 255 : 127) - ep.y_zp);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(ep.y_zp));
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  const __m128i bytes = u8 ? _mm_packus_epi16(w, w) : _mm_packs_epi16(w, w);
  int8_t* dst = static_cast<int8_t*>(ep.y) + o;
  if (n >= 8)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), bytes);
  else {
    alignas(16) int8_t tmp[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), bytes);
    std::memcpy(dst, tmp, n);
  }
}

// Policy: kGroup (K elements per 32-bit A broadcast), kElem (bytes per element), Dot(acc, a, b).
template <class Policy, int R>
void YmmTileRows(size_t nr, size_t kp, const uint8_t* a, size_t lda_bytes, const int8_t* b, const Epilogue& ep) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const size_t kgroups = kp / Policy::kGroup;
  for (size_t kb = 0; kb < kgroups; ++kb) {
    const int8_t* bk = b + kb * 64;
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bk));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bk + 32));
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda_bytes + kb * 4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      acc[r][0] = Policy::Dot(acc[r][0], av, b0);
      acc[r][1] = Policy::Dot(acc[r][1], av, b1);
    }
  }
  for (int v = 0; v < 2; ++v) {
    const size_t c0 = static_cast<size_t>(v) * 8;
    if (c0 >= nr) break;
    for (int r = 0; r < R; ++r) YmmStoreRow(acc[r][v], r, c0, nr - c0, ep);
  }
}

template <class Policy>
void YmmTile(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  const size_t ldb = lda * Policy::kElem;
  switch (mr) {
    case 1: YmmTileRows<Policy, 1>(nr, kp, a, ldb, b, ep); break;
    case 2: YmmTileRows<Policy, 2>(nr, kp, a, ldb, b, ep); break;
    case 3: YmmTileRows<Policy, 3>(nr, kp, a, ldb, b, ep); break;
    case 4: YmmTileRows<Policy, 4>(nr, kp, a, ldb, b, ep); break;
    case 5: YmmTileRows<Policy, 5>(nr, kp, a, ldb, b, ep); break;
    default: YmmTileRows<Policy, 6>(nr, kp, a, ldb, b, ep); break;
  }
}

}  // namespace
}  // namespace qie
