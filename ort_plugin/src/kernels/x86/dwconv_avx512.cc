// Depthwise convolution, AVX-512: qie_dwconv_u8s8_s32_32c2__avx512vnni (32 channels x 2 taps per two
// instructions; 16 channels in ymm for C = 16 and a tail of <= 16). Compiled with this file's own flags.
//
// Tiling, in steps:
//  1. depthwise_inl.h's indirection lists are built for the task's pixels at once; then per block of
//     32 channels (weights, bias, scale and constants loaded once, in the unpacks' lane order) the pixels
//     are swept, accumulators starting at the bias.
//  2. Per tap, the 32 input bytes are zero-extended to int16 once (vpmovzxbw) and the zero point subtracted
//     ((x - x_zp) in [-255, 255]); a signed input is XORed with 0x80 first (x + 128, zero point + 128,
//     differences unchanged). The two taps of a pair are interleaved by vpunpck{l,h}wd into (x0, x1) int16
//     pairs, and vpmaddwd with the (w0, w1) pairs adds both products exactly: two accumulators of 16
//     channels each (lanes {0-3, 8-11, ...} and {4-7, 12-15, ...} of the block).
//  3. The epilogue requantizes both in float32 (multiply, clamp, round half-to-even by the default MXCSR
//     mode, + y_zp), packs them back to channel order (vpackssdw undoes the unpacks' order) and stores 32
//     bytes, or permutes the int32 accumulators back and stores them.
#include <immintrin.h>

#include <algorithm>

#include "kernels/depthwise_inl.h"

namespace qie {
namespace {

// Vector traits of a block: 32 channels in zmm (Z32) or 16 in ymm (Y16, for C = 16 and the channel tail, where
// zmm lanes would sit idle). The in-lane unpacks leave the channels of each 128-bit lane split in halves: `lo`
// holds channels {0-3, 8-11, ...}, `hi` {4-7, 12-15, ...}; LoIdx / HiIdx pick them from the channel-ordered
// dword halves A (first half of the channels) and B (second half), ToA / ToB put them back.
struct Z32 {
  static constexpr size_t kC = 32, kHalf = 16;
  using I = __m512i;
  using F = __m512;
  using Mask = __mmask32;
  using HalfMask = __mmask16;
  static I LoIdx() { return _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27); }
  static I HiIdx() { return _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31); }
  static I ToAIdx() { return _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23); }
  static I ToBIdx() { return _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31); }
  static I LoadBytes(Mask m, const uint8_t* x, bool flip) {  // kC bytes widened to int16
    __m256i b = _mm256_maskz_loadu_epi8(m, x);
    if (flip) b = _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm512_cvtepu8_epi16(b);
  }
  static I Set16(int16_t v) { return _mm512_set1_epi16(v); }
  static I Set32(int32_t v) { return _mm512_set1_epi32(v); }
  static F SetF(float v) { return _mm512_set1_ps(v); }
  static I Zero() { return _mm512_setzero_si512(); }
  static I LoadDw(HalfMask m, const void* p) { return _mm512_maskz_loadu_epi32(m, p); }
  static F LoadF(HalfMask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static I Perm(I a, I idx, I b) { return _mm512_permutex2var_epi32(a, idx, b); }
  static F PermF(F a, I idx, F b) { return _mm512_permutex2var_ps(a, idx, b); }
  static I Sub16(I a, I b) { return _mm512_sub_epi16(a, b); }
  static I Add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I Lo16(I a, I b) { return _mm512_unpacklo_epi16(a, b); }
  static I Hi16(I a, I b) { return _mm512_unpackhi_epi16(a, b); }
  static I Madd(I a, I b) { return _mm512_madd_epi16(a, b); }
  static I Requant(I acc, F scale, F lo, F hi, I yzp) {
    const F v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale), lo), hi);
    return _mm512_add_epi32(_mm512_cvtps_epi32(v), yzp);
  }
  static void StoreDw(int32_t* y, HalfMask m, I v) { _mm512_mask_storeu_epi32(y, m, v); }
  static void StoreBytes(void* y, Mask m, I lo, I hi) {
    __m256i q = _mm512_cvtepi16_epi8(_mm512_packs_epi32(lo, hi));
    KeepInRegister(q);
    _mm256_mask_storeu_epi8(y, m, q);
  }
};

