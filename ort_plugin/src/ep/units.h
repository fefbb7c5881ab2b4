// QDQ units of the plugin EP's regions: which node groups qie can run in the integer domain, matched over ORT's
// graph API, and the constants they carry (tables, conv operands). Regions are formed from units in region.cc.
//
// Units (each one node group of the QDQ graph, each with its numpy-reference meaning):
//   conv:   DQ(x) -> Conv(., DQ(W) [, DQ(int32 bias)]) -> Q        = QLinearConv's arithmetic (reference.qlinear_conv)
//   table:  DQ(x) -> f -> Q, f an elementwise float subgraph of that one tensor and constants that are scalars or
//           per-channel vectors ([1,C,1,1], [C,1,1]; BatchNormalization's [C]): Relu, Clip, LeakyRelu, HardSigmoid,
//           HardSwish, Sigmoid, Tanh, Erf, Add/Sub/Mul/Div, Neg, Abs, Identity, BatchNormalization, and x * g(x)
//           forms (SiLU, Gelu) = one 256-entry table per channel, q -> Q(f(DQ(q))) in float32
//   binary: DQ(a), DQ(b) -> Add | Sub | Mul [-> unary activations] -> Q, 4-D with broadcasting
//                                                                     = the float QDQ arithmetic per element
//   gap:    DQ(x) -> GlobalAveragePool -> Q                           = integer sum, float mean, QuantizeLinear
//   concat: DQ(x_i) -> Concat(axis 1) -> Q                            = each input requantized to the output's scale
//   maxpool: DQ(x) -> MaxPool -> Q (2-D, no indices output)             = max of the codes, requantized
//   avgpool: DQ(x) -> AveragePool -> Q (2-D)                          = integer window sums, float mean, Q
//   shuffle: DQ(x) -> Reshape [N, g, C/g, H, W] -> Transpose (0, 2, 1, 3, 4) -> Reshape [N, C, H, W] -> Q
//            (ShuffleNet's channel shuffle; static C, H, W; an identity Q -> DQ pair after the first two nodes,
//            ORT's QDQ propagation, joins the unit)                  = codes moved, requantized by table
//   slice:  DQ(x) -> Slice (channel axis, constant start / end, step 1) -> Q (YOLO's C2f splits)
//                                                                     = a channel range's codes, requantized
//   resize: DQ(x) -> Resize (nearest, constant integer H / W scales, index = out / scale: asymmetric + floor or
//           half_pixel + round_prefer_floor / ceil) -> Q (YOLO's upsampling) = codes repeated, requantized
//   lrn:    DQ(x) -> LRN -> Q                                        = ORT's float LRN on the dequantized codes
//           (its channel-window sums in its order, powf), Q: within one step of ORT's (its pow is Eigen's)
//   (binary, gap and lrn operands may pass through an elementwise float prefix after their DQ: then in float32; concat
//   and shuffle operands through one of scalar constants: then in their requantization table)
// A unit's input DequantizeLinears may be shared with other units (a value read by a conv and a residual Add); a
// region takes a DequantizeLinear only with every one of its consumers.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "ep/graph.h"
#include "ops/conv_core.h"

