// QDQ units of the plugin EP's regions (see units.h): matching and the constants they carry.
//
// Numerics of a table: f is evaluated on the 256 dequantized codes, node by node, in float32 with the operations
// ORT's float kernels apply, so a table equals the QDQ graph wherever f is plain float32 arithmetic (Relu, Clip,
// LeakyRelu, HardSigmoid, HardSwish, Add/Sub/Mul/Div, BatchNormalization); Sigmoid, Tanh and Erf use libm where
// ORT uses MLAS's approximations, which may move a value across a rounding boundary: within one step
// (tests/ort/test_ep_regions.py bounds and counts it).
#include "ep/units.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <map>
#include <set>

namespace qie_ep {

namespace {

const std::set<std::string>& TableOps() {
  static const std::set<std::string> ops = {
      "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish",          "Sigmoid", "Tanh", "Erf", "Add", "Sub", "Mul",
      "Div",  "Neg",  "Abs",       "Identity",    "BatchNormalization", "Gelu"};
  return ops;
}
bool IsTableOp(const OrtNode* n) { return n && Domain(n).empty() && TableOps().count(OpType(n)) > 0; }

// The input DequantizeLinear of a unit: a runtime u8/s8 tensor, per-tensor constant positive scale and zero point.
bool InputDq(const OrtNode* dq) {
  Constant unused, sx, zx;
  ONNXTensorElementDataType xt;
  if (!DqOperands(dq, true, 0, &unused, &sx, &zx, &xt)) return false;
  return static_cast<const float*>(sx.data)[0] > 0.0f && IsGraphOutput(Outputs(dq)[0]) == false;
}
bool Rank4(const OrtValueInfo* vi) { return vi && ValueRank(vi) == 4; }

// Whether `vi` is another per-tensor DequantizeLinear of the codes `dq` reads, with the same scale and zero point:
// the same float tensor. ORT gives every consumer of a Q -> DQ its own DequantizeLinear
// (EnsureUniqueDQForNodeUnit), so SiLU's x * Sigmoid(x) reaches the EP as Mul(DQ'(q), Sigmoid(DQ(q))).
bool SameDequantize(const OrtValueInfo* vi, const OrtNode* dq) {
  Constant c;
  if (!vi || ReadConstant(vi, &c) || IsRequiredGraphInput(vi)) return false;  // (no producer to ask for)
  const OrtNode* p = Producer(vi);
  if (!p || !dq || p == dq || !IsOp(p, "DequantizeLinear") || Inputs(p)[0] != Inputs(dq)[0]) return false;
  Constant unused, sa, za, sb, zb;
  ONNXTensorElementDataType ta, tb;
  if (!DqOperands(p, true, 0, &unused, &sa, &za, &ta) || !DqOperands(dq, true, 0, &unused, &sb, &zb, &tb)) return false;
  if (ta != tb || static_cast<const float*>(sa.data)[0] != static_cast<const float*>(sb.data)[0]) return false;
  const auto z = [](const Constant& c) { return c.data ? static_cast<const uint8_t*>(c.data)[0] : uint8_t{0}; };
  return z(za) == z(zb);
}

// A constant table operand: a float32 scalar or per-channel vector, from an initializer or a DequantizeLinear of
// one (as ORT's quantizer writes a bias Add's or BatchNormalization's constants), evaluated as ORT does,
// (q - zp) * scale in float32. Channel vectors are [1,C,1,1] or [C,1,1] (NCHW's channel axis) or, with `one_d`
// (BatchNormalization's parameters), [C]; along the last axis (layout kLast) [N] or [1,..,1,N], of at most
// layout.max_rank dimensions. `dq` receives that DequantizeLinear (nullptr for an initializer).
bool ChannelConstant(const OrtValueInfo* vi, bool one_d, const ConstLayout& layout, std::vector<float>* v,
                     const OrtNode** dq) {
  auto channel_axis = [&](const std::vector<int64_t>& s, size_t count) -> int64_t {  // -2: not a table operand
    if (layout.axis == ConstLayout::kLast) {
      if (one_d || static_cast<int64_t>(s.size()) > std::max<int64_t>(1, layout.max_rank)) return -2;
      if (count == 1) return -1;
      for (size_t i = 0; i + 1 < s.size(); ++i)
        if (s[i] != 1) return -2;
      return static_cast<int64_t>(s.size()) - 1;
    }
    if (count == 1 && s.size() <= 4) return -1;  // a scalar
    if (one_d) return s.size() == 1 ? 0 : -2;
    if (s.size() == 3 && s[1] == 1 && s[2] == 1) return 0;
    if (s.size() == 4 && s[0] == 1 && s[2] == 1 && s[3] == 1) return 1;
    return -2;
  };
  Constant c;
  *dq = nullptr;
  if (ReadConstant(vi, &c)) {
    if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.count() == 0 || channel_axis(c.shape, c.count()) == -2)
      return false;
    v->assign(static_cast<const float*>(c.data), static_cast<const float*>(c.data) + c.count());
    return true;
  }
  const OrtNode* p = Producer(vi);
  if (!IsOp(p, "DequantizeLinear") || AttrInt(p, "block_size", 0) != 0) return false;
  const auto in = Inputs(p);
  Constant q, s, z;
  if (in.size() < 2 || !ReadConstant(in[0], &q) || q.count() == 0 || !ReadConstant(in[1], &s) ||
      s.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || (s.count() != 1 && s.count() != q.count()))
    return false;
  const int64_t axis = channel_axis(q.shape, q.count());
  if (axis == -2) return false;
  if (s.count() > 1) {
    int64_t a = AttrInt(p, "axis", 1);
    if (a < 0) a += static_cast<int64_t>(q.shape.size());
    if (a != axis) return false;
  }
  const bool has_z = Input(in, 2) && ReadConstant(Input(in, 2), &z);
  if (Input(in, 2) && (!has_z || z.type != q.type || z.count() != s.count())) return false;
  v->resize(q.count());
  for (size_t i = 0; i < q.count(); ++i) {
    int64_t qi = 0, zi = 0;
    const size_t j = s.count() == 1 ? 0 : i;
    switch (q.type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: qi = static_cast<const int8_t*>(q.data)[i]; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: qi = static_cast<const uint8_t*>(q.data)[i]; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: qi = static_cast<const int32_t*>(q.data)[i]; break;
      default: return false;
    }
    if (has_z) {
      switch (z.type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: zi = static_cast<const int8_t*>(z.data)[j]; break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: zi = static_cast<const uint8_t*>(z.data)[j]; break;
        default: zi = static_cast<const int32_t*>(z.data)[j]; break;
      }
    }
    (*v)[i] = static_cast<float>(static_cast<int32_t>(qi - zi)) * static_cast<const float*>(s.data)[j];
  }
  *dq = p;
  return true;
}

// Which inputs of a table op may be constants, and whether its 1-D constants are per channel.
bool ConstantOperand(const std::string& op, size_t i) {
  if (op == "BatchNormalization") return i >= 1 && i <= 4;
  if (op == "Clip") return i == 1 || i == 2;
  return i == 1 || (i == 0 && op != "Identity");  // binary ops: either side
}

}  // namespace

