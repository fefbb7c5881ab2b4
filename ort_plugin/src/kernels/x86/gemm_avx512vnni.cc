// AVX-512 VNNI microkernel: qie_gemm_u8s8_s32_8x48c4__avx512vnni. Compiled with this file's own flags.
//
// Tiling, in steps:
//  1. A tile of up to 8 rows x 48 columns lives in 24 zmm accumulators (3 per row; 1-2 at a right edge).
//  2. Per K-group of 4: three zmm loads of packed B (48 columns x 4 bytes), and for each row one 32-bit
//     broadcast of its 4 A bytes folded into vpdpbusd; vpdpbusd sums u8*s8 products into int32
//     without intermediate saturation, so the result is exact.
//  3. The epilogue compensates zero points, adds bias and writes int32, float or requantized u8/s8
//     with masked stores for the right-edge columns.
#include <immintrin.h>

#include <chrono>
#include <cstring>

#include "kernels/gemm.h"

namespace qie {
namespace {

constexpr int kMr = 8, kNr = 48, kVecs = kNr / 16;  // the macros below hold up to 8 rows x 4 vectors
static_assert(kMr <= 8 && kVecs <= 4, "tile larger than the named accumulators");
// A panel's right edge (N not a multiple of 48) runs with V = 1 or 2 column vectors instead of 3, so
// N = 16 or 64 does not pay for 48 or 96 columns.

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
  __m512 lo, hi;
  __m512i zp;
  bool quant;
};

template <int V>
inline bool MakeFast(size_t nr, const Epilogue& ep, FastEpilogue* f) {
  if (!ep.folded || (ep.zb && !ep.zb_rows) ||
      !(ep.kind == OutKind::kInt32 || ep.kind == OutKind::kU8 || ep.kind == OutKind::kS8))
    return false;
  f->quant = ep.kind != OutKind::kInt32;
  for (int v = 0; v < V; ++v) {
    const size_t c0 = 16 * static_cast<size_t>(v);
    f->mask[v] =
        nr > c0 ? (nr - c0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nr - c0)) - 1)) : 0;
    f->bias[v] = _mm512_maskz_loadu_epi32(f->mask[v], ep.bias + c0);
    if (f->quant) f->scale[v] = _mm512_maskz_loadu_ps(f->mask[v], ep.scale + c0);
  }
  const bool u8 = ep.kind == OutKind::kU8;
  f->lo = _mm512_set1_ps(static_cast<float>((u8 ? 0 : -128) - ep.y_zp));
  f->hi = _mm512_set1_ps(static_cast<float>((u8 ? 255 : 127) - ep.y_zp));
  f->zp = _mm512_set1_epi32(ep.y_zp);
  return true;
}

inline void FastStore(__m512i acc, const FastEpilogue& f, int v, void* y, ptrdiff_t o, const int32_t* zb_rows,
                      size_t r) {
  acc = _mm512_add_epi32(acc, f.bias[v]);
  if (zb_rows) acc = _mm512_add_epi32(acc, _mm512_set1_epi32(zb_rows[r]));
  if (!f.quant) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(y) + o, f.mask[v], acc);
    return;
  }
  __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), f.scale[v]);
  x = _mm512_min_ps(_mm512_max_ps(x, f.lo), f.hi);
  __m128i q = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(x), f.zp));
  KeepInRegister(q);
  _mm_mask_storeu_epi8(static_cast<int8_t*>(y) + o, f.mask[v], q);
}

