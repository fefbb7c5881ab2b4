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
#include "kernels/x86/epilogue_avx512_inl.h"

namespace qie {
namespace {

constexpr int kMr = 8, kNr = 48, kVecs = kNr / 16;  // the macros below hold up to 8 rows x 4 vectors
static_assert(kMr <= 8 && kVecs <= 4, "tile larger than the named accumulators");
// A panel's right edge (N not a multiple of 48) runs with V = 1 or 2 column vectors instead of 3, so
// N = 16 or 64 does not pay for 48 or 96 columns.

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
#define QIE_FAST(r) \
  if constexpr (R > r) { const __m512i row[4] = {c##r##0, c##r##1, c##r##2, c##r##3}; \
                         FastRow<V>(row, f, ep.y, static_cast<ptrdiff_t>(r) * ep.ldy, ep.zb_rows, r); }
#define QIE_EPILOGUE(FAST_ROWS, STORE_ROWS)             \
  FastEpilogue own;                                    \
  if (pre || MakeFast<V>(nr, ep, &own)) {              \
    const FastEpilogue& f = pre ? *pre : own;          \
    FAST_ROWS                                          \
  } else {                                             \
    STORE_ROWS                                         \
  }

// `pre`: the strip's epilogue constants (MakeFast already true for this panel), or nullptr.
template <int R, int V>
void TileRows(size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep,
              const FastEpilogue* pre) {
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
void TileFewRows(size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep,
                 const FastEpilogue* pre) {
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
#undef QIE_FAST
#undef QIE_EPILOGUE
// clang-format on

template <int V>
void TileV(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep,
           const FastEpilogue* pre) {
  switch (mr) {
    case 1: TileFewRows<1, V>(nr, kp, a, lda, b, ep, pre); break;
    case 2: TileFewRows<2, V>(nr, kp, a, lda, b, ep, pre); break;
    case 3: TileRows<3, V>(nr, kp, a, lda, b, ep, pre); break;
    case 4: TileRows<4, V>(nr, kp, a, lda, b, ep, pre); break;
    case 5: TileRows<5, V>(nr, kp, a, lda, b, ep, pre); break;
    case 6: TileRows<6, V>(nr, kp, a, lda, b, ep, pre); break;
    case 7: TileRows<7, V>(nr, kp, a, lda, b, ep, pre); break;
    default: TileRows<8, V>(nr, kp, a, lda, b, ep, pre); break;
  }
}

void Tile(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  ByVectors(nr, [&](auto v) { TileV<decltype(v)::value>(mr, nr, kp, a, lda, b, ep, nullptr); });
}

template <int V>
void StripV(size_t m, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  FastEpilogue f;
  const FastEpilogue* pre = MakeFast<V>(nr, ep, &f) ? &f : nullptr;  // else each tile's own epilogue
  for (size_t m0 = 0; m0 < m; m0 += kMr) {
    const Epilogue e = RowsFrom(ep, m0);
    if (m - m0 >= kMr)
      TileRows<kMr, V>(nr, kp, a + m0 * lda, lda, b, e, pre);
    else
      TileV<V>(m - m0, nr, kp, a + m0 * lda, lda, b, e, pre);
  }
}

void Strip(size_t m, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  ByVectors(nr, [&](auto v) { StripV<decltype(v)::value>(m, nr, kp, a, lda, b, ep); });
}

}  // namespace

// PackB's fast path for this kernel's full panels (48 columns): per K-group of four rows, the rows' 48 bytes
// interleaved into the panel's 192 (unpacks within 128-bit lanes, then a 4 x 4 transpose of the lanes), and the
// column sums of the stored values accumulated by vpdpbusd with ones (u8 ones x s8 values, four per dword).
size_t PackRowsByFour48(const uint8_t* b, ptrdiff_t ldb_k, size_t K, uint8_t flip, int8_t* dst, int32_t* sums) {
  constexpr __mmask64 kCols = (uint64_t{1} << kNr) - 1;
  const __m512i f = _mm512_set1_epi8(static_cast<char>(flip)), ones = _mm512_set1_epi8(1);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0;
  const size_t groups = K / 4;
  for (size_t g = 0; g < groups; ++g) {
    const uint8_t* r = b + static_cast<ptrdiff_t>(4 * g) * ldb_k;
    const __m512i a = _mm512_xor_si512(_mm512_maskz_loadu_epi8(kCols, r), f);
    const __m512i bb = _mm512_xor_si512(_mm512_maskz_loadu_epi8(kCols, r + ldb_k), f);
    const __m512i c = _mm512_xor_si512(_mm512_maskz_loadu_epi8(kCols, r + 2 * ldb_k), f);
    const __m512i e = _mm512_xor_si512(_mm512_maskz_loadu_epi8(kCols, r + 3 * ldb_k), f);
    const __m512i ab_lo = _mm512_unpacklo_epi8(a, bb), ab_hi = _mm512_unpackhi_epi8(a, bb);
    const __m512i ce_lo = _mm512_unpacklo_epi8(c, e), ce_hi = _mm512_unpackhi_epi8(c, e);
    // o_k lane L: columns 16L + 4k .. 16L + 4k + 3, four bytes each
    const __m512i o0 = _mm512_unpacklo_epi16(ab_lo, ce_lo), o1 = _mm512_unpackhi_epi16(ab_lo, ce_lo);
    const __m512i o2 = _mm512_unpacklo_epi16(ab_hi, ce_hi), o3 = _mm512_unpackhi_epi16(ab_hi, ce_hi);
    const __m512i t0 = _mm512_shuffle_i64x2(o0, o1, 0x44), t1 = _mm512_shuffle_i64x2(o0, o1, 0xEE);
    const __m512i t2 = _mm512_shuffle_i64x2(o2, o3, 0x44);
    const __m512i t3 = _mm512_shuffle_i64x2(o2, o3, 0xEE);
    const __m512i c0 = _mm512_shuffle_i64x2(t0, t2, 0x88);  // columns 0..15
    const __m512i c1 = _mm512_shuffle_i64x2(t0, t2, 0xDD);  // 16..31
    const __m512i c2 = _mm512_shuffle_i64x2(t1, t3, 0x88);  // 32..47
    int8_t* d = dst + g * kNr * 4;
    _mm512_store_si512(d, c0);
    _mm512_store_si512(d + 64, c1);
    _mm512_store_si512(d + 128, c2);
    s0 = _mm512_dpbusd_epi32(s0, ones, c0);
    s1 = _mm512_dpbusd_epi32(s1, ones, c1);
    s2 = _mm512_dpbusd_epi32(s2, ones, c2);
  }
  _mm512_storeu_si512(sums, _mm512_add_epi32(_mm512_loadu_si512(sums), s0));
  _mm512_storeu_si512(sums + 16, _mm512_add_epi32(_mm512_loadu_si512(sums + 16), s1));
  _mm512_storeu_si512(sums + 32, _mm512_add_epi32(_mm512_loadu_si512(sums + 32), s2));
  return groups * 4;
}

extern const MicroKernel kGemmAvx512Vnni = {
    Isa::kAvx512Vnni, "qie_gemm_u8s8_s32_8x48c4__avx512vnni", kMr, kNr, 4, false, Tile, Strip};

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
