// The convolution driver: weight prepacking and the three NHWC paths of conv.h (pointwise GEMM,
// im2col blocks + GEMM, depthwise). ISA-neutral; arithmetic lives in the GEMM microkernels and the
// per-ISA depthwise kernels.
//
// The general path, in steps:
//  1. Output pixels (over the whole batch) become im2col rows (kp bytes each, K = taps x Cg gathered in
//     (tap, channel) order, padding taps filled with the zero point, zeros from K to kp).
//  2. Each group runs a GEMM on them: A = the im2col rows (used in place by the microkernel:
//     `a_rows_padded`), B = the group's prepacked panels, output columns g*Mg.. of the NHWC output with
//     row stride M. A signed input is stored XOR 0x80 (+128) with the zero point shifted alike, so the
//     differences (x - x_zp) are unchanged.
//  Weights up to kTaskWeightBytes packed: one parallel loop over tasks of rows, each gathering its own
//  ~kTaskBytes of rows and running its GEMMs on them inline (the rows still in L1/L2, one pool
//  synchronisation per call). Larger weights: blocks of ~kIm2colBytes of rows, gathered in parallel, then
//  each GEMM parallel over its own tiles (which splits the weights' panels between the threads).
#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels/conv.h"
#include "kernels/isa.h"

namespace qie {

bool ConvShape::pointwise() const {
  for (int d = 0; d < 3; ++d)
    if (k[d] != 1 || stride[d] != 1 || pad[d] != 0 || out[d] != in[d]) return false;
  return true;
}

namespace {

constexpr size_t kIm2colBytes = 512 << 10;  // about half of a Zen 4 L2
constexpr size_t kGatherChunk = 32;
constexpr size_t kTaskBytes = 48 << 10;         // a task's own im2col rows: L1 / L2 resident
constexpr size_t kTaskWeightBytes = 768 << 10;  // packed weights up to this: per-task gather + GEMM

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

// Items per task for `total` items in tasks of about `chunk` (a multiple of `align`), so that the tasks split
// evenly over 2 or 4 threads: a count under 16 is rounded up to 2, 4 or a multiple of 4 (the pool's width is not
// known here). PP-LCNet's 14x14 layers made 4 tasks of 64, 64, 64 and 4 pixels: one of two threads ran 3 of them.
size_t BalancedChunk(size_t total, size_t chunk, size_t align) {
  chunk = std::max(chunk, align);
  size_t n = (total + chunk - 1) / chunk;
  if (n <= 1) return RoundUp(std::max<size_t>(total, 1), align);
  n = n <= 2 ? 2 : n <= 4 ? 4 : n < 16 ? RoundUp(n, 4) : n;
  return RoundUp((total + n - 1) / n, align);
}

// Rows a task's following table is looked up in: per-channel tables cost about a whole kLutRows tile per call, so
// tasks take whole tiles where there are two or more (fewer rows: tasks of partial tiles, each paying a tile's
// lookup, still finish sooner than one task); one table is a flat lookup.
size_t LutAlign(const ConvArgs& a, size_t total, size_t other) {
  return a.lut && a.lut_tables != 1 && total >= 2 * kLutRows ? kLutRows : other;
}

// An output pixel (image b, od, oh, ow), walked row by row without a division per row.
struct OutPixel {
  size_t b;
  ptrdiff_t od, oh, ow;
  OutPixel(const ConvShape& s, size_t row) {
    const size_t P = s.out_pixels(), p = row % P;
    b = row / P;
    od = ptrdiff_t(p / (s.out[1] * s.out[2]));
    oh = ptrdiff_t((p / s.out[2]) % s.out[1]);
    ow = ptrdiff_t(p % s.out[2]);
  }
  void Next(const ConvShape& s) {
    if (++ow < ptrdiff_t(s.out[2])) return;
    ow = 0;
    if (++oh < ptrdiff_t(s.out[1])) return;
    oh = 0;
    if (++od < ptrdiff_t(s.out[0])) return;
    od = 0;
    ++b;
  }
};

// n bytes from s to d: two overlapping copies of a fixed size up to 64 bytes (a stem's 3-channel kernel row is 9,
// a 16-channel 3x3 one 48), else memcpy.
inline void CopyBytes(uint8_t* __restrict d, const uint8_t* __restrict s, size_t n) {
  if (n > 16 && n <= 64) {
    if (n > 32) {
      uint8_t lo[32], hi[32];
      std::memcpy(lo, s, 32);
      std::memcpy(hi, s + n - 32, 32);
      std::memcpy(d, lo, 32);
      std::memcpy(d + n - 32, hi, 32);
    } else {
      uint8_t lo[16], hi[16];
      std::memcpy(lo, s, 16);
      std::memcpy(hi, s + n - 16, 16);
      std::memcpy(d, lo, 16);
      std::memcpy(d + n - 16, hi, 16);
    }
  } else if (n >= 8 && n <= 16) {
    uint64_t lo, hi;
    std::memcpy(&lo, s, 8);
    std::memcpy(&hi, s + n - 8, 8);
    std::memcpy(d, &lo, 8);
    std::memcpy(d + n - 8, &hi, 8);
  } else if (n >= 4 && n < 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, s, 4);
    std::memcpy(&hi, s + n - 4, 4);
    std::memcpy(d, &lo, 4);
    std::memcpy(d + n - 4, &hi, 4);
  } else {
    std::memcpy(d, s, n);
  }
}

// One im2col row for output pixel `o` and group g. Inlined into the row loop, so its per-call set-up (the padding
// byte's broadcast) is hoisted out of it. `Cg`: s.Cg(), passed in (a division per row otherwise).
__attribute__((always_inline)) inline void GatherRow(const ConvShape& s, const uint8_t* x, size_t g, size_t Cg,
                                                     const OutPixel& o, uint8_t flip, uint8_t pad_val, size_t kp,
                                                     uint8_t* __restrict dst) {
  const size_t b = o.b;
  const ptrdiff_t od = o.od, oh = o.oh, ow = o.ow;
  uint8_t* d = dst;
  const bool whole_rows = s.group == 1 && s.dil[2] == 1;
  for (size_t kd = 0; kd < s.k[0]; ++kd) {
    const ptrdiff_t id = od * ptrdiff_t(s.stride[0]) + ptrdiff_t(kd * s.dil[0]) - ptrdiff_t(s.pad[0]);
    for (size_t kh = 0; kh < s.k[1]; ++kh) {
      const ptrdiff_t ih = oh * ptrdiff_t(s.stride[1]) + ptrdiff_t(kh * s.dil[1]) - ptrdiff_t(s.pad[1]);
      const ptrdiff_t iw0 = ow * ptrdiff_t(s.stride[2]) - ptrdiff_t(s.pad[2]);
      if (whole_rows && id >= 0 && id < ptrdiff_t(s.in[0]) && ih >= 0 && ih < ptrdiff_t(s.in[1]) && iw0 >= 0 &&
          iw0 + ptrdiff_t(s.k[2]) <= ptrdiff_t(s.in[2])) {
        // One group and no W dilation: the kernel row's taps are adjacent pixels, one contiguous run.
        const size_t run = s.k[2] * Cg;
        const uint8_t* __restrict src =
            x + (((b * s.in[0] + size_t(id)) * s.in[1] + size_t(ih)) * s.in[2] + size_t(iw0)) * s.C;
        if (flip)
          for (size_t c = 0; c < run; ++c) d[c] = src[c] ^ flip;
        else
          CopyBytes(d, src, run);
        d += run;
        continue;
      }
      for (size_t kw = 0; kw < s.k[2]; ++kw, d += Cg) {
        const ptrdiff_t iw = ow * ptrdiff_t(s.stride[2]) + ptrdiff_t(kw * s.dil[2]) - ptrdiff_t(s.pad[2]);
        if (id < 0 || id >= ptrdiff_t(s.in[0]) || ih < 0 || ih >= ptrdiff_t(s.in[1]) || iw < 0 ||
            iw >= ptrdiff_t(s.in[2])) {
          std::memset(d, pad_val, Cg);
          continue;
        }
        const uint8_t* __restrict src =
            x + (((b * s.in[0] + size_t(id)) * s.in[1] + size_t(ih)) * s.in[2] + size_t(iw)) * s.C + g * Cg;
        if (flip)
          for (size_t c = 0; c < Cg; ++c) d[c] = src[c] ^ flip;
        else
          CopyBytes(d, src, Cg);
      }
    }
  }
  for (uint8_t* end = dst + kp; d < end; ++d) *d = 0;  // K's padding to the K-group: a few bytes, no memset call
}

// im2col rows [r0, r0 + n) of group g into dst (row stride kp). With one group, no W dilation and an unsigned
// input, a pixel whose window lies inside the image copies its k[0] x k[1] kernel rows (k[2] x C contiguous bytes
// each) from its window's first byte at offsets shared by all such pixels, the shape read once into locals; the
// others (borders, groups, dilation, signed inputs) take GatherRow.
void GatherRows(const ConvShape& s, const uint8_t* x, size_t g, size_t Cg, size_t r0, size_t n, uint8_t flip,
                uint8_t pad_val, size_t kp, uint8_t* __restrict dst) {
  constexpr size_t kMaxRuns = 64;
  const size_t runs = s.k[0] * s.k[1], run = s.k[2] * Cg, K = s.taps() * Cg, C = s.C;
  OutPixel o(s, r0);
  if (s.group != 1 || s.dil[2] != 1 || flip || runs > kMaxRuns) {
    for (size_t r = 0; r < n; ++r, o.Next(s)) GatherRow(s, x, g, Cg, o, flip, pad_val, kp, dst + r * kp);
    return;
  }
  size_t off[kMaxRuns];
  for (size_t kd = 0, j = 0; kd < s.k[0]; ++kd)
    for (size_t kh = 0; kh < s.k[1]; ++kh, ++j) off[j] = (kd * s.dil[0] * s.in[1] + kh * s.dil[1]) * s.in[2] * C;
  const ptrdiff_t in_d = ptrdiff_t(s.in[0]), in_h = ptrdiff_t(s.in[1]), in_w = ptrdiff_t(s.in[2]);
  const ptrdiff_t st_d = ptrdiff_t(s.stride[0]), st_h = ptrdiff_t(s.stride[1]), st_w = ptrdiff_t(s.stride[2]);
  const ptrdiff_t pd = ptrdiff_t(s.pad[0]), ph = ptrdiff_t(s.pad[1]), pw = ptrdiff_t(s.pad[2]);
  const ptrdiff_t span_d = ptrdiff_t((s.k[0] - 1) * s.dil[0]), span_h = ptrdiff_t((s.k[1] - 1) * s.dil[1]);
  const ptrdiff_t span_w = ptrdiff_t(s.k[2] - 1);
  // Short runs (a stem's 3 channels x 3 taps: 9 bytes) as whole 16-byte copies, in order, each run's excess
  // overwritten by the next run, the last one's by the zero tail, and that one's (< 16 bytes past the row) by the
  // next row: so not on a buffer's last row, not for rows under 16 bytes, and only where 16-byte source reads stay
  // in the input.
#if defined(__SSE2__)
  const size_t chunks = (run + 15) / 16;
  const bool wide_copies = run <= 64 && kp >= 16;
  const uint8_t* x_end = x + s.batch * s.in_pixels() * C;
  const __m128i zero = _mm_setzero_si128();
#endif
  // Output columns whose window's width lies inside the image: [first, last] (an interval, maybe empty).
  const ptrdiff_t first = (pw + st_w - 1) / st_w;
  const ptrdiff_t last = in_w - 1 - span_w + pw >= 0 ? (in_w - 1 - span_w + pw) / st_w : -1;
  const size_t step = size_t(st_w) * C;
  for (size_t r = 0; r < n;) {  // the range's part of one output row at a time
    const ptrdiff_t ow0 = o.ow, ow_end = ow0 + ptrdiff_t(std::min<size_t>(n - r, s.out[2] - size_t(o.ow)));
    const ptrdiff_t id0 = o.od * st_d - pd, ih0 = o.oh * st_h - ph;
    const bool rows_in = id0 >= 0 && id0 + span_d < in_d && ih0 >= 0 && ih0 + span_h < in_h;
    const ptrdiff_t lo = rows_in ? std::min(std::max(first, ow0), ow_end) : ow_end;
    const ptrdiff_t hi = rows_in ? std::max(lo, std::min(last + 1, ow_end)) : ow_end;
    OutPixel at = o;
    for (ptrdiff_t ow = ow0; ow < lo; ++ow, ++r) {  // borders (and rows outside): GatherRow
      at.ow = ow;
      GatherRow(s, x, g, Cg, at, flip, pad_val, kp, dst + r * kp);
    }
    // The interior: a tight loop, the window's first byte one stride along per pixel.
    const uint8_t* base =
        lo < hi ? x + (((o.b * s.in[0] + size_t(id0)) * s.in[1] + size_t(ih0)) * s.in[2] + size_t(lo * st_w - pw)) * C
                : nullptr;
    for (ptrdiff_t ow = lo; ow < hi; ++ow, ++r, base += step) {
      uint8_t* d = dst + r * kp;
#if defined(__SSE2__)
      if (wide_copies && r + 1 < n && base + off[runs - 1] + chunks * 16 <= x_end) {
        for (size_t j = 0; j < runs; ++j)
          for (size_t c = 0; c < chunks; ++c)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * run + 16 * c),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + off[j] + 16 * c)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + K), zero);
        continue;
      }
