// The qie INT8 GEMM kernel layer: plain C++ over raw pointers, strides and a params struct.
//
// Every GEMM is computed as u8 x s8 -> s32, exactly:
//   acc[m][n] = sum_k (a[m][k] - za[m]) * (b[k][n] - zb[n]) + bias[m][n]
// u8u8, s8s8 and s8u8 reach the same u8s8 microkernels through the +128 shift: a signed A is
// stored as a ^ 0x80 (= a + 128, u8) with za + 128; an unsigned B is stored as b ^ 0x80 (= b - 128,
// s8) with zb - 128. The differences (a - za) and (b - zb) are unchanged, so the result is exact.
//
// With raw = sum_k a'b', rs[m] = sum_k a'[m][k], cs[n] = sum_k b'[k][n] (primed: shifted values):
//   acc = raw + bias - zb[n] * rs[m] - za[m] * (cs[n] - K * zb[n])
// The epilogue of each microkernel applies that, then writes int32, float (acc * scale[n] + fbias[n])
// or requantized u8/s8 (saturate(round_half_even(float(acc) * scale[n]) + y_zp)), all in float32
// with the multiply rounded before the add, as ONNX Runtime's MLAS does.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace qie {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };
constexpr int kIsaCount = 5;
// Paths with AVX-512 (BW, VL, DQ, VNNI) and its kernels: AVX-512 VNNI, and AMX, which keeps them for all but GEMM
// tiles.
inline bool HasAvx512(Isa isa) { return isa == Isa::kAvx512Vnni || isa == Isa::kAmx; }
const char* IsaName(Isa isa);
bool IsaFromName(const char* name, Isa* out);
bool IsaSupported(Isa isa);  // by this CPU (cpuid + OS state)
Isa ActiveIsa();             // best supported, or QIE_ISA's choice; fixed after first use
bool ForceIsa(Isa isa);      // for tests and benchmarks; false if the CPU lacks it

enum class OutKind : int { kInt32 = 0, kFloat = 1, kU8 = 2, kS8 = 3 };

// What the epilogue needs, for one tile (rows m0.., columns n0..).
struct Epilogue {
  OutKind kind;
  const int32_t* rs;       // [mr] row sums of shifted A (nullptr when zb is all zero)
  const int32_t* za;       // [mr] A zero points (shifted)
  const int32_t* zb;       // [nr] B zero points (shifted); nullptr when all zero
  const int32_t* zb_rows;  // [mr] -zb * rs[m] when zb is one value for every column, else nullptr: the same zb
                           // term, which kernels may add per row instead of multiplying per column
  const int32_t* csk;      // [nr] cs[n] - K*zb[n]; unused when folded
  bool folded;             // bias holds bias[n] - za*csk[n] per column (one za for all rows): no za term
  const int32_t* bias;     // int32 bias at (m0, n0), or nullptr
  ptrdiff_t bias_rs;       // bias row stride (0 broadcasts rows)
  int bias_cs;             // 1: per column, 0: one value per row
  const float* scale;      // [nr] output multipliers (float/quantized outputs)
  const float* fbias;      // [nr] float bias added after scaling, or nullptr
  int32_t y_zp;
  void* y;              // output at (m0, n0)
  ptrdiff_t ldy;        // in elements
  uint64_t a_call = 0;  // this GEMM call's number (A is unchanged within it: kernels may reuse what they made of a
                        // tile's rows for its other panels), or 0
};

// One tile: rows [0, mr) of A (row stride lda bytes, or int16 elements for wide kernels), one packed
// panel of B (NR columns, of which nr are real), kp = K rounded up to the kernel's K-group.
using TileFn = void (*)(size_t mr, size_t nr, size_t kp, const void* a, size_t lda, const void* b_panel,
                        const Epilogue& ep);

// The epilogue every ISA's microkernel has a fast form of: one A zero point folded into the bias, B's zero
// point absent or one value (its term per row), int32 or requantized output.
inline bool CommonEpilogue(const Epilogue& ep) {
  return ep.folded && (!ep.zb || ep.zb_rows) &&
         (ep.kind == OutKind::kInt32 || ep.kind == OutKind::kU8 || ep.kind == OutKind::kS8);
}

// A strip: rows [0, m) of A in tiles of MR against one panel, with a folded epilogue (ep.rs and ep.zb_rows,
// where given, hold all m rows; ep.za unused): for the CommonEpilogue the per-panel constants are set up
// once per strip instead of once per tile, which small-K products (pointwise convolutions: K = 16..64)
// pay for as much as for their multiply-adds.
using StripFn = void (*)(size_t m, size_t nr, size_t kp, const void* a, size_t lda, const void* b_panel,
                         const Epilogue& ep);

struct MicroKernel {
  Isa isa;
  const char* name;  // e.g. qie_gemm_u8s8_s32_8x32c4__avx512vnni
  int mr, nr, kgroup;
  bool wide;  // operands widened to int16 (AVX2's exact vpmaddwd path)
  TileFn tile;
  StripFn strip = nullptr;  // optional (nullptr: tile by tile)
  // K from kalign_min on is padded to a multiple of kalign (AMX's tiles take 64 bytes of K), shorter K to the
  // K-group (0: always the K-group). A kernel with a kalign runs its products whose kp is not a multiple of it
  // another way (AMX: the AVX-512 VNNI tiles, for which padding K = 16 or 32 to 64 would cost more than it gains).
  int kalign = 0;
  size_t kalign_min = 0;
  // Optional per-thread state around a run of tiles (AMX: the tile configuration). Nested scopes are free; the
  // outermost one pays (see KernelScope).
  void (*enter)() = nullptr;
  void (*leave)() = nullptr;
  // K padded as this kernel's packed B and A rows hold it.
  size_t PaddedK(size_t K) const {
    K = std::max<size_t>(K, 1);
    const size_t m = static_cast<size_t>(kalign > kgroup && K >= kalign_min ? kalign : kgroup);
    return (K + m - 1) / m * m;
  }
};
const MicroKernel& GetMicroKernel(Isa isa);

