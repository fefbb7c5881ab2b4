// Quantized regions of the plugin EP (see region.h): matching, planning and execution.
//
// Numerics: a conv unit computes acc = sum (x - zx)(w - zw[m]) + bias[m] exactly and
// y = saturate(round_half_even(float(acc) * (sx * sw[m] / sy)) + zy), QLinearConv's arithmetic (what ORT runs
// at ORT_ENABLE_EXTENDED and above; within one step of the float DQ -> Conv -> Q below that). A table unit maps
// every input code q to Q(f(DQ(q))) with f evaluated in float32 by the same operations ORT's float kernels apply,
// so it equals the QDQ graph wherever f is plain float32 arithmetic (Relu, Clip, LeakyRelu, HardSigmoid,
// HardSwish, Add/Sub/Mul/Div); Sigmoid, Tanh and Erf use libm where ORT uses MLAS's approximations, which may
// move a value across a rounding boundary: within one step (tests/ort/test_ep_regions.py bounds and counts it).
//
// Execution of a region with convolutions:
//   1. the NCHW input is transposed once to NHWC (bytes);
//   2. each conv runs on qie's NHWC kernels (prepacked weights) into the other of two per-thread buffers;
//   3. consecutive tables are composed at Compile into one 256-entry table and applied in place;
//   4. the result is transposed once back to NCHW into the fused node's output.
// A region of tables only is layout-free: one composed table from input to output.
#include "ep/region.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "ep/graph.h"
#include "kernels/conv.h"
#include "kernels/isa.h"
#include "ops/conv_core.h"

