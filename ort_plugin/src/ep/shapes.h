// The EP's shape units (ShapeUnit below), each claimed as one fused node that reads only its input's dims. A torch
// export with dynamic axes computes every Reshape's target this way (BERT: ~180 such nodes in 6 layers, each an ORT
// kernel call; after ORT's QDQ pass gives each consumer its own DequantizeLinear, ~30 of them dequantize a whole
// tensor only for its Shape). Integers only: exact.
#pragma once
#include <string>
#include <vector>

#include "ep/graph.h"

namespace qie_ep {

// Every Shape node reading one tensor x, with the Gather (constant index, axis 0) -> Unsqueeze (axes [0]) nodes that
// pick their dims and the Concats (axis 0) of those and int64 constants (the Reshape targets: BERT's four per layer
// read two or three Shapes of the same tensor, and each Gather feeds four Concats), and the DequantizeLinear before x
// when one Shape is all that reads it: one fused node reading only x's dims.
struct ShapeUnit {
  const OrtNode* dq = nullptr;             // the DequantizeLinear the Shape alone reads (nullptr: none)
  std::vector<const OrtNode*> shapes;      // reading x; shapes[0] anchors the unit
  std::vector<const OrtNode*> gathers;     // reading a Shape's output
  std::vector<const OrtNode*> unsqueezes;  // each reading one of the gathers
  std::vector<const OrtNode*> concats;     // of unsqueezes and constants only
  std::vector<const OrtNode*> Nodes() const;
};
// Whether `shape` is the first Shape node reading its input, of such a unit with something to fuse (a
// DequantizeLinear or a Gather).
bool MatchShapeUnit(const OrtNode* shape, ShapeUnit* u);

struct CompiledShapes {
  struct Out {
    int output = 0;                      // the fused node's output
    int kind = 0;                        // 0: a Shape's dims, 1: a Gather's, 2: an Unsqueeze of a Gather, 3: a Concat
    int64_t start = 0, end = INT64_MAX;  // the Shape's
    std::vector<int64_t> index;          // the Gather's indices
    bool scalar = false;                 // the Gather's indices are a scalar (its output is 0-D)
    struct Piece {                       // a Concat's input: a constant's values, or one dim (a kind-2 Out)
      std::vector<int64_t> values;
      int64_t start = 0, end = INT64_MAX, index = 0;
    };
    std::vector<Piece> pieces;
  };
  std::vector<Out> outs;
  std::string name;  // the first Shape node's, for errors
};
void CompileShapes(const OrtGraph* graph, const OrtNode* fused, CompiledShapes* c);
OrtStatus* ComputeShapes(const CompiledShapes& c, OrtKernelContext* ctx);

}  // namespace qie_ep
