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
  for (const auto* part : {&shapes, &gathers, &unsqueezes, &concats}) v.insert(v.end(), part->begin(), part->end());
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

namespace {

// A Concat (axis 0) whose inputs are all int64 1-D constants or outputs of `unsqueezes`.
bool DimsConcat(const OrtNode* c, const std::vector<const OrtNode*>& unsqueezes) {
  if (!IsOp(c, "Concat") || Outputs(c).size() != 1) return false;
  const int64_t axis = AttrInt(c, "axis", 0);
  if (axis != 0 && axis != -1) return false;
  for (const OrtValueInfo* in : Inputs(c)) {
    Constant k;
    if (!in) return false;
    if (ReadConstant(in, &k)) {
      if (k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || k.shape.size() != 1) return false;
      continue;
    }
    if (std::none_of(unsqueezes.begin(), unsqueezes.end(), [&](const OrtNode* q) { return Outputs(q)[0] == in; }))
      return false;
  }
  return true;
}

bool IsShapeOf(const OrtNode* n, const OrtValueInfo* x) {
  return IsOp(n, "Shape") && Inputs(n).size() == 1 && Inputs(n)[0] == x && Outputs(n).size() == 1 && Outputs(n)[0];
}

}  // namespace

bool MatchShapeUnit(const OrtNode* shape, ShapeUnit* u) {
  *u = ShapeUnit{};
  if (!IsOp(shape, "Shape") || Inputs(shape).size() != 1) return false;
  const OrtValueInfo* x = Inputs(shape)[0];
  if (!x || !IsShapeOf(shape, x)) return false;
  for (const OrtNode* n : AllConsumers(x))
    if (IsShapeOf(n, x)) u->shapes.push_back(n);
  if (u->shapes.empty() || u->shapes[0] != shape) return false;  // one unit per tensor, from its first Shape
  // The DequantizeLinear only this Shape reads: its codes have the same dims. (Asked only then: for a fused graph's
  // input or a value another fused node produces, ORT logs a warning.)
  const OrtNode* dq = !IsGraphOutput(x) && !IsRequiredGraphInput(x) && Consumers(x) == 1 ? Producer(x) : nullptr;
  Constant unused, s, z;
  ONNXTensorElementDataType t;
  if (dq && DqOperands(dq, true, 0, &unused, &s, &z, &t)) u->dq = dq;
  for (const OrtNode* sh : u->shapes) {
    const OrtValueInfo* dims = Outputs(sh)[0];
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
  }
  for (const OrtNode* q : u->unsqueezes)
    for (const OrtNode* c : AllConsumers(Outputs(q)[0]))
      if (std::find(u->concats.begin(), u->concats.end(), c) == u->concats.end() && DimsConcat(c, u->unsqueezes))
        u->concats.push_back(c);
  return u->dq || !u->gathers.empty();
}