#endif
      for (size_t j = 0; j < runs; ++j) CopyBytes(d + j * run, base + off[j], run);
      for (size_t k = K; k < kp; ++k) d[k] = 0;
    }
    for (ptrdiff_t ow = hi; ow < ow_end; ++ow, ++r) {
      at.ow = ow;
      GatherRow(s, x, g, Cg, at, flip, pad_val, kp, dst + r * kp);
    }
    o.ow = ow_end - 1;  // the segment's last pixel, then on to the next row's first
    o.Next(s);
  }
}

// `lut`: the GEMM's tasks apply the conv's following table (ConvArgs::lut) to their blocks.
GemmArgs GroupGemm(const ConvShape& s, const ConvArgs& a, size_t g, bool lut) {
  const size_t Mg = s.Mg();
  GemmArgs ga;
  if (lut && a.lut && a.kind != OutKind::kInt32 && a.kind != OutKind::kFloat) {
    ga.lut = a.lut_tables == 1 ? a.lut : a.lut + g * Mg * 256;
    ga.lut_tables = a.lut_tables == 1 ? 1 : Mg;
  }
  ga.N = Mg;
  ga.K = s.taps() * s.Cg();
  ga.zb = a.w_zp ? a.w_zp + g * Mg : nullptr;
  ga.bias = a.bias ? a.bias + g * Mg : nullptr;
  ga.bias_rs = 0;
  ga.bias_cs = 1;
  ga.kind = a.kind;
  ga.scale = a.scale ? a.scale + g * Mg : nullptr;
  ga.y_zp = a.y_zp;
  ga.ldy = s.M;
  ga.batch = 1;
  ga.b = nullptr;
  return ga;
}

