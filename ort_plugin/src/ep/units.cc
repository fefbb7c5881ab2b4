// QDQ units of the plugin EP's regions (see units.h): matching and the constants they carry.
//
// Numerics of a table: f is evaluated on the 256 dequantized codes, node by node, in float32 with the operations
// ORT's float kernels apply, so a table equals the QDQ graph wherever f is plain float32 arithmetic (Relu, Clip,
// LeakyRelu, HardSigmoid, HardSwish, Add/Sub/Mul/Div, BatchNormalization); Sigmoid, Tanh and Erf use libm where
// ORT uses MLAS's approximations, which may move a value across a rounding boundary: within one step
// (tests/ort/test_ep_regions.py bounds and counts it).
#include "ep/units.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

namespace qie_ep {

namespace {

const std::set<std::string>& TableOps() {
  static const std::set<std::string> ops = {
      "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh",     "Erf",
      "Add",  "Sub",  "Mul",       "Div",         "Neg",       "Abs",     "Identity", "BatchNormalization"};
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

// A constant table operand: a float32 scalar or per-channel vector, from an initializer or a DequantizeLinear of
// one (as ORT's quantizer writes a bias Add's or BatchNormalization's constants), evaluated as ORT does,
// (q - zp) * scale in float32. Channel vectors are [1,C,1,1] or [C,1,1] (NCHW's channel axis) or, with `one_d`
// (BatchNormalization's parameters), [C]. `dq` receives that DequantizeLinear (nullptr for an initializer).
bool ChannelConstant(const OrtValueInfo* vi, bool one_d, std::vector<float>* v, const OrtNode** dq) {
  auto channel_axis = [&](const std::vector<int64_t>& s, size_t count) -> int64_t {  // -2: not a table operand
    if (count == 1 && s.size() <= 4) return -1;                                      // a scalar
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

// DQ(x) -> f -> Q with f an elementwise subgraph of the DQ's output and constants; every consumer of the DQ's
// output is in f. Fills the unit (nodes: constant DQs, f's nodes in topological order, Q).
bool MatchTable(const OrtNode* dq, Unit* u) {
  if (!InputDq(dq)) return false;
  const OrtValueInfo* v0 = Outputs(dq)[0];
  if (Consumers(v0) == 0 || !Rank4(v0)) return false;  // regions hold 4-D values (NHWC inside)
  std::vector<const OrtNode*> body;                    // f's nodes, discovery order
  std::set<const OrtValueInfo*> values = {v0};
  std::vector<const OrtValueInfo*> frontier = {v0};
  const OrtNode* q = nullptr;
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
      if (!IsTableOp(c)) return false;
      if (std::find(body.begin(), body.end(), c) != body.end()) continue;
      if (body.size() >= 16) return false;
      const auto out = Outputs(c);
      if (out.empty() || !out[0]) return false;
      for (size_t i = 1; i < out.size(); ++i)
        if (out[i] && !Name(out[i]).empty()) return false;  // BatchNormalization's training outputs
      if (OpType(c) == "BatchNormalization" && AttrInt(c, "training_mode", 0) != 0) return false;
      body.push_back(c);
      values.insert(out[0]);
      frontier.push_back(out[0]);
    }
  }
  if (!q || body.empty()) return false;
  // Every other input of f's nodes: a scalar or per-channel constant (one channel count for the unit).
  std::vector<const OrtNode*> param_dqs;
  size_t C = 1;
  for (const OrtNode* n : body) {
    const std::string op = OpType(n);
    const auto in = Inputs(n);
    for (size_t i = 0; i < in.size(); ++i) {
      if (!Input(in, i) || values.count(in[i])) continue;
      std::vector<float> v;
      const OrtNode* pdq = nullptr;
      if (!ConstantOperand(op, i) || !ChannelConstant(in[i], op == "BatchNormalization", &v, &pdq)) return false;
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
  // Topological order of f's nodes.
  std::vector<const OrtNode*> order;
  std::set<const OrtValueInfo*> ready = {v0};
  while (order.size() < body.size()) {
    bool progress = false;
    for (const OrtNode* n : body) {
      if (std::find(order.begin(), order.end(), n) != order.end()) continue;
      bool ok = true;
      for (const OrtValueInfo* in : Inputs(n))
        if (in && values.count(in) && !ready.count(in)) ok = false;
      if (!ok) continue;
      order.push_back(n);
      ready.insert(Outputs(n)[0]);
      progress = true;
    }
    if (!progress) return false;  // a cycle cannot happen in a valid graph; refuse rather than loop
  }
  u->kind = UnitKind::kTable;
  u->in_dqs = {dq};
  u->op = order.front();
  u->q = q;
  u->nodes = param_dqs;
  u->nodes.insert(u->nodes.end(), order.begin(), order.end());
  u->nodes.push_back(q);
  return true;
}

// op(DQ(x_0), DQ(x_1), ...) -> Q for a node whose every input is a runtime 4-D DequantizeLinear.
bool MatchMultiInput(const OrtNode* n, UnitKind kind, size_t min_inputs, size_t max_inputs, Unit* u) {
  const auto in = Inputs(n);
  const auto out = Outputs(n);
  if (in.size() < min_inputs || in.size() > max_inputs || out.empty() || !out[0]) return false;
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i] && !Name(out[i]).empty()) return false;
  std::vector<const OrtNode*> dqs;
  for (const OrtValueInfo* v : in) {
    const OrtNode* dq = v ? Producer(v) : nullptr;
    if (!InputDq(dq) || !Rank4(v)) return false;
    dqs.push_back(dq);
  }
  Constant sy, zy;
  const OrtNode* q = SoleConsumer(out[0]);
  if (!QOperands(q, &sy, &zy) || !Rank4(out[0])) return false;
  u->kind = kind;
  u->in_dqs = dqs;
  u->op = n;
  u->q = q;
  u->nodes = {n, q};
  return true;
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
      else if (op == "Add" || op == "Sub" || op == "Mul")
        ok = MatchMultiInput(n, UnitKind::kBinary, 2, 2, &u);
      else if (op == "GlobalAveragePool")
        ok = MatchMultiInput(n, UnitKind::kGap, 1, 1, &u);
      else if (op == "Concat") {
        const int64_t axis = AttrInt(n, "axis", 0);
        ok = (axis == 1 || axis == -3) && MatchMultiInput(n, UnitKind::kConcat, 1, 64, &u);
      } else if (op == "MaxPool" || op == "AveragePool")
        ok = MatchPool(n, &u);
      if (!ok) continue;
      bool free = true;
      for (const OrtNode* m : u.nodes) free = free && !used.count(m) && !Assigned(m);
      for (const OrtNode* m : u.in_dqs) free = free && !used.count(m) && !Assigned(m);
      if (!free) continue;
      used.insert(u.nodes.begin(), u.nodes.end());
      units.push_back(u);
    } catch (const Failure&) { continue; }
  }
  return units;
}

std::vector<uint8_t> EvalTable(const Unit& u, size_t* C_out) {
  const QParams px = InputParams(u.in_dqs[0]), py = OutputParams(u.q);
  struct Lanes {  // values of one tensor for every input code: [C][256], C = 1 for a per-tensor value
    size_t C = 1;
    std::vector<float> v;
    float at(size_t c, int i) const { return v[(C == 1 ? 0 : c) * 256 + i]; }
  };
  std::map<const OrtValueInfo*, Lanes> vals;
  Lanes& x0 = vals[Outputs(u.in_dqs[0])[0]];
  x0.v.resize(256);
  for (int code = 0; code < 256; ++code)
    x0.v[code] = static_cast<float>(Code(static_cast<uint8_t>(code), px.is_signed) - px.zp) * px.scale;
  auto operand = [&](const OrtNode* n, const OrtValueInfo* vi, Lanes* scratch) -> const Lanes& {
    auto it = vals.find(vi);
    if (it != vals.end()) return it->second;
    std::vector<float> c;
    const OrtNode* unused = nullptr;
    if (!ChannelConstant(vi, OpType(n) == "BatchNormalization", &c, &unused))
      throw Failure{"table operand '" + Name(vi) + "' is not a constant"};
    scratch->C = c.size();
    scratch->v.resize(c.size() * 256);
    for (size_t ch = 0; ch < c.size(); ++ch) std::fill_n(scratch->v.begin() + ch * 256, 256, c[ch]);
    return *scratch;
  };
  for (const OrtNode* n : u.nodes) {
    if (n == u.q || IsOp(n, "DequantizeLinear")) continue;  // constant DQs are read through their consumers
    const std::string op = OpType(n);
    const auto in = Inputs(n);
    Lanes sa, sb;
    const Lanes& a = operand(n, in[0], &sa);
    Lanes y;
    auto each = [&](size_t C, auto f) {  // y[c][i] = f(c, i)
      y.C = C;
      y.v.resize(C * 256);
      for (size_t c = 0; c < C; ++c)
        for (int i = 0; i < 256; ++i) y.v[c * 256 + i] = f(c, i);
    };
    if (op == "Add" || op == "Sub" || op == "Mul" || op == "Div") {
      const Lanes& b = operand(n, in.at(1), &sb);
      const size_t C = std::max(a.C, b.C);
      if (op == "Add") each(C, [&](size_t c, int i) { return a.at(c, i) + b.at(c, i); });
      if (op == "Sub") each(C, [&](size_t c, int i) { return a.at(c, i) - b.at(c, i); });
      if (op == "Mul") each(C, [&](size_t c, int i) { return a.at(c, i) * b.at(c, i); });
      if (op == "Div") each(C, [&](size_t c, int i) { return a.at(c, i) / b.at(c, i); });
    } else if (op == "BatchNormalization") {  // y = x * (scale / sqrt(var + eps)) + (B - mean * that), ORT's order
      Lanes p[4];
      const Lanes* q[4];
      for (int k = 0; k < 4; ++k) q[k] = &operand(n, in.at(1 + k), &p[k]);
      const float eps = AttrFloat(n, "epsilon", 1e-5f);
      each(q[0]->C, [&](size_t c, int i) {
        const float scale = (1.0f / std::sqrt(q[3]->at(c, 0) + eps)) * q[0]->at(c, 0);
        const float bias = q[1]->at(c, 0) - q[2]->at(c, 0) * scale;
        return a.at(c, i) * scale + bias;
      });
    } else if (op == "Clip") {
      float lo = -INFINITY, hi = INFINITY;
      if (Input(in, 1)) lo = operand(n, in[1], &sa).at(0, 0);
      if (Input(in, 2)) hi = operand(n, in[2], &sb).at(0, 0);
      if (in.size() == 1) {  // opset < 11: attributes
        lo = AttrFloat(n, "min", lo);
        hi = AttrFloat(n, "max", hi);
      }
      each(a.C, [&](size_t c, int i) { return std::min(std::max(a.at(c, i), lo), hi); });
    } else {
      const float alpha = AttrFloat(n, "alpha", op == "LeakyRelu" ? 0.01f : 0.2f);
      const float beta = AttrFloat(n, "beta", 0.5f);
      each(a.C, [&](size_t c, int i) {
        const float x = a.at(c, i);
        if (op == "Relu") return std::max(x, 0.0f);
        if (op == "LeakyRelu") return x >= 0 ? x : alpha * x;
        if (op == "HardSigmoid") return std::max(0.0f, std::min(1.0f, alpha * x + beta));
        if (op == "HardSwish") return x * std::max(0.0f, std::min(1.0f, (1.0f / 6.0f) * x + 0.5f));
        if (op == "Sigmoid") return 1.0f / (1.0f + std::exp(-x));
        if (op == "Tanh") return std::tanh(x);
        if (op == "Erf") return std::erf(x);
        if (op == "Neg") return -x;
        if (op == "Abs") return std::fabs(x);
        return x;  // Identity
      });
    }
    vals[Outputs(n)[0]] = std::move(y);
  }
  const Lanes& f = vals.at(Inputs(u.q)[0]);
  std::vector<uint8_t> t(f.C * 256);
  for (size_t i = 0; i < t.size(); ++i) t[i] = QuantizeOne(f.v[i], py);
  *C_out = f.C;
  return t;
}

}  // namespace qie_ep