struct Y16 {
  static constexpr size_t kC = 16, kHalf = 8;
  using I = __m256i;
  using F = __m256;
  using Mask = __mmask16;
  using HalfMask = __mmask8;
  static I LoIdx() { return _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11); }
  static I HiIdx() { return _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15); }
  static I ToAIdx() { return _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11); }
  static I ToBIdx() { return _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15); }
  static I LoadBytes(Mask m, const uint8_t* x, bool flip) {
    __m128i b = _mm_maskz_loadu_epi8(m, x);
    if (flip) b = _mm_xor_si128(b, _mm_set1_epi8(static_cast<char>(0x80)));
    return _mm256_cvtepu8_epi16(b);
  }
  static I Set16(int16_t v) { return _mm256_set1_epi16(v); }
  static I Set32(int32_t v) { return _mm256_set1_epi32(v); }
  static F SetF(float v) { return _mm256_set1_ps(v); }
  static I Zero() { return _mm256_setzero_si256(); }
  static I LoadDw(HalfMask m, const void* p) { return _mm256_maskz_loadu_epi32(m, p); }
  static F LoadF(HalfMask m, const float* p) { return _mm256_maskz_loadu_ps(m, p); }
  static I Perm(I a, I idx, I b) { return _mm256_permutex2var_epi32(a, idx, b); }
  static F PermF(F a, I idx, F b) { return _mm256_permutex2var_ps(a, idx, b); }
  static I Sub16(I a, I b) { return _mm256_sub_epi16(a, b); }
  static I Add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I Lo16(I a, I b) { return _mm256_unpacklo_epi16(a, b); }
  static I Hi16(I a, I b) { return _mm256_unpackhi_epi16(a, b); }
  static I Madd(I a, I b) { return _mm256_madd_epi16(a, b); }
  static I Requant(I acc, F scale, F lo, F hi, I yzp) {
    const F v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale), lo), hi);
    return _mm256_add_epi32(_mm256_cvtps_epi32(v), yzp);
  }
  static void StoreDw(int32_t* y, HalfMask m, I v) { _mm256_mask_storeu_epi32(y, m, v); }
  static void StoreBytes(void* y, Mask m, I lo, I hi) {
    __m128i q = _mm256_cvtepi16_epi8(_mm256_packs_epi32(lo, hi));
    KeepInRegister(q);
    _mm_mask_storeu_epi8(y, m, q);
  }
};

// One block of V::kC channels from c over the task's np pixels (step 2 and 3 above). `wbuf`: room for the block's
// weights in lane order, two vectors per tap pair.
// A block's constants in V's lane order (step 1 above): its weights into `wbuf` (two vectors per tap pair),
// bias and scales split into lo / hi, the epilogue's clamp bounds and zero points.
template <class V>
struct BlockConsts {
  using I = typename V::I;
  using F = typename V::F;
  typename V::Mask m;
  typename V::HalfMask ma, mb;
  I zp16, yzp, bias_lo, bias_hi;
  F lo, hi, scale_lo, scale_hi;
  bool quant;
  BlockConsts(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t c, I* wbuf) {
    const size_t C = s.C, pairs = (s.taps() + 1) / 2, n = C - c < V::kC ? C - c : V::kC;
    m = static_cast<typename V::Mask>(n == V::kC ? ~uint64_t{0} : (uint64_t{1} << n) - 1);
    ma = static_cast<typename V::HalfMask>(m);
    mb = static_cast<typename V::HalfMask>(m >> V::kHalf);
    const I lo_idx = V::LoIdx(), hi_idx = V::HiIdx();
    for (size_t tp = 0; tp < pairs; ++tp) {  // the (w0, w1) int16 pairs, one dword per channel
      const int16_t* w = dw + (tp * C + c) * 2;
      const I wa = V::LoadDw(ma, w), wb = V::LoadDw(mb, w + 2 * V::kHalf);
      wbuf[2 * tp] = V::Perm(wa, lo_idx, wb);
      wbuf[2 * tp + 1] = V::Perm(wa, hi_idx, wb);
    }
    zp16 = V::Set16(static_cast<int16_t>(a.x_zp + (a.x_signed ? 128 : 0)));
    quant = a.kind != OutKind::kInt32;
    const bool u8 = a.kind == OutKind::kU8;
    lo = V::SetF(static_cast<float>((u8 ? 0 : -128) - a.y_zp));
    hi = V::SetF(static_cast<float>((u8 ? 255 : 127) - a.y_zp));
    yzp = V::Set32(a.y_zp);
    bias_lo = bias_hi = V::Zero();
    if (a.bias) {
      const I ba = V::LoadDw(ma, a.bias + c), bb = V::LoadDw(mb, a.bias + c + V::kHalf);
      bias_lo = V::Perm(ba, lo_idx, bb);
      bias_hi = V::Perm(ba, hi_idx, bb);
    }
    scale_lo = scale_hi = V::SetF(0.0f);
    if (quant) {
      const F sa = V::LoadF(ma, a.scale + c), sb = V::LoadF(mb, a.scale + c + V::kHalf);
      scale_lo = V::PermF(sa, lo_idx, sb);
      scale_hi = V::PermF(sa, hi_idx, sb);
    }
  }
};