size_t OutBytes(OutKind k) { return k == OutKind::kInt32 || k == OutKind::kFloat ? 4 : 1; }

// The following table (ConvArgs::lut) on output rows [r0, r0 + n) (pixels over the batch), all M channels.
void LookupRows(Isa isa, const ConvArgs& a, const ConvShape& s, size_t r0, size_t n) {
  if (a.lut && OutBytes(a.kind) == 1)
    LookupBlock(isa, a.lut, a.lut_tables == 1 ? 1 : s.M, static_cast<uint8_t*>(a.y) + r0 * s.M, n, s.M, s.M);
}

// dst (cols x rows) = src (rows x cols) transposed, rows [i0, i1) of one matrix of 32-bit elements: 4 x 4 blocks
// by SSE2 unpacks within 32 x 32 cache blocks, the edges element by element.
void Transpose32Rows(const uint32_t* src, uint32_t* dst, size_t rows, size_t cols, size_t i0, size_t i1) {
  constexpr size_t kB = 32;
  for (size_t j0 = 0; j0 < cols; j0 += kB) {
    const size_t j1 = std::min(cols, j0 + kB);
    size_t i = i0;
#if defined(__SSE2__)
    for (; i + 4 <= i1; i += 4) {
      size_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * cols + j));
        const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (i + 1) * cols + j));
        const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (i + 2) * cols + j));
        const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (i + 3) * cols + j));
        const __m128i a = _mm_unpacklo_epi32(r0, r1), b = _mm_unpackhi_epi32(r0, r1);
        const __m128i c = _mm_unpacklo_epi32(r2, r3), d = _mm_unpackhi_epi32(r2, r3);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * rows + i), _mm_unpacklo_epi64(a, c));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 1) * rows + i), _mm_unpackhi_epi64(a, c));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 2) * rows + i), _mm_unpacklo_epi64(b, d));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 3) * rows + i), _mm_unpackhi_epi64(b, d));
      }
      for (; j < j1; ++j)
        for (size_t k = i; k < i + 4; ++k) dst[j * rows + k] = src[k * cols + j];
    }
