// The GEMM driver: packs B into microkernel panels, prepares A tiles, splits the work into tasks and
// runs the microkernels. ISA-neutral; the microkernels do the arithmetic and the fused epilogue.
//
// Tiling, in steps:
//  1. B is packed once per weight into panels of NR columns x kp (K padded to the K-group), each column
//     group interleaved by K-group so one vector load feeds NR/lanes dot products.
//  2. The output is cut into tasks of (batch, MB rows, NB columns); NB is chosen so a task's B block
//     (kp x NB) stays in L2, MB so an A tile (MR x kp) stays in L1 while it sweeps the B block.
//  3. A is prepared once per call (shifted / padded / widened only when the kernel needs it; row sums
//     only when B has a non-zero zero point); then within a task each MR-row A tile sweeps every
//     panel of the task's B block with the microkernel, whose epilogue writes the final output.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <unordered_map>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels/gemm.h"
#include "kernels/isa.h"

namespace qie {
namespace {

constexpr int kMaxMr = 32;
constexpr size_t kL2Block = 256 * 1024;
// Products of up to this many multiply-adds (~1 us of one core) run on the calling thread.
constexpr double kSerialMacs = 262144.0;

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

// Copies one A row into the kernel's layout: XOR with `flip` (0x80 shifts s8 to u8), zero-padded to
// kp, widened to int16 for wide kernels. Separate with __restrict so the compiler vectorizes it.
void PrepareRow(const uint8_t* __restrict src, size_t K, size_t kp, uint8_t flip, bool wide, void* __restrict dst) {
  if (wide) {
    int16_t* __restrict d = static_cast<int16_t*>(dst);
    for (size_t k = 0; k < K; ++k) d[k] = static_cast<uint8_t>(src[k] ^ flip);
    for (size_t k = K; k < kp; ++k) d[k] = 0;
  } else {
    uint8_t* __restrict d = static_cast<uint8_t*>(dst);
    for (size_t k = 0; k < K; ++k) d[k] = src[k] ^ flip;
    for (size_t k = K; k < kp; ++k) d[k] = 0;
  }
}

int32_t RowSum(const uint8_t* __restrict src, size_t K, uint8_t flip) {
  int32_t s = 0;
  for (size_t k = 0; k < K; ++k) s += static_cast<uint8_t>(src[k] ^ flip);
  return s;
}

// Interleaves groups of four rows of row-major B into a K-group-of-4 panel (element (k, j) at
// ((k/4)*nr + j)*4 + k%4), XORed with `flip`; returns the rows done (whole groups of four).
// Packs the K / 4 whole groups of rows of one panel (cols <= nr columns) into the kernel's K-groups of four, and
// adds each column's sum of the packed values to sums[j]. Returns the rows packed.
size_t PackRowsByFour(const uint8_t* b, ptrdiff_t ldb_k, size_t K, size_t cols, size_t nr, uint8_t flip, int8_t* dst,
                      int32_t* sums) {
  const size_t groups = K / 4;
  size_t j = 0;
#if defined(__SSE2__)
  // Sixteen columns at a time, all groups down: the four rows interleaved into place, and their sums (sign-extended
  // to int16, four rows added, then widened to int32) kept in registers until the column block ends.
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip)), zero = _mm_setzero_si128();
  auto widen = [&](__m128i v, __m128i* lo, __m128i* hi) {
    const __m128i sign = _mm_cmpgt_epi8(zero, v);
    *lo = _mm_unpacklo_epi8(v, sign);
    *hi = _mm_unpackhi_epi8(v, sign);
  };
  for (; j + 16 <= cols; j += 16) {
    __m128i s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (size_t g = 0; g < groups; ++g) {
      const uint8_t* r0 = b + static_cast<ptrdiff_t>(4 * g) * ldb_k + j;
      const __m128i a = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)), f);
      const __m128i bb = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + ldb_k)), f);
      const __m128i c = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 2 * ldb_k)), f);
      const __m128i e = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 3 * ldb_k)), f);
      const __m128i ab_lo = _mm_unpacklo_epi8(a, bb), ab_hi = _mm_unpackhi_epi8(a, bb);
      const __m128i ce_lo = _mm_unpacklo_epi8(c, e), ce_hi = _mm_unpackhi_epi8(c, e);
      __m128i* o = reinterpret_cast<__m128i*>(dst + g * nr * 4 + j * 4);
      _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(ab_lo, ce_lo));
      _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab_lo, ce_lo));
      _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab_hi, ce_hi));
      _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab_hi, ce_hi));
      __m128i lo[4], hi[4];
      widen(a, &lo[0], &hi[0]);
      widen(bb, &lo[1], &hi[1]);
      widen(c, &lo[2], &hi[2]);
      widen(e, &lo[3], &hi[3]);
      const __m128i tl = _mm_add_epi16(_mm_add_epi16(lo[0], lo[1]), _mm_add_epi16(lo[2], lo[3]));
      const __m128i th = _mm_add_epi16(_mm_add_epi16(hi[0], hi[1]), _mm_add_epi16(hi[2], hi[3]));
      const __m128i sl = _mm_cmpgt_epi16(zero, tl), sh = _mm_cmpgt_epi16(zero, th);
      s0 = _mm_add_epi32(s0, _mm_unpacklo_epi16(tl, sl));
      s1 = _mm_add_epi32(s1, _mm_unpackhi_epi16(tl, sl));
      s2 = _mm_add_epi32(s2, _mm_unpacklo_epi16(th, sh));
      s3 = _mm_add_epi32(s3, _mm_unpackhi_epi16(th, sh));
    }
    __m128i* sp = reinterpret_cast<__m128i*>(sums + j);
    _mm_storeu_si128(sp + 0, _mm_add_epi32(_mm_loadu_si128(sp + 0), s0));
    _mm_storeu_si128(sp + 1, _mm_add_epi32(_mm_loadu_si128(sp + 1), s1));
    _mm_storeu_si128(sp + 2, _mm_add_epi32(_mm_loadu_si128(sp + 2), s2));
    _mm_storeu_si128(sp + 3, _mm_add_epi32(_mm_loadu_si128(sp + 3), s3));
  }