namespace {

// `nodes` (single-output nodes) in topological order: each after every node of the set whose output it reads.
// False on a cycle (which a valid graph cannot have: refused rather than looped on).
bool OrderNodes(const std::vector<const OrtNode*>& nodes, std::vector<const OrtNode*>* order) {
  std::set<const OrtValueInfo*> produced, ready;
  for (const OrtNode* n : nodes) produced.insert(Outputs(n)[0]);
  order->clear();
  while (order->size() < nodes.size()) {
    bool progress = false;
    for (const OrtNode* n : nodes) {
      if (std::find(order->begin(), order->end(), n) != order->end()) continue;
      bool ok = true;
      for (const OrtValueInfo* in : Inputs(n))
        if (in && produced.count(in) && !ready.count(in)) ok = false;
      if (!ok) continue;
      order->push_back(n);
      ready.insert(Outputs(n)[0]);
      progress = true;
    }
    if (!progress) return false;
  }
  return true;
}

}  // namespace

// DQ(x) -> f -> Q with f an elementwise subgraph of the DQ's output and constants; every consumer of the DQ's
// output is in f. Fills the unit (nodes: constant DQs, f's nodes in topological order, Q).
bool MatchElementwise(const OrtNode* dq, const ConstLayout& layout, Unit* u) {
  if (!InputDq(dq)) return false;
  const OrtValueInfo* v0 = Outputs(dq)[0];
  if (Consumers(v0) == 0) return false;
  if (layout.axis == ConstLayout::kChannel && !Rank4(v0)) return false;  // regions hold 4-D values (NHWC inside)
  std::vector<const OrtNode*> body;                                      // f's nodes, discovery order
  std::set<const OrtValueInfo*> values = {v0};
  std::vector<const OrtValueInfo*> frontier = {v0};
  const OrtNode* q = nullptr;
  std::vector<std::pair<const OrtNode*, const OrtValueInfo*>> shapes;  // Shape nodes and the value each reads
  while (!frontier.empty()) {
    const OrtValueInfo* v = frontier.back();
    frontier.pop_back();
    if (IsGraphOutput(v)) return false;
    const auto cons = AllConsumers(v);
    if (cons.empty()) return false;
    for (const OrtNode* c : cons) {
      if (v != v0 && cons.size() == 1 && IsOp(c, "QuantizeLinear")) {
        if (q && q != c) return false;
        q = c;
        continue;
      }
      if (layout.layout_ops && IsOp(c, "Shape") && v != v0) {  // dims only: the unit outputs them
        if (std::none_of(shapes.begin(), shapes.end(), [&](const auto& r) { return r.first == c; }))
          shapes.emplace_back(c, v);
        continue;
      }
      const bool layout_op = layout.layout_ops && IsLayoutOp(c);
      if (!IsTableOp(c) && !layout_op) return false;
      if (layout_op && Inputs(c)[0] != v) return false;  // the data operand, not Reshape's shape
      if (std::find(body.begin(), body.end(), c) != body.end()) continue;
      if (body.size() >= 16) return false;
      const auto out = Outputs(c);
      if (out.empty() || !out[0]) return false;
      for (size_t i = 1; i < out.size(); ++i)
        if (out[i] && !Name(out[i]).empty()) return false;  // BatchNormalization's training outputs
      if (OpType(c) == "BatchNormalization" &&
          (AttrInt(c, "training_mode", 0) != 0 || layout.axis == ConstLayout::kLast))
        return false;
      body.push_back(c);
      values.insert(out[0]);
      frontier.push_back(out[0]);
    }
  }
  if (!q || body.empty()) return false;
  // Every other input of f's nodes: a scalar or per-channel constant (one channel count for the unit); a layout
  // node's other inputs (Reshape's shape) are the fused node's to read.
  std::vector<const OrtNode*> param_dqs;
  size_t C = 1;
  for (const OrtNode* n : body) {
    const std::string op = OpType(n);
    const auto in = Inputs(n);
    if (IsLayoutOp(n)) continue;
    for (size_t i = 0; i < in.size(); ++i) {
      if (!Input(in, i) || values.count(in[i])) continue;
      if (SameDequantize(in[i], dq)) {  // the input itself through its own DQ: joins the unit (read as register 0)
        if (SoleConsumer(in[i]) != n) return false;
        param_dqs.push_back(Producer(in[i]));
        continue;
      }
      std::vector<float> v;
      const OrtNode* pdq = nullptr;
      if (!ConstantOperand(op, i) || !ChannelConstant(in[i], op == "BatchNormalization", layout, &v, &pdq))
        return false;
      if (op == "Clip" && v.size() != 1) return false;
      if (v.size() > 1 || op == "BatchNormalization") {
        if (C > 1 && v.size() != C) return false;
        C = v.size();
      }
      if (pdq) {
        if (SoleConsumer(in[i]) != n) return false;
        param_dqs.push_back(pdq);
      }
    }
    if (op == "BatchNormalization" && (in.size() != 5 || !values.count(in[0]))) return false;
  }
  Constant sy, zy;
  if (!QOperands(q, &sy, &zy) || !values.count(Inputs(q)[0])) return false;
  std::vector<const OrtNode*> order;
  if (!OrderNodes(body, &order)) return false;
  // Layout nodes (tails): one chain of them; every value carries the number of layout nodes before it, a node's
  // tensor operands carry the same, and after the first one the constants are plain scalars (f then runs on the
  // [rows][N] values, the bytes are moved once at the end).
  std::map<const OrtValueInfo*, size_t> moves = {{v0, 0}};
  size_t layouts = 0;
  for (const OrtNode* n : order) {
    size_t k = SIZE_MAX;
    for (const OrtValueInfo* in : Inputs(n)) {
      if (!in || !values.count(in)) continue;
      if (k != SIZE_MAX && moves.at(in) != k) return false;
      k = moves.at(in);
    }
    if (IsLayoutOp(n)) {
      if (k != layouts) return false;
      k = ++layouts;
    } else if (k > 0) {
      for (const OrtValueInfo* in : Inputs(n)) {
        Constant c;
        if (!in || values.count(in)) continue;
        if (ValueRank(in) > 1 || (ReadConstant(in, &c) && c.count() != 1)) return false;
        std::vector<float> v;
        const OrtNode* unused = nullptr;
        if (!ChannelConstant(in, false, layout, &v, &unused) || v.size() != 1) return false;
      }
    }
    moves[Outputs(n)[0]] = k;
  }
  u->kind = UnitKind::kTable;
  u->in_dqs = {dq};
  u->op = order.front();
  u->q = q;
  u->nodes = param_dqs;
  u->nodes.insert(u->nodes.end(), order.begin(), order.end());
  u->nodes.push_back(q);
  u->layout = layout;
  u->shape_reads.clear();
  for (const auto& [node, value] : shapes) {
    const auto out = Outputs(node);
    if (out.size() != 1 || !out[0] || Inputs(node)[0] != value) return false;
    u->shape_reads.emplace_back(node, moves.at(value));
  }
  try {  // what Compile will build from it
    CompileTable(*u);
  } catch (const Failure&) { return false; }
  return true;
}

