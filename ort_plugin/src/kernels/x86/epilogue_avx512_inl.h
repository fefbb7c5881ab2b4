// The AVX-512 GEMM epilogue shared by the microkernels that hold their tiles in zmm rows (AVX-512 VNNI's
// accumulators, AMX's tiles stored to memory): zero-point terms, bias, int32 / float / requantized output
// (gemm.h). Internal linkage in each file that includes it (each is compiled with its own ISA flags).
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "kernels/gemm.h"

namespace qie {
namespace {

inline __m512i LoadOrZero(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

inline void StoreRow(__m512i acc, size_t r, size_t c0, __mmask16 m, const Epilogue& ep) {
  if (ep.bias) {
    const int32_t* bp = ep.bias + static_cast<ptrdiff_t>(r) * ep.bias_rs;
    acc = _mm512_add_epi32(acc, ep.bias_cs ? LoadOrZero(bp + c0, m) : _mm512_set1_epi32(bp[0]));
  }
  if (ep.zb) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(LoadOrZero(ep.zb + c0, m), _mm512_set1_epi32(ep.rs[r])));
  if (!ep.folded)
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
      const float lo = static_cast<float>((u8 ? 0 : -128) - ep.y_zp),
                  hi = static_cast<float>((u8 ? 255 : 127) - ep.y_zp);
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(m, ep.scale + c0));
      v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(ep.y_zp));
      // Register-form vpmovdb, then a byte store: the memory form of vpmovdb is slow on Zen 4.
      __m128i b = _mm512_cvtepi32_epi8(q);
      KeepInRegister(b);
      _mm_mask_storeu_epi8(static_cast<int8_t*>(ep.y) + o, m, b);
      return;
    }
  }
}

// The common epilogue with its per-tile invariants hoisted: one zero point for all rows (bias
// already folded with it), no B zero point, requantized or int32 output.
struct FastEpilogue {
  __m512i bias[4];
  __m512 scale[4];
  __mmask16 mask[4];
  __mmask64 bytes;  // the row's output bytes (V vectors of 16), for the packed store
  __m512 hi;
  __m512i zp16;   // the output zero point in every int16 lane
  __m512i order;  // vpermd: the packs' lane-interleaved dwords back into column order
  bool quant, u8;
  bool full;  // all 16 * V columns real: plain stores (masked byte stores cost more on Zen 4)
};

template <int V>
inline bool MakeFast(size_t nr, const Epilogue& ep, FastEpilogue* f) {
  if (!CommonEpilogue(ep)) return false;
  f->quant = ep.kind != OutKind::kInt32;
  f->bytes = 0;
  for (int v = 0; v < V; ++v) {
    const size_t c0 = 16 * static_cast<size_t>(v);
    f->mask[v] =
        nr > c0 ? (nr - c0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nr - c0)) - 1)) : 0;
    f->bias[v] = _mm512_maskz_loadu_epi32(f->mask[v], ep.bias + c0);
    if (f->quant) f->scale[v] = _mm512_maskz_loadu_ps(f->mask[v], ep.scale + c0);
    f->bytes |= static_cast<__mmask64>(f->mask[v]) << (16 * v);
  }
  f->u8 = ep.kind == OutKind::kU8;
  f->full = nr >= 16 * static_cast<size_t>(V);
  f->hi = _mm512_set1_ps(static_cast<float>((f->u8 ? 255 : 127) - ep.y_zp));
  f->zp16 = _mm512_set1_epi16(static_cast<int16_t>(ep.y_zp));
  f->order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return true;
}

// acc + bias, times the scale, rounded to int32 (MLAS's order); above the top clamp the top clamp
// (min(hi, x): also NaN -> cvt's INT_MIN, which saturates to the bottom like the float clamp's lo).
inline __m512i FastScaled(__m512i acc, const FastEpilogue& f, int v, const __m512i* zb) {
  acc = _mm512_add_epi32(acc, f.bias[v]);
  if (zb) acc = _mm512_add_epi32(acc, *zb);
  return _mm512_cvtps_epi32(_mm512_min_ps(f.hi, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), f.scale[v])));
}