template <class V, bool kSigned>
void Block(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t o0, size_t np, size_t c,
           const uint8_t* const* table, size_t stride, typename V::I* wbuf) {
  using I = typename V::I;
  const size_t C = s.C, pairs = (s.taps() + 1) / 2;
  const BlockConsts<V> k(s, dw, a, c, wbuf);
  const auto m = k.m;
  const auto ma = k.ma, mb = k.mb;
  const I zp16 = k.zp16, yzp = k.yzp, bias_lo = k.bias_lo, bias_hi = k.bias_hi;
  const auto lo = k.lo, hi = k.hi, scale_lo = k.scale_lo, scale_hi = k.scale_hi;
  const bool quant = k.quant;
  for (size_t i = 0; i < np; ++i) {
    const uint8_t* const* ptrs = table + i * stride;
    I acc_lo = bias_lo, acc_hi = bias_hi;
    for (size_t tp = 0; tp < pairs; ++tp) {
      const I x0 = V::Sub16(V::LoadBytes(m, ptrs[2 * tp] + c, kSigned), zp16);
      const I x1 = V::Sub16(V::LoadBytes(m, ptrs[2 * tp + 1] + c, kSigned), zp16);
      // (x0, x1) int16 pairs per channel; vpmaddwd adds x0 * w0 + x1 * w1 exactly into int32.
      acc_lo = V::Add32(acc_lo, V::Madd(V::Lo16(x0, x1), wbuf[2 * tp]));
      acc_hi = V::Add32(acc_hi, V::Madd(V::Hi16(x0, x1), wbuf[2 * tp + 1]));
    }
    const size_t o = o0 + i * C + c;
    if (!quant) {
      int32_t* y = static_cast<int32_t*>(a.y) + o;
      V::StoreDw(y, ma, V::Perm(acc_lo, V::ToAIdx(), acc_hi));
      V::StoreDw(y + V::kHalf, mb, V::Perm(acc_lo, V::ToBIdx(), acc_hi));
      continue;
    }
    // packs undoes the unpacks' lane order (in-lane: lo's four channels, then hi's); the values are in the output
    // range already, so the narrowing truncation is exact.
    V::StoreBytes(static_cast<int8_t*>(a.y) + o, m, V::Requant(acc_lo, scale_lo, lo, hi, yzp),
                  V::Requant(acc_hi, scale_hi, lo, hi, yzp));
  }
}

template <class V>
void Blocks(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t o0, size_t np, size_t c,
            const uint8_t* const* table, size_t stride, typename V::I* wbuf) {
  if (a.x_signed)
    Block<V, true>(s, dw, a, o0, np, c, table, stride, wbuf);
  else
    Block<V, false>(s, dw, a, o0, np, c, table, stride, wbuf);
}

