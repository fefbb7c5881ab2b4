// The EP's QDQ MatMul / Gemm units (matmul_unit.h): matching, compiling, running.
//
// First level (issue 13): every QDQ unit DequantizeLinear(x) -> MatMul(., DequantizeLinear(W)) -> QuantizeLinear
// with W a constant 2-D initializer, and every Gemm unit of the same shape (alpha = beta = 1, no transA, transB
// packed as such, C a DequantizeLinear'd int32 bias of scale sx * sw[n]), is claimed as one fused node and
// computed in the integer domain by qie's GEMM kernels: W packed once at Compile,
// y = saturate(round_half_even(float(acc + bias[n]) * (sx * sw[n] / sy)) + zy), exactly what ORT's
// QLinearMatMul / QGemm compute for the same unit (and within one step of the float DQ -> op -> Q semantics,
// which round the float product instead). A unit qie cannot prove it computes exactly (other dtypes,
// non-constant scales or zero points, blocked quantization, shared intermediate values, graph outputs in the
// middle) is left to ORT; GetCapability never guesses.
//
// Tails: after the unit's QuantizeLinear, up to kMaxTail segments DQ -> f -> Q join it, each reading the previous
// segment's codes alone, f elementwise with scalar constants or [N] constants along the last axis (a bias Add, the
// Gelu that follows it as Div / Erf / Add / Mul or as ONNX Gelu, Relu, Clip, ...; units.h's table ops). Each segment
// is a map code -> code per output column, evaluated once at Compile on the 256 codes with the float graph's
// operations (q -> Q(f(DQ(q))), units.cc), and the segments are composed into one table per column (one table when
// every constant is a scalar), applied to the GEMM's codes. Equal to the QDQ graph wherever f is plain float32
// arithmetic; Erf / Gelu / Sigmoid / Tanh use libm where ORT uses MLAS's approximations: within one step there.
#include "ep/matmul_unit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_set>

#include "ep/broadcast.h"
#include "ep/region_plan.h"

