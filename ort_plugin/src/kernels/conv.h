// The qie INT8 convolution kernel layer: NHWC convolutions over raw pointers and a params struct.
//
// Every convolution is computed as
//   acc[n, o..., m] = sum_{taps, c} (x[n, i..., g*Cg + c] - x_zp) * (w[m, c, taps] - w_zp[m]) + bias[m]
// (g = m / Mg; padding contributes nothing), then written as int32 or requantized to u8/s8 with the
// GEMM layer's epilogue. Three paths share that contract:
//   1. pointwise (1x1, stride 1, no padding): the NHWC input is the GEMM's A matrix, no copy;
//   2. general: the input is gathered into im2col rows (taps x Cg bytes, zero point for padding) in
//      blocks of output pixels, each block one GEMM per group on the prepacked weights;
//   3. depthwise (one input and one output channel per group): a per-ISA kernel that vectorizes over
//      channels, with the weights prepacked as int16 (w - w_zp) per tap, or in the ISA's own form (AVX-512
//      VNNI: int8 in groups of four taps, one vpdpbusd each, where every w - w_zp fits int8).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/gemm.h"

namespace qie {

// Geometry of one convolution, spatial dims padded to 3 (D, H, W) with leading 1s.
struct ConvShape {
  size_t batch = 1, C = 0, M = 0, group = 1;
  size_t in[3] = {1, 1, 1}, out[3] = {1, 1, 1}, k[3] = {1, 1, 1};
  size_t stride[3] = {1, 1, 1}, dil[3] = {1, 1, 1}, pad[3] = {0, 0, 0};  // leading pads
  size_t Cg() const { return C / group; }
  size_t Mg() const { return M / group; }
  size_t taps() const { return k[0] * k[1] * k[2]; }
  size_t in_pixels() const { return in[0] * in[1] * in[2]; }
  size_t out_pixels() const { return out[0] * out[1] * out[2]; }
  bool depthwise() const { return group > 1 && Cg() == 1 && Mg() == 1; }
  bool pointwise() const;
};

// Weights prepacked for one ISA: GEMM panels per group (K = taps x Cg in (tap, c) order, N = Mg), or
// the depthwise form: int16 (w - w_zp) in tap pairs, [ceil(taps/2)][C][2] (an odd last tap paired
// with 0), so one vpmaddwd lane sums two taps of one channel. An ISA may add its own depthwise form
// (IsaKernels::depthwise_pack, from the int16 one) where the weights allow it: bytes in its kernel's
// layout and per-channel int32s (the AVX-512 VNNI quad-tap form: int8 (w - w_zp) in groups of four
// taps and their sums, the input zero point folded into the accumulators' start). Empty: none.
struct PackedConv {
  Isa isa = Isa::kScalar;
  bool depthwise = false;
  std::vector<PackedB> groups;
  std::vector<int16_t> dw;
  std::vector<int8_t> dw_isa;
  std::vector<int32_t> dw_isa_sums;
};
// w: ONNX layout [M, Cg, kD, kH, kW]; w_zp: [M] (unshifted); used by the depthwise form only.
void PackConv(const MicroKernel& uk, const ConvShape& s, const uint8_t* w, bool w_signed, const int32_t* w_zp,
              PackedConv* out);

struct ConvArgs {
  const uint8_t* x = nullptr;  // NHWC [batch, in..., C]
  bool x_signed = false;
  int32_t x_zp = 0;
  const int32_t* w_zp = nullptr;   // [M] unshifted; nullptr = all zero
  const int32_t* bias = nullptr;   // [M] or nullptr
  OutKind kind = OutKind::kInt32;  // kInt32, kU8 or kS8
  const float* scale = nullptr;    // [M]
  int32_t y_zp = 0;
  void* y = nullptr;  // NHWC [batch, out..., M]
  // u8 / s8 output: byte table(s) applied to the output codes by each task while its block is in cache: one
  // table, or one per output channel (lut_tables = M), 3 readable bytes after. nullptr: none.
  const uint8_t* lut = nullptr;
  size_t lut_tables = 1;
};
void Conv(const MicroKernel& uk, const ConvShape& s, const PackedConv& w, const ConvArgs& a, const ParallelFor& pfor);

// [batch][rows][cols] -> [batch][cols][rows] of `elem`-byte elements (1 or 4): NCHW <-> NHWC.
void Transpose2D(const void* src, void* dst, size_t batch, size_t rows, size_t cols, size_t elem,
                 const ParallelFor* pfor = nullptr);
// dst[j][i] = src[i][j] for i < rows, j < cols, bytes, with row strides (16 x 16 SSE2 blocks, scalar edges).
void TransposeBytes(const uint8_t* src, size_t src_stride, uint8_t* dst, size_t dst_stride, size_t rows, size_t cols);

// The per-ISA depthwise kernel: output pixels [p0, p1) of image b, all channels. Scratch: acc (C
// int32), zrow (C + 64 bytes equal to x_zp: padding taps read it and contribute nothing), and for the
// int16 pair form ptrs ((taps + 1) per pixel of the range), for an ISA's own form words
// (DepthwiseWords(taps, pixels)).
struct DepthwiseScratch {
  int32_t* acc;
  const uint8_t* zrow;
  const uint8_t** ptrs;
  uintptr_t* words;
};
inline size_t DepthwiseWords(size_t taps, size_t pixels) { return (taps + 6) * (pixels + 1); }
using DepthwiseFn = void (*)(const ConvShape& s, const PackedConv& w, const ConvArgs& a, size_t b, size_t p0, size_t p1,
                             const DepthwiseScratch& scratch);
// Adds the ISA's own depthwise form to `out` (whose int16 form `dw` is filled), or leaves it empty.
using DepthwisePackFn = void (*)(const ConvShape& s, PackedConv* out);
DepthwiseFn GetDepthwiseKernel(Isa isa);
DepthwisePackFn GetDepthwisePack(Isa isa);

}  // namespace qie