#endif
  for (; j < cols; ++j)
    for (size_t g = 0; g < groups; ++g)
      for (size_t i = 0; i < 4; ++i) {
        const int8_t v =
            static_cast<int8_t>(b[static_cast<ptrdiff_t>(4 * g + i) * ldb_k + static_cast<ptrdiff_t>(j)] ^ flip);
        dst[g * nr * 4 + j * 4 + i] = v;
        sums[j] += v;
      }
  return groups * 4;
}

struct GemmScratch {
  std::vector<int32_t> zb_s, rsum, zb_rows, csk, folded;
  std::vector<uint8_t> aprep;
  std::vector<const PackedB*> distinct;
  std::vector<size_t> b_slot;
};

}  // namespace

void PackB(const MicroKernel& uk, const uint8_t* b, bool b_signed, size_t K, size_t N, ptrdiff_t ldb_k, ptrdiff_t ldb_n,
           PackedB* out, const ParallelFor* pfor) {
  const size_t nr = uk.nr, kg = uk.kgroup;
  out->isa = uk.isa;
  out->K = K;
  out->N = N;
  out->kp = uk.PaddedK(K);
  out->shifted = !b_signed;
  const size_t elem = uk.wide ? 2 : 1;
  out->panel_bytes = RoundUp(out->kp * nr * elem, 64);
  const size_t panels = (N + nr - 1) / nr;
  // Resized, not cleared: a buffer packed again (ConvInteger's per-call input, an attention's operands) keeps its
  // memory, and each panel zeroes only what packing leaves unwritten (K's padding rows, a short panel's columns).
  out->data.resize(panels * out->panel_bytes + 64);
  out->offset = (64 - reinterpret_cast<uintptr_t>(out->data.data()) % 64) % 64;
  out->cs.assign(N, 0);
  const uint8_t flip = b_signed ? 0 : 0x80;
  const size_t group_bytes = nr * kg * elem;
  auto pack_panel = [&](size_t p) {
    int8_t* dst = out->data.data() + out->offset + p * out->panel_bytes;
    const size_t n0 = p * nr, width = std::min(nr, N - n0);
    if (width < nr)
      std::memset(dst, 0, out->panel_bytes);
    else if (out->kp > K)  // the groups from K's on (K padded to the K-group, or to the kernel's alignment)
      std::memset(dst + (K / kg) * group_bytes, 0, (out->kp / kg - K / kg) * group_bytes);
    int32_t* __restrict sums = out->cs.data() + n0;
    const uint8_t* panel_b = b + static_cast<ptrdiff_t>(n0) * ldb_n;
    size_t k_done = 0, summed = K;            // rows packed by the fast path; rows whose sums are done
    if (ldb_n == 1 && !uk.wide && kg == 4) {  // row-major B (MatMul's, ConvInteger's input): packed with its sums
      k_done = summed = HasAvx512(uk.isa) && nr == 48 && width == nr
                            ? PackRowsByFour48(panel_b, ldb_k, K, flip, dst, sums)
                            : PackRowsByFour(panel_b, ldb_k, K, width, nr, flip, dst, sums);
    } else if (ldb_k == 1 && !uk.wide && kg == 4) {  // columns contiguous (a transposed B: attention's keys)
      // each column's four bytes of a K-group are one dword of the source: copied whole, their sum added
      const uint32_t flip4 = 0x01010101u * flip;
      const size_t groups = K / 4;
      for (size_t j = 0; j < width; ++j) {
        const uint8_t* col = panel_b + static_cast<ptrdiff_t>(j) * ldb_n;
        int32_t sum = 0;
        for (size_t gi = 0; gi < groups; ++gi) {
          uint32_t v;
          std::memcpy(&v, col + 4 * gi, 4);
          v ^= flip4;
          std::memcpy(dst + gi * nr * 4 + j * 4, &v, 4);
          sum += static_cast<int8_t>(v) + static_cast<int8_t>(v >> 8) + static_cast<int8_t>(v >> 16) +
                 static_cast<int8_t>(v >> 24);
        }
        sums[j] += sum;
      }
      k_done = summed = groups * 4;
    } else if (ldb_n == 1) {  // column sums row by row over contiguous bytes (vectorized)
      for (size_t k = 0; k < K; ++k) {
        const uint8_t* __restrict src = panel_b + static_cast<ptrdiff_t>(k) * ldb_k;
        for (size_t j = 0; j < width; ++j) sums[j] += static_cast<int8_t>(src[j] ^ flip);
      }
    } else {
      for (size_t k = 0; k < K; ++k)
        for (size_t j = 0; j < width; ++j)
          sums[j] += static_cast<int8_t>(
              panel_b[static_cast<ptrdiff_t>(k) * ldb_k + static_cast<ptrdiff_t>(j) * ldb_n] ^ flip);
    }
    // The rest element by element (one division per row): other layouts, wide kernels, the K tail.
    int16_t* dst16 = reinterpret_cast<int16_t*>(dst);
    for (size_t k = k_done; k < K; ++k) {
      const uint8_t* src = panel_b + static_cast<ptrdiff_t>(k) * ldb_k;
      const size_t base = (k / kg) * nr * kg + k % kg;
      for (size_t j = 0; j < width; ++j) {
        const int8_t v = static_cast<int8_t>(src[static_cast<ptrdiff_t>(j) * ldb_n] ^ flip);
        if (k >= summed) sums[j] += v;
        if (uk.wide)
          dst16[base + j * kg] = v;
        else
          dst[base + j * kg] = v;
      }
    }
  };
  // ~64 KiB of panels per task where a pool is given (the per-call packing of a large B: ConvInteger's NCHW
  // pointwise layers)
  const size_t per = std::max<size_t>(1, (size_t{1} << 16) / std::max<size_t>(1, out->panel_bytes));
  if (pfor && panels > per)
    (*pfor)((panels + per - 1) / per, [&](size_t t) {
      for (size_t p = t * per; p < std::min(panels, (t + 1) * per); ++p) pack_panel(p);
    });
  else
    for (size_t p = 0; p < panels; ++p) pack_panel(p);
}