// C = 16 exactly: two pixels per zmm (lanes 0-1 pixel i, lanes 2-3 pixel i + 1), Y16's lane order in each half,
// so its weights, bias and scales broadcast to both; the two pixels' 32 output bytes (or int32s) are adjacent.
// An odd last pixel goes through Y16's block.
template <bool kSigned>
void PixelPairs16(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t o0, size_t np,
                  const uint8_t* const* table, size_t stride, __m256i* wbuf) {
  const size_t pairs = (s.taps() + 1) / 2;
  const BlockConsts<Y16> k(s, dw, a, 0, wbuf);  // Y16's constants, broadcast to both pixels' halves
  const __m512i zp16 = _mm512_broadcast_i64x4(k.zp16), yzp = _mm512_broadcast_i64x4(k.yzp);
  const __m512i bias_lo = _mm512_broadcast_i64x4(k.bias_lo), bias_hi = _mm512_broadcast_i64x4(k.bias_hi);
  const __m512 lo = _mm512_broadcast_f32x8(k.lo), hi = _mm512_broadcast_f32x8(k.hi);
  const __m512 scale_lo = _mm512_broadcast_f32x8(k.scale_lo), scale_hi = _mm512_broadcast_f32x8(k.scale_hi);
  const bool quant = k.quant;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  auto tap = [&](const uint8_t* p0, const uint8_t* p1) {
    __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))),
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)), 1);
    if (kSigned) b = _mm256_xor_si256(b, flip);
    return _mm512_sub_epi16(_mm512_cvtepu8_epi16(b), zp16);
  };
  size_t i = 0;
  for (; i + 2 <= np; i += 2) {
    const uint8_t* const* pa = table + i * stride;
    const uint8_t* const* pb = pa + stride;
    __m512i acc_lo = bias_lo, acc_hi = bias_hi;
    for (size_t tp = 0; tp < pairs; ++tp) {
      const __m512i x0 = tap(pa[2 * tp], pb[2 * tp]);
      const __m512i x1 = tap(pa[2 * tp + 1], pb[2 * tp + 1]);
      const __m512i wl = _mm512_broadcast_i64x4(wbuf[2 * tp]), wh = _mm512_broadcast_i64x4(wbuf[2 * tp + 1]);
      acc_lo = _mm512_add_epi32(acc_lo, _mm512_madd_epi16(_mm512_unpacklo_epi16(x0, x1), wl));
      acc_hi = _mm512_add_epi32(acc_hi, _mm512_madd_epi16(_mm512_unpackhi_epi16(x0, x1), wh));
    }
    const size_t o = o0 + i * 16;
    if (!quant) {  // per pixel, Y16's order back: Z32's ToA / ToB pick pixel i's and pixel i + 1's 16 channels
      int32_t* y = static_cast<int32_t*>(a.y) + o;
      _mm512_storeu_si512(y, _mm512_permutex2var_epi32(acc_lo, Z32::ToAIdx(), acc_hi));
      _mm512_storeu_si512(y + 16, _mm512_permutex2var_epi32(acc_lo, Z32::ToBIdx(), acc_hi));
      continue;
    }
    Z32::StoreBytes(static_cast<int8_t*>(a.y) + o, ~__mmask32{0}, Z32::Requant(acc_lo, scale_lo, lo, hi, yzp),
                    Z32::Requant(acc_hi, scale_hi, lo, hi, yzp));
  }
  if (i < np) Block<Y16, kSigned>(s, dw, a, o0 + i * 16, np - i, 0, table + i * stride, stride, wbuf);
}

// The pixel range's indirection table is built once; then each block of 32 channels (16 for the last <= 16)
// sweeps the pixels with its weights, bias, scale and epilogue constants loaded once.
void DepthwisePairs(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1,
                    const DepthwiseScratch& sc) {
  const size_t stride = s.taps() + 1, np = p1 - p0;
  BuildTable(s, a, sc.zrow, b, p0, np, sc.ptrs, stride);
  const size_t o0 = (b * s.out_pixels() + p0) * s.C, pairs = (s.taps() + 1) / 2;
  // The block's weights in lane order: two vectors per tap pair, on the stack up to 64 pairs (11x11 taps).
  __m512i local[128];
  __m512i* heap = pairs > 64 ? new __m512i[2 * pairs] : nullptr;
  __m512i* wbuf = heap ? heap : local;
  if (s.C == 16) {
    auto* w16 = reinterpret_cast<__m256i*>(wbuf);
    if (a.x_signed)
      PixelPairs16<true>(s, dw, a, o0, np, sc.ptrs, stride, w16);
    else
      PixelPairs16<false>(s, dw, a, o0, np, sc.ptrs, stride, w16);
    delete[] heap;
    return;
  }
  size_t c = 0;
  for (; c + 16 < s.C; c += 32) Blocks<Z32>(s, dw, a, o0, np, c, sc.ptrs, stride, wbuf);
  if (c < s.C) Blocks<Y16>(s, dw, a, o0, np, c, sc.ptrs, stride, reinterpret_cast<__m256i*>(wbuf));
  delete[] heap;
}

// ---- The quad-tap form: qie_dwconv_u8s8_s32_64c4__avx512vnni (64 channel-taps x 4 per vpdpbusd) ----
//
// Used when every (w - w_zp) fits int8 (symmetric int8 weights, uint8 weights around 128: what quantizers
// write). Tiling, in steps:
//  1. Each 128-bit lane of a zmm holds 16 channels of one pixel: a block is 64 channels of one pixel, or
//     32 channels of two pixels, or 16 of four (`lpp` = lanes per pixel, the weights replicated over a
//     vector's pixels): blocks of 64 channels, the last one's lanes per pixel fitted to what is left (C = 144:
//     two blocks of 64, then 16 channels of four pixels). Taps go in groups of four (the last group's missing
//     taps read the zero-point row with weight 0).
//  2. Per group, the four taps' input bytes are loaded raw (the zero point is not subtracted: the
//     accumulators start at bias - x_zp * sum(w), and padding taps read x_zp bytes, so the sum is the
//     same as sum (x - x_zp) * w); a signed input is XORed with 0x80 (x + 128, zero point + 128).
//     In-lane vpunpck{l,h}bw then vpunpck{l,h}wd make each dword one channel's four taps, and vpdpbusd
//     adds the four u8 x s8 products into it: four accumulators, acc_j's lane L holding the lane's
//     channels 4j..4j+3.
//  3. The epilogue requantizes the four in float32 (as the pair form), and vpackssdw / vpack{us,ss}wb
//     (in-lane, the unpacks' inverse) put the bytes back in channel order; int32 output transposes the
//     four accumulators' lanes back instead.
// Weights prepacked per block and group as four zmm (acc_j's: dword L*4 + i = channel 16 (L % lpp) + 4j
// + i's four taps); the weight sums the same way per block.
size_t QuadBlocks(size_t C) { return (C + 63) / 64; }
size_t QuadLanes(size_t C, size_t blk) {  // lanes per pixel of block blk: what is left of C from blk * 64
  const size_t left = C - blk * 64;
  return left <= 16 ? 1 : left <= 32 ? 2 : 4;
}
size_t QuadChannel(size_t lpp, size_t blk, size_t j, size_t L, size_t i) {
  return blk * 64 + 16 * (L % lpp) + 4 * j + i;
}