inline __m512i BroadcastA(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Named accumulators (p<row><vec>, p = c or d) rather than an array: GCC keeps them in registers
// without the per-iteration register shuffling it emits for an array of __m512i.
// clang-format off: the register tiles are written as rows of macros, one row of the tile per line.
#define QIE_DOT(p, r, v, bb) \
  if constexpr (V > v) p##r##v = _mm512_dpbusd_epi32(p##r##v, av, bb##v);
#define QIE_ROW(p, r, k, bb)                                                              \
  if constexpr (R > r) {                                                                  \
    const __m512i av = BroadcastA(a + (r) * lda + (k) * 4);                               \
    QIE_DOT(p, r, 0, bb) QIE_DOT(p, r, 1, bb) QIE_DOT(p, r, 2, bb) QIE_DOT(p, r, 3, bb)   \
  }
#define QIE_LOADB(bb, k)                                                \
  const int8_t* bb##k_ = b + (k) * (kNr * 4);                           \
  const __m512i bb##0 = _mm512_load_si512(bb##k_);                      \
  const __m512i bb##1 = V > 1 ? _mm512_load_si512(bb##k_ + 64) : z;     \
  const __m512i bb##2 = V > 2 ? _mm512_load_si512(bb##k_ + 128) : z;    \
  const __m512i bb##3 = V > 3 ? _mm512_load_si512(bb##k_ + 192) : z;
#define QIE_STORE1(r, v) \
  if constexpr (V > v) if (nr > 16 * v) StoreRow(c##r##v, r, 16 * v, Mask(nr, v), ep);
#define QIE_STORE(r) \
  if constexpr (R > r) { QIE_STORE1(r, 0) QIE_STORE1(r, 1) QIE_STORE1(r, 2) QIE_STORE1(r, 3) }
#define QIE_DECL(p, r) __m512i p##r##0 = z, p##r##1 = z, p##r##2 = z, p##r##3 = z;
#define QIE_FAST1(r, v) \
  if constexpr (V > v) if (nr > 16 * v) FastStore(c##r##v, f, v, ep.y, static_cast<ptrdiff_t>(r) * ep.ldy + 16 * v, ep.zb_rows, r);
#define QIE_FAST(r) \
  if constexpr (R > r) { QIE_FAST1(r, 0) QIE_FAST1(r, 1) QIE_FAST1(r, 2) QIE_FAST1(r, 3) }
#define QIE_EPILOGUE(FAST_ROWS, STORE_ROWS) \
  FastEpilogue f;                          \
  if (MakeFast<V>(nr, ep, &f)) {           \
    FAST_ROWS                              \
  } else {                                 \
    STORE_ROWS                             \
  }

inline __mmask16 Mask(size_t nr, int v) {
  const size_t c0 = 16 * static_cast<size_t>(v);
  return nr - c0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nr - c0)) - 1);
}

