// The compiled form of a region (region.cc plans it) and the kernels that run its steps (region_steps.cc): each
// reads its operands' NHWC buffers and dims and writes its output's, growing the output buffer as needed.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/pacing.h"
#include "ep/units.h"
#include "kernels/conv.h"
#include "kernels/gemm.h"

namespace qie_ep {

// Elements per block of a binary unit's activation program.
constexpr size_t kTailBlock = 4096;

// Pixels per block of a per-channel float program (~8 KiB of floats per register).
inline size_t ProgramRows(size_t C) { return std::max<size_t>(1, 2048 / std::max<size_t>(1, C)); }

struct RegionPlan {
  struct Chained {  // one table unit: DequantizeLinear, f, QuantizeLinear
    QParams in;
    FloatProgram f;
    QParams out;
  };
  struct Value {
    std::string name;
    bool is_signed = false;
    int input = -1, output = -1;  // the fused node's input / output index
    int slot = -1;
    bool quantize = false;  // the fused input is the float tensor of an input QuantizeLinear with `q`, run on entry
    QParams q;
  };
  struct Step {
    UnitKind kind = UnitKind::kTable;
    std::string name;  // the unit's op node, for errors
    std::vector<int> in;
    int out = -1;
    std::vector<QParams> qin;
    QParams qout;
    // tables: [tC][256] and 3 bytes of padding (the vector lookup reads dwords); tC = 1 for one table
    size_t tC = 1;
    std::vector<uint8_t> table;
    // the composed units as float programs; per-channel tables of plain arithmetic run them on the data instead
    // of gathering from the tables (same float32 operations, same codes; no dword gathers)
    std::vector<Chained> chain;
    bool arithmetic = false;
    bool lookup_only = false;  // the tables hold more than `chain` (a binary unit folded into them): looked up
    // conv (shuffle: C channels in M groups, k = {H, W})
    qie::ConvAttrs at;
    std::vector<int64_t> k;
    size_t C = 0, M = 0;
    qie::PackedConv packed;
    std::vector<int32_t> wzp, bias;
    std::vector<float> scale;
    // a following table step folded into the conv (FuseConvTables): its tables (tC = post_tC: 1 or M), applied to
    // the conv's codes by the conv's own tasks; empty: none
    std::vector<uint8_t> post;
    size_t post_tC = 1;
    // binary: the operation, and the float program of the activations after it (none: tail.steps empty)
    char op = '+';
    FloatProgram tail;
    // binary: activations that are clamps of the output codes (Relu / Clip tails; lo, hi codes), applied in order
    std::vector<std::pair<int, int>> clamps;
    // binary: ORT's QLinearAdd / QLinearMul arithmetic (units.h QLinearBinary) instead of the float graph's, where
    // ORT fuses the unit so (QLinearOp)
    bool qlinear = false;
    // binary / gap: per operand, the float program between its DequantizeLinear and the op (empty: none)
    std::vector<FloatProgram> pre;
    bool has_pre = false;
    // average pool: padding counted in the divisor
    bool include_pad = false;
    // LRN: its attributes
    int64_t lrn_size = 1;
    float lrn_alpha = 0, lrn_beta = 0, lrn_bias = 0;
    // concat / maxpool / shuffle / slice / resize: per input, code -> output code (empty: the identity)
    std::vector<std::vector<uint8_t>> requant;
  };
  std::vector<Value> values;
  std::vector<Step> steps;
  // pacing.h: one per step, then one per fused input's layout change, then one per step's output layout change
  std::unique_ptr<Pacing[]> pacing;
  std::vector<int> inputs;  // value of each fused input (-1: not read)
  size_t slots = 0;
  bool profile = false;
  bool adaptive = true;  // EP option "pacing"
  bool team = true;      // EP option "team": one pool wake-up per run (team.h)
  // Team runs in a row in which no other pool task joined (the first runs: a member that exists joins a run of a
  // region within microseconds); at kSoloRuns the pool is taken to run one thread and
  // the plan calls it per section again (a team there only adds its bookkeeping).
  static constexpr int kSoloRuns = 2;
  std::atomic<int> solo_runs{0};
};

struct Dims {  // a value's NHWC dims
  size_t n = 0, h = 0, w = 0, c = 0;
  size_t pixels() const { return n * h * w; }
  size_t count() const { return pixels() * c; }
  std::string Nchw() const {
    return "[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," + std::to_string(w) + "]";
  }
};

// y = t[c][x] over `pixels` NHWC pixels of C channels (`t`: one table when tC = 1, else tC = C of them, 3 bytes
// of padding after). Blocks of ~32 KiB, in parallel.
// DequantizeLinear as ORT computes it, y = float(q - zp) * scale, vectorized (also the MatMul units' float outputs).
void DequantizeCodes(const uint8_t* q, size_t n, bool is_signed, int32_t zp, float scale, float* y);
void ApplyLut(const uint8_t* t, size_t tC, const uint8_t* x, uint8_t* y, size_t pixels, size_t C,
              const qie::ParallelFor& pfor);

// NCHW -> NHWC and back for n images of c channels and hw pixels, in parallel over blocks of pixels.
void ToNhwc(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor);
// An input QuantizeLinear run on entry: float NCHW x of dims d quantized with q into NHWC codes y.
void QuantizeInput(const float* x, uint8_t* y, const Dims& d, const QParams& q, const qie::ParallelFor& pfor);

void ToNchw(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor);

// A per-channel table step of plain arithmetic run on the data: per block of pixels, each composed unit's
// DequantizeLinear, float program and QuantizeLinear, as its tables were built (so the same codes).
void RunChannelPrograms(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, uint8_t* y,
                        const qie::ParallelFor& pfor);

void RunConv(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
             const qie::ParallelFor& pfor);

void RunBinary(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b, Dims* od,
               std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor);

// Binary units with a prefix on an operand: both operands in float32, the operation with broadcasting, the
// activation program, QuantizeLinear.
void RunBinaryFloat(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b,
                    Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor);

void RunGap(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
            const qie::ParallelFor& pfor);

// A global average pool whose operand has a prefix: the float values summed pixel by pixel in float32, / HW.
void RunGapFloat(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                 const qie::ParallelFor& pfor);

void RunConcat(const RegionPlan::Step& s, const std::vector<const Dims*>& ds, const std::vector<const uint8_t*>& xs,
               Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor);

void RunMaxPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor);

// A channel shuffle: y[p][j * g + i] = requant(x[p][i * C / g + j]) for each pixel p (g = s.M groups).
void RunShuffle(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor);

// A channel range [k[0], k[1]) of each pixel (ONNX Slice's start / end: negative from the end, clamped to [0, C]),
// requantized by table where the scales differ.
void RunSlice(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
              const qie::ParallelFor& pfor);

// Nearest upsampling by integer scales k = {sh, sw}: output pixel (oh, ow) is input pixel (oh / sh, ow / sw),
// requantized by table where the scales differ.
void RunResize(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
               const qie::ParallelFor& pfor);

// LRN as ORT's float kernel computes it on the dequantized codes, per pixel (NHWC: its channel window contiguous):
// squares, the window sum started at bias and slid by adding the head and subtracting the tail (ORT's order),
// y = Q(x * powf(sum, -beta)).
void RunLrn(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
            const qie::ParallelFor& pfor);

// y = Q(sum of the window's dequantized values / count), summed in float32 in ORT's order (rows, then columns).
void RunAvgPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor);

}  // namespace qie_ep