void PackQuads(const ConvShape& s, PackedConv* out) {
  const size_t C = s.C, taps = s.taps(), quads = (taps + 3) / 4, blocks = QuadBlocks(C);
  const auto wv = [&](size_t c, size_t t) { return int32_t(out->dw[((t / 2) * C + c) * 2 + t % 2]); };
  for (size_t c = 0; c < C; ++c)
    for (size_t t = 0; t < taps; ++t)
      if (wv(c, t) < -128 || wv(c, t) > 127) return;  // the pair form only
  out->dw_isa.assign(blocks * quads * 256, 0);
  out->dw_isa_sums.assign(blocks * 64, 0);
  for (size_t blk = 0; blk < blocks; ++blk)
    for (size_t j = 0; j < 4; ++j)
      for (size_t L = 0; L < 4; ++L)
        for (size_t i = 0; i < 4; ++i) {
          const size_t c = QuadChannel(QuadLanes(C, blk), blk, j, L, i), lane = (j * 4 + L) * 4 + i;
          if (c >= C) continue;
          int32_t sum = 0;
          for (size_t t = 0; t < taps; ++t) {
            out->dw_isa[((blk * quads + t / 4) * 64 + lane) * 4 + t % 4] = static_cast<int8_t>(wv(c, t));
            sum += wv(c, t);
          }
          out->dw_isa_sums[blk * 64 + lane] = sum;
        }
}

// out[j]'s lane L = in[L]'s lane j (a 4 x 4 transpose of 128-bit lanes; its own inverse).
inline void LaneTranspose(const __m512i in[4], __m512i out[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(in[0], in[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t1 = _mm512_shuffle_i32x4(in[2], in[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t2 = _mm512_shuffle_i32x4(in[0], in[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i t3 = _mm512_shuffle_i32x4(in[2], in[3], _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
  out[1] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
  out[2] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));
  out[3] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));
}

// Channels of [c, c + 16) below C, as a 16-bit mask.
inline __mmask16 Mask16(size_t C, size_t c) {
  return c >= C ? 0 : C - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (C - c)) - 1);
}

// The kPpv pixels' bytes of one tap (rows already at the block's first channel), each in its lpp lanes.
template <size_t kPpv>
inline __m512i LoadTap(const uint8_t* const* rows, __mmask64 m) {
  if constexpr (kPpv == 1) {
    return _mm512_maskz_loadu_epi8(m, rows[0]);
  } else if constexpr (kPpv == 2) {
    const __mmask32 h = static_cast<__mmask32>(m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(h, rows[0])),
                              _mm256_maskz_loadu_epi8(h, rows[1]), 1);
  } else {
    const __mmask16 q = static_cast<__mmask16>(m);
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(q, rows[0]));
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(q, rows[1]), 1);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(q, rows[2]), 2);
    return _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(q, rows[3]), 3);
  }
}

template <size_t kPpv>
inline void StoreLaneBytes(int8_t* y, size_t k, __mmask64 m, __m512i v) {
  if constexpr (kPpv == 2) {
    const __m256i h = k == 0 ? _mm512_castsi512_si256(v) : _mm512_extracti64x4_epi64(v, 1);
    _mm256_mask_storeu_epi8(y, static_cast<__mmask32>(m), h);
  } else {
    __m128i q;
    switch (k) {
      case 0: q = _mm512_castsi512_si128(v); break;
      case 1: q = _mm512_extracti32x4_epi32(v, 1); break;
      case 2: q = _mm512_extracti32x4_epi32(v, 2); break;
      default: q = _mm512_extracti32x4_epi32(v, 3);
    }
    _mm_mask_storeu_epi8(y, static_cast<__mmask16>(m), q);
  }
}

