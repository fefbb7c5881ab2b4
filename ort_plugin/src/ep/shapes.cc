// The EP's shape units (shapes.h).
#include "ep/shapes.h"

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "ep/matmul_unit.h"

namespace qie_ep {

std::vector<const OrtNode*> ShapeUnit::Nodes() const {
  std::vector<const OrtNode*> v;
  if (dq) v.push_back(dq);
  v.push_back(shape);
  v.insert(v.end(), gathers.begin(), gathers.end());
  v.insert(v.end(), unsqueezes.begin(), unsqueezes.end());
  return v;
}

namespace {

// A Gather of the shape vector `dims` along axis 0 with constant integer indices (a scalar or 1-D).
bool ShapeGather(const OrtNode* g, const OrtValueInfo* dims, std::vector<int64_t>* index, bool* scalar) {
  if (!IsOp(g, "Gather") || AttrInt(g, "axis", 0) != 0) return false;
  const auto in = Inputs(g);
  if (in.size() != 2 || in[0] != dims || Outputs(g).size() != 1) return false;
  Constant k;
  if (!ReadConstant(in[1], &k) || k.shape.size() > 1) return false;
  index->clear();
  for (size_t i = 0; i < k.count(); ++i) {
    if (k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
      index->push_back(static_cast<const int64_t*>(k.data)[i]);
    else if (k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      index->push_back(static_cast<const int32_t*>(k.data)[i]);
    else
      return false;
  }
  *scalar = k.shape.empty();
  return true;
}

// An Unsqueeze of a 0-D value to [1] (axes [0] or [-1], an attribute before opset 13, a constant input from 13).
bool UnsqueezeToOne(const OrtNode* u, const OrtValueInfo* v) {
  if (!IsOp(u, "Unsqueeze") || Outputs(u).size() != 1) return false;
  const auto in = Inputs(u);
  if (in.empty() || in[0] != v) return false;
  std::vector<int64_t> axes = AttrInts(u, "axes");
  if (const OrtValueInfo* a = Input(in, 1)) {
    Constant k;
    if (!ReadConstant(a, &k) || k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) return false;
    axes.assign(static_cast<const int64_t*>(k.data), static_cast<const int64_t*>(k.data) + k.count());
  }
  return axes.size() == 1 && (axes[0] == 0 || axes[0] == -1);
}

}  // namespace

bool MatchShapeUnit(const OrtNode* shape, ShapeUnit* u) {
  *u = ShapeUnit{};
  if (!IsOp(shape, "Shape") || Inputs(shape).size() != 1 || Outputs(shape).size() != 1) return false;
  const OrtValueInfo* x = Inputs(shape)[0];
  const OrtValueInfo* dims = Outputs(shape)[0];
  if (!x || !dims) return false;
  u->shape = shape;
  // The DequantizeLinear only this Shape reads: its codes have the same dims.
  // (asked only then: for a fused graph's input or a value another fused node produces, ORT logs a warning)
  const OrtNode* dq = !IsGraphOutput(x) && !IsRequiredGraphInput(x) && Consumers(x) == 1 ? Producer(x) : nullptr;
  Constant unused, s, z;
  ONNXTensorElementDataType t;
  if (dq && DqOperands(dq, true, 0, &unused, &s, &z, &t)) u->dq = dq;
  for (const OrtNode* g : AllConsumers(dims)) {
    std::vector<int64_t> index;
    bool scalar = false;
    if (!ShapeGather(g, dims, &index, &scalar)) continue;
    u->gathers.push_back(g);
    if (!scalar) continue;
    const OrtValueInfo* gv = Outputs(g)[0];
    for (const OrtNode* q : AllConsumers(gv))
      if (UnsqueezeToOne(q, gv)) u->unsqueezes.push_back(q);
  }
  return u->dq || !u->gathers.empty();
}

void CompileShapes(const OrtGraph* graph, const OrtNode* fused, CompiledShapes* c) {
  const std::vector<const OrtNode*> nodes = GraphNodes(graph);
  ShapeUnit u;
  const OrtNode* shape = nullptr;
  for (const OrtNode* n : nodes)
    if (IsOp(n, "Shape")) shape = n;
  const std::unordered_set<const OrtNode*> in_graph(nodes.begin(), nodes.end());
  if (!shape || !MatchShapeUnit(shape, &u)) throw Failure{"fused graph is not the shape unit claimed"};
  // At Compile a node outside the fused graph is not among the consumers: keep what is in it.
  auto inside = [&](std::vector<const OrtNode*>* v) {
    v->erase(std::remove_if(v->begin(), v->end(), [&](const OrtNode* n) { return !in_graph.count(n); }), v->end());
  };
  inside(&u.gathers);
  inside(&u.unsqueezes);
  if (u.dq && !in_graph.count(u.dq)) u.dq = nullptr;
  if (u.Nodes().size() != nodes.size()) throw Failure{"fused graph is not the shape unit claimed"};
  c->name = NodeName(shape);
  c->start = AttrInt(shape, "start", 0);
  c->end = AttrInt(shape, "end", INT64_MAX);
  c->outs.clear();
  auto add = [&](const OrtNode* n, int kind, const std::vector<int64_t>& index, bool scalar) {
    const int o = IndexByName(Outputs(fused), Outputs(n)[0]);  // -1: read inside the node only
    if (o >= 0) c->outs.push_back({o, kind, index, scalar});
  };
  add(shape, 0, {}, false);
  for (const OrtNode* g : u.gathers) {
    std::vector<int64_t> index;
    bool scalar = false;
    if (!ShapeGather(g, Outputs(shape)[0], &index, &scalar)) throw Failure{"Gather '" + NodeName(g) + "' changed"};
    add(g, 1, index, scalar);
    for (const OrtNode* q : u.unsqueezes)
      if (Inputs(q)[0] == Outputs(g)[0]) add(q, 2, index, scalar);
  }
}

OrtStatus* ComputeShapes(const CompiledShapes& c, OrtKernelContext* ctx) {
  return Guard("Shape", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, 0, &x));
    const std::vector<int64_t> dims = ShapeSlice(TensorShape(x), c.start, c.end);
    const auto n = static_cast<int64_t>(dims.size());
    for (const CompiledShapes::Out& o : c.outs) {
      std::vector<int64_t> values, out_shape;
      if (o.kind == 0) {
        values = dims;
        out_shape = {n};
      } else {
        for (int64_t i : o.index) {
          if (i < -n || i >= n)
            throw Failure{c.name + ": a Gather index " + std::to_string(i) + " is out of range for its " +
                          std::to_string(n) + " dims"};
          values.push_back(dims[static_cast<size_t>(i < 0 ? i + n : i)]);
        }
        if (o.kind == 2)
          out_shape = {1};
        else if (!o.scalar)
          out_shape = {static_cast<int64_t>(values.size())};
      }
      Int64Output(ctx, o.output, out_shape, values);
    }
  });
}

}  // namespace qie_ep