namespace qie_ep {

namespace {

enum class UnitKind { kConv, kTable, kChannelTable };

struct Unit {
  UnitKind kind = UnitKind::kTable;
  const OrtNode* dq_x = nullptr;  // the unit's input DequantizeLinear
  const OrtNode* q = nullptr;     // its output QuantizeLinear
  std::vector<const OrtNode*> nodes;
};

// ---- matching -----------------------------------------------------------------------------------------------

const std::set<std::string>& TableOps() {
  static const std::set<std::string> ops = {"Relu",    "Clip", "LeakyRelu", "HardSigmoid", "HardSwish",
                                            "Sigmoid", "Tanh", "Erf",       "Add",         "Sub",
                                            "Mul",     "Div",  "Neg",       "Abs",         "Identity"};
  return ops;
}
bool IsTableOp(const OrtNode* n) { return n && Domain(n).empty() && TableOps().count(OpType(n)) > 0; }

bool ScalarFloat(const OrtValueInfo* vi, float* v) {
  Constant c;
  if (!ReadConstant(vi, &c) || c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.count() != 1) return false;
  *v = static_cast<const float*>(c.data)[0];
  return true;
}

// The input DequantizeLinear of a unit: a runtime u8/s8 tensor, per-tensor constant scale and zero point.
bool InputDq(const OrtNode* dq, Constant* sx, Constant* zx, ONNXTensorElementDataType* xt) {
  Constant unused;
  return DqOperands(dq, true, 0, &unused, sx, zx, xt);
}

// DQ(x) -> f -> Q with f an elementwise subgraph of the DQ's output and scalar constants. Fills the unit's nodes
// (DQ first, then f's nodes in topological order, then Q).
bool MatchTable(const OrtNode* dq, Unit* u) {
  Constant sx, zx;
  ONNXTensorElementDataType xt;
  if (!InputDq(dq, &sx, &zx, &xt)) return false;
  const OrtValueInfo* v0 = Outputs(dq)[0];
  if (IsGraphOutput(v0) || Consumers(v0) == 0) return false;
  std::vector<const OrtNode*> body;  // f's nodes, discovery order
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
      if (out.size() != 1 || !out[0]) return false;
      body.push_back(c);
      values.insert(out[0]);
      frontier.push_back(out[0]);
    }
  }
  if (!q || body.empty()) return false;
  // Every input of f's nodes: a value of the unit or a scalar float constant; the Q reads f's one result.
  for (const OrtNode* n : body) {
    for (const OrtValueInfo* in : Inputs(n)) {
      float unused;
      if (!in || Name(in).empty() || values.count(in)) continue;
      if (!ScalarFloat(in, &unused)) return false;
    }
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
  u->dq_x = dq;
  u->q = q;
  u->nodes = {dq};
  u->nodes.insert(u->nodes.end(), order.begin(), order.end());
  u->nodes.push_back(q);
  return true;
}

// A 1-D float constant: an initializer, or DequantizeLinear of a constant (per-tensor or along axis 0, as ORT's
// quantizer writes BatchNormalization's scale and bias) evaluated as ORT does, (q - zp) * scale in float32.
// `dq` receives that DequantizeLinear (nullptr for a plain initializer).
bool FloatVector(const OrtValueInfo* vi, std::vector<float>* v, const OrtNode** dq) {
  Constant c;
  *dq = nullptr;
  if (ReadConstant(vi, &c)) {
    if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.shape.size() != 1) return false;
    v->assign(static_cast<const float*>(c.data), static_cast<const float*>(c.data) + c.count());
    return true;
  }
  const OrtNode* p = Producer(vi);
  if (!IsOp(p, "DequantizeLinear") || AttrInt(p, "block_size", 0) != 0) return false;
  const auto in = Inputs(p);
  Constant q, s, z;
  if (in.size() < 2 || !ReadConstant(in[0], &q) || q.shape.size() != 1 || !ReadConstant(in[1], &s) ||
      s.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || (s.count() != 1 && s.count() != q.count()))
    return false;
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

// DQ(x) -> BatchNormalization(., constant scale, B, mean, var) -> Q (inference mode): a per-channel table.
bool MatchBatchNorm(const OrtNode* dq, Unit* u) {
  Constant sx, zx, sy, zy;
  ONNXTensorElementDataType xt;
  if (!InputDq(dq, &sx, &zx, &xt)) return false;
  const OrtNode* bn = SoleConsumer(Outputs(dq)[0]);
  if (!IsOp(bn, "BatchNormalization") || AttrInt(bn, "training_mode", 0) != 0) return false;
  const auto in = Inputs(bn);
  const auto out = Outputs(bn);
  if (in.size() != 5 || out.empty() || !out[0]) return false;
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i] && !Name(out[i]).empty()) return false;
  size_t C = 0;
  std::vector<const OrtNode*> param_dqs;
  for (size_t i = 1; i < 5; ++i) {
    std::vector<float> v;
    const OrtNode* pdq = nullptr;
    if (!in[i] || !FloatVector(in[i], &v, &pdq) || (i > 1 && v.size() != C)) return false;
    if (pdq) {
      if (SoleConsumer(in[i]) != bn) return false;
      param_dqs.push_back(pdq);
    }
    C = v.size();
  }
  const OrtNode* q = SoleConsumer(out[0]);
  if (C == 0 || !QOperands(q, &sy, &zy)) return false;
  u->kind = UnitKind::kChannelTable;
  u->dq_x = dq;
  u->q = q;
  u->nodes = {dq};
  u->nodes.insert(u->nodes.end(), param_dqs.begin(), param_dqs.end());
  u->nodes.push_back(bn);
  u->nodes.push_back(q);
  return true;
}

// The operands of a conv unit, read from the graph.
struct ConvOperands {
  Constant sx, zx, w, sw, zw, sy, zy;
  ONNXTensorElementDataType xt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, wt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int32_t> bias;
  qie::ConvAttrs at;
};