// Step 1's rows, per pixel of a task: tap t of pixel i reads base[i] + list_i[t] (address arithmetic). Inside
// the image base is the window's first byte and the list the offsets all such pixels share; near a border base
// is 0 and the list the pixel's own addresses (padding taps at the zero-point row). The last group's missing
// taps repeat a readable row (their weights are 0). Laid out in DepthwiseScratch::words.
struct QuadRows {
  const uintptr_t* words;
  const uintptr_t* base;   // [np]
  const uintptr_t* start;  // [np]: where each pixel's list starts in words
};

QuadRows BuildQuadRows(const ConvShape& s, const ConvArgs& a, const uint8_t* zrow, size_t b, size_t p0, size_t np,
                       size_t group_taps, uintptr_t* words) {
  const size_t taps = s.taps();
  uintptr_t* shared = words;
  size_t t = 0;
  for (size_t kd = 0; kd < s.k[0]; ++kd)
    for (size_t kh = 0; kh < s.k[1]; ++kh)
      for (size_t kw = 0; kw < s.k[2]; ++kw)
        shared[t++] = ((kd * s.dil[0] * s.in[1] + kh * s.dil[1]) * s.in[2] + kw * s.dil[2]) * s.C;
  for (; t < group_taps; ++t) shared[t] = shared[0];
  uintptr_t* base = words + group_taps;
  uintptr_t* start = base + np;
  uintptr_t* next = start + np;
  // The output columns whose window's width lies inside the image: [ow_lo, ow_hi) (an interval).
  const auto width_in = [&](size_t ow) {
    const ptrdiff_t iw0 = ptrdiff_t(ow * s.stride[2]) - ptrdiff_t(s.pad[2]);
    return iw0 >= 0 && iw0 + ptrdiff_t((s.k[2] - 1) * s.dil[2]) < ptrdiff_t(s.in[2]);
  };
  size_t ow_lo = 0, ow_hi = 0;
  while (ow_lo < s.out[2] && !width_in(ow_lo)) ++ow_lo;
  for (ow_hi = ow_lo; ow_hi < s.out[2] && width_in(ow_hi);) ++ow_hi;
  const size_t step = s.stride[2] * s.C, out_w = s.out[2];
  PixelWalk walk(s, p0);
  for (size_t i = 0; i < np;) {  // the range's part of one output row at a time
    const size_t ow0 = size_t(walk.ow), n = std::min(np - i, out_w - ow0), end = ow0 + n;
    const ptrdiff_t id0 = walk.od * ptrdiff_t(s.stride[0]) - ptrdiff_t(s.pad[0]);
    const ptrdiff_t ih0 = walk.oh * ptrdiff_t(s.stride[1]) - ptrdiff_t(s.pad[1]);
    const bool rows_in = id0 >= 0 && id0 + ptrdiff_t((s.k[0] - 1) * s.dil[0]) < ptrdiff_t(s.in[0]) && ih0 >= 0 &&
                         ih0 + ptrdiff_t((s.k[1] - 1) * s.dil[1]) < ptrdiff_t(s.in[1]);
    // Column 0's window origin (before the pad: only columns inside use it).
    const uintptr_t origin =
        rows_in
            ? reinterpret_cast<uintptr_t>(a.x + ((b * s.in[0] + size_t(id0)) * s.in[1] + size_t(ih0)) * s.in[2] * s.C) -
                  s.pad[2] * s.C
            : 0;
    // Columns [lo, hi) of the segment have their window inside the image; the others are borders.
    const size_t lo = rows_in ? std::min(std::max(ow_lo, ow0), end) : end;
    const size_t hi = rows_in ? std::max(lo, std::min(ow_hi, end)) : end;
    const auto border = [&](size_t ow, size_t k) {
      PixelWalk at = walk;
      at.ow = ptrdiff_t(ow);
      base[k] = 0;
      start[k] = uintptr_t(next - words);
      TapPointers(s, a, zrow, b, at, next);
      for (size_t u = taps; u < group_taps; ++u) next[u] = reinterpret_cast<uintptr_t>(zrow);
      next += group_taps;
    };
    size_t k = i;
    for (size_t ow = ow0; ow < lo; ++ow) border(ow, k++);
    uintptr_t at = origin + lo * step;  // the interior: a tight loop (no walk, no stores the shape could alias)
    for (size_t ow = lo; ow < hi; ++ow, ++k, at += step) {
      base[k] = at;
      start[k] = 0;
    }
    for (size_t ow = hi; ow < end; ++ow) border(ow, k++);
    i += n;
    walk.ow = ptrdiff_t(end) - 1;  // the segment's last pixel, then on to the next row's first
    walk.Next(s);
  }
  return QuadRows{words, base, start};
}

