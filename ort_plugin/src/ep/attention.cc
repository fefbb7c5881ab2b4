// The EP's quantized attention unit (attention.h).
#include "ep/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_set>

#include "ep/broadcast.h"
#include "ep/matmul_unit.h"
#include "ops/matmul_core.h"

namespace qie_ep {

std::vector<const OrtNode*> AttentionUnit::Nodes() const {
  std::vector<const OrtNode*> v = {dq_a, dq_b, mm1, q1, dq1};
  v.insert(v.end(), steps.begin(), steps.end());
  v.push_back(softmax);
  if (isnan) {
    v.push_back(isnan);
    v.push_back(where);
  }
  for (const OrtNode* n : {q2, dq2, dq_v, mm2, q3}) v.push_back(n);
  v.insert(v.end(), shape_reads.begin(), shape_reads.end());
  return v;
}

namespace {

// A per-tensor DequantizeLinear of runtime u8 / s8 codes.
bool RuntimeDq(const OrtNode* dq) {
  Constant unused, s, z;
  ONNXTensorElementDataType t;
  if (!DqOperands(dq, true, 0, &unused, &s, &z, &t)) return false;
  const float sv = static_cast<const float*>(s.data)[0];
  return std::isfinite(sv);
}

// `dq`'s output is read by `op` (once) and otherwise only by Shape nodes, which are appended to `shapes`.
bool ReadByOpAndShapes(const OrtNode* dq, const OrtNode* op, std::vector<const OrtNode*>* shapes) {
  const auto out = Outputs(dq);
  if (out.size() != 1 || !out[0] || IsGraphOutput(out[0])) return false;
  int uses = 0;
  for (const OrtNode* c : AllConsumers(out[0])) {
    if (c == op) {
      ++uses;
    } else if (IsOp(c, "Shape") && Inputs(c).size() == 1 && Outputs(c).size() == 1) {
      if (std::find(shapes->begin(), shapes->end(), c) == shapes->end()) shapes->push_back(c);
    } else {
      return false;
    }
  }
  return uses == 1;
}

// The DequantizeLinear reading q's codes alone, with q's scale and zero point.
const OrtNode* SameParamsDq(const OrtNode* q) {
  Constant sy, zy;
  if (!QOperands(q, &sy, &zy)) return nullptr;
  const auto out = Outputs(q);
  if (out.size() != 1 || !out[0]) return nullptr;
  int64_t idx = 0;
  const OrtNode* dq = SoleConsumer(out[0], &idx);
  if (!dq || idx != 0 || !RuntimeDq(dq)) return nullptr;
  Constant unused, s, z;
  ONNXTensorElementDataType t;
  DqOperands(dq, true, 0, &unused, &s, &z, &t);
  if (t != zy.type || static_cast<const float*>(s.data)[0] != static_cast<const float*>(sy.data)[0] ||
      (z.data ? Zp(z, 0) : 0) != Zp(zy, 0))
    return nullptr;
  return dq;
}

// The QuantizeLinear reading `v` alone (input 0).
const OrtNode* SoleQ(const OrtValueInfo* v) {
  int64_t idx = 0;
  const OrtNode* q = v ? SoleConsumer(v, &idx) : nullptr;
  Constant sy, zy;
  return q && idx == 0 && QOperands(q, &sy, &zy) ? q : nullptr;
}

bool ScalarConstant(const OrtValueInfo* v, float* value) {
  Constant k;
  if (!v || !ReadConstant(v, &k) || k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || k.count() != 1 ||
      k.shape.size() > 1)
    return false;
  *value = static_cast<const float*>(k.data)[0];
  return true;
}

// Softmax over the last axis (opset >= 13: `axis`, default -1; older: flattened from `axis`, default 1).
bool LastAxisSoftmax(const OrtNode* sm) {
  if (!IsOp(sm, "Softmax") || Inputs(sm).size() != 1 || Outputs(sm).size() != 1) return false;
  int since = 0;
  Check(g_api->Node_GetSinceVersion(sm, &since));
  const int64_t axis = AttrInt(sm, "axis", since >= 13 ? -1 : 1);
  if (axis == -1) return true;
  const int64_t rank = ValueRank(Inputs(sm)[0]);
  return rank >= 1 && axis == rank - 1;
}

// Where(IsNaN(p), c, p) after the softmax: fills isnan / where and the value past them.
bool MatchNanWhere(const OrtValueInfo* p, AttentionUnit* u, const OrtValueInfo** after) {
  if (IsGraphOutput(p) || Consumers(p) != 2) return false;
  const OrtNode *isnan = nullptr, *where = nullptr;
  for (const OrtNode* c : AllConsumers(p)) {
    if (IsOp(c, "IsNaN")) isnan = c;
    if (IsOp(c, "Where")) where = c;
  }
  if (!isnan || !where || Outputs(isnan).size() != 1) return false;
  const auto win = Inputs(where);
  float c = 0.0f;
  if (win.size() != 3 || win[0] != Outputs(isnan)[0] || win[2] != p || !ScalarConstant(win[1], &c)) return false;
  if (SoleConsumer(Outputs(isnan)[0]) != where || Outputs(where).size() != 1) return false;
  u->isnan = isnan;
  u->where = where;
  *after = Outputs(where)[0];
  return true;
}

}  // namespace

bool MatchAttention(const OrtNode* mm1, AttentionUnit* u) {
  *u = AttentionUnit{};
  if (!IsOp(mm1, "MatMul")) return false;
  const auto in = Inputs(mm1);
  const auto out = Outputs(mm1);
  if (in.size() != 2 || out.size() != 1 || !in[0] || !in[1] || !out[0]) return false;
  u->dq_a = Producer(in[0]);
  u->dq_b = Producer(in[1]);
  if (!u->dq_a || !u->dq_b || u->dq_a == u->dq_b || !RuntimeDq(u->dq_a) || !RuntimeDq(u->dq_b)) return false;
  if (!ReadByOpAndShapes(u->dq_a, mm1, &u->shape_reads) || !ReadByOpAndShapes(u->dq_b, mm1, &u->shape_reads))
    return false;
  u->mm1 = mm1;
  if (!(u->q1 = SoleQ(out[0])) || !(u->dq1 = SameParamsDq(u->q1))) return false;
  // The float steps up to the softmax.
  const OrtValueInfo* v = Outputs(u->dq1)[0];
  bool mask = false;
  for (;;) {
    const OrtNode* c = v ? SoleConsumer(v) : nullptr;
    if (!c) return false;
    if (LastAxisSoftmax(c)) {
      u->softmax = c;
      break;
    }
    const std::string t = OpType(c);
    if (!Domain(c).empty() || (t != "Add" && t != "Sub" && t != "Mul" && t != "Div") || u->steps.size() == 6)
      return false;
    const auto cin = Inputs(c);
    if (cin.size() != 2 || Outputs(c).size() != 1 || (cin[0] == v) == (cin[1] == v)) return false;
    const OrtValueInfo* other = cin[0] == v ? cin[1] : cin[0];
    float s = 0.0f;
    if (!ScalarConstant(other, &s)) {  // the mask: Add only, once, a float tensor
      if (t != "Add" || mask || !other || ValueType(other) != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return false;
      mask = true;
    }
    u->steps.push_back(c);
    v = Outputs(c)[0];
  }
  const OrtValueInfo* p = Outputs(u->softmax)[0];
  if (!p) return false;
  const OrtNode* q2 = SoleQ(p);
  if (!q2) {
    const OrtValueInfo* after = nullptr;
    if (!MatchNanWhere(p, u, &after) || !(q2 = SoleQ(after))) return false;
  }
  u->q2 = q2;
  if (!(u->dq2 = SameParamsDq(q2))) return false;
  int64_t idx = 0;
  const OrtNode* mm2 = SoleConsumer(Outputs(u->dq2)[0], &idx);
  if (!IsOp(mm2, "MatMul") || idx != 0) return false;
  const auto in2 = Inputs(mm2);
  if (in2.size() != 2 || !in2[1] || Outputs(mm2).size() != 1) return false;
  u->dq_v = Producer(in2[1]);
  if (!u->dq_v || u->dq_v == u->dq_a || u->dq_v == u->dq_b || !RuntimeDq(u->dq_v) ||
      !ReadByOpAndShapes(u->dq_v, mm2, &u->shape_reads))
    return false;
  u->mm2 = mm2;
  return (u->q3 = SoleQ(Outputs(mm2)[0])) != nullptr;
}

void CompileAttention(const OrtGraph* graph, const OrtNode* fused, CompiledAttention* c) {
  const std::vector<const OrtNode*> nodes = GraphNodes(graph);
  AttentionUnit u;
  bool found = false;
  for (const OrtNode* n : nodes)
    if (IsOp(n, "MatMul") && MatchAttention(n, &u)) {
      found = true;
      break;
    }
  if (!found || u.Nodes().size() != nodes.size()) throw Failure{"fused graph is not the attention unit claimed"};
  c->name = NodeName(u.softmax);
  c->a = InputParams(u.dq_a);
  c->b = InputParams(u.dq_b);
  c->scores = OutputParams(u.q1);
  c->p = OutputParams(u.q2);
  c->v = InputParams(u.dq_v);
  c->y = OutputParams(u.q3);
  c->mult1 = (c->a.scale * c->b.scale) / c->scores.scale;
  c->mult2 = (c->p.scale * c->v.scale) / c->y.scale;
  c->a_input = FusedInput(fused, Inputs(u.dq_a)[0]);
  c->b_input = FusedInput(fused, Inputs(u.dq_b)[0]);
  c->v_input = FusedInput(fused, Inputs(u.dq_v)[0]);
  c->y_output = FusedOutput(fused, Outputs(u.q3)[0]);
  c->steps.clear();
  const OrtValueInfo* v = Outputs(u.dq1)[0];
  for (const OrtNode* n : u.steps) {
    CompiledAttention::Step st;
    const std::string t = OpType(n);
    st.op = t == "Add" ? '+' : t == "Sub" ? '-' : t == "Mul" ? '*' : '/';
    const auto in = Inputs(n);
    st.value_first = in[0] == v;
    const OrtValueInfo* other = st.value_first ? in[1] : in[0];
    if (!ScalarConstant(other, &st.scalar)) {
      st.mask = true;
      Constant k;
      if (ReadConstant(other, &k)) {
        if (k.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Failure{c->name + ": the mask must be float"};
        const auto* d = static_cast<const float*>(k.data);
        c->mask_const.assign(d, d + k.count());
        c->mask_const_shape = k.shape;
      } else {
        c->mask_input = FusedInput(fused, other);
      }
    }
    c->steps.push_back(st);
    v = Outputs(n)[0];
  }
  c->nan_where = u.where != nullptr;
  if (c->nan_where && !ScalarConstant(Inputs(u.where)[1], &c->nan_value))
    throw Failure{c->name + ": the Where's constant changed"};
  c->shape_outs.clear();
  for (const OrtNode* s : u.shape_reads) {
    CompiledAttention::ShapeOut so;
    so.output = FusedOutput(fused, Outputs(s)[0]);
    const OrtValueInfo* read = Inputs(s)[0];
    so.of = read == Outputs(u.dq_a)[0] ? 0 : read == Outputs(u.dq_b)[0] ? 1 : 2;
    so.start = AttrInt(s, "start", 0);
    so.end = AttrInt(s, "end", INT64_MAX);
    c->shape_outs.push_back(so);
  }
}

namespace {

struct Codes {
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
};

Codes InputCodes(OrtKernelContext* ctx, int i) {
  const OrtValue* v = nullptr;
  Check(g_api->KernelContext_GetInput(ctx, static_cast<size_t>(i), &v));
  Codes c;
  c.shape = TensorShape(v);
  const void* p = nullptr;
  Check(g_api->GetTensorData(v, &p));
  c.data = static_cast<const uint8_t*>(p);
  return c;
}

// y = Q(a @ b) with a's and b's per-tensor zero points and the float multiplier `mult` (QLinearMatMul's
// requantization), numpy matmul broadcasting; B packed into this thread's buffers.
void QuantizedMatMul(const qie::MatMulPlan& plan, const uint8_t* a, const QParams& pa, const Codes& b,
                     const QParams& pb, float mult, const QParams& py, uint8_t* y, const qie::ParallelFor& pfor) {
  const size_t rows = plan.folded ? plan.rows : plan.M;
  const size_t batch = plan.folded ? 1 : plan.a_off.size();
  if (rows == 0 || plan.N == 0 || batch == 0) return;
  const qie::MicroKernel& uk = qie::GetMicroKernel(qie::ActiveIsa());
  thread_local qie::PrepackedB pk;  // this call's B, in buffers kept between calls
  qie::Tensor bt;
  bt.type = pb.is_signed ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  bt.shape = b.shape;
  bt.data = b.data;
  qie::PackAllB(uk, bt, false, &pk);
  std::vector<const qie::PackedB*> bptrs;
  const std::vector<int32_t> zb(plan.N, pb.zp);
  const std::vector<float> scale(plan.N, mult);
  const int32_t za = pa.zp;
  qie::GemmArgs g;
  qie::PlanArgs(plan, a, y, pk.mats, &bptrs, &g);
  g.a_signed = pa.is_signed;
  g.za = &za;
  g.zb = zb.data();
  g.kind = py.is_signed ? qie::OutKind::kS8 : qie::OutKind::kU8;
  g.scale = scale.data();
  g.y_zp = py.zp;
  qie::Gemm(uk, g, pfor);
}

qie::MatMulPlan Plan(const std::vector<int64_t>& a, const std::vector<int64_t>& b, const std::string& what) {
  try {
    return qie::PlanMatMul(a, b);
  } catch (const qie::OpError& e) { throw Failure{what + ": " + e.what()}; }
}

// exp(x) in float32 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n), ~1 ulp; 0 below -87,
// NaN for NaN. Plain arithmetic so that the row loops below vectorize (libm's expf is a call per element).
inline float ExpApprox(float x) {
  const float xc = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
  constexpr float kMagic = 12582912.0f;  // round to nearest by adding and subtracting 1.5 * 2^23
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float p;
  std::memcpy(&p, &bits, sizeof p);
  y = y * p;
  y = x < -87.0f ? 0.0f : y;
  return x != x ? x : y;
}

// Softmax rows [r0, r1) of L values each, in float buffer x ((r1 - r0) * L): x = (code - z) * s, the steps, then
// p = exp(x - max) * (1 / sum) (MLAS's order), NaN -> c when the unit has the Where, quantized into y (the
// probabilities' codes, row-major). Elementwise work runs over the whole block (it vectorizes at any row length);
// only the row maxima and sums go row by row. `bc`: the scores' and the mask's strides in the probabilities' axes.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void SoftmaxRows(
    const CompiledAttention& c, const Broadcast& bc, const uint8_t* codes, const float* mask, size_t r0, size_t r1,
    size_t L, float* x, float* row_scale, uint8_t* y) {
  const size_t R = bc.shape.size(), n = (r1 - r0) * L;
  const size_t xs = bc.sx[R - 1], ms = bc.sm[R - 1];
  const float s = c.scores.scale;
  const int32_t z = c.scores.zp;
  const bool sgn = c.scores.is_signed;
  bool plain = true;  // the scores' rows are the probabilities' rows, in order (no axis broadcast)
  for (size_t d = R, k = 1; d-- > 0; k *= static_cast<size_t>(bc.shape[d]))
    plain = plain && (bc.shape[d] == 1 || bc.sx[d] == k);
  if (plain) {
    const uint8_t* q = codes + r0 * L;
    if (sgn)
      for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<int8_t>(q[i]) - z) * s;
    else
      for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(q[i] - z) * s;
  } else {
    for (size_t r = r0; r < r1; ++r) {
      size_t ox, om;
      bc.RowOffsets(r, &ox, &om);
      float* v = x + (r - r0) * L;
      for (size_t j = 0; j < L; ++j) v[j] = static_cast<float>(Code(codes[ox + j * xs], sgn) - z) * s;
    }
  }
  for (const CompiledAttention::Step& st : c.steps) {
    const bool f = st.value_first;
    if (st.mask) {  // Add only
      for (size_t r = r0; r < r1; ++r) {
        size_t ox, om;
        bc.RowOffsets(r, &ox, &om);
        float* v = x + (r - r0) * L;
        const float* m = mask + om;
        if (ms)
          for (size_t j = 0; j < L; ++j) v[j] = f ? v[j] + m[j] : m[j] + v[j];
        else
          for (size_t j = 0; j < L; ++j) v[j] = f ? v[j] + m[0] : m[0] + v[j];
      }
      continue;
    }
    const float k = st.scalar;
    switch (st.op) {
      case '+':
        for (size_t i = 0; i < n; ++i) x[i] = f ? x[i] + k : k + x[i];
        break;
      case '-':
        for (size_t i = 0; i < n; ++i) x[i] = f ? x[i] - k : k - x[i];
        break;
      case '*':
        for (size_t i = 0; i < n; ++i) x[i] = f ? x[i] * k : k * x[i];
        break;
      default:
        for (size_t i = 0; i < n; ++i) x[i] = f ? x[i] / k : k / x[i];
    }
  }
  for (size_t r = 0; r < r1 - r0; ++r) {  // x - max per row
    float* v = x + r * L;
    float lanes[16];  // 16 independent maxima: one compare chain per lane, not per element
    std::fill(lanes, lanes + 16, v[0]);
    size_t j = 0;
    for (; j + 16 <= L; j += 16)
      for (size_t l = 0; l < 16; ++l) lanes[l] = lanes[l] < v[j + l] ? v[j + l] : lanes[l];
    float top = v[0];
    for (; j < L; ++j) top = top < v[j] ? v[j] : top;
    for (size_t l = 0; l < 16; ++l) top = top < lanes[l] ? lanes[l] : top;
    for (size_t j = 0; j < L; ++j) v[j] = v[j] - top;
  }
  for (size_t i = 0; i < n; ++i) x[i] = ExpApprox(x[i]);
  for (size_t r = 0; r < r1 - r0; ++r) {  // 1 / sum per row, over 16 float lanes as MLAS sums
    const float* v = x + r * L;
    float lanes[16] = {};
    size_t j = 0;
    for (; j + 16 <= L; j += 16)
      for (size_t l = 0; l < 16; ++l) lanes[l] += v[j + l];
    float sum = 0.0f;
    for (; j < L; ++j) sum += v[j];
    for (size_t l = 0; l < 16; ++l) sum += lanes[l];
    row_scale[r] = 1.0f / sum;
  }
  for (size_t r = 0; r < r1 - r0; ++r) {
    float* v = x + r * L;
    const float inv = row_scale[r];
    for (size_t j = 0; j < L; ++j) v[j] = v[j] * inv;
  }
  const Quantizer quant(c.p);
  uint8_t* out = y + r0 * L;
  if (c.nan_where) {  // Where(IsNaN(p), c, p), in place
    const float nv = c.nan_value;
    for (size_t i = 0; i < n; ++i) x[i] = x[i] != x[i] ? nv : x[i];
  }
  QuantizeBlock(x, n, quant, out);
}

}  // namespace

OrtStatus* ComputeAttention(const CompiledAttention& c, OrtKernelContext* ctx) {
  return Guard("Attention", [&] {
    const Codes a = InputCodes(ctx, c.a_input), b = InputCodes(ctx, c.b_input), v = InputCodes(ctx, c.v_input);
    for (const CompiledAttention::ShapeOut& so : c.shape_outs) {
      const std::vector<int64_t> d = ShapeSlice(so.of == 0   ? a.shape
                                                : so.of == 1 ? b.shape
                                                             : v.shape,
                                                so.start, so.end);
      Int64Output(ctx, so.output, {static_cast<int64_t>(d.size())}, d);
    }
    const qie::MatMulPlan p1 = Plan(a.shape, b.shape, c.name + ": the scores' MatMul");
    // The mask (runtime input, constant or none) and the probabilities' shape: the scores' broadcast with it.
    std::vector<int64_t> mshape;
    const float* mask = nullptr;
    if (c.mask_input >= 0) {
      const OrtValue* mv = nullptr;
      Check(g_api->KernelContext_GetInput(ctx, static_cast<size_t>(c.mask_input), &mv));
      mshape = TensorShape(mv);
      const void* md = nullptr;
      Check(g_api->GetTensorData(mv, &md));
      mask = static_cast<const float*>(md);
    } else if (!c.mask_const_shape.empty() || !c.mask_const.empty()) {
      mshape = c.mask_const_shape;
      mask = c.mask_const.data();
    }
    Broadcast bc;
    if (!BroadcastOf(p1.out_shape, mshape, &bc))
      throw Failure{c.name + ": the attention mask of shape " + qie::ShapeStr(mshape) +
                    " does not broadcast to the scores' " + qie::ShapeStr(p1.out_shape)};
    if (bc.shape.empty()) throw Failure{c.name + ": Softmax input must have rank >= 1"};
    const qie::MatMulPlan p2 = Plan(bc.shape, v.shape, c.name + ": the output's MatMul");
    OrtValue* yv = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(c.y_output), p2.out_shape.data(), p2.out_shape.size(),
                                         &yv));
    void* yd = nullptr;
    Check(g_api->GetTensorMutableData(yv, &yd));
    size_t n1 = 1, np = 1;
    for (int64_t d : p1.out_shape) n1 *= static_cast<size_t>(d);
    for (int64_t d : bc.shape) np *= static_cast<size_t>(d);
    size_t ny = 1;
    for (int64_t d : p2.out_shape) ny *= static_cast<size_t>(d);
    if (ny == 0 && np == 0) return;
    thread_local std::vector<uint8_t> scores, probs;
    scores.resize(n1);
    probs.resize(np);
    const qie::ParallelFor pool = CtxParallelFor(ctx);
    Pace pace(c.pacing, c.adaptive, n1 * p1.K + ny * p2.K + np * 8, pool);
    const qie::ParallelFor& pfor = pace.For();
    uint8_t* const sc = scores.data();  // (a thread_local named in the tasks would be each pool thread's own)
    uint8_t* const pr = probs.data();
    QuantizedMatMul(p1, a.data, c.a, b, c.b, c.mult1, c.scores, sc, pfor);
    // The softmax rows: (q - z) * s, the steps, exp(x - max) * (1 / sum), [NaN -> c], Q.
    const size_t L = static_cast<size_t>(bc.shape.back());
    const size_t rows = L ? np / L : 0;
    const size_t per = std::max<size_t>(1, 8192 / std::max<size_t>(L, 1));
    auto task = [&](size_t t) {
      thread_local std::vector<float> x, inv;
      const size_t r0 = t * per, r1 = std::min(rows, r0 + per);
      x.resize((r1 - r0) * L);
      inv.resize(r1 - r0);
      SoftmaxRows(c, bc, sc, mask, r0, r1, L, x.data(), inv.data(), pr);
    };
    const size_t tasks = (rows + per - 1) / per;
    if (tasks == 1)
      task(0);
    else if (tasks > 1)
      pfor(tasks, task);
    QuantizedMatMul(p2, pr, c.p, v, c.v, c.mult2, c.y, static_cast<uint8_t*>(yd), pfor);
    pace.Done();
  });
}

}  // namespace qie_ep
