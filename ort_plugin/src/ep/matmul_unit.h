// The EP's QDQ MatMul / Gemm unit: DequantizeLinear(x) -> MatMul | Gemm(., DequantizeLinear(W) [,
// DequantizeLinear(int32 bias)]) -> QuantizeLinear with constant W, its elementwise tail segments and its output
// DequantizeLinear, claimed as one fused node and computed in the integer domain (the numerics: matmul_unit.cc's
// opening comment, docs/numerics.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ep/graph.h"
#include "ep/region_plan.h"
#include "ep/units.h"
#include "kernels/gemm.h"

namespace qie_ep {

// A matched unit: its nodes (the op is MatMul, or Gemm with an optional DequantizeLinear'd int32 bias).
struct MatMulUnit {
  // q nullptr: a float unit, the op's float output read by the norm tail alone (no QuantizeLinear between them: `qie
  // quantize` leaves a residual sum's MatMul outputs float); it is a unit only with that tail.
  const OrtNode *dq_x = nullptr, *dq_w = nullptr, *matmul = nullptr, *q = nullptr, *dq_bias = nullptr;
  // The DequantizeLinear that is the Q's only consumer, with the Q's scale and zero point: the unit then outputs
  // its float values, (q - zy) * sy, and the Q -> DQ pair costs ORT no nodes (nullptr: the codes are the output).
  const OrtNode* dq_out = nullptr;
  bool trans_b = false;
  std::vector<Unit> tail;  // the DQ -> f -> Q segments after q, in order
  // After dq_out, a transformer's residual LayerNorm: [Add(bias)] -> Add(residual, a runtime tensor of the same
  // shape) -> LayerNormalization(last axis) -> Q; the unit then outputs that Q's codes. A float unit's tail may end
  // at the LayerNormalization or at the residual Add (a pre-LN block's sum): it outputs those float values.
  // last: the tail's last node (null: no tail).
  // A float unit's LayerNormalization may also feed a Mul by a column constant and its Q (`qie quantize`'s SmoothQuant
  // division) while other nodes read its value: the unit then outputs both.
  struct Norm {
    const OrtNode *add_bias = nullptr, *add_res = nullptr, *ln = nullptr, *mul = nullptr, *q = nullptr, *last = nullptr;
    const OrtValueInfo* residual = nullptr;
  } norm;
  // Else, after dq_out, an Add of a float constant of 1 or N values along the last axis (a Linear's bias before float
  // ops: a classifier's logits): the unit outputs that sum (nullptr: none).
  const OrtNode* out_bias = nullptr;
  const OrtNode* last_q() const { return tail.empty() ? q : tail.back().q; }
  bool Complete() const { return q || norm.last; }  // a float unit whose norm tail another claim took is none
  void DropOutput() {  // the unit outputs the codes: neither dq_out nor the norm or bias tail is its to take
    dq_out = nullptr;
    norm = {};
    out_bias = nullptr;
  }
  std::vector<const OrtNode*> Nodes() const {
    std::vector<const OrtNode*> v = {dq_x, dq_w};
    if (dq_bias) v.push_back(dq_bias);
    v.push_back(matmul);
    if (q) v.push_back(q);
    for (const Unit& seg : tail) {
      v.push_back(seg.in_dqs[0]);
      v.insert(v.end(), seg.nodes.begin(), seg.nodes.end());
      for (const auto& r : seg.shape_reads) v.push_back(r.first);
    }
    if (dq_out) v.push_back(dq_out);
    for (const OrtNode* n : {norm.add_bias, norm.add_res, norm.ln, norm.mul, norm.q})
      if (norm.last && n) v.push_back(n);
    if (out_bias) v.push_back(out_bias);
    return v;
  }
};

// The unit's operands, read from the graph (GetCapability) or from the fused graph (Compile).
struct UnitOperands {
  Constant w, sw, zw, sx, zx, sy, zy;
  ONNXTensorElementDataType wt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, xt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t K = 0, N = 0;
  std::vector<int32_t> bias;
};

// Whether `op` is the MatMul / Gemm of such a unit; fills its nodes (tail segments and output DequantizeLinear as
// far as they can join it) and operands.
bool MatchUnit(const OrtNode* op, MatMulUnit* u, UnitOperands* o);
const OrtNode* DequantizedBySame(const OrtNode* q, const Constant& sy, const Constant& zy);

// Drops the tail's segments from the first one holding a node `gone` says is not the unit's to take (claimed by
// another group, or outside the fused graph at Compile); the unit then outputs the codes before it.
template <typename Pred>
void TrimTail(MatMulUnit* u, Pred gone) {
  if (u->norm.last) {  // the norm tail goes first (it reads dq_out)
    bool out = false;
    for (const OrtNode* n : {u->norm.add_bias, u->norm.add_res, u->norm.ln, u->norm.mul, u->norm.q})
      out = out || (n && gone(n));
    if (out || (u->dq_out && gone(u->dq_out))) u->norm = {};
  }
  if (u->out_bias && (gone(u->out_bias) || (u->dq_out && gone(u->dq_out)))) u->out_bias = nullptr;
  for (size_t i = 0; i < u->tail.size(); ++i) {
    bool out = gone(u->tail[i].in_dqs[0]);
    for (const OrtNode* m : u->tail[i].nodes) out = out || gone(m);
    for (const auto& r : u->tail[i].shape_reads) out = out || gone(r.first);
    if (!out) continue;
    u->tail.resize(i);
    u->norm = {};
    u->out_bias = nullptr;
    Constant sy, zy;  // what reads the codes now: perhaps a DequantizeLinear that `gone` also says is not the unit's
    u->dq_out = QOperands(u->last_q(), &sy, &zy) ? DequantizedBySame(u->last_q(), sy, zy) : nullptr;
    return;
  }
}

struct CompiledMatMul {
  Pacing pacing;         // the unit's run on the pool or the calling thread, learnt (pacing.h)
  bool adaptive = true;  // EP option "pacing"
  qie::PackedB packed;
  const qie::MicroKernel* uk = nullptr;
  size_t K = 0, N = 0;
  bool x_signed = false;
  int32_t zx = 0;
  std::vector<int32_t> zw;
  std::vector<float> mult;  // (sx * sw[n]) / sy, in float32 as ORT evaluates it
  qie::OutKind kind = qie::OutKind::kU8;
  int32_t zy = 0;
  std::vector<int32_t> bias;  // Gemm's C, per column (empty: none)
  bool gemm = false;          // Gemm: x must be 2-D
  // The tail: its leading per-column segments of plain arithmetic run on the data (programs.chain, each as its
  // table was built: the same codes, no [N][256] tables to read), the others composed into one table
  // (output code = table[column][code], [tC][256] + 3 bytes; empty: none).
  RegionPlan::Step programs;
  std::vector<uint8_t> table;
  size_t tC = 1;
  // The tail's Reshape / Transpose nodes in order, applied to the [rows][N] codes at the end (their values in between
  // only met scalar constants).
  struct LayoutStep {
    bool transpose = false;
    std::vector<int64_t> perm;   // Transpose (empty: reversed axes)
    std::vector<int64_t> shape;  // Reshape: its constant shape, or
    int input = -1;              // the fused node's input holding it
    bool allowzero = false;
    std::string name;  // the node's, for errors
  };
  std::vector<LayoutStep> layout;
  // The tail's Shape nodes: the fused node's output each fills, the layout steps before the value it reads, and its
  // start / end attributes.
  struct ShapeOut {
    int output = 0;
    size_t steps = 0;
    int64_t start = 0, end = INT64_MAX;
  };
  std::vector<ShapeOut> shape_outs;
  int y_output = 0;             // the fused node's output of the codes (or their float values)
  QParams out;                  // the last QuantizeLinear's scale, zero point and type
  bool float_out = false;       // the unit ends with that Q's DequantizeLinear: outputs (q - zp) * scale
  bool float_acc = false;       // a float unit: the norm tail reads float(acc) * mult[n] (mult = sx * sw[n])
  std::vector<float> out_bias;  // [N]: then outputs (q - zp) * scale + out_bias[n] (MatMulUnit::out_bias)
  int x_input = 0;              // the fused node's input holding x
  // The norm tail (MatMulUnit::Norm): y = Q(LayerNorm(float(q - zp) * scale + bias[n] + residual) * gamma + beta).
  struct CompiledNorm {
    bool on = false;
    bool ln = true, quantized = true;      // a float unit's tail: LayerNormalization or not; Q after it or not
    std::vector<float> mul;                // [N]: the Mul between the LayerNormalization and the Q (empty: none)
    int ln_output = -1;                    // the fused node's output of the LayerNormalization's values (-1: none)
    std::vector<float> bias, gamma, beta;  // [N] each (bias, beta empty: none)
    float epsilon = 1e-5f;
    int residual = -1;  // the fused node's input
    QParams out;
    std::string name;  // the LayerNormalization's, for errors
  } norm;
  std::string x_name;
};

// From the fused graph (the unit GetCapability claimed; checked) and the fused node.
void CompileMatMul(const OrtGraph* graph, const OrtNode* fused, CompiledMatMul* c);
OrtStatus* ComputeMatMul(CompiledMatMul& c, OrtKernelContext* ctx);

// The nodes of a graph.
inline std::vector<const OrtNode*> GraphNodes(const OrtGraph* graph) {
  size_t n = 0;
  Check(g_api->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) Check(g_api->Graph_GetNodes(graph, nodes.data(), n));
  return nodes;
}

}  // namespace qie_ep
