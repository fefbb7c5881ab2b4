// The one ISA table: for each instruction-set path, its name, what the CPU must have, and every kernel
// it provides. Adding an ISA = one row in dispatch.cc, its kernel files, and their compile flags in
// CMakeLists.txt; nothing else chooses kernels by ISA.
#pragma once
#include "kernels/conv.h"

namespace qie {

using MinMaxFn = void (*)(const float* x, size_t n, float* lo, float* hi);
using QuantizeU8Fn = void (*)(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q);
// y[p * ld + c] = t[c * 256 + x[p * ld + c]] for p < pixels, c < C (t padded by 3 readable bytes; rows ld >= C
// bytes apart, the bytes between them untouched); C = 1: one table over `pixels` contiguous bytes (ld unused).
// One image's pixels [p0, p1) of x (NCHW floats, C planes of hw) quantized into y (NHWC bytes, C per pixel) as
// QuantizeLinear does: saturate(round_half_even(x / scale) + zp), NaN -> the bottom code (QuantizeToNhwc).
using QuantizeNhwcFn = void (*)(const float* x, size_t C, size_t hw, size_t p0, size_t p1, float scale, int32_t zp,
                                bool is_signed, uint8_t* y);
using ChannelLutFn = void (*)(const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y, size_t pixels, size_t ld);
// Whether the AVX-512 byte tables may use AVX512-VBMI where the CPU has it (default on; the kernel tests turn it
// off to check the gather path).
void SetLutVbmi(bool on);

struct IsaKernels {
  Isa isa;
  const char* name;                // "scalar", "avx2", ... (QIE_ISA, qie_ep.force_isa, stats)
  bool (*cpu_has)();               // every extension the path's files are compiled with (cpuid + OS state)
  const MicroKernel* gemm;         // GEMM microkernel (tile MR x NR, K-group)
  DepthwiseFn depthwise;           // depthwise convolution over channels
  DepthwisePackFn depthwise_pack;  // the depthwise kernel's own weight form; nullptr: the int16 form only
  MinMaxFn minmax;                 // dynamic quantization's range; nullptr: the scalar loop
  QuantizeU8Fn quantize_u8;        // dynamic quantization's q = saturate(round(x / scale) + zp); nullptr: scalar
  ChannelLutFn channel_lut;        // the EP's (per-channel) byte tables; nullptr: the scalar loop
  QuantizeNhwcFn quantize_nhwc;    // the EP's region inputs (an image's QuantizeLinear); nullptr: the scalar loop
};

const IsaKernels& KernelsFor(Isa isa);

// In place, y[r * ldy + j] = t[(tables == 1 ? 0 : j) * 256 + y[r * ldy + j]] for r < rows, j < cols, with ISA
// `isa`'s byte-table kernel: one table, or one per column (t padded by 3 readable bytes, as ChannelLutFn's).
// A convolution's or GEMM's following table (the EP's conv + activation) on a task's block while it is in cache.
// Rows per tile of the per-channel lookups (ChannelLutFn): blocks of whole multiples of it cost the least.
constexpr size_t kLutRows = 64;
void LookupBlock(Isa isa, const uint8_t* t, size_t tables, uint8_t* y, size_t rows, size_t cols, size_t ldy);

}  // namespace qie
