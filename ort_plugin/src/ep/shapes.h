// The EP's shape units: a Shape node with the Gather (constant index, axis 0) -> Unsqueeze (axes [0]) nodes that
// pick its dims, and the DequantizeLinear before it when the Shape is all that reads it, claimed as one fused node
// that reads only its input's dims. A torch export with dynamic axes computes every Reshape's target this way
// (BERT: ~100 such nodes in 6 layers, each an ORT kernel call; after ORT's QDQ pass gives each consumer its own
// DequantizeLinear, ~30 of them dequantize a whole tensor only for its Shape). Integers only: exact.
#pragma once
#include <string>
#include <vector>

#include "ep/graph.h"

namespace qie_ep {

struct ShapeUnit {
  const OrtNode* dq = nullptr;  // the DequantizeLinear the Shape alone reads (nullptr: none)
  const OrtNode* shape = nullptr;
  std::vector<const OrtNode*> gathers;     // reading the Shape's output
  std::vector<const OrtNode*> unsqueezes;  // each reading one of the gathers
  std::vector<const OrtNode*> Nodes() const;
};
// Whether `shape` is the Shape node of such a unit with something to fuse (a DequantizeLinear or a Gather).
bool MatchShapeUnit(const OrtNode* shape, ShapeUnit* u);

struct CompiledShapes {
  int64_t start = 0, end = INT64_MAX;  // the Shape's
  struct Out {
    int output = 0;              // the fused node's output
    int kind = 0;                // 0: the Shape's dims, 1: a Gather's, 2: an Unsqueeze of a Gather
    std::vector<int64_t> index;  // the Gather's indices
    bool scalar = false;         // the Gather's indices are a scalar (its output is 0-D)
  };
  std::vector<Out> outs;
  std::string name;  // the Shape node's, for errors
};
void CompileShapes(const OrtGraph* graph, const OrtNode* fused, CompiledShapes* c);
OrtStatus* ComputeShapes(const CompiledShapes& c, OrtKernelContext* ctx);

}  // namespace qie_ep