bool MatchConv(const OrtNode* conv, Unit* u, ConvOperands* o) {
  if (!IsOp(conv, "Conv")) return false;
  const auto in = Inputs(conv);
  const auto out = Outputs(conv);
  if (out.size() != 1 || in.size() < 2 || in.size() > 3 || !in[0] || !in[1]) return false;
  const OrtNode* dq_x = Producer(in[0]);
  const OrtNode* dq_w = Producer(in[1]);
  const OrtValueInfo* b = Input(in, 2);
  const OrtNode* dq_b = b ? Producer(b) : nullptr;
  if (!dq_x || !dq_w || SoleConsumer(in[0]) != conv || SoleConsumer(in[1]) != conv) return false;
  if (b && (!dq_b || SoleConsumer(b) != conv)) return false;
  const OrtNode* q = SoleConsumer(out[0]);
  if (!QOperands(q, &o->sy, &o->zy)) return false;
  if (!InputDq(dq_x, &o->sx, &o->zx, &o->xt)) return false;
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
  u->dq_x = dq_x;
  u->q = q;
  u->nodes = {dq_x, dq_w};
  if (dq_b) u->nodes.push_back(dq_b);
  u->nodes.push_back(conv);
  u->nodes.push_back(q);
  return true;
}

// Every unit of `nodes` and the chains they form (unit indices, in chain order).
struct Chains {
  std::vector<Unit> units;
  std::vector<std::vector<size_t>> chains;
};

Chains FindChains(const std::vector<const OrtNode*>& nodes) {
  Chains r;
  std::set<const OrtNode*> used;
  for (const OrtNode* n : nodes) {
    // A node whose reading fails is left to ORT: claiming nothing is always safe.
    try {
      Unit u;
      ConvOperands o;
      if (MatchConv(n, &u, &o) || (IsOp(n, "DequantizeLinear") && (MatchBatchNorm(n, &u) || MatchTable(n, &u)))) {
        bool free = true;
        for (const OrtNode* m : u.nodes) free = free && !used.count(m) && !Assigned(m);
        if (!free) continue;
        used.insert(u.nodes.begin(), u.nodes.end());
        r.units.push_back(u);
      }
    } catch (const Failure&) { continue; }
  }
  std::map<const OrtNode*, size_t> by_dq;
  for (size_t i = 0; i < r.units.size(); ++i) by_dq[r.units[i].dq_x] = i;
  std::vector<long> next(r.units.size(), -1), prev(r.units.size(), -1);
  for (size_t i = 0; i < r.units.size(); ++i) {
    int64_t idx = -1;
    const OrtNode* c = SoleConsumer(Outputs(r.units[i].q)[0], &idx);
    auto it = c ? by_dq.find(c) : by_dq.end();
    if (it == by_dq.end() || idx != 0 || it->second == i || prev[it->second] != -1) continue;
    next[i] = static_cast<long>(it->second);
    prev[it->second] = static_cast<long>(i);
  }
  for (size_t i = 0; i < r.units.size(); ++i) {
    if (prev[i] != -1) continue;
    std::vector<size_t> chain;
    for (long j = static_cast<long>(i); j != -1 && chain.size() <= r.units.size(); j = next[j])
      chain.push_back(static_cast<size_t>(j));
    r.chains.push_back(chain);
  }
  return r;
}

// ---- planning -----------------------------------------------------------------------------------------------

int32_t QMin(bool s) { return s ? -128 : 0; }
int32_t QMax(bool s) { return s ? 127 : 255; }

// q = saturate(round_half_even(v / s) + zp), as ORT's QuantizeLinear (MLAS) computes it.
uint8_t QuantizeOne(float v, float s, int32_t zp, bool is_signed) {
  float x = v / s;
  const float lo = static_cast<float>(QMin(is_signed) - zp), hi = static_cast<float>(QMax(is_signed) - zp);
  if (std::isnan(x)) x = 0.0f;  // MLAS's min/max order sends NaN to the zero point
  x = std::min(std::max(x, lo), hi);
  const int32_t q = static_cast<int32_t>(std::nearbyint(x)) + zp;
  return static_cast<uint8_t>(is_signed ? static_cast<uint8_t>(static_cast<int8_t>(q)) : q);
}