#endif
    for (; i < i1; ++i)
      for (size_t j = j0; j < j1; ++j) dst[j * rows + i] = src[i * cols + j];
  }
}

#if defined(__SSE2__)
// One 16 x 16 byte block: four rounds of unpacks (bytes, words, dwords, qwords); register k ends as column k.
inline void Transpose16x16(const uint8_t* src, size_t ss, uint8_t* dst, size_t ds) {
  __m128i r[16], b[16], c[16], d[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss));
  for (int i = 0; i < 8; ++i) {
    b[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    b[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g)  // rows 4g..4g+3: b[4g..4g+3]
    for (int h = 0; h < 2; ++h) {
      c[4 * g + 2 * h] = _mm_unpacklo_epi16(b[4 * g + h], b[4 * g + h + 2]);
      c[4 * g + 2 * h + 1] = _mm_unpackhi_epi16(b[4 * g + h], b[4 * g + h + 2]);
    }
  for (int g = 0; g < 2; ++g)  // rows 8g..8g+7: c[8g..8g+7]
    for (int h = 0; h < 4; ++h) {
      d[8 * g + 2 * h] = _mm_unpacklo_epi32(c[8 * g + h], c[8 * g + h + 4]);
      d[8 * g + 2 * h + 1] = _mm_unpackhi_epi32(c[8 * g + h], c[8 * g + h + 4]);
    }
  for (int k = 0; k < 8; ++k) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * k) * ds), _mm_unpacklo_epi64(d[k], d[k + 8]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * k + 1) * ds), _mm_unpackhi_epi64(d[k], d[k + 8]));
  }
}
#endif

}  // namespace