namespace {

bool MatchTable(const OrtNode* dq, Unit* u) { return MatchElementwise(dq, ConstLayout{}, u); }

// The elementwise float nodes `v` is computed by from one quantized tensor (and plain constants), back to that
// tensor's DequantizeLinear (*dq): a chain, or a small graph whose nodes read the tensor more than once (HardSwish
// written x * HardSigmoid(x), ORT giving each reader its own copy of the DequantizeLinear: the copies join the
// prefix, read as the tensor itself). `prefix`: the copies, then the nodes in topological order.
bool ElementwisePrefix(const OrtValueInfo* v, const OrtNode** dq, std::vector<const OrtNode*>* prefix) {
  constexpr size_t kMaxNodes = 8;
  std::vector<const OrtNode*> nodes, copies, stack = {Producer(v)};
  const OrtNode* src = nullptr;
  std::vector<const OrtNode*> dqs;  // every DequantizeLinear the nodes read
  while (!stack.empty()) {
    const OrtNode* n = stack.back();
    stack.pop_back();
    if (std::find(nodes.begin(), nodes.end(), n) != nodes.end()) continue;
    if (!IsTableOp(n) || nodes.size() >= kMaxNodes || Outputs(n).empty() || !Outputs(n)[0]) return false;
    for (size_t i = 1; i < Outputs(n).size(); ++i)
      if (Outputs(n)[i] && !Name(Outputs(n)[i]).empty()) return false;
    nodes.push_back(n);
    for (const OrtValueInfo* x : Inputs(n)) {
      Constant c;
      if (!x || Name(x).empty() || ReadConstant(x, &c)) continue;
      const OrtNode* p = Producer(x);  // (a graph input has none: null)
      if (p && IsOp(p, "DequantizeLinear")) {
        if (std::find(dqs.begin(), dqs.end(), p) == dqs.end()) dqs.push_back(p);
      } else if (p) {
        stack.push_back(p);
      } else {
        return false;
      }
    }
  }
  for (const OrtNode* d : dqs) {  // one tensor: the first DequantizeLinear, the others copies of it
    if (!src) {
      if (!InputDq(d)) return false;
      src = d;
    } else if (!SameDequantize(Outputs(d)[0], src)) {
      return false;
    } else {
      copies.push_back(d);
    }
  }
  if (!src) return false;
  std::vector<const OrtNode*> order;
  if (!OrderNodes(nodes, &order)) return false;
  *dq = src;
  *prefix = copies;
  prefix->insert(prefix->end(), order.begin(), order.end());
  return true;
}

// ElementwisePrefix of the 4-D value `v` when its float program is plain arithmetic (no libm function), with scalar
// constants only where `scalar` (a prefix that becomes a requantization table: Concat's, a channel shuffle's).
bool ArithmeticPrefix(const OrtValueInfo* v, bool scalar, const OrtNode** dq, std::vector<const OrtNode*>* prefix) {
  if (!ElementwisePrefix(v, dq, prefix) || !Rank4(Outputs(*dq)[0])) return false;
  try {
    const FloatProgram f = CompileProgramTo(Outputs(*dq)[0], *prefix, v);
    return f.arithmetic && (!scalar || f.C == 1);
  } catch (const Failure&) { return false; }
}

// op(DQ(x_0), DQ(x_1), ...) -> Q for a node whose every input is a runtime 4-D DequantizeLinear (`tensors`: only
// the first so many inputs; the node's own checks read the constants after them, e.g. ReduceMean's axes).
bool MatchMultiInput(const OrtNode* n, UnitKind kind, size_t min_inputs, size_t max_inputs, Unit* u,
                     size_t tensors = SIZE_MAX) {
  auto in = Inputs(n);
  const auto out = Outputs(n);
  if (in.size() < min_inputs || in.size() > max_inputs || out.empty() || !out[0]) return false;
  if (in.size() > tensors) in.resize(tensors);
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i] && !Name(out[i]).empty()) return false;
  std::vector<const OrtNode*> dqs;
  std::vector<std::vector<const OrtNode*>> prefixes;
  for (const OrtValueInfo* v : in) {
    std::vector<const OrtNode*> prefix;
    if (!v || !Rank4(v)) return false;
    const OrtNode* dq = Producer(v);
    const bool prefixed =
        kind == UnitKind::kBinary || kind == UnitKind::kGap || kind == UnitKind::kConcat || kind == UnitKind::kLrn;
    // a Concat input's prefix becomes its requantization table: scalar constants only
    if (prefixed && dq && !IsOp(dq, "DequantizeLinear") &&
        !ArithmeticPrefix(v, kind == UnitKind::kConcat, &dq, &prefix))
      return false;
    if (!InputDq(dq)) return false;
    dqs.push_back(dq);
    prefixes.push_back(prefix);
  }
  if (!Rank4(out[0])) return false;
  // Binary units may end in a chain of unary activations before their Q (ResNet's Add -> Relu -> Q where the
  // quantizer leaves Add and Relu in float): their float program, plain arithmetic with scalar constants.
  std::vector<const OrtNode*> tail;
  const OrtValueInfo* v = out[0];
  const OrtNode* q = SoleConsumer(v);
  static const std::set<std::string> unary = {"Relu",      "Clip", "LeakyRelu", "HardSigmoid",
                                              "HardSwish", "Neg",  "Abs",       "Identity"};
  while (kind == UnitKind::kBinary && q && Domain(q).empty() && unary.count(OpType(q)) && tail.size() < 8) {
    for (size_t i = 1; i < Inputs(q).size(); ++i) {  // Clip's bounds: plain scalar constants
      Constant c;
      if (Input(Inputs(q), i) && (!ReadConstant(Inputs(q)[i], &c) || c.count() != 1)) return false;
    }
    const auto qo = Outputs(q);
    if (qo.size() != 1 || !qo[0]) return false;
    tail.push_back(q);
    v = qo[0];
    q = SoleConsumer(v);
  }
  Constant sy, zy;
  if (!QOperands(q, &sy, &zy)) return false;
  u->kind = kind;
  u->in_dqs = dqs;
  u->prefix = prefixes;
  u->op = n;
  u->q = q;
  u->nodes = {n};
  u->nodes.insert(u->nodes.end(), tail.begin(), tail.end());
  u->nodes.push_back(q);
  if (!tail.empty()) {
    try {
      const FloatProgram f = CompileProgram(out[0], tail, q);
      if (!f.arithmetic || f.C != 1) return false;
    } catch (const Failure&) { return false; }
  }
  return true;
}