// f evaluated on the 256 dequantized input codes, node by node, in float32.
void EvalTable(const Unit& u, uint8_t table[256], bool* out_signed) {
  Constant sx, zx, sy, zy;
  ONNXTensorElementDataType xt;
  if (!InputDq(u.dq_x, &sx, &zx, &xt) || !QOperands(u.q, &sy, &zy)) throw Failure{"table unit changed"};
  const bool xs = xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ys = zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  const float fsx = static_cast<const float*>(sx.data)[0];
  const int32_t izx = zx.data ? Zp(zx, 0) : 0;
  std::map<const OrtValueInfo*, std::vector<float>> vals;
  std::vector<float>& x0 = vals[Outputs(u.dq_x)[0]];
  x0.resize(256);
  for (int code = 0; code < 256; ++code) {
    const int32_t q = xs ? static_cast<int8_t>(code) : code;
    x0[code] = static_cast<float>(q - izx) * fsx;  // DequantizeLinear
  }
  auto operand = [&](const OrtValueInfo* vi, std::vector<float>* scratch) -> const std::vector<float>& {
    auto it = vals.find(vi);
    if (it != vals.end()) return it->second;
    float c = 0;
    if (!ScalarFloat(vi, &c)) throw Failure{"table operand '" + Name(vi) + "' is not a scalar constant"};
    scratch->assign(256, c);
    return *scratch;
  };
  for (size_t k = 1; k + 1 < u.nodes.size(); ++k) {
    const OrtNode* n = u.nodes[k];
    const std::string op = OpType(n);
    const auto in = Inputs(n);
    std::vector<float> sa, sb;
    const std::vector<float>& a = operand(in[0], &sa);
    std::vector<float> y(256);
    if (op == "Add" || op == "Sub" || op == "Mul" || op == "Div") {
      const std::vector<float>& b = operand(in.at(1), &sb);
      for (int i = 0; i < 256; ++i)
        y[i] = op == "Add" ? a[i] + b[i] : op == "Sub" ? a[i] - b[i] : op == "Mul" ? a[i] * b[i] : a[i] / b[i];
    } else if (op == "Clip") {
      float lo = -INFINITY, hi = INFINITY;
      if (in.size() > 1 && Input(in, 1)) lo = operand(in[1], &sa)[0];
      if (in.size() > 2 && Input(in, 2)) hi = operand(in[2], &sb)[0];
      if (in.size() == 1) {  // opset < 11: attributes
        lo = AttrFloat(n, "min", -3.402823466e+38f);
        hi = AttrFloat(n, "max", 3.402823466e+38f);
      }
      for (int i = 0; i < 256; ++i) y[i] = std::min(std::max(a[i], lo), hi);
    } else {
      const float alpha = AttrFloat(n, "alpha", op == "LeakyRelu" ? 0.01f : 0.2f);
      const float beta = AttrFloat(n, "beta", 0.5f);
      for (int i = 0; i < 256; ++i) {
        const float x = a[i];
        if (op == "Relu")
          y[i] = std::max(x, 0.0f);
        else if (op == "LeakyRelu")
          y[i] = x >= 0 ? x : alpha * x;
        else if (op == "HardSigmoid")
          y[i] = std::max(0.0f, std::min(1.0f, alpha * x + beta));
        else if (op == "HardSwish")
          y[i] = x * std::max(0.0f, std::min(1.0f, (1.0f / 6.0f) * x + 0.5f));
        else if (op == "Sigmoid")
          y[i] = 1.0f / (1.0f + std::exp(-x));
        else if (op == "Tanh")
          y[i] = std::tanh(x);
        else if (op == "Erf")
          y[i] = std::erf(x);
        else if (op == "Neg")
          y[i] = -x;
        else if (op == "Abs")
          y[i] = std::fabs(x);
        else
          y[i] = x;  // Identity
      }
    }
    vals[Outputs(n)[0]] = std::move(y);
  }
  const std::vector<float>& f = vals.at(Inputs(u.q)[0]);
  const float fsy = static_cast<const float*>(sy.data)[0];
  const int32_t izy = Zp(zy, 0);
  for (int i = 0; i < 256; ++i) table[i] = QuantizeOne(f[i], fsy, izy, ys);
  *out_signed = ys;
}