// One row of V accumulators: int32 stores, or requantized with saturating packs (int32 -> int16, + zero
// point saturating, -> u8 / s8) of all V vectors at once and one masked store of the row's bytes. The
// result equals clamp(round(x), lo, hi) + zp of the scalar epilogue for every x (packs saturate what
// the float clamp cut at lo; the top clamp stays in float so x >= 2^31 is not cvt's INT_MIN).
template <int V>
inline void FastRow(const __m512i* acc, const FastEpilogue& f, void* y, ptrdiff_t o, const int32_t* zb_rows, size_t r) {
  const __m512i zbv = _mm512_set1_epi32(zb_rows ? zb_rows[r] : 0);
  const __m512i* zb = zb_rows ? &zbv : nullptr;
  if (!f.quant) {
    for (int v = 0; v < V; ++v) {
      __m512i a = _mm512_add_epi32(acc[v], f.bias[v]);
      if (zb) a = _mm512_add_epi32(a, zbv);
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(y) + o + 16 * v, f.mask[v], a);
    }
    return;
  }
  const __m512i q0 = FastScaled(acc[0], f, 0, zb);
  const __m512i q1 = V > 1 ? FastScaled(acc[1], f, 1, zb) : q0;
  const __m512i q2 = V > 2 ? FastScaled(acc[2], f, 2, zb) : q0;
  const __m512i q3 = V > 3 ? FastScaled(acc[3], f, 3, zb) : q2;
  const __m512i w01 = _mm512_adds_epi16(_mm512_packs_epi32(q0, q1), f.zp16);
  const __m512i w23 = V > 2 ? _mm512_adds_epi16(_mm512_packs_epi32(q2, q3), f.zp16) : w01;
  const __m512i b = f.u8 ? _mm512_packus_epi16(w01, w23) : _mm512_packs_epi16(w01, w23);
  const __m512i row = _mm512_permutexvar_epi32(f.order, b);
  int8_t* out = static_cast<int8_t*>(y) + o;
  if (!f.full) {
    _mm512_mask_storeu_epi8(out, f.bytes, row);
  } else if constexpr (V == 4) {
    _mm512_storeu_si512(out, row);
  } else if constexpr (V >= 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_castsi512_si256(row));
    if constexpr (V == 3) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32), _mm512_extracti32x4_epi32(row, 2));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_castsi512_si128(row));
  }
}

inline __mmask16 Mask(size_t nr, int v) {
  const size_t c0 = 16 * static_cast<size_t>(v);
  return nr - c0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nr - c0)) - 1);
}

// The epilogue of the rows from r0 of ep's tile: output, row sums, zero points and bias rows moved down.
inline Epilogue RowsFrom(const Epilogue& ep, size_t r0) {
  Epilogue e = ep;
  const ptrdiff_t r = static_cast<ptrdiff_t>(r0);
  const ptrdiff_t osz = ep.kind == OutKind::kU8 || ep.kind == OutKind::kS8 ? 1 : 4;
  e.y = static_cast<char*>(ep.y) + r * ep.ldy * osz;
  if (ep.rs) e.rs = ep.rs + r0;
  if (ep.za) e.za = ep.za + r0;
  if (ep.zb_rows) e.zb_rows = ep.zb_rows + r0;
  if (ep.bias) e.bias = ep.bias + r * ep.bias_rs;
  return e;
}

// f(std::integral_constant<int, V>{}) with V the column vectors of 16 that a panel's nr real columns need (1-3).
template <class F>
inline void ByVectors(size_t nr, F&& f) {
  if (nr > 32)
    f(std::integral_constant<int, 3>{});
  else if (nr > 16)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, 1>{});
}

}  // namespace
}  // namespace qie