namespace qie_ep {

namespace {

constexpr size_t kMaxTail = 4;
// Per-column tails over more columns than this stay ORT's: a [N][256] table of PP-OCRv6's 18710 classes (4.8 MB)
// misses the caches on every lookup.
constexpr size_t kMaxTailColumns = 4096;

}  // namespace

// The DequantizeLinear reading QuantizeLinear `q`'s output when it is that output's only consumer (not a graph
// output), dequantizes with the same scale and zero point and feeds float ops whose results are not quantized
// again; nullptr otherwise.
const OrtNode* DequantizedBySame(const OrtNode* q, const Constant& sy, const Constant& zy) {
  const auto out = Outputs(q);
  if (out.size() != 1 || !out[0]) return nullptr;
  int64_t idx = 0;
  const OrtNode* dq = SoleConsumer(out[0], &idx);
  if (!dq || idx != 0 || !IsOp(dq, "DequantizeLinear") || AttrInt(dq, "block_size", 0) != 0) return nullptr;
  const auto in = Inputs(dq);
  Constant s, z;
  if (in.size() < 2 || !ReadConstant(in[1], &s) || s.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || s.count() != 1)
    return nullptr;
  if (static_cast<const float*>(s.data)[0] != static_cast<const float*>(sy.data)[0]) return nullptr;
  const OrtValueInfo* zin = Input(in, 2);
  const int32_t zp = zin ? (ReadConstant(zin, &z) && z.type == zy.type && z.count() == 1 ? Zp(z, 0) : -1000) : 0;
  if (zp != Zp(zy, 0)) return nullptr;
  // A float op after it whose result is quantized again (DQ -> Add -> Q) is a QDQ group ORT fuses (QLinearAdd,
  // ...) only while the DequantizeLinear is there: then it stays ORT's.
  const auto dq_out = Outputs(dq);
  if (dq_out.size() != 1 || !dq_out[0]) return nullptr;
  for (const OrtNode* op : AllConsumers(dq_out[0]))
    for (const OrtValueInfo* v : Outputs(op))
      if (v)
        for (const OrtNode* c : AllConsumers(v))
          if (IsOp(c, "QuantizeLinear")) return nullptr;
  return dq;
}

namespace {

// The segments DQ -> f -> Q after the unit's QuantizeLinear (see the file's comment), each the only reader of the
// codes before it.
void MatchTail(MatMulUnit* u, size_t N) {
  const OrtNode* q = u->q;
  const int64_t rank = ValueRank(Outputs(u->matmul)[0]);  // constants may not raise it (unknown: 1-D constants)
  bool moved = false;                                     // an earlier segment holds a Reshape / Transpose
  while (u->tail.size() < kMaxTail) {
    const auto out = Outputs(q);
    if (out.size() != 1 || !out[0] || IsGraphOutput(out[0])) return;
    int64_t idx = 0;
    const OrtNode* dq = SoleConsumer(out[0], &idx);
    if (!IsOp(dq, "DequantizeLinear") || idx != 0) return;
    Unit seg;
    if (!MatchElementwise(dq, ConstLayout{ConstLayout::kLast, std::max<int64_t>(rank, 1), true}, &seg)) return;
    const size_t C = CompileTable(seg).C;
    if (C != 1 && (C != N || N > kMaxTailColumns || moved)) return;  // columns moved: scalars only
    u->tail.push_back(seg);
    moved = moved || std::any_of(seg.nodes.begin(), seg.nodes.end(), IsLayoutOp);
    q = seg.q;
  }
}

// A float constant of 1 or N values along the last axis of a value of rank `rank` (unknown: -1): its N values.
bool ColumnConstant(const OrtValueInfo* vi, size_t N, int64_t rank, std::vector<float>* v) {
  Constant k;
  if (!vi || !ReadConstant(vi, &k) || k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return false;
  if (k.shape.size() > static_cast<size_t>(std::max<int64_t>(rank, 1))) return false;
  for (size_t i = 0; i + 1 < k.shape.size(); ++i)
    if (k.shape[i] != 1) return false;
  const auto* d = static_cast<const float*>(k.data);
  if (k.count() == 1)
    v->assign(N, d[0]);
  else if (k.count() == N && !k.shape.empty())
    v->assign(d, d + N);
  else
    return false;
  return true;
}

// The residual LayerNorm after the unit's float output (MatMulUnit::Norm): each value read by the next node alone.
void MatchNorm(MatMulUnit* u, size_t N) {
  u->norm = {};
  if (!u->dq_out && u->q) return;
  for (const Unit& seg : u->tail)  // LayerNorm's last axis is N only while no Reshape / Transpose moved it
    if (std::any_of(seg.nodes.begin(), seg.nodes.end(), IsLayoutOp)) return;
  const int64_t rank = ValueRank(Outputs(u->matmul)[0]);
  MatMulUnit::Norm n;
  const OrtValueInfo* v = Outputs(u->dq_out ? u->dq_out : u->matmul)[0];
  auto next = [&](const OrtValueInfo* value) -> const OrtNode* {
    return value && !IsGraphOutput(value) ? SoleConsumer(value) : nullptr;
  };
  auto other = [](const OrtNode* add, const OrtValueInfo* mine) -> const OrtValueInfo* {
    const auto in = Inputs(add);
    if (in.size() != 2) return nullptr;
    return in[0] == mine ? in[1] : in[1] == mine ? in[0] : nullptr;
  };
  const OrtNode* c = next(v);
  std::vector<float> unused;
  if (IsOp(c, "Add") && ColumnConstant(other(c, v), N, rank, &unused)) {
    n.add_bias = c;
    v = Outputs(c)[0];
    c = next(v);
  }
  if (!IsOp(c, "Add")) return;
  const OrtValueInfo* r = other(c, v);
  Constant k;
  // The residual's shape need not be provably the unit's (a head merge's Reshape leaves the unit's dims unknown to
  // ORT's shape inference): any float tensor of the same rank; the run broadcasts it as ORT's Add does.
  if (!r || r == v || ReadConstant(r, &k) || ValueType(r) != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      ValueRank(r) != rank || rank < 1)
    return;
  // The residual must come from outside the unit; compared by name (asking ORT for the producer of a fused graph's
  // input logs a warning).
  const std::vector<const OrtNode*> mine = u->Nodes();
  const std::string rname = Name(r);
  for (const OrtNode* m : mine)
    for (const OrtValueInfo* o : Outputs(m))
      if (o && Name(o) == rname) return;
  n.add_res = c;
  n.residual = r;
  v = Outputs(c)[0];
  c = next(v);
  if (!u->q) n.last = n.add_res;  // a float unit may end here (the next node reads the sum, or not alone)
  auto done = [&] {
    if (n.last) u->norm = n;
  };
  if (!IsOp(c, "LayerNormalization") || rank < 1 || Inputs(c)[0] != v) return done();
  const int64_t axis = AttrInt(c, "axis", -1);
  if ((axis != -1 && axis != rank - 1) || AttrInt(c, "stash_type", 1) != 1) return done();
  const auto lin = Inputs(c);
  const auto lout = Outputs(c);
  if (lin.size() < 2 || !ColumnConstant(lin[1], N, 1, &unused) ||
      (Input(lin, 2) && !ColumnConstant(lin[2], N, 1, &unused)))
    return done();
  for (size_t i = 1; i < lout.size(); ++i)  // Mean / InvStdDev: not computed here
    if (lout[i] && !Name(lout[i]).empty() && (IsGraphOutput(lout[i]) || Consumers(lout[i]) > 0)) return done();
  n.ln = c;
  if (!u->q) n.last = c;
  v = lout[0];
  c = next(v);
  Constant sy, zy;
  if (!u->q &&
      (!c || IsOp(c, "Mul"))) {  // a float unit: LN -> Mul(column constant) -> Q, the LN's value maybe read too
    for (const OrtNode* m : AllConsumers(v)) {
      const OrtValueInfo* mo = IsOp(m, "Mul") && Inputs(m).size() == 2 ? Outputs(m)[0] : nullptr;
      const OrtNode* mq = mo && !IsGraphOutput(mo) ? SoleConsumer(mo) : nullptr;
      if (!IsOp(mq, "QuantizeLinear") || Inputs(mq)[0] != mo || !QOperands(mq, &sy, &zy) ||
          !ColumnConstant(other(m, v), N, rank, &unused))
        continue;
      n.mul = m;
      n.q = mq;
      n.last = mq;
      break;
    }
    u->norm = n;
    return;
  }
  if (!IsOp(c, "QuantizeLinear") || Inputs(c)[0] != v || !QOperands(c, &sy, &zy)) {
    if (!u->q) u->norm = n;
    return;
  }
  n.q = c;
  n.last = c;
  u->norm = n;
}

// The bias Add after the unit's float output when no norm tail took it (MatMulUnit::out_bias), read only by ops
// ORT fuses nothing with.
void MatchOutBias(MatMulUnit* u, size_t N) {
  u->out_bias = nullptr;
  if (!u->dq_out || u->norm.last) return;
  for (const Unit& seg : u->tail)  // the bias runs along N only while no Reshape / Transpose moved it
    if (std::any_of(seg.nodes.begin(), seg.nodes.end(), IsLayoutOp)) return;
  const OrtValueInfo* v = Outputs(u->dq_out)[0];
  const OrtNode* add = v && !IsGraphOutput(v) ? SoleConsumer(v) : nullptr;
  if (!IsOp(add, "Add")) return;
  const auto in = Inputs(add);
  std::vector<float> unused;
  const int64_t rank = ValueRank(Outputs(u->matmul)[0]);
  if (in.size() != 2 || in[0] == in[1] || rank < 1 || !ColumnConstant(in[0] == v ? in[1] : in[0], N, rank, &unused))
    return;
  // Only where ORT fuses nothing with the Add: its SkipLayerNormalization ((x + skip) + bias, another float order
  // than the graph's), BiasGelu and the like would run on values the unit already biased.
  static const std::set<std::string> kAfter = {"Softmax", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"};
  for (const OrtNode* r : AllConsumers(Outputs(add)[0]))
    if (!r || !Domain(r).empty() || !kAfter.count(OpType(r))) return;
  u->out_bias = add;
}

}  // namespace

bool MatchUnit(const OrtNode* op, MatMulUnit* u, UnitOperands* o) {
  const std::string type = OpType(op);
  const bool gemm = type == "Gemm";
  if ((type != "MatMul" && !gemm) || !Domain(op).empty()) return false;
  const auto in = Inputs(op);
  const auto out = Outputs(op);
  if (out.size() != 1 || in.size() < 2 || in.size() > (gemm ? 3u : 2u) || !in[0] || !in[1]) return false;
  const bool has_c = gemm && Input(in, 2) != nullptr;
  if (gemm && (AttrInt(op, "transA", 0) != 0 || AttrFloat(op, "alpha", 1.0f) != 1.0f ||
               (has_c && AttrFloat(op, "beta", 1.0f) != 1.0f)))
    return false;
  const bool trans_b = gemm && AttrInt(op, "transB", 0) != 0;
  if (IsGraphOutput(out[0]) || Consumers(out[0]) != 1) return false;
  const OrtNode* dq_x = Producer(in[0]);
  const OrtNode* dq_w = Producer(in[1]);
  const OrtNode* dq_b = has_c ? Producer(in[2]) : nullptr;
  if (!dq_x || !dq_w || Consumers(in[0]) != 1 || Consumers(in[1]) != 1 || IsGraphOutput(in[0]) || IsGraphOutput(in[1]))
    return false;
  if (has_c && (!dq_b || Consumers(in[2]) != 1 || IsGraphOutput(in[2]))) return false;
  // The consumer: one QuantizeLinear, or (a float unit) the norm tail's Add.
  size_t nc = 1;
  std::vector<const OrtNode*> consumers(nc);
  std::vector<int64_t> idx(nc);
  Check(g_api->ValueInfo_GetValueConsumers(out[0], consumers.data(), idx.data(), nc));
  const OrtNode* q = consumers[0];
  if (!q) return false;
  if (IsOp(q, "QuantizeLinear")) {
    if (idx[0] != 0 || AttrInt(q, "block_size", 0) != 0 || AttrInt(q, "saturate", 1) != 1) return false;
  } else if (IsOp(q, "Add")) {
    q = nullptr;
  } else {
    return false;
  }
  Constant unused;
  const auto win = Inputs(dq_w);
  if (win.empty() || !ReadConstant(win[0], &o->w) || o->w.shape.size() != 2) return false;
  o->K = static_cast<size_t>(o->w.shape[trans_b ? 1 : 0]);
  o->N = static_cast<size_t>(o->w.shape[trans_b ? 0 : 1]);
  if (!DqOperands(dq_w, false, o->N, &o->w, &o->sw, &o->zw, &o->wt, trans_b ? 0 : 1)) return false;
  if (!DqOperands(dq_x, true, 0, &unused, &o->sx, &o->zx, &o->xt)) return false;
  if (has_c && !Int32Bias(dq_b, o->N, o->sx, o->sw, &o->bias)) return false;
  u->dq_x = dq_x;
  u->dq_w = dq_w;
  u->dq_bias = dq_b;
  u->matmul = op;
  u->trans_b = trans_b;
  u->tail.clear();
  u->dq_out = nullptr;
  u->out_bias = nullptr;
  if (!q) {  // a float unit: only with its norm tail
    u->q = nullptr;
    MatchNorm(u, o->N);
    return u->norm.last != nullptr;
  }
  const auto qin = Inputs(q);
  if (qin.size() < 3 || !ReadConstant(qin[1], &o->sy) || o->sy.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      o->sy.count() != 1 || !ReadConstant(Input(qin, 2), &o->zy) || !IsQ8(o->zy.type) || o->zy.count() != 1)
    return false;
  const float sy = static_cast<const float*>(o->sy.data)[0];
  if (!(std::isfinite(sy) && sy != 0.0f)) return false;
  u->q = q;
  MatchTail(u, o->N);
  Constant sy_last, zy_last;
  if (!QOperands(u->last_q(), &sy_last, &zy_last)) return false;
  u->dq_out = DequantizedBySame(u->last_q(), sy_last, zy_last);
  MatchNorm(u, o->N);
  MatchOutBias(u, o->N);
  return true;
}

namespace {

// ONNX Reshape's output dims for `in` (0: the input's dim unless allowzero, -1: inferred), checked.
std::vector<int64_t> ReshapeDims(const std::vector<int64_t>& in, const int64_t* spec, size_t n, bool allowzero,
                                 const std::string& name) {
  int64_t count = 1, known = 1;
  for (int64_t d : in) count *= d;
  std::vector<int64_t> out(spec, spec + n);
  int infer = -1;
  for (size_t i = 0; i < n; ++i) {
    if (out[i] == 0 && !allowzero) {
      if (i >= in.size()) throw Failure{"Reshape '" + name + "': a 0 in its shape past the input's rank"};
      out[i] = in[i];
    }
    if (out[i] == -1) {
      if (infer >= 0) throw Failure{"Reshape '" + name + "': two -1 in its shape"};
      infer = static_cast<int>(i);
    } else if (out[i] < 0) {
      throw Failure{"Reshape '" + name + "': a negative dimension in its shape"};
    } else {
      known *= out[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || count % known != 0)
      throw Failure{"Reshape '" + name + "': cannot infer the -1 dimension of " + std::to_string(count) + " elements"};
    out[static_cast<size_t>(infer)] = count / known;
  } else if (known != count) {
    throw Failure{"Reshape '" + name + "': shape of " + std::to_string(known) + " elements for an input of " +
                  std::to_string(count)};
  }
  return out;
}

// y = x (dims `in`) transposed by `perm`: rows of the output's last axis, copied whole where that is x's last axis.
void PermuteBytes(const uint8_t* x, const std::vector<int64_t>& in, const std::vector<int64_t>& perm, uint8_t* y) {
  const size_t r = in.size();
  std::vector<size_t> istride(r), od(r), os(r), idx(r, 0);
  size_t total = 1;
  for (size_t i = r; i-- > 0;) {
    istride[i] = total;
    total *= static_cast<size_t>(in[i]);
  }
  if (total == 0) return;
  for (size_t i = 0; i < r; ++i) {
    od[i] = static_cast<size_t>(in[static_cast<size_t>(perm[i])]);
    os[i] = istride[static_cast<size_t>(perm[i])];
  }
  const size_t inner = r ? od[r - 1] : 1, step = r ? os[r - 1] : 1;
  for (size_t o = 0; o < total / inner; ++o, y += inner) {
    size_t base = 0;
    for (size_t i = 0; i + 1 < r; ++i) base += idx[i] * os[i];
    if (step == 1) {
      std::memcpy(y, x + base, inner);
    } else {
      for (size_t j = 0; j < inner; ++j) y[j] = x[base + j * step];
    }
    for (size_t i = r - 1; i-- > 0;) {
      if (++idx[i] < od[i]) break;
      idx[i] = 0;
    }
  }
}

// A Transpose step's permutation of `rank` axes (ONNX: none given reverses them).
std::vector<int64_t> PermOf(const CompiledMatMul::LayoutStep& st, size_t rank) {
  std::vector<int64_t> perm = st.perm;
  if (perm.empty())
    for (size_t i = rank; i-- > 0;) perm.push_back(static_cast<int64_t>(i));
  return perm;
}

// The dims each layout step reads (shapes[i]) and the output's (shapes.back()).
std::vector<std::vector<int64_t>> LayoutShapes(const CompiledMatMul& c, std::vector<int64_t> dims,
                                               OrtKernelContext* ctx) {
  std::vector<std::vector<int64_t>> shapes = {dims};
  for (const CompiledMatMul::LayoutStep& st : c.layout) {
    if (st.transpose) {
      const std::vector<int64_t> perm = PermOf(st, dims.size());
      std::vector<bool> seen(dims.size(), false);
      bool ok = perm.size() == dims.size();
      for (int64_t p : perm) {
        ok = ok && p >= 0 && p < static_cast<int64_t>(dims.size()) && !seen[static_cast<size_t>(p)];
        if (ok) seen[static_cast<size_t>(p)] = true;
      }
      if (!ok)
        throw Failure{"Transpose '" + st.name + "': perm is not a permutation of its input's " +
                      std::to_string(dims.size()) + " axes"};
      std::vector<int64_t> out(dims.size());
      for (size_t i = 0; i < dims.size(); ++i) out[i] = dims[static_cast<size_t>(perm[i])];
      dims = out;
    } else if (st.input < 0) {
      dims = ReshapeDims(dims, st.shape.data(), st.shape.size(), st.allowzero, st.name);
    } else {
      const OrtValue* v = nullptr;
      Check(g_api->KernelContext_GetInput(ctx, static_cast<size_t>(st.input), &v));
      const std::vector<int64_t> s = TensorShape(v);
      OrtTensorTypeAndShapeInfo* info = nullptr;
      Check(g_api->GetTensorTypeAndShape(v, &info));
      ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      OrtStatus* st_type = g_api->GetTensorElementType(info, &type);
      g_api->ReleaseTensorTypeAndShapeInfo(info);
      Check(st_type);
      if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || s.size() != 1)
        throw Failure{"Reshape '" + st.name + "': its shape must be a 1-D int64 tensor"};
      const void* data = nullptr;
      Check(g_api->GetTensorData(v, &data));
      dims = ReshapeDims(dims, static_cast<const int64_t*>(data), static_cast<size_t>(s[0]), st.allowzero, st.name);
    }
    shapes.push_back(dims);
  }
  return shapes;
}

// The residual's shape and the norm tail's output shape (`dims`, the MatMul's, broadcast with the residual's as
// ORT's Add does: LayerNormalization then runs over the broadcast rows), checked.
Broadcast NormShape(const CompiledMatMul& c, OrtKernelContext* ctx, const std::vector<int64_t>& dims,
                    const float** residual) {
  const CompiledMatMul::CompiledNorm& nm = c.norm;
  const OrtValue* rv = nullptr;
  Check(g_api->KernelContext_GetInput(ctx, static_cast<size_t>(nm.residual), &rv));
  const std::vector<int64_t> rd = TensorShape(rv);
  Broadcast bc;
  if (!BroadcastOf(dims, rd, &bc) || bc.shape.empty() || bc.shape.back() != static_cast<int64_t>(c.N))
    throw Failure{nm.name + ": the residual of shape " + qie::ShapeStr(rd) +
                  " does not broadcast to the MatMul's output " + qie::ShapeStr(dims) + " along its rows"};
  const void* rp = nullptr;
  Check(g_api->GetTensorData(rv, &rp));
  *residual = static_cast<const float*>(rp);
  return bc;
}

// The norm tail over the broadcast rows of N float values (x: the unit's dequantized output; res: the residual):
// per row, + bias, + the residual, LayerNormalization as ORT's CPU kernel computes it in float32 (sums in order,
// mean and variance from them, (x - mean) / sqrt(var + eps) * gamma + beta), then the QuantizeLinear.
// Each row's two sums are chains of N dependent float adds (in order, as ORT's kernel adds them): rows go in blocks
// of kNormLanes, the block's values stored transposed ([h][row]), so the chains of a block's rows advance together
// in vector lanes (each lane the same float32 operations in the same order as one row alone); the rest of the work
// is elementwise along the row and left to the compiler's vectorizer.
constexpr size_t kNormLanes = 16;

void NormRows(const CompiledMatMul& c, const float* x, const Broadcast& bc, const float* res, void* yv, float* ln_y,
              const qie::ParallelFor& pfor) {
  uint8_t* y = static_cast<uint8_t*>(yv);
  float* yf = static_cast<float*>(yv);  // a float unit's tail without the QuantizeLinear: its float values
  const CompiledMatMul::CompiledNorm& nm = c.norm;
  const size_t N = c.N;
  size_t rows = 1;
  for (size_t d = 0; d + 1 < bc.shape.size(); ++d) rows *= static_cast<size_t>(bc.shape[d]);
  const size_t rs = bc.sm.back();  // the residual's stride along the row: 1, or 0 for one value per row
  const Quantizer q(nm.out);
  // rows per task: whole blocks of lanes, ~16k values
  const size_t per = std::max<size_t>(1, 16384 / std::max<size_t>(N * kNormLanes, 1)) * kNormLanes;
  auto task = [&](size_t t) {
    thread_local std::vector<float> tl_v, tl_vt, tl_o;
    tl_v.resize(kNormLanes * N);
    tl_vt.resize(kNormLanes * N);
    tl_o.resize(N);
    float* __restrict vb = tl_v.data();
    float* __restrict vt = tl_vt.data();
    float* __restrict o = tl_o.data();
    const float* __restrict bias = nm.bias.empty() ? nullptr : nm.bias.data();
    const float* __restrict gamma = nm.gamma.data();
    const float* __restrict beta = nm.beta.empty() ? nullptr : nm.beta.data();
    const float* __restrict mul = nm.mul.empty() ? nullptr : nm.mul.data();
    const size_t r_end = std::min(rows, (t + 1) * per);
    for (size_t r0 = t * per; r0 < r_end; r0 += kNormLanes) {
      const size_t nr = std::min(kNormLanes, r_end - r0);
      for (size_t i = 0; i < nr; ++i) {  // the block's rows: x (+ bias) + the residual
        size_t ox = 0, oe = 0;
        bc.RowOffsets(r0 + i, &ox, &oe);
        float* __restrict v = vb + i * N;
        const float* __restrict xr = x + ox;
        const float* __restrict e = res + oe;
        if (bias)
          for (size_t h = 0; h < N; ++h) v[h] = xr[h] + bias[h];
        else
          for (size_t h = 0; h < N; ++h) v[h] = xr[h];
        if (rs == 1)
          for (size_t h = 0; h < N; ++h) v[h] = v[h] + e[h];
        else
          for (size_t h = 0; h < N; ++h) v[h] = v[h] + e[0];
        if (!nm.ln) std::memcpy(yf + (r0 + i) * N, v, N * sizeof(float));  // the sum is the output
        for (size_t h = 0; h < N; ++h) vt[h * kNormLanes + i] = v[h];
      }
      if (!nm.ln) continue;
      for (size_t i = nr; i < kNormLanes; ++i)  // unused lanes: zeros (their sums are not read)
        for (size_t h = 0; h < N; ++h) vt[h * kNormLanes + i] = 0.0f;
      float mean[kNormLanes] = {}, square[kNormLanes] = {};
      for (size_t h = 0; h < N; ++h) {
        const float* __restrict col = vt + h * kNormLanes;
        for (size_t i = 0; i < kNormLanes; ++i) {
          mean[i] = mean[i] + col[i];
          const float sq = col[i] * col[i];
          square[i] = square[i] + sq;
        }
      }
      for (size_t i = 0; i < nr; ++i) {
        const float m = mean[i] / static_cast<float>(N);
        const float denom = std::sqrt(square[i] / static_cast<float>(N) - m * m + nm.epsilon);
        const float* __restrict v = vb + i * N;
        for (size_t h = 0; h < N; ++h) o[h] = (v[h] - m) / denom * gamma[h];
        if (beta)
          for (size_t h = 0; h < N; ++h) o[h] = o[h] + beta[h];
        if (!nm.quantized) {
          std::memcpy(yf + (r0 + i) * N, o, N * sizeof(float));
          continue;
        }
        if (ln_y) std::memcpy(ln_y + (r0 + i) * N, o, N * sizeof(float));
        if (mul)  // the Mul between the LayerNormalization and the Q: its float32 products
          for (size_t h = 0; h < N; ++h) o[h] = o[h] * mul[h];
        QuantizeBlock(o, N, q, y + (r0 + i) * N);
      }
    }
  };
  const size_t tasks = (rows + per - 1) / per;
  if (tasks == 1)
    task(0);
  else if (tasks > 1)
    pfor(tasks, task);
}

}  // namespace

OrtStatus* ComputeMatMul(CompiledMatMul& c, OrtKernelContext* ctx) {
  return Guard("MatMul", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, static_cast<size_t>(c.x_input), &x));
    const std::vector<int64_t> shape = TensorShape(x);
    const size_t rank = shape.size();
    if (rank == 0 || shape.back() != static_cast<int64_t>(c.K) || (c.gemm && rank != 2))
      throw Failure{"input '" + c.x_name + "' must be " + (c.gemm ? "2-D " : "") +
                    "with last dimension K=" + std::to_string(c.K)};
    size_t rows = 1;
    for (size_t d = 0; d + 1 < rank; ++d) rows *= static_cast<size_t>(shape[d]);
    std::vector<int64_t> gemm_shape = shape;
    if (rank == 1)
      gemm_shape = {static_cast<int64_t>(c.N)};
    else
      gemm_shape.back() = static_cast<int64_t>(c.N);
    const std::vector<std::vector<int64_t>> shapes = LayoutShapes(c, gemm_shape, ctx);
    for (const CompiledMatMul::ShapeOut& so : c.shape_outs) {
      const std::vector<int64_t> d = ShapeSlice(shapes[so.steps], so.start, so.end);
      Int64Output(ctx, so.output, {static_cast<int64_t>(d.size())}, d);
    }
    // The norm tail's output: the MatMul's broadcast with the residual (the same shape unless ORT's Add broadcasts).
    const float* residual = nullptr;
    const Broadcast norm_bc = c.norm.on ? NormShape(c, ctx, shapes.back(), &residual) : Broadcast{};
    const std::vector<int64_t>& y_dims = c.norm.on ? norm_bc.shape : shapes.back();
    OrtValue* y = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(c.y_output), y_dims.data(), y_dims.size(), &y));
    void* ydata = nullptr;
    Check(g_api->GetTensorMutableData(y, &ydata));
    float* ln_y = nullptr;  // the norm tail's LayerNormalization's values, when read outside the unit too
    if (c.norm.ln_output >= 0) {
      OrtValue* lv = nullptr;
      Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(c.norm.ln_output), y_dims.data(), y_dims.size(),
                                           &lv));
      void* p = nullptr;
      Check(g_api->GetTensorMutableData(lv, &p));
      ln_y = static_cast<float*>(p);
    }
    const void* xdata = nullptr;
    Check(g_api->GetTensorData(x, &xdata));
    if (rows == 0 || c.N == 0) return;
    // The GEMM's codes, when a tail, a layout or a float output follows; the tail's; the layout's two buffers.
    thread_local std::vector<uint8_t> codes, tail_codes, moved[2];
    const bool tail = !c.table.empty() || !c.programs.chain.empty();
    const bool after = c.float_out || !c.layout.empty();  // the codes do not go to the output as they are
    const size_t n = rows * c.N;
    thread_local std::vector<float> values;  // a float unit's GEMM output; the norm tail's input
    if (c.float_acc) values.resize(n);
    if (after || tail) codes.resize(n);
    if (after && tail) tail_codes.resize(n);
    const qie::PackedB* bp = &c.packed;
    qie::GemmArgs g;
    g.M = rows;
    g.N = c.N;
    g.K = c.K;
    g.a = static_cast<const uint8_t*>(xdata);
    g.lda = c.K;
    g.a_signed = c.x_signed;
    g.za = &c.zx;
    g.zb = c.zw.data();
    if (!c.bias.empty()) {
      g.bias = c.bias.data();
      g.bias_rs = 0;
      g.bias_cs = 1;
    }
    g.kind = c.kind;
    g.scale = c.mult.data();
    g.y_zp = c.zy;
    g.y = c.float_acc ? static_cast<void*>(values.data()) : after || tail ? codes.data() : ydata;
    g.ldy = c.N;
    g.batch = 1;
    g.b = &bp;
    const qie::ParallelFor pool = CtxParallelFor(ctx);
    Pace pace(c.pacing, c.adaptive, rows * c.K, pool);
    const qie::ParallelFor& pfor = pace.For();
    qie::Gemm(*c.uk, g, pfor);
    const uint8_t* out_codes = codes.data();
    if (tail) {  // programs then table, each in place once the codes are in dst
      uint8_t* dst = after ? tail_codes.data() : static_cast<uint8_t*>(ydata);
      Dims d;
      d.n = rows;
      d.h = d.w = 1;
      d.c = c.N;
      const uint8_t* src = codes.data();
      if (!c.programs.chain.empty()) {
        RunChannelPrograms(c.programs, d, src, dst, pfor);
        src = dst;
      }
      if (!c.table.empty()) ApplyLut(c.table.data(), c.tC, src, dst, rows, c.N, pfor);
      out_codes = dst;
    }
    if (!c.layout.empty()) {  // the bytes moved by each Transpose (a Reshape moves none), the last into the output
      size_t last = c.layout.size();
      while (last > 0 && !c.layout[last - 1].transpose) --last;
      size_t moves = 0;  // transposes so far: they alternate between the two buffers
      for (size_t i = 0; i < c.layout.size(); ++i) {
        if (!c.layout[i].transpose) continue;
        const std::vector<int64_t> perm = PermOf(c.layout[i], shapes[i].size());
        std::vector<uint8_t>& buf = moved[moves++ % 2];
        if (!(i + 1 == last && !c.float_out)) buf.resize(n);
        uint8_t* dst = i + 1 == last && !c.float_out ? static_cast<uint8_t*>(ydata) : buf.data();
        PermuteBytes(out_codes, shapes[i], perm, dst);
        out_codes = dst;
      }
      if (!c.float_out && out_codes != ydata) std::memcpy(ydata, out_codes, n);
    }
    if (c.norm.on) {
      values.resize(n);
      if (!c.float_acc) DequantizeCodes(out_codes, n, c.out.is_signed, c.out.zp, c.out.scale, values.data());
      NormRows(c, values.data(), norm_bc, residual, ydata, ln_y, pfor);
    } else if (c.float_out) {
      float* y = static_cast<float*>(ydata);
      DequantizeCodes(out_codes, n, c.out.is_signed, c.out.zp, c.out.scale, y);
      const float* __restrict b = c.out_bias.data();
      if (!c.out_bias.empty())  // ORT's Add after the DequantizeLinear: one float32 add per value
        for (size_t i = 0; i < n; i += c.N) {
          float* __restrict row = y + i;
          for (size_t j = 0; j < c.N; ++j) row[j] = row[j] + b[j];
        }
    }
    pace.Done();
  });
}