// BatchNormalization's table per channel: y = x * (scale / sqrt(var + eps)) + (B - mean * that), in ORT's order.
std::vector<uint8_t> EvalChannelTable(const Unit& u, bool* out_signed) {
  Constant sx, zx, sy, zy;
  std::vector<float> p[4];
  ONNXTensorElementDataType xt;
  if (!InputDq(u.dq_x, &sx, &zx, &xt) || !QOperands(u.q, &sy, &zy)) throw Failure{"channel table unit changed"};
  const OrtNode* bn = u.nodes[u.nodes.size() - 2];
  const auto in = Inputs(bn);
  for (int i = 0; i < 4; ++i) {
    const OrtNode* unused = nullptr;
    if (!FloatVector(in[1 + i], &p[i], &unused)) throw Failure{"BatchNormalization operand changed"};
  }
  const float eps = AttrFloat(bn, "epsilon", 1e-5f);
  const size_t C = p[0].size();
  const bool xs = xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ys = zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  const float fsx = static_cast<const float*>(sx.data)[0], fsy = static_cast<const float*>(sy.data)[0];
  const int32_t izx = zx.data ? Zp(zx, 0) : 0, izy = Zp(zy, 0);
  auto at = [&](int i, size_t c) { return p[i][c]; };
  std::vector<uint8_t> t(C * 256);
  for (size_t c = 0; c < C; ++c) {
    const float inv_std = 1.0f / std::sqrt(at(3, c) + eps);
    const float scale = inv_std * at(0, c), bias = at(1, c) - at(2, c) * scale;
    for (int code = 0; code < 256; ++code) {
      const int32_t q = xs ? static_cast<int8_t>(code) : code;
      const float x = static_cast<float>(q - izx) * fsx;
      t[c * 256 + code] = QuantizeOne(x * scale + bias, fsy, izy, ys);
    }
  }
  *out_signed = ys;
  return t;
}

}  // namespace

struct RegionPlan {
  struct Step {
    UnitKind kind = UnitKind::kTable;
    uint8_t table[256 + 3] = {};  // composed tables (3 bytes of padding: the vector lookup reads dwords)
    std::vector<uint8_t> ctable;  // per channel [C][256] when any composed table is per channel
    // conv
    qie::ConvAttrs at;
    std::vector<int64_t> k;
    size_t C = 0, M = 0;
    qie::PackedConv packed;
    std::vector<int32_t> wzp, bias;
    std::vector<float> scale;
    int32_t xzp = 0, yzp = 0;
    bool x_signed = false;
    qie::OutKind out = qie::OutKind::kU8;
  };
  std::vector<Step> steps;
  bool spatial = false;  // has convolutions: NCHW input, NHWC inside
  bool y_signed = false;
  std::string input_name;
};

std::vector<std::vector<const OrtNode*>> MatchRegions(const std::vector<const OrtNode*>& nodes,
                                                      const RegionOptions& opts) {
  const Chains c = FindChains(nodes);
  std::vector<std::vector<const OrtNode*>> out;
  for (const auto& chain : c.chains) {
    size_t convs = 0;
    for (size_t i : chain) convs += c.units[i].kind == UnitKind::kConv;
    if (convs == 0 ? !opts.table_regions : convs < opts.min_conv_units) continue;
    std::vector<const OrtNode*> group;
    for (size_t i : chain) group.insert(group.end(), c.units[i].nodes.begin(), c.units[i].nodes.end());
    out.push_back(group);
  }
  return out;
}