// A kernel's per-thread state (MicroKernel::enter / leave) for a scope on this thread: drivers open one around each
// task, so the tiles inside share one set-up (the AMX kernel otherwise checks, and may swap, the tile configuration
// per tile: with another library's configuration on the thread that was two ldtilecfg per tile).
class KernelScope {
 public:
  explicit KernelScope(const MicroKernel& uk) : uk_(uk) {
    if (uk_.enter) uk_.enter();
  }
  ~KernelScope() {
    if (uk_.enter) uk_.leave();
  }
  KernelScope(const KernelScope&) = delete;
  KernelScope& operator=(const KernelScope&) = delete;

 private:
  const MicroKernel& uk_;
};

// B packed once (constant weights) or per call: panels of NR columns, K padded to the K-group.
struct PackedB {
  Isa isa = Isa::kScalar;
  size_t K = 0, N = 0, kp = 0;
  bool shifted = false;      // B was u8 and is stored as b ^ 0x80
  std::vector<int32_t> cs;   // [N] column sums of stored (shifted) values
  std::vector<int8_t> data;  // panels, 64-byte aligned start via offset below
  size_t offset = 0;
  size_t panel_bytes = 0;
  const void* panel(size_t p) const { return data.data() + offset + p * panel_bytes; }
};
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;

// b: K x N with element (k, n) at b[k*ldb_k + n*ldb_n]; b_signed says int8 (else uint8). `pfor`: packs its panels
// in parallel (nullptr: on the calling thread).
void PackB(const MicroKernel& uk, const uint8_t* b, bool b_signed, size_t K, size_t N, ptrdiff_t ldb_k, ptrdiff_t ldb_n,
           PackedB* out, const ParallelFor* pfor = nullptr);

// The AVX-512 VNNI kernel's packing of one full panel (48 columns) of row-major B, K / 4 groups of four rows, with
// the column sums added to sums[0..48); the rows packed. Only where that kernel runs.
size_t PackRowsByFour48(const uint8_t* b, ptrdiff_t ldb_k, size_t K, uint8_t flip, int8_t* dst, int32_t* sums);

// A GEMM problem over `batch` independent matrices sharing one packed B per batch entry.
struct GemmArgs {
  size_t M = 0, N = 0, K = 0;
  const uint8_t* a = nullptr;  // A for batch 0; rows of lda bytes
  size_t lda = 0;
  bool a_rows_padded = false;         // rows hold kp bytes, zero from K on: used in place whatever K is
  const size_t* a_offsets = nullptr;  // [batch] byte offsets of each A (nullptr: all 0)
  bool a_signed = false;
  const int32_t* za = nullptr;  // A zero point(s), unshifted
  int za_per_row = 0;           // 1: za[m], 0: za[0]
  const int32_t* zb = nullptr;  // [N] B zero points, unshifted (nullptr: all zero)
  const int32_t* bias = nullptr;
  ptrdiff_t bias_rs = 0;
  int bias_cs = 0;
  ptrdiff_t bias_batch_stride = 0;
  OutKind kind = OutKind::kInt32;
  const float* scale = nullptr;  // [N]
  const float* fbias = nullptr;  // [N]
  int32_t y_zp = 0;
  void* y = nullptr;
  size_t ldy = 0;
  ptrdiff_t y_batch_stride = 0;  // in elements
  size_t batch = 1;
  const PackedB* const* b = nullptr;  // [batch] packed B (entries may repeat)
  // u8 / s8 output: byte table(s) applied to the codes in each task after its tiles (isa.h LookupBlock): one
  // table, or one per column (lut_tables = N). nullptr: none.
  const uint8_t* lut = nullptr;
  size_t lut_tables = 1;
};
void Gemm(const MicroKernel& uk, const GemmArgs& args, const ParallelFor& pfor);

// Keeps a vector in a register: stops GCC folding a down-convert into its memory-destination form
// (vpmovdb m128, zmm), which is several times slower than the register form plus a store on Zen 4.
template <class V>
inline void KeepInRegister(V& v) {
  __asm__("" : "+v"(v));
}

// DynamicQuantizeLinear semantics (as ORT computes them): scale and zero point from min/max of x
// (range widened to include 0), then q = saturate(round_half_even(x / scale) + zp).
void DynamicQuantizeParams(const float* x, size_t n, float* scale, uint8_t* zp);
void QuantizeLinearU8(const float* x, size_t n, float scale, uint8_t zp, uint8_t* q);
// QuantizeLinear of one image's pixels [p0, p1) from NCHW floats x (C planes of hw) into NHWC bytes y (the image's
// start): y[p * C + c] = saturate(round_half_even(x[c * hw + p] / scale) + zp) as u8 or s8; NaN -> the bottom code
// (0 / -128), as ORT's QuantizeLinear (MLAS: max(x / scale, lo) first) gives it, whatever the zero point.
void QuantizeToNhwc(const float* x, size_t C, size_t hw, size_t p0, size_t p1, float scale, int32_t zp, bool is_signed,
                    uint8_t* y);

// y[r, n] = y[r, n] * scale[n] (+ bias[n]) over a rows x n row-major float matrix: the second rounding
// of the float outputs ORT computes as (float(acc) * a_scale) * b_scale[n].
void ScaleColumns(float* y, size_t rows, size_t n, const float* scale, const float* bias);

}  // namespace qie