namespace {

// The tail's plan: when every segment up to the last per-column one is plain arithmetic, those run as float programs
// on the data and the rest (per-tensor) as one table; otherwise all of it as one composed table.
void PlanTail(const MatMulUnit& u, CompiledMatMul* c) {
  c->programs.chain.clear();
  c->table.clear();
  c->tC = 1;
  std::vector<FloatProgram> f;  // each segment's program, compiled once
  size_t direct = 0;            // segments run as programs: up to the last per-column one, if all arithmetic
  for (size_t i = 0; i < u.tail.size(); ++i) {
    f.push_back(CompileTable(u.tail[i]));
    if (f.back().C > 1) direct = i + 1;
  }
  if (std::any_of(f.begin(), f.begin() + static_cast<ptrdiff_t>(direct),
                  [](const FloatProgram& p) { return !p.arithmetic; }))
    direct = 0;
  for (size_t i = 0; i < direct; ++i) {
    RegionPlan::Chained link{InputParams(u.tail[i].in_dqs[0]), std::move(f[i]), OutputParams(u.tail[i].q)};
    link.f.Expand(c->N, ProgramRows(c->N));
    c->programs.chain.push_back(std::move(link));
  }
  if (direct == u.tail.size()) return;
  c->table.assign(256 + 3, 0);
  for (int k = 0; k < 256; ++k) c->table[k] = static_cast<uint8_t>(k);
  for (size_t i = direct; i < u.tail.size(); ++i) {
    size_t C = 1;
    const std::vector<uint8_t> t = EvalTable(u.tail[i], &C);
    ComposeTables(&c->table, &c->tC, t, C);
  }
}

}  // namespace