RegionPlan* CompileRegion(const std::vector<const OrtNode*>& nodes, const std::string& input_name) {
  const Chains c = FindChains(nodes);
  size_t covered = 0;
  for (const Unit& u : c.units) covered += u.nodes.size();
  if (c.chains.size() != 1 || covered != nodes.size())
    throw Failure{"fused graph is not the region GetCapability claimed"};
  auto plan = std::make_unique<RegionPlan>();
  plan->input_name = input_name;
  const qie::MicroKernel& uk = qie::GetMicroKernel(qie::ActiveIsa());
  for (size_t i : c.chains[0]) {
    const Unit& u = c.units[i];
    if (u.kind != UnitKind::kConv) {
      uint8_t t[256];
      std::vector<uint8_t> ct;  // per channel, or empty
      bool ys = false;
      if (u.kind == UnitKind::kTable)
        EvalTable(u, t, &ys);
      else
        ct = EvalChannelTable(u, &ys);
      plan->y_signed = ys;
      if (plan->steps.empty() || plan->steps.back().kind != UnitKind::kTable) {
        RegionPlan::Step s;
        for (int k = 0; k < 256; ++k) s.table[k] = static_cast<uint8_t>(k);  // identity, composed below
        plan->steps.push_back(std::move(s));
      }
      RegionPlan::Step& st = plan->steps.back();                     // compose: this table after the step's
      const size_t C = std::max(st.ctable.size(), ct.size()) / 256;  // (padding < 256)
      if (C == 0) {
        for (int k = 0; k < 256; ++k) st.table[k] = t[st.table[k]];
        continue;
      }
      if ((!st.ctable.empty() && st.ctable.size() != C * 256 + 3) || (!ct.empty() && ct.size() != C * 256))
        throw Failure{"BatchNormalization channel counts differ inside one region"};
      std::vector<uint8_t> out(C * 256);
      for (size_t c = 0; c < C; ++c)
        for (int k = 0; k < 256; ++k) {
          const uint8_t first = st.ctable.empty() ? st.table[k] : st.ctable[c * 256 + k];
          out[c * 256 + k] = ct.empty() ? t[first] : ct[c * 256 + first];
        }
      out.resize(C * 256 + 3);  // padding for the vector lookup
      st.ctable = std::move(out);
      continue;
    }
    const OrtNode* conv = nullptr;
    for (const OrtNode* n : u.nodes)
      if (IsOp(n, "Conv")) conv = n;
    Unit again;
    ConvOperands o;
    if (!MatchConv(conv, &again, &o)) throw Failure{"conv unit changed between GetCapability and Compile"};
    RegionPlan::Step s;
    s.kind = UnitKind::kConv;
    s.at = o.at;
    s.k = qie::ConvKernelDims(o.at, 4, -1, o.w.shape);
    s.M = static_cast<size_t>(o.w.shape[0]);
    s.C = static_cast<size_t>(o.w.shape[1] * o.at.group);
    s.x_signed = o.xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    s.xzp = o.zx.data ? Zp(o.zx, 0) : 0;
    s.wzp.resize(s.M);
    s.scale.resize(s.M);
    const float fsx = static_cast<const float*>(o.sx.data)[0], fsy = static_cast<const float*>(o.sy.data)[0];
    for (size_t m = 0; m < s.M; ++m) {
      const size_t j = o.sw.count() == 1 ? 0 : m;
      s.wzp[m] = o.zw.data ? Zp(o.zw, j) : 0;
      s.scale[m] = (fsx * static_cast<const float*>(o.sw.data)[j]) / fsy;  // QLinearConv's order
    }
    s.bias = o.bias;
    s.yzp = Zp(o.zy, 0);
    plan->y_signed = o.zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    s.out = plan->y_signed ? qie::OutKind::kS8 : qie::OutKind::kU8;
    qie::ConvShape cs;
    cs.M = s.M;
    cs.group = static_cast<size_t>(o.at.group);
    cs.C = s.C;
    cs.k[1] = static_cast<size_t>(s.k[0]);
    cs.k[2] = static_cast<size_t>(s.k[1]);
    qie::PackConv(uk, cs, static_cast<const uint8_t*>(o.w.data), o.wt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                  s.wzp.data(), &s.packed);
    plan->spatial = true;
    plan->steps.push_back(std::move(s));
  }
  return plan.release();
}

void ReleaseRegion(RegionPlan* plan) { delete plan; }