template <int R, int V>
void TileRows(size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  const __m512i z = _mm512_setzero_si512();
  QIE_DECL(c, 0) QIE_DECL(c, 1) QIE_DECL(c, 2) QIE_DECL(c, 3) QIE_DECL(c, 4) QIE_DECL(c, 5) QIE_DECL(c, 6) QIE_DECL(c, 7)
  const size_t kgroups = kp / 4;
  for (size_t kb = 0; kb < kgroups; ++kb) {
    QIE_LOADB(e, kb)
    QIE_ROW(c, 0, kb, e) QIE_ROW(c, 1, kb, e) QIE_ROW(c, 2, kb, e) QIE_ROW(c, 3, kb, e)
    QIE_ROW(c, 4, kb, e) QIE_ROW(c, 5, kb, e) QIE_ROW(c, 6, kb, e) QIE_ROW(c, 7, kb, e)
  }
  QIE_EPILOGUE(QIE_FAST(0) QIE_FAST(1) QIE_FAST(2) QIE_FAST(3) QIE_FAST(4) QIE_FAST(5) QIE_FAST(6) QIE_FAST(7),
               QIE_STORE(0) QIE_STORE(1) QIE_STORE(2) QIE_STORE(3) QIE_STORE(4) QIE_STORE(5) QIE_STORE(6) QIE_STORE(7))
}
// 1-2 rows: too few independent accumulator chains to hide vpdpbusd's latency, so even and odd
// K-groups go to two accumulator sets (c, d) summed before the epilogue.
template <int R, int V>
void TileFewRows(size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  static_assert(R <= 2, "few rows");
  const __m512i z = _mm512_setzero_si512();
  QIE_DECL(c, 0) QIE_DECL(c, 1) QIE_DECL(d, 0) QIE_DECL(d, 1)
  const size_t kgroups = kp / 4;
  size_t kb = 0;
  for (; kb + 2 <= kgroups; kb += 2) {
    { QIE_LOADB(e, kb) QIE_ROW(c, 0, kb, e) QIE_ROW(c, 1, kb, e) }
    { QIE_LOADB(o, kb + 1) QIE_ROW(d, 0, kb + 1, o) QIE_ROW(d, 1, kb + 1, o) }
  }
  if (kb < kgroups) { QIE_LOADB(e, kb) QIE_ROW(c, 0, kb, e) QIE_ROW(c, 1, kb, e) }
  c00 = _mm512_add_epi32(c00, d00); c01 = _mm512_add_epi32(c01, d01);
  c02 = _mm512_add_epi32(c02, d02); c03 = _mm512_add_epi32(c03, d03);
  c10 = _mm512_add_epi32(c10, d10); c11 = _mm512_add_epi32(c11, d11);
  c12 = _mm512_add_epi32(c12, d12); c13 = _mm512_add_epi32(c13, d13);
  QIE_EPILOGUE(QIE_FAST(0) QIE_FAST(1), QIE_STORE(0) QIE_STORE(1))
}
#undef QIE_DOT
#undef QIE_ROW
#undef QIE_LOADB
#undef QIE_STORE1
#undef QIE_STORE
#undef QIE_DECL
#undef QIE_FAST1
#undef QIE_FAST
#undef QIE_EPILOGUE
// clang-format on

template <int V>
void TileV(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  switch (mr) {
    case 1: TileFewRows<1, V>(nr, kp, a, lda, b, ep); break;
    case 2: TileFewRows<2, V>(nr, kp, a, lda, b, ep); break;
    case 3: TileRows<3, V>(nr, kp, a, lda, b, ep); break;
    case 4: TileRows<4, V>(nr, kp, a, lda, b, ep); break;
    case 5: TileRows<5, V>(nr, kp, a, lda, b, ep); break;
    case 6: TileRows<6, V>(nr, kp, a, lda, b, ep); break;
    case 7: TileRows<7, V>(nr, kp, a, lda, b, ep); break;
    default: TileRows<8, V>(nr, kp, a, lda, b, ep); break;
  }
}

void Tile(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  if (nr > 32)
    TileV<kVecs>(mr, nr, kp, a, lda, b, ep);
  else if (nr > 16)
    TileV<2>(mr, nr, kp, a, lda, b, ep);
  else
    TileV<1>(mr, nr, kp, a, lda, b, ep);
}

}  // namespace

extern const MicroKernel kGemmAvx512Vnni = {
    Isa::kAvx512Vnni, "qie_gemm_u8s8_s32_8x48c4__avx512vnni", kMr, kNr, 4, false, Tile};

}  // namespace qie

namespace qie {
// Single-core vpdpbusd (zmm) throughput in GOPS (2 ops per u8 x s8 multiply-add), for the benchmark's
// "% of peak": 12 independent accumulator chains, so latency never limits it.
double MeasureVnniPeakGops() {
  // 12 independent vpdpbusd chains on fixed registers (written in asm so nothing spills).
  const long iters = 50000000;
  const auto t0 = std::chrono::steady_clock::now();
  __asm__ volatile(
      "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"
      "mov %0, %%rcx\n\t"
      "1:\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm0\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm1\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm2\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm3\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm4\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm5\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm6\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm7\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm8\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm9\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm10\n\t"
      "vpdpbusd %%zmm12, %%zmm12, %%zmm11\n\t"
      "dec %%rcx\n\t"
      "jnz 1b\n\t"
      :
      : "r"(iters)
      : "rcx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "cc");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 12.0 * iters * 64 * 2 / s / 1e9;
}
}  // namespace qie