// Builds the compiled unit from the fused graph (its DequantizeLinear(W) initializers and scales).
void CompileMatMul(const OrtGraph* graph, const OrtNode* fused, CompiledMatMul* c) {
  const std::vector<const OrtNode*> nodes = GraphNodes(graph);
  const OrtNode* op = nullptr;
  for (const OrtNode* node : nodes)
    if (OpType(node) == "MatMul" || OpType(node) == "Gemm") op = node;
  if (!op) throw Failure{"fused graph has no MatMul or Gemm"};
  MatMulUnit u;
  UnitOperands o;
  if (!MatchUnit(op, &u, &o)) throw Failure{"fused graph is not the unit GetCapability claimed"};
  const std::unordered_set<const OrtNode*> in_graph(nodes.begin(), nodes.end());
  TrimTail(&u, [&](const OrtNode* m) { return in_graph.count(m) == 0; });
  if (u.dq_out && !in_graph.count(u.dq_out)) u.DropOutput();
  if (!u.Complete() || u.Nodes().size() != nodes.size())
    throw Failure{"fused graph is not the unit GetCapability claimed"};
  c->K = o.K;
  c->N = o.N;
  c->gemm = OpType(op) == "Gemm";
  c->uk = &qie::GetMicroKernel(qie::ActiveIsa());
  const auto ld = static_cast<ptrdiff_t>(u.trans_b ? c->K : c->N);
  qie::PackB(*c->uk, static_cast<const uint8_t*>(o.w.data), o.wt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, c->K, c->N,
             u.trans_b ? 1 : ld, u.trans_b ? ld : 1, &c->packed);
  c->x_signed = o.xt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  c->zx = o.zx.data ? Zp(o.zx, 0) : 0;
  c->zw.resize(c->N);
  c->mult.resize(c->N);
  c->float_acc = u.q == nullptr;
  // A float unit's values: float(acc) * (sx * sw[n]), as ORT's MatMulIntegerToFloat computes them.
  const float fsx = static_cast<const float*>(o.sx.data)[0];
  const float fsy = c->float_acc ? 1.0f : static_cast<const float*>(o.sy.data)[0];
  for (size_t j = 0; j < c->N; ++j) {
    const size_t i = o.sw.count() == 1 ? 0 : j;
    c->zw[j] = o.zw.data ? Zp(o.zw, i) : 0;
    const float m = fsx * static_cast<const float*>(o.sw.data)[i];
    c->mult[j] = c->float_acc ? m : m / fsy;
  }
  c->bias = o.bias;
  c->kind = c->float_acc                                      ? qie::OutKind::kFloat
            : o.zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 ? qie::OutKind::kS8
                                                              : qie::OutKind::kU8;
  c->zy = c->float_acc ? 0 : Zp(o.zy, 0);
  c->float_out = u.dq_out != nullptr;
  if (!c->float_acc) c->out = OutputParams(u.last_q());
  PlanTail(u, c);
  c->x_input = FusedInput(fused, Inputs(u.dq_x)[0]);
  c->x_name = Name(Inputs(u.dq_x)[0]);
  c->y_output = FusedOutput(fused, Outputs(u.norm.last  ? u.norm.last
                                           : u.out_bias ? u.out_bias
                                           : u.dq_out   ? u.dq_out
                                                        : u.last_q())[0]);
  c->out_bias.clear();
  if (u.out_bias) {
    const int64_t rank = ValueRank(Outputs(u.matmul)[0]);
    for (const OrtValueInfo* in : Inputs(u.out_bias))
      if (ColumnConstant(in, c->N, rank, &c->out_bias)) break;
    if (c->out_bias.size() != c->N) throw Failure{"Add '" + NodeName(u.out_bias) + "': its constant changed"};
  }
  c->norm = {};
  if (u.norm.last) {
    CompiledMatMul::CompiledNorm& nm = c->norm;
    nm.on = true;
    nm.ln = u.norm.ln != nullptr;
    nm.quantized = u.norm.q != nullptr;
    nm.name = u.norm.ln ? "LayerNormalization '" + NodeName(u.norm.ln) + "'" : "Add '" + NodeName(u.norm.add_res) + "'";
    const int64_t rank = ValueRank(Outputs(u.matmul)[0]);
    if (u.norm.add_bias)
      for (const OrtValueInfo* in : Inputs(u.norm.add_bias))
        if (ColumnConstant(in, c->N, rank, &nm.bias)) break;
    if (u.norm.add_bias && nm.bias.empty())
      throw Failure{"Add '" + NodeName(u.norm.add_bias) + "': its constant changed"};
    if (nm.ln) {
      const auto lin = Inputs(u.norm.ln);
      if (!ColumnConstant(lin[1], c->N, 1, &nm.gamma) || (Input(lin, 2) && !ColumnConstant(lin[2], c->N, 1, &nm.beta)))
        throw Failure{nm.name + ": its constants changed"};
      nm.epsilon = AttrFloat(u.norm.ln, "epsilon", 1e-5f);
    }
    nm.residual = FusedInput(fused, u.norm.residual);
    if (nm.quantized) nm.out = OutputParams(u.norm.q);
    // read outside the unit: then an output of the fused node (the fused graph need not say so of the value)
    nm.ln_output = u.norm.mul ? IndexByName(Outputs(fused), Outputs(u.norm.ln)[0]) : -1;
    nm.mul.clear();
    if (u.norm.mul) {
      for (const OrtValueInfo* in : Inputs(u.norm.mul))
        if (in != Outputs(u.norm.ln)[0] && ColumnConstant(in, c->N, rank, &nm.mul)) break;
      if (nm.mul.size() != c->N) throw Failure{"Mul '" + NodeName(u.norm.mul) + "': its constant changed"};
    }
  }
  c->layout.clear();
  c->shape_outs.clear();
  for (const Unit& seg : u.tail) {
    for (const auto& [node, moves] : seg.shape_reads) {
      CompiledMatMul::ShapeOut so;
      so.output = FusedOutput(fused, Outputs(node)[0]);
      so.steps = c->layout.size() + moves;
      so.start = AttrInt(node, "start", 0);
      so.end = AttrInt(node, "end", INT64_MAX);
      c->shape_outs.push_back(so);
    }
    for (const OrtNode* n : seg.nodes) {
      if (!IsLayoutOp(n)) continue;
      CompiledMatMul::LayoutStep st;
      st.name = NodeName(n);
      if (st.name.empty()) st.name = "(output " + Name(Outputs(n)[0]) + ")";
      st.transpose = IsOp(n, "Transpose");
      if (st.transpose) {
        st.perm = AttrInts(n, "perm");
      } else {
        st.allowzero = AttrInt(n, "allowzero", 0) != 0;
        const OrtValueInfo* sv = Input(Inputs(n), 1);
        Constant k;
        if (!sv) throw Failure{"Reshape '" + st.name + "' has no shape input"};
        if (ReadConstant(sv, &k)) {
          if (k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || k.shape.size() != 1)
            throw Failure{"Reshape '" + st.name + "': its shape must be a 1-D int64 tensor"};
          st.shape.assign(static_cast<const int64_t*>(k.data), static_cast<const int64_t*>(k.data) + k.count());
        } else {
          st.input = FusedInput(fused, sv);
        }
      }
      c->layout.push_back(std::move(st));
    }
  }
}

}  // namespace qie_ep