namespace {

// Per-thread ping-pong buffers, kept between runs and grown, never shrunk: a run in the steady state allocates
// nothing. They live as long as the thread.
std::vector<uint8_t>& Buffer(int which) {
  thread_local std::vector<uint8_t> buf[2];
  return buf[which];
}
uint8_t* Sized(int which, size_t n) {
  std::vector<uint8_t>& b = Buffer(which);
  if (b.size() < n) b.resize(n);
  return b.data();
}

// y = t[c][x] over `outer` blocks of [C][inner] (NHWC: outer = pixels, inner = 1; NCHW: inner = H*W; one table:
// C = 1). `t` holds C * 256 bytes and 3 more (the vector kernel reads dwords). Blocks of ~32 KiB, in parallel.
void ApplyLut(const uint8_t* t, size_t C, const uint8_t* x, uint8_t* y, size_t outer, size_t inner,
              const qie::ParallelFor& pfor) {
  const qie::ChannelLutFn lut = qie::KernelsFor(qie::ActiveIsa()).channel_lut;
  if (inner != 1) {  // NCHW: each [inner] row has one channel's table
    const size_t rows = outer * C, per = std::max<size_t>(1, (size_t{1} << 15) / inner);
    if (rows == 0 || inner == 0) return;
    pfor((rows + per - 1) / per, [&](size_t b) {
      for (size_t r = b * per; r < std::min(rows, (b + 1) * per); ++r) {
        const uint8_t* tc = t + (r % C) * 256;
        if (lut) {
          lut(tc, 1, x + r * inner, y + r * inner, inner);
        } else {
          for (size_t i = r * inner; i < (r + 1) * inner; ++i) y[i] = tc[x[i]];
        }
      }
    });
    return;
  }
  if (outer == 0 || C == 0) return;
  const size_t per = std::max<size_t>(1, (size_t{1} << 15) / C);
  pfor((outer + per - 1) / per, [&](size_t b) {
    const size_t p0 = b * per, p1 = std::min(outer, p0 + per);
    if (lut) {
      lut(t, C, x + p0 * C, y + p0 * C, p1 - p0);
      return;
    }
    for (size_t p = p0; p < p1; ++p)
      for (size_t c = 0; c < C; ++c) y[p * C + c] = t[c * 256 + x[p * C + c]];
  });
}

std::vector<int64_t> Shape(const OrtValue* v, ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> shape(rank);
  if (!st && rank) st = g_api->GetDimensions(info, shape.data(), rank);
  if (!st) st = g_api->GetTensorElementType(info, type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  Check(st);
  return shape;
}

std::string Dims(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

OrtStatus* RunRegion(RegionPlan& p, OrtKernelContext* ctx) {
  return Guard("region", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, 0, &x));
    ONNXTensorElementDataType xt;
    const std::vector<int64_t> shape = Shape(x, &xt);
    const void* xd = nullptr;
    Check(g_api->GetTensorData(x, &xd));
    const qie::ParallelFor pfor = CtxParallelFor(ctx);
    if (!p.spatial) {  // tables only: elementwise on any shape
      OrtValue* y = nullptr;
      Check(g_api->KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &y));
      void* yd = nullptr;
      Check(g_api->GetTensorMutableData(y, &yd));
      size_t n = 1;
      for (int64_t d : shape) n *= static_cast<size_t>(d);
      const auto* xb = static_cast<const uint8_t*>(xd);
      auto* yb = static_cast<uint8_t*>(yd);
      if (p.steps[0].ctable.empty()) return ApplyLut(p.steps[0].table, 1, xb, yb, n, 1, pfor);
      const size_t C = p.steps[0].ctable.size() / 256;
      if (shape.size() < 2 || static_cast<size_t>(shape[1]) != C)
        throw Failure{"input '" + p.input_name + "' must have " + std::to_string(C) +
                      " channels (dim 1) for BatchNormalization, got " + Dims(shape)};
      const size_t outer = static_cast<size_t>(shape[0]);
      return ApplyLut(p.steps[0].ctable.data(), C, xb, yb, outer, outer ? n / outer / C : 0, pfor);
    }
    if (shape.size() != 4)
      throw Failure{"input '" + p.input_name + "' must be 4-D (N, C, H, W) for a 2-D convolution, got " + Dims(shape)};
    size_t C = 0;
    for (const auto& s : p.steps)
      if (s.kind == UnitKind::kConv) {
        C = s.C;
        break;
      }
    if (static_cast<size_t>(shape[1]) != C)
      throw Failure{"input '" + p.input_name + "' has " + std::to_string(shape[1]) +
                    " channels; the region's first convolution expects " + std::to_string(C)};
    size_t N = static_cast<size_t>(shape[0]), H = static_cast<size_t>(shape[2]), W = static_cast<size_t>(shape[3]);
    size_t ch = C;
    int cur = 0;
    uint8_t* a = Sized(cur, N * C * H * W);
    qie::Transpose2D(xd, a, N, C, H * W, 1);
    for (auto& s : p.steps) {
      const size_t n = N * H * W * ch;
      if (s.kind == UnitKind::kTable) {
        if (s.ctable.empty()) {
          ApplyLut(s.table, 1, a, a, n, 1, pfor);
        } else {
          if (ch != s.ctable.size() / 256)
            throw Failure{"a BatchNormalization of " + std::to_string(s.ctable.size() / 256) + " channels meets " +
                          std::to_string(ch) + " channels"};
          ApplyLut(s.ctable.data(), ch, a, a, N * H * W, 1, pfor);
        }
        continue;
      }
      std::vector<int64_t> out, pad;
      qie::ConvGeometry(s.at, {static_cast<int64_t>(H), static_cast<int64_t>(W)}, s.k, &out, &pad);
      qie::ConvShape cs;
      cs.batch = N;
      cs.C = s.C;
      cs.M = s.M;
      cs.group = static_cast<size_t>(s.at.group);
      cs.in[1] = H;
      cs.in[2] = W;
      cs.out[1] = static_cast<size_t>(out[0]);
      cs.out[2] = static_cast<size_t>(out[1]);
      cs.k[1] = static_cast<size_t>(s.k[0]);
      cs.k[2] = static_cast<size_t>(s.k[1]);
      for (int d = 0; d < 2; ++d) {
        cs.stride[1 + d] = s.at.strides.empty() ? 1 : static_cast<size_t>(s.at.strides[d]);
        cs.dil[1 + d] = s.at.dilations.empty() ? 1 : static_cast<size_t>(s.at.dilations[d]);
        cs.pad[1 + d] = static_cast<size_t>(pad[d]);
      }
      const size_t osize = N * cs.out_pixels() * s.M;
      uint8_t* b = Sized(1 - cur, osize);
      a = Buffer(cur).data();  // Sized(1 - cur) never moves buffer cur
      if (osize) {
        qie::ConvArgs ca;
        ca.x = a;
        ca.x_signed = s.x_signed;
        ca.x_zp = s.xzp;
        ca.w_zp = s.wzp.data();
        ca.bias = s.bias.empty() ? nullptr : s.bias.data();
        ca.kind = s.out;
        ca.scale = s.scale.data();
        ca.y_zp = s.yzp;
        ca.y = b;
        qie::Conv(qie::GetMicroKernel(s.packed.isa), cs, s.packed, ca, pfor);  // the ISA it was packed for
      }
      cur = 1 - cur;
      a = b;
      H = cs.out[1];
      W = cs.out[2];
      ch = s.M;
    }
    const std::vector<int64_t> yshape = {static_cast<int64_t>(N), static_cast<int64_t>(ch), static_cast<int64_t>(H),
                                         static_cast<int64_t>(W)};
    OrtValue* y = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, 0, yshape.data(), yshape.size(), &y));
    void* yd = nullptr;
    Check(g_api->GetTensorMutableData(y, &yd));
    qie::Transpose2D(a, yd, N, H * W, ch, 1);
  });
}

}  // namespace qie_ep