// A Reshape's constant int64 target shape (allowzero off: 0 copies the input's size at that axis).
bool ReshapeTarget(const OrtNode* r, std::vector<int64_t>* target) {
  if (!IsOp(r, "Reshape") || AttrInt(r, "allowzero", 0) != 0) return false;
  const auto in = Inputs(r);
  Constant c;
  if (in.size() != 2 || !in[0] || !ReadConstant(in[1], &c) || c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ||
      c.shape.size() != 1)
    return false;
  target->assign(static_cast<const int64_t*>(c.data), static_cast<const int64_t*>(c.data) + c.count());
  return true;
}

// The node reading `v`, past a QuantizeLinear -> DequantizeLinear pair of one scale and zero point (ORT's QDQ
// propagation puts one after each Reshape / Transpose of a quantized tensor from ORT_ENABLE_BASIC on: the identity
// on codes), which is appended to `pair`; nullptr unless the one reader (and a pair's) is sole.
const OrtNode* PastQdqPair(const OrtValueInfo* v, std::vector<const OrtNode*>* pair, int64_t* at) {
  const OrtNode* n = v ? SoleConsumer(v, at) : nullptr;
  if (!IsOp(n, "QuantizeLinear")) return n;
  Constant sy, zy;
  const OrtNode* d = SoleConsumer(Outputs(n)[0]);
  if (!QOperands(n, &sy, &zy) || !IsOp(d, "DequantizeLinear") || !InputDq(d)) return nullptr;
  const QParams a = OutputParams(n), b = InputParams(d);
  if (a.scale != b.scale || a.zp != b.zp || a.is_signed != b.is_signed) return nullptr;
  pair->push_back(n);
  pair->push_back(d);
  return SoleConsumer(Outputs(d)[0], at);
}

// The channel shuffle of `r1` (r1 -> Transpose -> Reshape, each maybe followed by an identity Q -> DQ pair) for an
// input of static C, H, W: its C / g groups, and the nodes after r1 up to the last Reshape (`body`, the last);
// false when the chain or a size is not the shuffle's for every batch size.
bool ShuffleChain(const OrtNode* r1, ShuffleShape* sh, std::vector<const OrtNode*>* body) {
  std::vector<int64_t> s1, s2;
  if (!ReshapeTarget(r1, &s1) || s1.size() != 5 || Outputs(r1).size() != 1) return false;
  const std::vector<int64_t> x = StaticDims(Inputs(r1)[0]);
  if (x.size() != 4 || x[1] <= 0 || x[2] <= 0 || x[3] <= 0) return false;
  const int64_t N = x[0], C = x[1], H = x[2], W = x[3];
  // the batch axis: copied (0), inferred (-1: every other size is fixed) or the static batch size
  auto batch = [&](int64_t t, bool inferred_ok) { return t == 0 || (t == -1 && inferred_ok) || (N > 0 && t == N); };
  if (!batch(s1[0], true) || s1[1] <= 0 || s1[2] <= 0 || s1[1] * s1[2] != C || s1[3] != H || s1[4] != W) return false;
  body->clear();
  int64_t at = -1;
  const OrtNode* t = PastQdqPair(Outputs(r1)[0], body, &at);
  if (!IsOp(t, "Transpose") || AttrInts(t, "perm") != std::vector<int64_t>{0, 2, 1, 3, 4} || Outputs(t).size() != 1)
    return false;
  body->push_back(t);
  const OrtNode* r = PastQdqPair(Outputs(t)[0], body, &at);
  if (!ReshapeTarget(r, &s2) || s2.size() != 4 || at != 0 || Outputs(r).size() != 1) return false;
  if (!batch(s2[0], s2[1] != -1) || (s2[1] != C && !(s2[1] == -1 && s2[0] != -1)) || s2[2] != H || s2[3] != W)
    return false;
  body->push_back(r);
  *sh = {static_cast<size_t>(C), static_cast<size_t>(s1[1]), static_cast<size_t>(H), static_cast<size_t>(W)};
  return true;
}

// DQ(x) [-> elementwise float nodes, scalar constants] -> Reshape -> Transpose -> Reshape -> Q, a channel shuffle
// (ShuffleChain).
bool MatchShuffle(const OrtNode* r1, Unit* u) {
  ShuffleShape sh;
  std::vector<const OrtNode*> body;
  if (!ShuffleChain(r1, &sh, &body)) return false;
  const OrtValueInfo* x = Inputs(r1)[0];
  const OrtNode* dq = Producer(x);
  std::vector<const OrtNode*> prefix;  // elementwise float nodes after the DequantizeLinear (a Relu): in the table
  if (dq && !IsOp(dq, "DequantizeLinear") && !ArithmeticPrefix(x, true, &dq, &prefix)) return false;
  const OrtNode* r2 = body.back();
  const OrtNode* q = SoleConsumer(Outputs(r2)[0]);
  Constant sy, zy;
  if (!InputDq(dq) || !QOperands(q, &sy, &zy)) return false;
  u->kind = UnitKind::kShuffle;
  u->in_dqs = {dq};
  u->prefix = {prefix};
  u->op = r1;
  u->q = q;
  u->nodes = {r1};
  u->nodes.insert(u->nodes.end(), body.begin(), body.end());
  u->nodes.push_back(q);
  return true;
}

