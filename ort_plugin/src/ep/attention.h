// The EP's quantized attention unit: the QDQ core of a transformer's self-attention, claimed as one fused node
//   scores = Q1(DQ(a) @ DQ(b))                      (a: the query codes, b: the transposed key codes)
//   p      = Q2(softmax_last(f(DQ(scores))))          f: up to six float steps, each an Add / Sub / Mul / Div by a
//                                                     scalar constant or (Add, once) by a mask that broadcasts
//                                                     (runtime or constant); after softmax optionally
//                                                     Where(IsNaN(p), c, p) (torch's fully masked rows)
//   y      = Q3(DQ(p) @ DQ(v))
// with per-tensor scales and u8 / s8 codes everywhere, plus Shape nodes reading DQ(a) / DQ(b) / DQ(v) (the head
// split's shape arithmetic): the unit outputs the dims they give. Both products are integer GEMMs (qie's kernels,
// B packed per call), requantized as ORT's QLinearMatMul does ((s_a * s_b) / s_y in float32, the float product
// clamped, rounded half to even): equal to ORT's fused QLinearMatMul at ORT_ENABLE_EXTENDED / ALL, within one step
// of the float graph (ORT_DISABLE_ALL / BASIC). The softmax in between is the float graph's arithmetic per row
// ((q - z) * s, the steps in order, exp(x - max) * (1 / sum), Q), with libm's expf where MLAS has its exp
// approximation and the sum in double: within one step of ORT's (docs/numerics.md).
// ORT runs the same nodes as ~14 kernels per layer (two QLinearMatMuls, DQ / Add / Softmax / IsNaN / Where / Q).
#pragma once
#include <string>
#include <vector>

#include "ep/graph.h"
#include "kernels/pacing.h"
#include "ep/units.h"

namespace qie_ep {

struct AttentionUnit {
  const OrtNode *dq_a = nullptr, *dq_b = nullptr, *mm1 = nullptr, *q1 = nullptr, *dq1 = nullptr;
  std::vector<const OrtNode*> steps;  // the float steps between dq1 and the softmax, in order
  const OrtNode* softmax = nullptr;
  const OrtNode *isnan = nullptr, *where = nullptr;  // optional, both or none
  const OrtNode *q2 = nullptr, *dq2 = nullptr, *dq_v = nullptr, *mm2 = nullptr, *q3 = nullptr;
  std::vector<const OrtNode*> shape_reads;  // Shape nodes reading dq_a's, dq_b's or dq_v's output
  std::vector<const OrtNode*> Nodes() const;
};
// Whether `mm1` is the first MatMul of such a unit (none of its nodes assigned to an EP yet).
bool MatchAttention(const OrtNode* mm1, AttentionUnit* u);

struct CompiledAttention {
  mutable Pacing pacing;  // the unit's run on the pool or the calling thread, learnt (pacing.h)
  bool adaptive = true;   // EP option "pacing"
  QParams a, b, scores, p, v, y;
  float mult1 = 0.0f, mult2 = 0.0f;  // (s_a * s_b) / s_scores, (s_p * s_v) / s_y in float32
  struct Step {
    char op = '+';            // + - * /
    bool value_first = true;  // the running value is the op's first operand
    bool mask = false;        // the other operand is the mask (else `scalar`)
    float scalar = 0.0f;
  };
  std::vector<Step> steps;
  int mask_input = -1;            // the fused node's input holding the mask (-1: constant or none)
  std::vector<float> mask_const;  // a constant mask
  std::vector<int64_t> mask_const_shape;
  bool nan_where = false;
  float nan_value = 0.0f;
  int a_input = 0, b_input = 0, v_input = 0, y_output = 0;
  struct ShapeOut {
    int output = 0;
    int of = 0;  // 0: a, 1: b, 2: v
    int64_t start = 0, end = INT64_MAX;
  };
  std::vector<ShapeOut> shape_outs;
  std::string name;  // the Softmax node's, for errors
};
// From the fused graph (the unit GetCapability claimed; checked) and the fused node.
void CompileAttention(const OrtGraph* graph, const OrtNode* fused, CompiledAttention* c);
OrtStatus* ComputeAttention(const CompiledAttention& c, OrtKernelContext* ctx);

}  // namespace qie_ep
