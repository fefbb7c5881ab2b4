// Quantized regions of the plugin EP: chains of QDQ units joined by QuantizeLinear -> DequantizeLinear pairs,
// claimed as one fused node and run in uint8/int8 end to end.
//
// Units (each one node group of the QDQ graph, each with its numpy-reference meaning):
//   conv:  DQ(x) -> Conv(., DQ(W) [, DQ(int32 bias)]) -> Q       = QLinearConv's arithmetic (reference.qlinear_conv)
//   table: DQ(x) -> f -> Q, f any elementwise float subgraph of that one tensor and scalar constants (Relu, Clip,
//          LeakyRelu, HardSigmoid, HardSwish, Sigmoid, Tanh, Erf, Add/Sub/Mul/Div, x * g(x) forms: SiLU, Gelu)
//          = a 256-entry table q -> Q(f(DQ(q))) built with the same float32 operations (reference.table_unit)
// A region is a maximal chain of units where each unit's output Q feeds only the next unit's DQ. Matching
// (which nodes) is here; planning (shapes, packed weights, composed tables) happens at Compile; execution runs
// the chain on qie's NHWC convolution kernels with tables applied in place. Three parts, one file each would
// be tidier once more unit kinds exist.
#pragma once
#include <onnxruntime_c_api.h>

#include <memory>
#include <string>
#include <vector>

namespace qie_ep {

struct RegionPlan;  // compiled form (region.cc)

struct RegionOptions {
  size_t min_conv_units = 2;  // a chain with convolutions needs this many of them (a lone conv gains nothing on MLAS)
  // Regions of tables alone (no convolution). Off: measured on PP-OCRv6 rec, claiming DQ -> Div -> Erf -> Q
  // and Sigmoid islands stopped ORT's own Gelu / QDQ fusions around them and made the model 2.3x slower.
  bool table_regions = false;
};

// Every region of `nodes` (a whole graph at GetCapability, or one fused subgraph at Compile): the node groups
// to fuse, in graph order. Nodes already assigned to an EP are never part of a region.
std::vector<std::vector<const OrtNode*>> MatchRegions(const std::vector<const OrtNode*>& nodes,
                                                      const RegionOptions& opts);

// Builds the plan of the one region in a fused subgraph (throws when the subgraph is not one region); the
// caller owns it and frees it with ReleaseRegion.
RegionPlan* CompileRegion(const std::vector<const OrtNode*>& nodes, const std::string& input_name);
OrtStatus* RunRegion(RegionPlan& plan, OrtKernelContext* ctx);
void ReleaseRegion(RegionPlan* plan);

}  // namespace qie_ep