void Gemm(const MicroKernel& uk, const GemmArgs& g, const ParallelFor& pfor) {
  const size_t M = g.M, N = g.N, K = g.K, mr = uk.mr, nr = uk.nr;
  if (M == 0 || N == 0 || g.batch == 0) return;
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;
  const size_t kp = uk.PaddedK(K);

  // Per-column terms, shared by all tasks.
  const int32_t zb_shift = g.b[0]->shifted ? 128 : 0;
  const bool any_zb =
      zb_shift != 0 || (g.zb != nullptr && std::any_of(g.zb, g.zb + N, [](int32_t z) { return z != 0; }));
  // Per-call buffers: this thread's, kept between calls (no allocation in the steady state; tasks on other
  // threads read them during the call only).
  thread_local GemmScratch sc;
  std::vector<int32_t>& zb_s = sc.zb_s;
  zb_s.clear();
  if (any_zb) {
    zb_s.resize(N);
    if (g.zb)
      for (size_t n = 0; n < N; ++n) zb_s[n] = g.zb[n] - zb_shift;
    else
      std::fill(zb_s.begin(), zb_s.end(), -zb_shift);
  }
  const int32_t za_shift = g.a_signed ? 128 : 0;
  const bool direct_a = !uk.wide && !g.a_signed && K > 0 && (kp == K || g.a_rows_padded);

  const size_t panels = (N + nr - 1) / nr, mtiles = (M + mr - 1) / mr;
  const size_t panel_bytes = g.b[0]->panel_bytes;
  // Per-channel tables are looked up in tiles of 64 rows (kLutRows) by 16 columns: a short tile costs about a
  // whole one, so their tasks keep at least 64 rows where there are, and split the columns (whole panels) only
  // when that leaves too few tasks (PP-LCNet's 7x7 layers: 49 rows, 512 channels were one task). One table is a
  // flat lookup: its blocks are split as without one.
  const bool lut_rows = g.lut && g.lut_tables != 1;
  size_t nb = lut_rows ? panels : std::max<size_t>(1, std::min(panels, kL2Block / panel_bytes));
  size_t mb = std::min<size_t>(mtiles, std::max<size_t>(1, 64 / mr));
  const double macs = double(M) * N * K * g.batch;
  auto count = [&] { return g.batch * ((mtiles + mb - 1) / mb) * ((panels + nb - 1) / nb); };
  if (macs > kSerialMacs) {
    const size_t mb_min = lut_rows ? std::min(mb, std::max<size_t>(1, kLutRows / mr)) : 1;
    while (count() < 8 && (mb > mb_min || nb > 1)) {
      if (mb > mb_min)
        mb = std::max(mb_min, (mb + 1) / 2);
      else
        nb = (nb + 1) / 2;
    }
  } else {
    mb = mtiles;
    nb = panels;
  }
  const size_t mblocks = (mtiles + mb - 1) / mb, nblocks = (panels + nb - 1) / nb;
  const size_t elem = uk.wide ? 2 : 1;

  // Step 3a: prepare A once for the whole call (in parallel over row chunks): shifted / padded /
  // widened rows when the kernel needs them, and row sums when B has a non-zero zero point.
  const size_t rows_total = g.batch * M;
  std::vector<uint8_t>& aprep = sc.aprep;
  aprep.resize(direct_a ? 0 : rows_total * kp * elem + 64);
  std::vector<int32_t>& rsum = sc.rsum;
  rsum.resize(any_zb ? rows_total : 0);
  auto row_ptr = [&](size_t row) { return g.a + (g.a_offsets ? g.a_offsets[row / M] : 0) + (row % M) * g.lda; };
  if (!direct_a || any_zb) {
    const uint8_t flip = g.a_signed ? 0x80 : 0;
    constexpr size_t kChunk = 64;
    auto prep = [&](size_t c) {
      for (size_t row = c * kChunk; row < std::min(rows_total, (c + 1) * kChunk); ++row) {
        const uint8_t* src = row_ptr(row);
        if (any_zb) rsum[row] = RowSum(src, K, flip);
        if (!direct_a) PrepareRow(src, K, kp, flip, uk.wide, aprep.data() + row * kp * elem);
      }
    };
    const size_t chunks = (rows_total + kChunk - 1) / kChunk;
    if (chunks == 1 || macs <= kSerialMacs)
      for (size_t c = 0; c < chunks; ++c) prep(c);
    else
      pfor(chunks, prep);
  }

  // One B zero point for every column (per-tensor, or u8 B's shift alone): its term -zb * rs[m] once per row.
  const bool zb_one = any_zb && std::all_of(zb_s.begin(), zb_s.end(), [&](int32_t z) { return z == zb_s[0]; });
  std::vector<int32_t>& zb_rows = sc.zb_rows;
  zb_rows.resize(zb_one ? rows_total : 0);
  for (size_t row = 0; row < zb_rows.size(); ++row)
    zb_rows[row] = static_cast<int32_t>(0u - static_cast<uint32_t>(zb_s[0]) * static_cast<uint32_t>(rsum[row]));

  // Column terms, once per call: csk[n] = cs[n] - K*zb[n] per batch matrix, and, when every row has
  // the same zero point and the bias is per column (or absent) and shared by the batch, the folded
  // bias[n] - za*csk[n] (wrapping, as the kernels' int32 arithmetic), so tiles skip the za term.
  const bool fold = !g.za_per_row && (g.bias == nullptr || (g.bias_rs == 0 && g.bias_cs == 1)) &&
                    (g.batch == 1 || g.bias_batch_stride == 0);
  const int32_t za0 = (g.za ? g.za[0] : 0) + za_shift;
  // Distinct B matrices (a broadcast B is one), found by a scan from the last one seen (batches list them in
  // order or repeat one), a map for long lists.
  std::vector<const PackedB*>& distinct = sc.distinct;
  distinct.clear();
  std::unordered_map<const PackedB*, size_t> slot_of;
  std::vector<size_t>& b_slot = sc.b_slot;
  b_slot.resize(g.batch);
  for (size_t bi = 0; bi < g.batch; ++bi) {
    if (g.batch > 64) {
      auto ins = slot_of.emplace(g.b[bi], distinct.size());
      if (ins.second) distinct.push_back(g.b[bi]);
      b_slot[bi] = ins.first->second;
      continue;
    }
    size_t d = distinct.size();
    for (size_t k = 0; k < distinct.size(); ++k)
      if (distinct[k] == g.b[bi]) d = k;
    if (d == distinct.size()) distinct.push_back(g.b[bi]);
    b_slot[bi] = d;
  }
  std::vector<int32_t>& csk_all = sc.csk;
  std::vector<int32_t>& folded_all = sc.folded;
  csk_all.resize(distinct.size() * N);
  folded_all.resize(fold ? distinct.size() * N : 0);
  // Branch-free loops over the columns (vectorized: ConvInteger's NCHW pointwise layers have N = H*W columns).
  const uint32_t k32 = static_cast<uint32_t>(K), za32 = static_cast<uint32_t>(za0);
  for (size_t d = 0; d < distinct.size(); ++d) {
    const int32_t* __restrict cs = distinct[d]->cs.data();
    int32_t* __restrict csk = csk_all.data() + d * N;
    if (any_zb) {
      const int32_t* __restrict zb = zb_s.data();
      for (size_t n = 0; n < N; ++n)
        csk[n] = static_cast<int32_t>(static_cast<uint32_t>(cs[n]) - k32 * static_cast<uint32_t>(zb[n]));
    } else {
      std::copy(cs, cs + N, csk);
    }
    if (!fold) continue;
    int32_t* __restrict folded = folded_all.data() + d * N;
    const int32_t* __restrict bias = g.bias;
    if (bias)
      for (size_t n = 0; n < N; ++n)
        folded[n] = static_cast<int32_t>(static_cast<uint32_t>(bias[n]) - za32 * static_cast<uint32_t>(csk[n]));
    else
      for (size_t n = 0; n < N; ++n) folded[n] = static_cast<int32_t>(0u - za32 * static_cast<uint32_t>(csk[n]));
  }
  const size_t osz = g.kind == OutKind::kU8 || g.kind == OutKind::kS8 ? 1 : 4;
  // The tile's epilogue for panel p at rows m0.. of batch entry bi (za: the tile's zero points, unused when folded).
  auto epilogue = [&](size_t bi, size_t m0, size_t p, const int32_t* za) {
    const size_t n0 = p * nr, row0 = bi * M + m0, col0 = b_slot[bi] * N + n0;
    Epilogue ep;
    ep.kind = g.kind;
    ep.rs = any_zb ? rsum.data() + row0 : nullptr;
    ep.za = za;
    ep.zb = any_zb ? zb_s.data() + n0 : nullptr;
    ep.zb_rows = zb_one ? zb_rows.data() + row0 : nullptr;
    ep.csk = csk_all.data() + col0;
    ep.folded = fold;
    if (fold) {
      ep.bias = folded_all.data() + col0;
      ep.bias_rs = 0;
      ep.bias_cs = 1;
    } else {
      ep.bias = g.bias ? g.bias + static_cast<ptrdiff_t>(bi) * g.bias_batch_stride +
                             static_cast<ptrdiff_t>(m0) * g.bias_rs + static_cast<ptrdiff_t>(n0) * g.bias_cs
                       : nullptr;
      ep.bias_rs = g.bias_rs;
      ep.bias_cs = g.bias_cs;
    }
    ep.scale = g.scale ? g.scale + n0 : nullptr;
    ep.fbias = g.fbias ? g.fbias + n0 : nullptr;
    ep.y_zp = g.y_zp;
    ep.y = static_cast<char*>(g.y) +
           (static_cast<ptrdiff_t>(bi) * g.y_batch_stride + static_cast<ptrdiff_t>(m0 * g.ldy + n0)) * osz;
    ep.ldy = static_cast<ptrdiff_t>(g.ldy);
    ep.a_call = call;
    return ep;
  };
  // Small K with a folded epilogue: each panel sweeps the task's rows as one strip (the A block, <= 64 rows of
  // <= 256 bytes, stays in L1 across panels), so the epilogue's constants are set up once per panel.
  const bool strips = uk.strip != nullptr && fold && kp <= 256;
  auto task = [&](size_t t) {
    const size_t nbi = t % nblocks, mbi = (t / nblocks) % mblocks, bi = t / (nblocks * mblocks);
    const PackedB& pb = *g.b[bi];
    const size_t mt0 = mbi * mb, mt1 = std::min(mtiles, (mbi + 1) * mb);
    const auto a_at = [&](size_t m0) {
      const size_t row0 = bi * M + m0;
      return direct_a ? static_cast<const void*>(row_ptr(row0)) : aprep.data() + row0 * kp * elem;
    };
    const size_t lda = direct_a ? g.lda : kp;
    const size_t p0 = nbi * nb, p1 = std::min(panels, (nbi + 1) * nb);
    const auto cols = [&](size_t p) { return std::min(nr, N - p * nr); };  // panel p's real columns
    if (strips) {
      const size_t m0 = mt0 * mr, rows = std::min(M, mt1 * mr) - m0;
      for (size_t p = p0; p < p1; ++p)
        uk.strip(rows, cols(p), kp, a_at(m0), lda, pb.panel(p), epilogue(bi, m0, p, nullptr));
    } else {
      int32_t za[kMaxMr];
      for (size_t mt = mt0; mt < mt1; ++mt) {
        const size_t m0 = mt * mr, rows = std::min(mr, M - m0);
        for (size_t r = 0; r < rows; ++r) za[r] = (g.za ? g.za[g.za_per_row ? m0 + r : 0] : 0) + za_shift;
        for (size_t p = p0; p < p1; ++p)
          uk.tile(rows, cols(p), kp, a_at(m0), lda, pb.panel(p), epilogue(bi, m0, p, za));
      }
    }
    if (g.lut && osz == 1) {  // the following table, on the task's block while it is in cache
      const size_t r0 = mt0 * mr, r1 = std::min(M, mt1 * mr), c0 = p0 * nr, c1 = std::min(N, p1 * nr);
      uint8_t* yb = static_cast<uint8_t*>(g.y) + static_cast<ptrdiff_t>(bi) * g.y_batch_stride + r0 * g.ldy + c0;
      LookupBlock(uk.isa, g.lut_tables == 1 ? g.lut : g.lut + c0 * 256, g.lut_tables == 1 ? 1 : c1 - c0, yb, r1 - r0,
                  c1 - c0, g.ldy);
    }
  };
  const size_t total = g.batch * mblocks * nblocks;
  if (total == 1 || macs <= kSerialMacs)  // small products (an attention head's): a worker's wake-up costs more
    for (size_t t = 0; t < total; ++t) task(t);
  else
    pfor(total, task);
}

void ScaleColumns(float* y, size_t rows, size_t n, const float* scale, const float* bias) {
  for (size_t r = 0; r < rows; ++r, y += n)
    for (size_t c = 0; c < n; ++c) y[c] = bias ? y[c] * scale[c] + bias[c] : y[c] * scale[c];
}

}  // namespace qie