// One block (channels from blk * 64, or all C channels of kPpv pixels) over the task's np pixels.
template <size_t kPpv, bool kSigned>
void QuadBlock(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t o0, size_t np, size_t blk,
               const QuadRows& r) {
  constexpr size_t lpp = 4 / kPpv;
  const size_t C = s.C, quads = (s.taps() + 3) / 4, c0 = blk * 64;
  const __m512i* wq = reinterpret_cast<const __m512i*>(w.dw_isa.data()) + blk * quads * 4;
  // Per lane L: its channels' first (c0 + 16 (L % lpp)) and load mask; the block's load mask covers lpp lanes.
  __mmask16 lane_mask[4];
  for (size_t L = 0; L < 4; ++L) lane_mask[L] = Mask16(C, c0 + 16 * (L % lpp));
  const __mmask64 m = _cvtu64_mask64(uint64_t(lane_mask[0]) | uint64_t(lane_mask[1 % lpp]) << 16 |
                                     uint64_t(lane_mask[2 % lpp]) << 32 | uint64_t(lane_mask[3 % lpp]) << 48);
  // Step 2's start: bias - zp * sum(w) in acc_j's order; the scales alike.
  const int32_t zp = a.x_zp + (a.x_signed ? 128 : 0);
  __m512i in[4], init[4];
  __m512 scale[4];
  for (size_t L = 0; L < 4; ++L)
    in[L] = a.bias ? _mm512_maskz_loadu_epi32(lane_mask[L], a.bias + c0 + 16 * (L % lpp)) : _mm512_setzero_si512();
  LaneTranspose(in, init);
  for (size_t j = 0; j < 4; ++j) {
    const __m512i sums = _mm512_loadu_si512(w.dw_isa_sums.data() + blk * 64 + j * 16);
    init[j] = _mm512_sub_epi32(init[j], _mm512_mullo_epi32(sums, _mm512_set1_epi32(zp)));
  }
  const bool quant = a.kind != OutKind::kInt32, u8 = a.kind == OutKind::kU8;
  if (quant) {
    __m512i sc[4];
    for (size_t L = 0; L < 4; ++L)
      in[L] = _mm512_castps_si512(_mm512_maskz_loadu_ps(lane_mask[L], a.scale + c0 + 16 * (L % lpp)));
    LaneTranspose(in, sc);
    for (size_t j = 0; j < 4; ++j) scale[j] = _mm512_castsi512_ps(sc[j]);
  }
  const __m512 hi = _mm512_set1_ps(static_cast<float>((u8 ? 255 : 127) - a.y_zp));
  const __m512i zp16 = _mm512_set1_epi16(static_cast<int16_t>(a.y_zp)),
                flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const bool whole = c0 == 0 && C == 16 * lpp;  // a vector of whole pixels: one contiguous store
  for (size_t i = 0; i < np; i += kPpv) {
    const size_t nv = np - i < kPpv ? np - i : kPpv;
    uintptr_t pb[kPpv];
    const uintptr_t* pl[kPpv];
    for (size_t k = 0; k < kPpv; ++k) {
      const size_t p = i + (k < nv ? k : 0);  // a vector's missing pixels repeat its first
      pb[k] = r.base[p] + c0;
      pl[k] = r.words + r.start[p];
    }
    // Whole pixels side by side in the input (unit stride along the width, the same tap list): each tap of the
    // vector is the 64 bytes from its first pixel's row, one load where LoadTap makes kPpv and inserts them.
    bool contiguous = kPpv > 1 && whole && nv == kPpv;
    for (size_t k = 1; k < kPpv && contiguous; ++k) contiguous = pl[k] == pl[0] && pb[k] == pb[0] + k * C;
    __m512i acc0 = init[0], acc1 = init[1], acc2 = init[2], acc3 = init[3];
    for (size_t q = 0; q < quads; ++q) {
      __m512i t[4];
      for (size_t u = 0; u < 4; ++u) {
        if (contiguous) {
          t[u] = _mm512_loadu_si512(reinterpret_cast<const void*>(pb[0] + pl[0][4 * q + u]));
        } else {
          const uint8_t* rows[kPpv];
          for (size_t k = 0; k < kPpv; ++k) rows[k] = reinterpret_cast<const uint8_t*>(pb[k] + pl[k][4 * q + u]);
          t[u] = LoadTap<kPpv>(rows, m);
        }
        if (kSigned) t[u] = _mm512_xor_si512(t[u], flip);
      }
      const __m512i p_lo = _mm512_unpacklo_epi8(t[0], t[1]), p_hi = _mm512_unpackhi_epi8(t[0], t[1]);
      const __m512i q_lo = _mm512_unpacklo_epi8(t[2], t[3]), q_hi = _mm512_unpackhi_epi8(t[2], t[3]);
      acc0 = _mm512_dpbusd_epi32(acc0, _mm512_unpacklo_epi16(p_lo, q_lo), _mm512_loadu_si512(wq + 4 * q));
      acc1 = _mm512_dpbusd_epi32(acc1, _mm512_unpackhi_epi16(p_lo, q_lo), _mm512_loadu_si512(wq + 4 * q + 1));
      acc2 = _mm512_dpbusd_epi32(acc2, _mm512_unpacklo_epi16(p_hi, q_hi), _mm512_loadu_si512(wq + 4 * q + 2));
      acc3 = _mm512_dpbusd_epi32(acc3, _mm512_unpackhi_epi16(p_hi, q_hi), _mm512_loadu_si512(wq + 4 * q + 3));
    }
    const size_t o = o0 + i * C + c0;
    if (!quant) {  // lane L of the transposed accumulators: pixel i + L / lpp, channels from c0 + 16 (L % lpp)
      const __m512i acc[4] = {acc0, acc1, acc2, acc3};
      __m512i v[4];
      LaneTranspose(acc, v);
      for (size_t L = 0; L < 4; ++L)
        if (L / lpp < nv && lane_mask[L])
          _mm512_mask_storeu_epi32(static_cast<int32_t*>(a.y) + o + (L / lpp) * C + 16 * (L % lpp), lane_mask[L], v[L]);
      continue;
    }
    // As the GEMM's fast epilogue (FastRow): the top clamp in float (x >= 2^31 would be cvt's INT_MIN; NaN
    // becomes INT_MIN), the bottom one by the saturating packs (int32 -> int16, + zero point saturating, -> 8
    // bits), which also undo the unpacks' in-lane order: clamp(round(x), lo, hi) + zp for every x.
    const auto requant = [&](__m512i acc, __m512 sc) {
      return _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc)));
    };
    const __m512i w01 = _mm512_adds_epi16(_mm512_packs_epi32(requant(acc0, scale[0]), requant(acc1, scale[1])), zp16);
    const __m512i w23 = _mm512_adds_epi16(_mm512_packs_epi32(requant(acc2, scale[2]), requant(acc3, scale[3])), zp16);
    const __m512i bytes = u8 ? _mm512_packus_epi16(w01, w23) : _mm512_packs_epi16(w01, w23);
    int8_t* y = static_cast<int8_t*>(a.y) + o;
    if (kPpv == 1)
      _mm512_mask_storeu_epi8(y, m, bytes);
    else if (whole && nv == kPpv)
      _mm512_storeu_si512(y, bytes);
    else
      for (size_t k = 0; k < nv; ++k) StoreLaneBytes<kPpv>(y + k * C, k, m, bytes);
  }
}