// Slice's constant operands (starts, ends, axes, steps; one entry each, int64 or int32), empty where absent; false
// when one is not such a constant.
bool SliceOperands(const OrtNode* n, std::vector<int64_t> v[4]) {
  const auto in = Inputs(n);
  if (in.size() < 4 || in.size() > 5) return false;  // opset >= 10 with axes
  for (size_t i = 1; i < in.size(); ++i) {
    if (!Input(in, i)) continue;
    Constant c;
    if (!ReadConstant(in[i], &c) || c.count() != 1) return false;
    if (c.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
      v[i - 1] = {static_cast<const int64_t*>(c.data)[0]};
    else if (c.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      v[i - 1] = {static_cast<const int32_t*>(c.data)[0]};
    else
      return false;
  }
  return !v[0].empty() && !v[1].empty();
}

// DQ(x) -> Slice of one channel range (axis 1 of a 4-D tensor, step 1) -> Q.
bool MatchSlice(const OrtNode* n, Unit* u) {
  std::vector<int64_t> v[4];
  if (!SliceOperands(n, v) || v[2].empty() || (v[2][0] != 1 && v[2][0] != -3)) return false;
  if (!v[3].empty() && v[3][0] != 1) return false;
  return MatchMultiInput(n, UnitKind::kSlice, 4, 5, u, 1);
}

// A nearest Resize whose output pixel (oh, ow) reads input pixel (oh / sh, ow / sw) for integer scales sh, sw >= 1
// given by a constant `scales` input [1, 1, sh, sw]: asymmetric coordinates with floor (x = oh / s), or half-pixel
// ones rounded to the nearest either way (x = (oh + 0.5) / s - 0.5 lies strictly within 0.5 of oh / s's floor).
bool NearestScales(const OrtNode* n, int64_t* sh, int64_t* sw) {
  if (!IsOp(n, "Resize") || AttrString(n, "mode", "nearest") != "nearest") return false;
  const std::string ct = AttrString(n, "coordinate_transformation_mode", "half_pixel");
  const std::string nm = AttrString(n, "nearest_mode", "round_prefer_floor");
  const bool ok = (ct == "asymmetric" && nm == "floor") ||
                  (ct == "half_pixel" && (nm == "round_prefer_floor" || nm == "round_prefer_ceil"));
  if (!ok || !AttrInts(n, "axes").empty()) return false;
  const auto in = Inputs(n);
  Constant c;
  if (in.size() < 3 || in.size() > 4 || Input(in, 3) || !ReadConstant(Input(in, 2), &c) ||
      c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.count() != 4)
    return false;
  const float* f = static_cast<const float*>(c.data);
  if (f[0] != 1.0f || f[1] != 1.0f) return false;
  for (int i = 2; i < 4; ++i)
    if (!(f[i] >= 1.0f && f[i] <= 64.0f) || f[i] != static_cast<float>(static_cast<int64_t>(f[i]))) return false;
  *sh = static_cast<int64_t>(f[2]);
  *sw = static_cast<int64_t>(f[3]);
  return true;
}

// DQ(x) -> Resize (NearestScales) -> Q.
bool MatchResize(const OrtNode* n, Unit* u) {
  int64_t sh = 0, sw = 0;
  return NearestScales(n, &sh, &sw) && MatchMultiInput(n, UnitKind::kResize, 3, 4, u, 1);
}

// DQ(x) -> MaxPool | AveragePool -> Q, 2-D, floor mode (MaxPool: no indices output).
bool MatchPool(const OrtNode* n, Unit* u) {
  const bool max = IsOp(n, "MaxPool");
  if (!max && !IsOp(n, "AveragePool")) return false;
  if (AttrInt(n, "ceil_mode", 0) != 0 || (max && AttrInt(n, "storage_order", 0) != 0)) return false;
  if (AttrInts(n, "kernel_shape").size() != 2) return false;
  if (!max && AttrInt(n, "count_include_pad", 0) != 0 && AttrString(n, "auto_pad", "NOTSET") != "NOTSET")
    return false;  // the divisor then depends on ORT's padding split: left to ORT
  try {
    const qie::ConvAttrs at = PoolAttrs(n);
    std::vector<int64_t> oshape, pad;
    qie::ConvGeometry(at, {-1, -1}, at.kernel_shape, &oshape, &pad);
  } catch (const std::exception&) { return false; }
  return MatchMultiInput(n, max ? UnitKind::kMaxPool : UnitKind::kAvgPool, 1, 1, u);
}

}  // namespace

qie::ConvAttrs PoolAttrs(const OrtNode* n) {
  qie::ConvAttrs at;
  at.auto_pad = AttrString(n, "auto_pad", "NOTSET");
  at.kernel_shape = AttrInts(n, "kernel_shape");
  at.pads = AttrInts(n, "pads");
  at.strides = AttrInts(n, "strides");
  at.dilations = AttrInts(n, "dilations");
  return at;
}

ShuffleShape ShuffleOf(const Unit& u) {
  ShuffleShape sh;
  std::vector<const OrtNode*> body;
  if (u.kind != UnitKind::kShuffle || !ShuffleChain(u.op, &sh, &body)) throw Failure{"channel shuffle changed"};
  return sh;
}

void ResizeScales(const Unit& u, int64_t* sh, int64_t* sw) {
  if (u.kind != UnitKind::kResize || !NearestScales(u.op, sh, sw)) throw Failure{"resize changed"};
}

void SliceRange(const Unit& u, int64_t* start, int64_t* end) {
  std::vector<int64_t> v[4];
  if (u.kind != UnitKind::kSlice || !SliceOperands(u.op, v)) throw Failure{"slice changed"};
  *start = v[0][0];
  *end = v[1][0];
}

QParams InputParams(const OrtNode* dq) {
  Constant unused, sx, zx;
  ONNXTensorElementDataType xt;
  if (!DqOperands(dq, true, 0, &unused, &sx, &zx, &xt)) throw Failure{"input DequantizeLinear changed"};
  return {static_cast<const float*>(sx.data)[0], zx.data ? Zp(zx, 0) : 0, xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8};
}
QParams OutputParams(const OrtNode* q) {
  Constant sy, zy;
  if (!QOperands(q, &sy, &zy)) throw Failure{"QuantizeLinear changed"};
  return {static_cast<const float*>(sy.data)[0], Zp(zy, 0), zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8};
}

bool MatchConv(const OrtNode* conv, Unit* u, ConvOperands* o) {
  if (!IsOp(conv, "Conv")) return false;
  const auto in = Inputs(conv);
  const auto out = Outputs(conv);
  if (out.size() != 1 || in.size() < 2 || in.size() > 3 || !in[0] || !in[1]) return false;
  const OrtNode* dq_x = Producer(in[0]);
  const OrtNode* dq_w = Producer(in[1]);
  const OrtValueInfo* b = Input(in, 2);
  const OrtNode* dq_b = b ? Producer(b) : nullptr;
  if (!dq_x || !dq_w || SoleConsumer(in[1]) != conv) return false;
  if (b && (!dq_b || SoleConsumer(b) != conv)) return false;
  const OrtNode* q = SoleConsumer(out[0]);
  if (!QOperands(q, &o->sy, &o->zy)) return false;
  Constant unused;
  if (!InputDq(dq_x) || !DqOperands(dq_x, true, 0, &unused, &o->sx, &o->zx, &o->xt)) return false;
  const auto win = Inputs(dq_w);
  if (win.empty() || !ReadConstant(win[0], &o->w) || o->w.shape.size() != 4) return false;
  const size_t M = static_cast<size_t>(o->w.shape[0]);
  if (!DqOperands(dq_w, false, M, &o->w, &o->sw, &o->zw, &o->wt, 0)) return false;
  if (o->sw.count() > 1) {
    const int64_t axis = AttrInt(dq_w, "axis", 1);
    if (axis != 0 && axis != -4) return false;
  }
  if (dq_b && !Int32Bias(dq_b, M, o->sx, o->sw, &o->bias)) return false;
  o->at.auto_pad = AttrString(conv, "auto_pad", "NOTSET");
  o->at.kernel_shape = AttrInts(conv, "kernel_shape");
  o->at.pads = AttrInts(conv, "pads");
  o->at.strides = AttrInts(conv, "strides");
  o->at.dilations = AttrInts(conv, "dilations");
  o->at.group = AttrInt(conv, "group", 1);
  try {  // the attributes against W, as the custom op checks them (unknown input dims)
    const auto k = qie::ConvKernelDims(o->at, 4, -1, o->w.shape);
    std::vector<int64_t> oshape, pad;
    qie::ConvGeometry(o->at, {-1, -1}, k, &oshape, &pad);
  } catch (const std::exception&) { return false; }
  u->kind = UnitKind::kConv;
  u->in_dqs = {dq_x};
  u->op = conv;
  u->q = q;
  u->nodes = {dq_w};
  if (dq_b) u->nodes.push_back(dq_b);
  u->nodes.push_back(conv);
  u->nodes.push_back(q);
  return true;
}

// ReduceMean over H and W of a 4-D tensor keeping its dims: GlobalAveragePool (squeeze-excitation blocks written
// with ReduceMean). Axes from the attribute (opset < 18) or a constant second input (opset 18).
bool SpatialMean(const OrtNode* n) {
  if (AttrInt(n, "keepdims", 1) != 1) return false;
  std::vector<int64_t> axes = AttrInts(n, "axes");
  const auto in = Inputs(n);
  if (Input(in, 1)) {
    Constant c;
    if (!axes.empty() || !ReadConstant(in[1], &c) || c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) return false;
    axes.assign(static_cast<const int64_t*>(c.data), static_cast<const int64_t*>(c.data) + c.count());
  }
  for (int64_t& a : axes) a = a < 0 ? a + 4 : a;
  std::sort(axes.begin(), axes.end());
  return axes == std::vector<int64_t>{2, 3};
}

std::vector<Unit> FindUnits(const std::vector<const OrtNode*>& nodes) {
  std::vector<Unit> units;
  std::set<const OrtNode*> used;
  for (const OrtNode* n : nodes) {
    try {
      Unit u;
      ConvOperands o;
      const std::string op = Domain(n).empty() ? OpType(n) : "";
      bool ok = false;
      if (op == "Conv")
        ok = MatchConv(n, &u, &o);
      else if (op == "DequantizeLinear")
        ok = MatchTable(n, &u);
      else if (op == "Add" || op == "Sub" || op == "Mul" || op == "Sum")  // Sum of two: Add (opset <= 12 exports)
        ok = MatchMultiInput(n, UnitKind::kBinary, 2, 2, &u);
      else if (op == "GlobalAveragePool")
        ok = MatchMultiInput(n, UnitKind::kGap, 1, 1, &u);
      else if (op == "ReduceMean")
        ok = SpatialMean(n) && MatchMultiInput(n, UnitKind::kGap, 1, 2, &u, 1);
      else if (op == "Concat") {
        const int64_t axis = AttrInt(n, "axis", 0);
        ok = (axis == 1 || axis == -3) && MatchMultiInput(n, UnitKind::kConcat, 1, 64, &u);
      } else if (op == "MaxPool" || op == "AveragePool")
        ok = MatchPool(n, &u);
      else if (op == "Reshape")
        ok = MatchShuffle(n, &u);
      else if (op == "Slice")
        ok = MatchSlice(n, &u);
      else if (op == "Resize")
        ok = MatchResize(n, &u);
      else if (op == "LRN")
        ok = AttrInt(n, "size", 0) % 2 == 1 && MatchMultiInput(n, UnitKind::kLrn, 1, 1, &u);  // odd, as ORT requires
      if (!ok) continue;
      bool free = true;
      for (const OrtNode* m : u.nodes) free = free && !used.count(m) && !Assigned(m);
      for (const OrtNode* m : u.in_dqs) free = free && !used.count(m) && !Assigned(m);
      for (const auto& pre : u.prefix)
        for (const OrtNode* m : pre) free = free && !used.count(m) && !Assigned(m);
      if (!free) continue;
      used.insert(u.nodes.begin(), u.nodes.end());
      units.push_back(u);
    } catch (const Failure&) { continue; }
  }
  // A prefix node (shareable) that a later unit took as its own node: that prefix's unit is dropped.
  std::vector<Unit> kept;
  for (const Unit& u : units) {
    bool clash = false;
    for (const auto& pre : u.prefix)
      for (const OrtNode* m : pre) clash = clash || used.count(m) > 0;
    if (!clash) kept.push_back(u);
  }
  return kept;
}

FloatProgram CompileTable(const Unit& u) {
  std::vector<const OrtNode*> body;
  for (const OrtNode* n : u.nodes)
    if (n != u.q) body.push_back(n);
  return CompileProgramTo(Outputs(u.in_dqs[0])[0], body, Inputs(u.q)[0], u.layout);
}

FloatProgram CompileProgram(const OrtValueInfo* input, const std::vector<const OrtNode*>& nodes, const OrtNode* q) {
  std::vector<const OrtNode*> body;
  for (const OrtNode* n : nodes)
    if (n != q) body.push_back(n);
  return CompileProgramTo(input, body, Inputs(q)[0]);
}

FloatProgram CompileProgramTo(const OrtValueInfo* input, const std::vector<const OrtNode*>& nodes,
                              const OrtValueInfo* result, const ConstLayout& layout) {
  FloatProgram p;
  std::map<const OrtValueInfo*, int> reg = {{input, 0}};
  Constant unused;
  const OrtNode* input_dq = ReadConstant(input, &unused) || IsRequiredGraphInput(input) ? nullptr : Producer(input);
  if (input_dq && !IsOp(input_dq, "DequantizeLinear")) input_dq = nullptr;
  auto channels = [&](std::vector<float> v) {  // a constant operand; fixes the program's channel count
    if (v.size() > 1) {
      if (p.C > 1 && p.C != v.size()) throw Failure{"table constants of different channel counts"};
      p.C = v.size();
    }
    return v;
  };
  auto constant = [&](const OrtNode* n, const OrtValueInfo* vi) {
    std::vector<float> c;
    const OrtNode* unused = nullptr;
    if (!ChannelConstant(vi, OpType(n) == "BatchNormalization", layout, &c, &unused))
      throw Failure{"table operand '" + Name(vi) + "' is not a constant"};
    return channels(c);
  };
  using Op = FloatProgram::Op;
  static const std::map<std::string, Op> unary = {{"Relu", Op::kRelu},
                                                  {"LeakyRelu", Op::kLeakyRelu},
                                                  {"HardSigmoid", Op::kHardSigmoid},
                                                  {"HardSwish", Op::kHardSwish},
                                                  {"Sigmoid", Op::kSigmoid},
                                                  {"Tanh", Op::kTanh},
                                                  {"Erf", Op::kErf},
                                                  {"Gelu", Op::kGelu},
                                                  {"Neg", Op::kNeg},
                                                  {"Abs", Op::kAbs},
                                                  {"Identity", Op::kCopy}};
  static const std::map<std::string, Op> binary = {
      {"Add", Op::kAdd}, {"Sub", Op::kSub}, {"Mul", Op::kMul}, {"Div", Op::kDiv}};
  for (const OrtNode* n : nodes) {
    if (IsOp(n, "DequantizeLinear")) continue;  // constant DQs are read through their consumers
    const std::string op = OpType(n);
    const auto in = Inputs(n);
    FloatProgram::Step st;
    auto operand = [&](size_t i, int* r, std::vector<float>* k) {
      auto it = reg.find(in.at(i));
      if (it != reg.end()) {
        *r = it->second;
      } else if (input_dq && SameDequantize(in[i], input_dq)) {
        *r = 0;
      } else {
        *r = -1;
        *k = constant(n, in[i]);
      }
    };
    if (binary.count(op)) {
      st.op = binary.at(op);
      operand(0, &st.a, &st.ka);
      operand(1, &st.b, &st.kb);
      if (st.a < 0 && st.b < 0) throw Failure{"table node '" + NodeName(n) + "' has no tensor operand"};
      if (st.a < 0) {  // constant first: k + x = x + k exactly; k - x and k / x have their own operations
        st.a = st.b;
        st.b = -1;
        st.kb = std::move(st.ka);
        st.ka.clear();
        if (st.op == Op::kSub) st.op = Op::kRSub;
        if (st.op == Op::kDiv) st.op = Op::kRDiv;
      }
    } else if (op == "BatchNormalization") {  // y = x * (scale / sqrt(var + eps)) + (B - mean * that), ORT's order
      st.op = Op::kAffine;
      operand(0, &st.a, &st.ka);
      std::vector<float> q[4];
      for (int k = 0; k < 4; ++k) q[k] = constant(n, in.at(1 + k));
      const float eps = AttrFloat(n, "epsilon", 1e-5f);
      const size_t C = q[0].size();
      for (int k = 1; k < 4; ++k)
        if (q[k].size() != C) throw Failure{"BatchNormalization parameters of different lengths"};
      st.ka.resize(C);
      st.kb.resize(C);
      for (size_t c = 0; c < C; ++c) {
        st.ka[c] = (1.0f / std::sqrt(q[3][c] + eps)) * q[0][c];
        st.kb[c] = q[1][c] - q[2][c] * st.ka[c];
      }
    } else if (op == "Reshape" || op == "Transpose") {  // tails: f runs on [rows][N], the bytes move afterwards
      st.op = Op::kCopy;
      operand(0, &st.a, &st.ka);
    } else if (op == "Clip") {
      st.op = Op::kClip;
      operand(0, &st.a, &st.ka);
      st.lo = -INFINITY;
      st.hi = INFINITY;
      if (Input(in, 1)) st.lo = constant(n, in[1]).at(0);
      if (Input(in, 2)) st.hi = constant(n, in[2]).at(0);
      if (in.size() == 1) {  // opset < 11: attributes
        st.lo = AttrFloat(n, "min", st.lo);
        st.hi = AttrFloat(n, "max", st.hi);
      }
    } else if (unary.count(op)) {
      st.op = unary.at(op);
      if (st.op == Op::kGelu) {
        const std::string approx = AttrString(n, "approximate", "none");
        if (approx != "none" && approx != "tanh")
          throw Failure{"Gelu node '" + NodeName(n) + "' has approximate='" + approx + "'"};
        if (approx == "tanh") st.op = Op::kGeluTanh;
      }
      operand(0, &st.a, &st.ka);
      st.alpha = AttrFloat(n, "alpha", op == "LeakyRelu" ? 0.01f : 0.2f);
      st.beta = AttrFloat(n, "beta", 0.5f);
      p.arithmetic = p.arithmetic && st.op != Op::kSigmoid && st.op != Op::kTanh && st.op != Op::kErf &&
                     st.op != Op::kGelu && st.op != Op::kGeluTanh;
    } else {
      throw Failure{"table node '" + NodeName(n) + "' (" + op + ") has no float program"};
    }
    if (st.a < 0) throw Failure{"table node '" + NodeName(n) + "' has a constant first operand"};
    p.steps.push_back(std::move(st));
    reg[Outputs(n)[0]] = static_cast<int>(p.steps.size());
  }
  auto it = reg.find(result);
  if (it == reg.end()) throw Failure{"a unit's QuantizeLinear does not read its float program"};
  p.result = it->second;
  p.Expand(p.C, 1);
  return p;
}

void FloatProgram::Expand(size_t channels, size_t rows) {
  for (Step& st : steps)
    for (std::vector<float>* k : {&st.ka, &st.kb}) {
      if (k->empty()) continue;
      const std::vector<float> one =
          k->size() == 1 ? std::vector<float>(channels, (*k)[0]) : std::vector<float>(k->begin(), k->begin() + C);
      k->resize(channels * rows);
      for (size_t r = 0; r < rows; ++r) std::copy(one.begin(), one.end(), k->begin() + r * channels);
    }
  C = channels;
  block_rows = rows;
}

// Each operation over n = rows x C lanes, the constants laid out for as many rows (Expand): flat loops, so that
// the same float32 operations build tables (rows = 256 codes) and, vectorized, run on data (rows = pixels).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void RunStep(
    const FloatProgram::Step& st, const float* __restrict a, const float* __restrict b, float* __restrict y, size_t n) {
  using Op = FloatProgram::Op;
  const float* __restrict ka = st.ka.data();
  const float* __restrict k = b ? b : st.kb.data();  // the second operand: a tensor or the constant
  const float lo = st.lo, hi = st.hi, alpha = st.alpha, beta = st.beta;
  switch (st.op) {
    case Op::kAdd:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] + k[i];
      break;
    case Op::kSub:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] - k[i];
      break;
    case Op::kMul:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] * k[i];
      break;
    case Op::kDiv:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] / k[i];
      break;
    case Op::kRSub:
      for (size_t i = 0; i < n; ++i) y[i] = k[i] - a[i];
      break;
    case Op::kRDiv:
      for (size_t i = 0; i < n; ++i) y[i] = k[i] / a[i];
      break;
    case Op::kAffine:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] * ka[i] + k[i];
      break;
    case Op::kClip:
      for (size_t i = 0; i < n; ++i) y[i] = std::min(std::max(a[i], lo), hi);
      break;
    case Op::kRelu:
      for (size_t i = 0; i < n; ++i) y[i] = std::max(a[i], 0.0f);
      break;
    case Op::kLeakyRelu:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] >= 0 ? a[i] : alpha * a[i];
      break;
    case Op::kHardSigmoid:
      for (size_t i = 0; i < n; ++i) y[i] = std::max(0.0f, std::min(1.0f, alpha * a[i] + beta));
      break;
    case Op::kHardSwish:
      for (size_t i = 0; i < n; ++i) y[i] = a[i] * std::max(0.0f, std::min(1.0f, (1.0f / 6.0f) * a[i] + 0.5f));
      break;
    case Op::kSigmoid:
      for (size_t i = 0; i < n; ++i) y[i] = 1.0f / (1.0f + std::exp(-a[i]));
      break;
    case Op::kTanh:
      for (size_t i = 0; i < n; ++i) y[i] = std::tanh(a[i]);
      break;
    case Op::kErf:
      for (size_t i = 0; i < n; ++i) y[i] = std::erf(a[i]);
      break;
    case Op::kGelu:  // ORT's Gelu: 0.5 x (1 + erf(x / sqrt 2))
      for (size_t i = 0; i < n; ++i) y[i] = 0.5f * a[i] * (1.0f + std::erf(a[i] * static_cast<float>(M_SQRT1_2)));
      break;
    case Op::kGeluTanh:  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
      for (size_t i = 0; i < n; ++i)
        y[i] = 0.5f * a[i] * (1.0f + std::tanh(0.7978845608f * (a[i] + 0.044715f * a[i] * a[i] * a[i])));
      break;
    case Op::kNeg:
      for (size_t i = 0; i < n; ++i) y[i] = -a[i];
      break;
    case Op::kAbs:
      for (size_t i = 0; i < n; ++i) y[i] = std::fabs(a[i]);
      break;
    case Op::kCopy:
      for (size_t i = 0; i < n; ++i) y[i] = a[i];
      break;
  }
}