void TransposeBytes(const uint8_t* src, size_t src_stride, uint8_t* dst, size_t dst_stride, size_t rows, size_t cols) {
  size_t i0 = 0;
#if defined(__SSE2__)
  // Few rows into dense columns (an image's 3 channels to NHWC: dst_stride == rows < 16): 16 columns at a time from
  // a zero-padded 16 x 16 block, each column stored as 16 bytes in order, so each store's excess is overwritten by
  // the next column's; the last 16 columns, whose excess would land past them, exactly.
  if (rows < 16 && dst_stride == rows && cols >= 32) {
    alignas(16) uint8_t blk[256] = {};
    size_t j0 = 0;
    for (; j0 + 32 <= cols; j0 += 16) {
      for (size_t i = 0; i < rows; ++i) std::memcpy(blk + 16 * i, src + i * src_stride + j0, 16);
      Transpose16x16(blk, 16, dst + j0 * dst_stride, dst_stride);
    }
    for (size_t i = 0; i < rows; ++i)
      for (size_t j = j0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
    return;
  }
  for (; i0 + 16 <= rows; i0 += 16) {
    size_t j0 = 0;
    for (; j0 + 16 <= cols; j0 += 16)
      Transpose16x16(src + i0 * src_stride + j0, src_stride, dst + j0 * dst_stride + i0, dst_stride);
    for (size_t i = i0; i < i0 + 16; ++i)
      for (size_t j = j0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
#endif
  for (size_t i = i0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

void Transpose2D(const void* src, void* dst, size_t batch, size_t rows, size_t cols, size_t elem,
                 const ParallelFor* pfor) {
  // Tasks of 64 rows (a conv's output pixels: ~64 x M x 4 bytes read, whole cache lines written per column run)
  constexpr size_t kRows = 64;
  const size_t blocks = (rows + kRows - 1) / kRows, total = batch * blocks;
  auto task = [&](size_t t) {
    const size_t b = t / blocks, i0 = (t % blocks) * kRows, i1 = std::min(rows, i0 + kRows);
    if (elem == 4) {
      Transpose32Rows(static_cast<const uint32_t*>(src) + b * rows * cols,
                      static_cast<uint32_t*>(dst) + b * rows * cols, rows, cols, i0, i1);
    } else {
      TransposeBytes(static_cast<const uint8_t*>(src) + b * rows * cols + i0 * cols, cols,
                     static_cast<uint8_t*>(dst) + b * rows * cols + i0, rows, i1 - i0, cols);
    }
  };
  if (pfor && total > 1 && batch * rows * cols * elem > (size_t{64} << 10))
    (*pfor)(total, task);
  else
    for (size_t t = 0; t < total; ++t) task(t);
}

void PackConv(const MicroKernel& uk, const ConvShape& s, const uint8_t* w, bool w_signed, const int32_t* w_zp,
              PackedConv* out) {
  const size_t taps = s.taps(), Cg = s.Cg(), Mg = s.Mg(), K = taps * Cg;
  out->isa = uk.isa;
  out->depthwise = s.depthwise();
  out->groups.clear();
  out->dw.clear();
  if (out->depthwise) {
    out->dw.assign((taps + 1) / 2 * s.C * 2, 0);
    for (size_t c = 0; c < s.C; ++c)
      for (size_t t = 0; t < taps; ++t) {
        const int32_t v = w_signed ? int32_t(int8_t(w[c * taps + t])) : int32_t(w[c * taps + t]);
        out->dw[((t / 2) * s.C + c) * 2 + t % 2] = static_cast<int16_t>(v - (w_zp ? w_zp[c] : 0));
      }
    out->dw_isa.clear();
    out->dw_isa_sums.clear();
    if (const DepthwisePackFn pack = GetDepthwisePack(uk.isa)) pack(s, out);
    return;
  }
  out->groups.resize(s.group);
  std::vector<uint8_t> bt(K * Mg);
  for (size_t g = 0; g < s.group; ++g) {
    for (size_t n = 0; n < Mg; ++n)
      for (size_t c = 0; c < Cg; ++c)
        for (size_t t = 0; t < taps; ++t) bt[(t * Cg + c) * Mg + n] = w[((g * Mg + n) * Cg + c) * taps + t];
    PackB(uk, bt.data(), w_signed, K, Mg, static_cast<ptrdiff_t>(Mg), 1, &out->groups[g]);
  }
}

void Conv(const MicroKernel& uk, const ConvShape& s, const PackedConv& w, const ConvArgs& a, const ParallelFor& pfor) {
  const size_t P = s.out_pixels(), rows = s.batch * P, osz = OutBytes(a.kind);
  if (rows == 0 || s.M == 0) return;

  if (w.depthwise) {
    const DepthwiseFn fn = GetDepthwiseKernel(w.isa);
    // Tasks of ~256k multiply-adds and at least 32 pixels: each task sets up every channel block's weights, bias
    // and scales and its rows once, so fewer pixels per task than that costs more than its arithmetic (5x5 taps x
    // 256 channels gave tasks of two pixels); with the quad-tap kernel, 64k-MAC tasks measured 1.11-1.18x ORT on
    // PP-LCNet's depthwise layers at 2 threads, 256k ones 1.19-1.28x (same runs, interleaved).
    const size_t want = std::max<size_t>(32, 262144 / std::max<size_t>(1, s.C * s.taps()));
    const size_t chunk = std::min(P, BalancedChunk(P, want, LutAlign(a, P, 1)));
    const size_t per_image = (P + chunk - 1) / chunk, tasks = s.batch * per_image;
    const std::vector<uint8_t> zrow(s.C + 64, static_cast<uint8_t>(a.x_zp));
    auto task = [&](size_t t) {
      // This thread's scratch, grown and kept between calls (nothing allocated once warm; tasks of 256k MACs can
      // need over glibc's 128 KiB mmap threshold); the kernels write what they read, so it is never cleared.
      thread_local std::vector<int32_t> acc;
      thread_local std::vector<const uint8_t*> ptrs;
      thread_local std::vector<uintptr_t> words;
      if (acc.size() < s.C + 16) acc.resize(s.C + 16);
      if (w.dw_isa.empty() && ptrs.size() < (s.taps() + 1) * chunk) ptrs.resize((s.taps() + 1) * chunk);
      if (!w.dw_isa.empty() && words.size() < DepthwiseWords(s.taps(), chunk))
        words.resize(DepthwiseWords(s.taps(), chunk));
      const size_t b = t / per_image, p0 = (t % per_image) * chunk, p1 = std::min(P, p0 + chunk);
      fn(s, w, a, b, p0, p1, DepthwiseScratch{acc.data(), zrow.data(), ptrs.data(), words.data()});
      LookupRows(w.isa, a, s, b * P + p0, p1 - p0);
    };
    if (tasks == 1)
      task(0);
    else
      pfor(tasks, task);
    return;
  }

  if (s.pointwise()) {
    for (size_t g = 0; g < s.group; ++g) {
      GemmArgs ga = GroupGemm(s, a, g, true);  // each GEMM task looks its block up
      const PackedB* pb = &w.groups[g];
      ga.M = rows;
      ga.a = a.x + g * s.Cg();
      ga.lda = s.C;
      ga.a_signed = a.x_signed;
      ga.za = &a.x_zp;
      ga.y = static_cast<char*>(a.y) + g * s.Mg() * osz;
      ga.b = &pb;
      Gemm(uk, ga, pfor);
    }
    return;
  }

  const size_t Cg = s.Cg(), K = s.taps() * Cg, kp = uk.PaddedK(K);
  const uint8_t flip = a.x_signed ? 0x80 : 0;
  const uint8_t pad_val = static_cast<uint8_t>(a.x_zp) ^ flip;
  const int32_t za = a.x_zp + (a.x_signed ? 128 : 0);
  // `lut`: the GEMM's tasks apply the following table (the block path; the task path looks up its rows itself).
  auto group_gemm = [&](size_t g, size_t r0, size_t nrows, const uint8_t* rows_buf, const ParallelFor& run, bool lut) {
    GemmArgs ga = GroupGemm(s, a, g, lut);
    const PackedB* pb = &w.groups[g];
    ga.M = nrows;
    ga.a = rows_buf;
    ga.lda = kp;
    ga.a_rows_padded = true;
    ga.a_signed = false;
    ga.za = &za;
    ga.y = static_cast<char*>(a.y) + (r0 * s.M + g * s.Mg()) * osz;
    ga.b = &pb;
    Gemm(uk, ga, run);
  };

  // Weights that stay in L2 next to a task's rows: each task gathers its own rows (kTaskBytes of im2col, a
  // multiple of the tile's rows) and multiplies them itself, one synchronisation per call and the rows still
  // in cache; larger weights keep the blocks below, whose GEMMs split the weights' panels over the threads.
  size_t weight_bytes = 0;
  for (const PackedB& pb : w.groups) weight_bytes += pb.data.size();
  if (weight_bytes <= kTaskWeightBytes) {
    const size_t task_rows =
        std::min(rows, BalancedChunk(rows, std::max<size_t>(1, kTaskBytes / kp), LutAlign(a, rows, uk.mr)));
    const size_t tasks = (rows + task_rows - 1) / task_rows;
    const ParallelFor inline_for = [](size_t n, const std::function<void(size_t)>& fn) {
      for (size_t i = 0; i < n; ++i) fn(i);
    };
    auto task = [&](size_t t) {
      const KernelScope scope(uk);  // one tile set-up for the task's groups
      thread_local std::vector<uint8_t> tbuf;
      tbuf.resize(task_rows * kp);
      const size_t r0 = t * task_rows, nrows = std::min(task_rows, rows - r0);
      for (size_t g = 0; g < s.group; ++g) {
        GatherRows(s, a.x, g, Cg, r0, nrows, flip, pad_val, kp, tbuf.data());
        group_gemm(g, r0, nrows, tbuf.data(), inline_for, false);
      }
      LookupRows(uk.isa, a, s, r0, nrows);
    };
    if (tasks == 1)
      task(0);
    else
      pfor(tasks, task);
    return;
  }

  const size_t block = std::min(rows, std::max<size_t>(kGatherChunk, RoundUp(kIm2colBytes / kp, kGatherChunk)));
  std::vector<uint8_t> buf(block * kp);
  for (size_t r0 = 0; r0 < rows; r0 += block) {
    const size_t nrows = std::min(block, rows - r0);
    for (size_t g = 0; g < s.group; ++g) {
      const size_t chunks = (nrows + kGatherChunk - 1) / kGatherChunk;
      auto gather = [&](size_t c) {
        const size_t r = c * kGatherChunk;
        GatherRows(s, a.x, g, Cg, r0 + r, std::min(nrows, r + kGatherChunk) - r, flip, pad_val, kp,
                   buf.data() + r * kp);
      };
      if (chunks == 1)
        gather(0);
      else
        pfor(chunks, gather);
      group_gemm(g, r0, nrows, buf.data(), pfor, true);
    }
  }
}

}  // namespace qie