template <size_t kPpv>
void QuadBlockOf(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t o0, size_t np, size_t blk,
                 const QuadRows& r) {
  if (a.x_signed)
    QuadBlock<kPpv, true>(s, w, a, o0, np, blk, r);
  else
    QuadBlock<kPpv, false>(s, w, a, o0, np, blk, r);
}

void DepthwiseQuads(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t b, size_t p0, size_t p1,
                    const DepthwiseScratch& sc) {
  const size_t np = p1 - p0;
  const QuadRows r = BuildQuadRows(s, a, sc.zrow, b, p0, np, (s.taps() + 3) / 4 * 4, sc.words);
  const size_t o0 = (b * s.out_pixels() + p0) * s.C;
  for (size_t blk = 0; blk < QuadBlocks(s.C); ++blk) switch (QuadLanes(s.C, blk)) {
      case 1: QuadBlockOf<4>(s, w, a, o0, np, blk, r); break;
      case 2: QuadBlockOf<2>(s, w, a, o0, np, blk, r); break;
      default: QuadBlockOf<1>(s, w, a, o0, np, blk, r);
    }
}

void DepthwiseAvx512(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t b, size_t p0, size_t p1,
                     const DepthwiseScratch& sc) {
  if (!w.dw_isa.empty())
    DepthwiseQuads(s, w, a, b, p0, p1, sc);
  else
    DepthwisePairs(s, w.dw.data(), a, b, p0, p1, sc);
}

}  // namespace

extern const DepthwiseFn kDepthwiseAvx512 = DepthwiseAvx512;
extern const DepthwisePackFn kDepthwisePackAvx512 = PackQuads;
}  // namespace qie