const float* RunProgram(const FloatProgram& p, const float* x, size_t rows, std::vector<std::vector<float>>* regs) {
  if (rows > p.block_rows) throw Failure{"float program run on more rows than its constants were laid out for"};
  if (regs->size() < p.steps.size() + 1) regs->resize(p.steps.size() + 1);
  const size_t n = rows * p.C;
  auto at = [&](int r) -> const float* { return r == 0 ? x : (*regs)[static_cast<size_t>(r)].data(); };
  for (size_t i = 0; i < p.steps.size(); ++i) {
    std::vector<float>& y = (*regs)[i + 1];
    if (y.size() < n) y.resize(n);
    const FloatProgram::Step& st = p.steps[i];
    RunStep(st, at(st.a), st.b >= 0 ? at(st.b) : nullptr, y.data(), n);
  }
  return at(p.result);
}

// A table unit that is one Add / Mul of its input and a DequantizeLinear'd u8 constant (a scalar or a channel vector
// with one scale and zero point), u8 throughout, is what ORT fuses into QLinearAdd / QLinearMul from
// ORT_ENABLE_EXTENDED on (DenseNet's BatchNormalization as Mul and Add of quantized constants): its table takes their
// arithmetic (QLinearBinary) on the constant's codes, as binary units do (tests/ort/test_ep_qlinear_binary.py). False
// for any other table.
bool QLinearTable(const Unit& u, std::vector<uint8_t>* t, size_t* C) {
  std::vector<const OrtNode*> body;  // but the constant's DequantizeLinear, a node of the unit too
  for (const OrtNode* n : u.nodes)
    if (n != u.q && !IsOp(n, "DequantizeLinear")) body.push_back(n);
  if (body.size() != 1 || !Domain(body[0]).empty() || !(IsOp(body[0], "Add") || IsOp(body[0], "Mul"))) return false;
  const auto in = Inputs(body[0]);
  const OrtValueInfo* x = Outputs(u.in_dqs[0])[0];
  if (in.size() != 2 || !in[0] || !in[1] || in[0] == in[1] || (in[0] != x && in[1] != x)) return false;
  const bool const_first = in[1] == x;
  std::vector<float> unused;
  const OrtNode* dq = nullptr;
  if (!ChannelConstant(in[const_first ? 0 : 1], false, u.layout, &unused, &dq) || !dq) return false;
  for (const OrtNode* n : u.nodes)
    if (IsOp(n, "DequantizeLinear") && n != dq) return false;
  const auto din = Inputs(dq);
  Constant q, s, z;
  if (!ReadConstant(din[0], &q) || q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || !ReadConstant(din[1], &s) ||
      s.count() != 1)
    return false;
  QParams pc{static_cast<const float*>(s.data)[0], 0, false};
  if (Input(din, 2)) {
    if (!ReadConstant(Input(din, 2), &z) || z.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || z.count() != 1)
      return false;
    pc.zp = static_cast<const uint8_t*>(z.data)[0];
  }
  const QParams px = InputParams(u.in_dqs[0]), py = OutputParams(u.q);
  if (px.is_signed || py.is_signed || !(pc.scale > 0.0f) || !std::isfinite(pc.scale)) return false;
  // The constant first: ORT walks it as its scalar (the operands swapped) where it is broadcast along ORT's innermost
  // axis: a single value, or a channel vector of a region's NCHW value (measured: ORT keeps such a QLinearAdd in
  // NCHW at ORT_ENABLE_ALL); along a MatMul tail's last axis it is the span itself.
  const bool swap = const_first && (q.count() == 1 || u.layout.axis != ConstLayout::kLast);
  const QParams &pa = const_first ? pc : px, &pb = const_first ? px : pc;
  const QLinearBinary ql(IsOp(body[0], "Mul") ? '*' : '+', swap ? pb : pa, swap ? pa : pb, py);
  *C = q.count();
  t->assign(*C * 256, 0);
  const auto* codes = static_cast<const uint8_t*>(q.data);
  for (size_t c = 0; c < *C; ++c)
    for (int k = 0; k < 256; ++k) {
      const int32_t a = const_first ? codes[c] : k, b = const_first ? k : codes[c];
      (*t)[c * 256 + static_cast<size_t>(k)] = swap ? ql(b, a) : ql(a, b);
    }
  return true;
}

