// The EP's quantized Softmax unit: DequantizeLinear(x) -> Softmax(last axis) -> QuantizeLinear, per-tensor u8/s8
// on both sides (attention scores, a recogniser's class scores), claimed as one fused node and computed on the codes:
//   per row, the largest code m; e(v) = exp(-(m - v) * s_x) from a 256-entry table built at Compile (as ORT's
//   QLinearSoftmax does); sum = the sum of e over the row in double; y = Q(e * (1 / sum)). Rows of 512 codes and
//   more count their codes (a histogram), sum count[v] * e(v) over the values present and apply one 256-entry table
//   per row, t[v] = Q(e(v) * (1 / sum)), to the row's bytes (AVX512-VBMI permutes where present).
// That is the float QDQ graph's arithmetic as ORT's CPU kernels do it (MLAS's softmax: exp(x - max), the float
// reciprocal of the sum, a product; QuantizeLinear x / s rounded half to even), with libm's expf for MLAS's exp
// approximation, (m - v) * s for DQ(v) - DQ(m) (a few ulps of the argument) and the sum in double: codes within
// one step of ORT at ORT_DISABLE_ALL (docs/numerics.md). ORT's own INT8 path fuses the same nodes into
// QLinearSoftmax, ~3 ns per element on long rows; the histogram path costs ~1 cycle per element.
#pragma once
#include <string>
#include <vector>

#include "ep/graph.h"
#include "kernels/pacing.h"
#include "ep/units.h"

namespace qie_ep {

struct SoftmaxUnit {
  const OrtNode *dq = nullptr, *op = nullptr, *q = nullptr;
  std::vector<const OrtNode*> Nodes() const { return {dq, op, q}; }
};
// Whether `op` is the Softmax of such a unit (none of its nodes assigned to an EP yet).
bool MatchSoftmax(const OrtNode* op, SoftmaxUnit* u);

struct CompiledSoftmax {
  mutable Pacing pacing;  // the unit's run on the pool or the calling thread, learnt (pacing.h)
  bool adaptive = true;   // EP option "pacing"
  QParams in, out;
  float exp[256];    // exp(-k * s_x): the factor of a code k steps below the row's largest
  std::string name;  // the Softmax node's, for errors
};
// From the fused graph's nodes (the unit GetCapability claimed).
void CompileSoftmax(const std::vector<const OrtNode*>& nodes, CompiledSoftmax* c);
OrtStatus* ComputeSoftmax(const CompiledSoftmax& c, OrtKernelContext* ctx);

}  // namespace qie_ep