namespace qie_ep {

enum class UnitKind { kConv, kTable, kBinary, kGap, kConcat, kMaxPool, kAvgPool, kShuffle, kLrn, kSlice, kResize };

// Where a table unit's per-channel constants run: along NCHW's axis 1 ([1,C,1,1], [C,1,1]; regions), or along the
// last axis ([N], [1,..,1,N]; the segments after a MatMul / Gemm unit, whose output is [rows][N]). `max_rank`: the
// rank a constant may have without raising its tensor's rank (kLast; 1 when that rank is unknown).
// `layout_ops` (kLast only): the segment may also hold Reshape and Transpose nodes; constants after them are scalars,
// so f runs on the [rows][N] values and the bytes are permuted afterwards (MatMul unit tails).
struct ConstLayout {
  enum Axis { kChannel, kLast } axis = kChannel;
  int64_t max_rank = 4;
  bool layout_ops = false;
};
inline bool IsLayoutOp(const OrtNode* n) { return IsOp(n, "Reshape") || IsOp(n, "Transpose"); }

struct Unit {
  UnitKind kind = UnitKind::kTable;
  std::vector<const OrtNode*> in_dqs;  // one DequantizeLinear per runtime operand, in operand order
  // Binary and global-average-pool units: per operand, the elementwise float nodes between its DequantizeLinear
  // and the op (empty: none), e.g. BatchNormalization -> HardSwish whose result the op and other units read.
  // Like a DequantizeLinear, a prefix node may be shared by several units of a region.
  std::vector<std::vector<const OrtNode*>> prefix;
  const OrtNode* op = nullptr;        // the Conv / Add / ... node (tables: the first node of f)
  const OrtNode* q = nullptr;         // the output QuantizeLinear
  std::vector<const OrtNode*> nodes;  // every node of the unit but its input DequantizeLinears
  ConstLayout layout;                 // table units: where their per-channel constants run
  // MatMul unit tails: Shape nodes reading a value of f (BERT's query path reads its Reshape's), each with the number
  // of the segment's layout nodes before that value; they join the unit, which outputs the dims they give.
  std::vector<std::pair<const OrtNode*, size_t>> shape_reads;
};

// Every unit of `nodes`, each node in at most one unit's `nodes`; nodes already assigned to an EP are skipped and
// a node whose reading fails is left out (claiming nothing is always safe).
std::vector<Unit> FindUnits(const std::vector<const OrtNode*>& nodes);

// A table unit DQ(x) -> f -> Q starting at `dq` whose constants run along `layout` (regions: 4-D values, NCHW
// channels; MatMul unit tails: any rank, the last axis).
bool MatchElementwise(const OrtNode* dq, const ConstLayout& layout, Unit* u);

// The operands of a conv unit, read from the graph.
struct ConvOperands {
  Constant sx, zx, w, sw, zw, sy, zy;
  ONNXTensorElementDataType xt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, wt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int32_t> bias;
  qie::ConvAttrs at;
};
bool MatchConv(const OrtNode* conv, Unit* u, ConvOperands* o);
// A shuffle unit's channels and groups (output channel j * g + i is input channel i * C / g + j).
struct ShuffleShape {
  size_t C = 0, groups = 0, H = 0, W = 0;
};
ShuffleShape ShuffleOf(const Unit& u);
// A resize unit's integer scales along H and W.
void ResizeScales(const Unit& u, int64_t* sh, int64_t* sw);
// A slice unit's start and end along the channel axis, as written (negative: from the end; clamped at run time).
void SliceRange(const Unit& u, int64_t* start, int64_t* end);
// A MaxPool's or AveragePool's window attributes in the conv geometry's terms.
qie::ConvAttrs PoolAttrs(const OrtNode* n);

// A unit input's or output's per-tensor quantization.
struct QParams {
  float scale = 1.0f;
  int32_t zp = 0;
  bool is_signed = false;
};
QParams InputParams(const OrtNode* dq);  // of a unit's input DequantizeLinear
QParams OutputParams(const OrtNode* q);  // of its QuantizeLinear

// q = saturate(round_half_even(v / s) + zp), as ORT's QuantizeLinear (MLAS) computes it; the byte of the code.
// Branch-free so loops over it vectorize: NaN goes to the bottom code (MLAS's max(x / s, lo) first; measured on ORT
// 1.31: 0 / -128 whatever the zero point), the clamped value
// (|x| <= 510) is rounded half to even by adding and subtracting 1.5 * 2^23 (exact below 2^22).
struct Quantizer {
  float scale, lo, hi;
  int32_t zp;
  explicit Quantizer(const QParams& p)
      : scale(p.scale),
        lo(static_cast<float>((p.is_signed ? -128 : 0) - p.zp)),
        hi(static_cast<float>((p.is_signed ? 127 : 255) - p.zp)),
        zp(p.zp) {}
  uint8_t operator()(float v) const {
    float x = v / scale;
    x = x == x ? x : lo;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    constexpr float kMagic = 12582912.0f;
    x = (x + kMagic) - kMagic;
    return static_cast<uint8_t>(static_cast<int32_t>(x) + zp);
  }
};
inline uint8_t QuantizeOne(float v, const QParams& p) { return Quantizer(p)(v); }
// y[i] = q(x[i]) for i < n, vectorized for the CPU (region_steps.cc). A loop of q's calls writing bytes through a
// pointer that may alias q stays scalar, reloading q's fields on every element.
void QuantizeBlock(const float* x, size_t n, const Quantizer& q, uint8_t* y);
// The code of byte b.
inline int32_t Code(uint8_t b, bool is_signed) { return is_signed ? static_cast<int8_t>(b) : b; }

// ORT's QLinearAdd / QLinearMul arithmetic: what ORT runs for DQ(a), DQ(b) -> Add / Mul -> Q on u8 tensors from
// ORT_ENABLE_EXTENDED on, its QDQ fusion, on x86 with AVX2 (MLAS's kernels; checked bit for bit against ORT 1.31 on
// every pair of codes, tests/ort/test_ep_qlinear_binary.py). Add, in float32 with fused multiply-adds as the wheel's
// AVX2 kernel computes it: rx = sx / sout, ry likewise, fixed = zout - fma(rx, zx, ry * zy), v = fma(x, rx, fma(y, ry,
// fixed)) on the raw codes, x the operand ORT walks as a span and y the other (ORT swaps the operands when the first is
// the one broadcast along the innermost axis: FirstIsScalar). Mul: v = float((x - zx) * (y - zy)) * ((sx * sy) /
// sout) + zout, a product then a sum. Then cvtps (half to even; NaN or |v| >= 2^31 give INT_MIN) and saturation.
// Within one step of the float QDQ graph, Q(DQ(a) op DQ(b)).
struct QLinearBinary {
  bool mul = false;
  float rx = 0, ry = 0, fixed = 0;  // add
  float ratio = 0, zout = 0;        // mul
  int32_t zx = 0, zy = 0;
  QLinearBinary(char op, const QParams& x, const QParams& y, const QParams& out)
      : mul(op == '*'),
        rx(x.scale / out.scale),
        ry(y.scale / out.scale),
        fixed(static_cast<float>(out.zp) - std::fma(rx, static_cast<float>(x.zp), ry * static_cast<float>(y.zp))),
        ratio((x.scale * y.scale) / out.scale),
        zout(static_cast<float>(out.zp)),
        zx(x.zp),
        zy(y.zp) {}
  // the output code of u8 codes x, y (Mul == mul: the loops that call it have no branch to vectorize around)
  uint8_t operator()(int32_t x, int32_t y) const { return mul ? Apply<true>(x, y) : Apply<false>(x, y); }
  template <bool Mul>
  uint8_t Apply(int32_t x, int32_t y) const {
    float v = Mul ? static_cast<float>((x - zx) * (y - zy)) * ratio + zout
                  : std::fma(static_cast<float>(x), rx, std::fma(static_cast<float>(y), ry, fixed));
    v = v < 2147483648.0f ? v : -2147483648.0f;  // cvtps: NaN and overflow give INT_MIN
    v = v < 0.0f ? 0.0f : v;
    v = v > 255.0f ? 255.0f : v;
    constexpr float kMagic = 12582912.0f;  // round half to even (0 <= v <= 255)
    v = (v + kMagic) - kMagic;
    return static_cast<uint8_t>(static_cast<int32_t>(v));  // through int32: vectorizes
  }
};

// A table unit's f as float32 operations on [rows][C] lanes (constants per channel, scalars expanded to C):
// evaluated on the 256 input codes to build its tables and, where it is plain arithmetic (no libm function), on
// data by the region's per-channel steps: the same operations in the same order, so both give the same codes.
struct FloatProgram {
  enum class Op : uint8_t {
    kAdd,
    kSub,
    kMul,
    kDiv,
    kRSub,
    kRDiv,
    kAffine,
    kClip,
    kRelu,
    kLeakyRelu,
    kHardSigmoid,
    kHardSwish,
    kSigmoid,
    kTanh,
    kErf,
    kGelu,
    kGeluTanh,
    kNeg,
    kAbs,
    kCopy
  };
  struct Step {
    Op op = Op::kCopy;
    int a = 0, b = -1;          // operand registers (0: the input; i + 1: step i's result; -1: the constant)
    std::vector<float> ka, kb;  // kAffine: x * ka + kb; binary ops: kb when b < 0 (kRSub: kb - x, kRDiv: kb / x)
    float alpha = 0, beta = 0, lo = 0, hi = 0;
  };
  std::vector<Step> steps;
  int result = 0;
  size_t C = 1;            // channels of the constants
  size_t block_rows = 1;   // rows the constants are laid out for
  bool arithmetic = true;  // no Sigmoid / Tanh / Erf / Gelu
  // Lays the constants out as [rows][channels] (a scalar constant as `channels` equal entries), so that steps
  // run as flat loops over up to `rows` rows.
  void Expand(size_t channels, size_t rows);
};
FloatProgram CompileTable(const Unit& u);
// The float program of `nodes` (but Q and constant DQs) from `input` (register 0) to what `q` reads.
FloatProgram CompileProgram(const OrtValueInfo* input, const std::vector<const OrtNode*>& nodes, const OrtNode* q);
// The same to `result`.
FloatProgram CompileProgramTo(const OrtValueInfo* input, const std::vector<const OrtNode*>& nodes,
                              const OrtValueInfo* result, const ConstLayout& layout = {});
// Runs `p` on x ([rows][p.C] floats); `regs` is scratch; returns the result's [rows][p.C] floats.
const float* RunProgram(const FloatProgram& p, const float* x, size_t rows, std::vector<std::vector<float>>* regs);

// A table unit's tables, [C][256] (C = 1 when every constant is a scalar).
// `qlinear` (optional) tells whether it is ORT's QLinearAdd / QLinearMul of a quantized constant (units.cc
// QLinearTable): then the table is not the unit's float program, which must not run in its place.
std::vector<uint8_t> EvalTable(const Unit& u, size_t* C, bool* qlinear = nullptr);

// `*table` ([*tC][256] + 3 bytes of padding; *tC = 1: one table) followed by `t` ([C][256], C = 1: one table),
// composed in place: table[c][k] = t[c][table[c][k]]. Per-channel tables of different channel counts: Failure. An
// empty table is the identity (Requant's for equal parameters): `t` empty leaves `*table`, `*table` empty becomes `t`.
void ComposeTables(std::vector<uint8_t>* table, size_t* tC, const std::vector<uint8_t>& t, size_t C);

}  // namespace qie_ep
