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
void DepthwiseAvx512(const ConvShape& s, const int16_t* dw, const ConvArgs& a, size_t b, size_t p0, size_t p1,
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

}  // namespace

extern const DepthwiseFn kDepthwiseAvx512 = DepthwiseAvx512;
}  // namespace qie