std::vector<uint8_t> EvalTable(const Unit& u, size_t* C_out, bool* qlinear) {
  std::vector<uint8_t> ql;
  const bool is_ql = QLinearTable(u, &ql, C_out);
  if (qlinear) *qlinear = is_ql;
  if (is_ql) return ql;
  const QParams px = InputParams(u.in_dqs[0]), py = OutputParams(u.q);
  FloatProgram p = CompileTable(u);
  const size_t C = p.C;
  p.Expand(C, 256);
  std::vector<float> x(256 * C);  // [code][c]
  for (int code = 0; code < 256; ++code)
    std::fill_n(x.begin() + code * C, C,
                static_cast<float>(Code(static_cast<uint8_t>(code), px.is_signed) - px.zp) * px.scale);
  std::vector<std::vector<float>> regs;
  const float* f = RunProgram(p, x.data(), 256, &regs);
  std::vector<uint8_t> t(C * 256);
  const Quantizer q(py);
  for (size_t c = 0; c < C; ++c)
    for (int code = 0; code < 256; ++code) t[c * 256 + code] = q(f[code * C + c]);
  *C_out = C;
  return t;
}

void ComposeTables(std::vector<uint8_t>* table, size_t* tC, const std::vector<uint8_t>& t, size_t C) {
  if (t.empty()) return;  // the identity
  if (table->empty()) {
    *table = t;
    *tC = C;
    return;
  }
  const size_t n = std::max(*tC, C);
  if (*tC > 1 && C > 1 && *tC != C)
    throw Failure{"per-channel tables of " + std::to_string(*tC) + " and " + std::to_string(C) +
                  " channels meet in one region"};
  std::vector<uint8_t> out(n * 256 + 3);
  for (size_t c = 0; c < n; ++c)
    for (int k = 0; k < 256; ++k) {
      const uint8_t first = (*table)[(*tC == 1 ? 0 : c) * 256 + k];
      out[c * 256 + k] = t[(C == 1 ? 0 : c) * 256 + first];
    }
  *table = std::move(out);
  *tC = n;
}

}  // namespace qie_ep