void CompileShapes(const OrtGraph* graph, const OrtNode* fused, CompiledShapes* c) {
  const std::vector<const OrtNode*> nodes = GraphNodes(graph);
  const std::unordered_set<const OrtNode*> in_graph(nodes.begin(), nodes.end());
  ShapeUnit u;
  const OrtNode* shape = nullptr;  // the anchor: the unit's first Shape
  for (const OrtNode* n : nodes)
    if (!shape && IsOp(n, "Shape") && MatchShapeUnit(n, &u)) shape = n;
  if (!shape) throw Failure{"fused graph is not the shape unit claimed"};
  // At Compile a node outside the fused graph is not among the consumers: keep what is in it.
  auto inside = [&](std::vector<const OrtNode*>* v) {
    v->erase(std::remove_if(v->begin(), v->end(), [&](const OrtNode* n) { return !in_graph.count(n); }), v->end());
  };
  for (auto* part : {&u.shapes, &u.gathers, &u.unsqueezes, &u.concats}) inside(part);
  if (u.dq && !in_graph.count(u.dq)) u.dq = nullptr;
  if (u.Nodes().size() != nodes.size()) throw Failure{"fused graph is not the shape unit claimed"};
  c->name = NodeName(shape);
  c->outs.clear();
  // Each node's Out: its dims' source (the Shape's slice, the Gather's indices), and the fused node's output if any.
  auto out_of = [&](const OrtNode* n, int kind, const OrtNode* sh, const std::vector<int64_t>& index, bool scalar) {
    CompiledShapes::Out o;
    o.output = IndexByName(Outputs(fused), Outputs(n)[0]);  // -1: read inside the node only
    o.kind = kind;
    o.start = AttrInt(sh, "start", 0);
    o.end = AttrInt(sh, "end", INT64_MAX);
    o.index = index;
    o.scalar = scalar;
    return o;
  };
  std::vector<std::pair<const OrtNode*, CompiledShapes::Out>> dims_of;  // each unsqueeze's, for the concats
  for (const OrtNode* sh : u.shapes) {
    CompiledShapes::Out o = out_of(sh, 0, sh, {}, false);
    if (o.output >= 0) c->outs.push_back(o);
    for (const OrtNode* g : u.gathers) {
      std::vector<int64_t> index;
      bool scalar = false;
      if (Inputs(g)[0] != Outputs(sh)[0]) continue;
      if (!ShapeGather(g, Outputs(sh)[0], &index, &scalar)) throw Failure{"Gather '" + NodeName(g) + "' changed"};
      o = out_of(g, 1, sh, index, scalar);
      if (o.output >= 0) c->outs.push_back(o);
      for (const OrtNode* q : u.unsqueezes) {
        if (Inputs(q)[0] != Outputs(g)[0]) continue;
        o = out_of(q, 2, sh, index, scalar);
        dims_of.emplace_back(q, o);
        if (o.output >= 0) c->outs.push_back(o);
      }
    }
  }
  for (const OrtNode* cat : u.concats) {
    CompiledShapes::Out o = out_of(cat, 3, shape, {}, false);
    if (o.output < 0) continue;
    for (const OrtValueInfo* in : Inputs(cat)) {
      CompiledShapes::Out::Piece p;
      Constant k;
      if (ReadConstant(in, &k)) {
        p.values.assign(static_cast<const int64_t*>(k.data), static_cast<const int64_t*>(k.data) + k.count());
        if (p.values.empty()) continue;
      } else {
        const auto it =
            std::find_if(dims_of.begin(), dims_of.end(), [&](const auto& d) { return Outputs(d.first)[0] == in; });
        if (it == dims_of.end()) throw Failure{"Concat '" + NodeName(cat) + "' changed"};
        p.start = it->second.start;
        p.end = it->second.end;
        p.index = it->second.index[0];
      }
      o.pieces.push_back(std::move(p));
    }
    c->outs.push_back(std::move(o));
  }
}

namespace {

// dims[i] of the Shape's slice of `all`, checked.
int64_t Dim(const std::vector<int64_t>& all, int64_t start, int64_t end, int64_t i, const std::string& name) {
  const std::vector<int64_t> dims = ShapeSlice(all, start, end);
  const auto n = static_cast<int64_t>(dims.size());
  if (i < -n || i >= n)
    throw Failure{name + ": a Gather index " + std::to_string(i) + " is out of range for its " + std::to_string(n) +
                  " dims"};
  return dims[static_cast<size_t>(i < 0 ? i + n : i)];
}

}  // namespace

OrtStatus* ComputeShapes(const CompiledShapes& c, OrtKernelContext* ctx) {
  return Guard("Shape", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, 0, &x));
    const std::vector<int64_t> all = TensorShape(x);
    for (const CompiledShapes::Out& o : c.outs) {
      std::vector<int64_t> values, out_shape;
      if (o.kind == 0) {
        values = ShapeSlice(all, o.start, o.end);
        out_shape = {static_cast<int64_t>(values.size())};
      } else if (o.kind == 3) {
        for (const CompiledShapes::Out::Piece& p : o.pieces) {
          if (p.values.empty())
            values.push_back(Dim(all, p.start, p.end, p.index, c.name));
          else
            values.insert(values.end(), p.values.begin(), p.values.end());
        }
        out_shape = {static_cast<int64_t>(values.size())};
      } else {
        for (int64_t i : o.index) values.push_back(Dim(all, o.start, o.end, i, c.name));
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
