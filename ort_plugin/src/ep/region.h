// Quantized regions of the plugin EP: connected groups of QDQ units (units.h) joined by QuantizeLinear ->
// DequantizeLinear edges, claimed as one fused node and run in uint8/int8 end to end, NHWC inside.
//
// A region is a set of units whose input DequantizeLinears have all their consumers in the region, convex in
// the graph (no path leaves it and comes back), with at least `min_conv_units` convolutions. Its inputs are the
// quantized tensors its DequantizeLinears read from outside (or, where such a tensor is a per-tensor QuantizeLinear's
// output of a 4-D float tensor that only the region reads and that depends on nothing in it, that float tensor: the
// QuantizeLinear joins the region and runs on entry, an image's input quantization); its outputs are its
// QuantizeLinears' results that nodes outside (or the graph's outputs) read. Matching (which nodes) is here; planning
// (shapes, packed weights, composed tables, buffer slots) happens at Compile; execution runs the units in topological
// order.
#pragma once
#include <onnxruntime_c_api.h>

#include <memory>
#include <string>
#include <vector>

namespace qie_ep {

struct RegionPlan;  // compiled form (region.cc)

struct RegionOptions {
  // A region needs this many convolutions. Measured on PP-OCRv6 rec: table-only islands (DQ -> Div -> Erf -> Q,
  // lone Sigmoids) and lone convs stopped ORT's own Gelu / QDQ fusions around them and made the model slower.
  size_t min_conv_units = 2;
  bool profile = false;     // time each unit kind and the layout changes (RegionProfile)
  bool pacing = true;       // each step learns whether the intra-op pool pays off for it (RegionPlan::Pacing)
  bool conv_tables = true;  // a table after a conv runs in the conv's tasks (FuseConvTables)
  bool team = true;         // the run's parallel sections on one team of pool tasks (team.h)
};

// What MatchRegions found, for the EP's log.
struct RegionReport {
  size_t units = 0;           // QDQ units matched
  size_t units_claimed = 0;   // of them, in a region
  size_t dropped_cycles = 0;  // regions dropped because fusing them would close a cycle
};

// Every region of `nodes` (a whole graph at GetCapability): the node groups to fuse, each in graph order. Nodes
// already assigned to an EP are never part of a region.
std::vector<std::vector<const OrtNode*>> MatchRegions(const std::vector<const OrtNode*>& nodes,
                                                      const RegionOptions& opts, RegionReport* report = nullptr);

// Builds the plan of the one region in a fused subgraph (throws when the subgraph is not one region) with the
// fused node's input and output names; the caller owns it and frees it with ReleaseRegion.
RegionPlan* CompileRegion(const std::vector<const OrtNode*>& nodes, const std::vector<std::string>& inputs,
                          const std::vector<std::string>& outputs, const RegionOptions& opts);
OrtStatus* RunRegion(RegionPlan& plan, OrtKernelContext* ctx);
void ReleaseRegion(RegionPlan* plan);

// Time spent per unit kind in regions compiled with `profile`, since load or the last reset: the names, space
// separated ("conv table binary gap concat maxpool avgpool layout"), and per kind nanoseconds and runs.
const char* RegionProfileNames();
size_t RegionProfile(int64_t* ns, int64_t* calls, size_t n);
// The same per step, one line each: its unit's op node ("Conv 'name'"), nanoseconds and runs, tab separated.
std::string RegionStepProfile();
void ResetRegionProfile();

}  // namespace qie_ep
