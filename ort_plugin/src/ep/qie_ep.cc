// qie as an ONNX Runtime plugin execution provider (libqie_ep.so, built against the API-27 headers; ORT >= 1.27).
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
#include <onnxruntime_c_api.h>  // includes onnxruntime_ep_c_api.h

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "ep/graph.h"
#include "ep/region.h"
#include "ep/region_plan.h"
#include "ep/softmax.h"
#include "kernels/gemm.h"
#include "ops/common.h"

namespace {

using namespace qie_ep;  // NOLINT: the EP's own graph helpers

std::atomic<long> g_claimed{0}, g_runs{0}, g_regions{0}, g_region_runs{0};
constexpr const char* kEpName = "QIE";
constexpr size_t kMaxTail = 4;
// Per-column tails over more columns than this stay ORT's: a [N][256] table of PP-OCRv6's 18710 classes (4.8 MB)
// misses the caches on every lookup.
constexpr size_t kMaxTailColumns = 4096;

// ---- the QDQ MatMul unit ----------------------------------------------------------------------------------

// A matched unit: its nodes (the op is MatMul, or Gemm with an optional DequantizeLinear'd int32 bias).
struct MatMulUnit {
  const OrtNode *dq_x = nullptr, *dq_w = nullptr, *matmul = nullptr, *q = nullptr, *dq_bias = nullptr;
  // The DequantizeLinear that is the Q's only consumer, with the Q's scale and zero point: the unit then outputs
  // its float values, (q - zy) * sy, and the Q -> DQ pair costs ORT no nodes (nullptr: the codes are the output).
  const OrtNode* dq_out = nullptr;
  bool trans_b = false;
  std::vector<Unit> tail;  // the DQ -> f -> Q segments after q, in order
  const OrtNode* last_q() const { return tail.empty() ? q : tail.back().q; }
  std::vector<const OrtNode*> Nodes() const {
    std::vector<const OrtNode*> v = {dq_x, dq_w};
    if (dq_bias) v.push_back(dq_bias);
    v.push_back(matmul);
    v.push_back(q);
    for (const Unit& seg : tail) {
      v.push_back(seg.in_dqs[0]);
      v.insert(v.end(), seg.nodes.begin(), seg.nodes.end());
    }
    if (dq_out) v.push_back(dq_out);
    return v;
  }
};

// The unit's operands, read from the graph (GetCapability) or from the fused graph (Compile).
struct UnitOperands {
  Constant w, sw, zw, sx, zx, sy, zy;
  ONNXTensorElementDataType wt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, xt = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t K = 0, N = 0;
  std::vector<int32_t> bias;
};

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

// The segments DQ -> f -> Q after the unit's QuantizeLinear (see the file's comment), each the only reader of the
// codes before it.
void MatchTail(MatMulUnit* u, size_t N) {
  const OrtNode* q = u->q;
  const int64_t rank = ValueRank(Outputs(u->matmul)[0]);  // constants may not raise it (unknown: 1-D constants)
  while (u->tail.size() < kMaxTail) {
    const auto out = Outputs(q);
    if (out.size() != 1 || !out[0] || IsGraphOutput(out[0])) return;
    int64_t idx = 0;
    const OrtNode* dq = SoleConsumer(out[0], &idx);
    if (!IsOp(dq, "DequantizeLinear") || idx != 0) return;
    Unit seg;
    if (!MatchElementwise(dq, ConstLayout{ConstLayout::kLast, std::max<int64_t>(rank, 1)}, &seg)) return;
    const size_t C = CompileTable(seg).C;
    if (C != 1 && (C != N || N > kMaxTailColumns)) return;
    u->tail.push_back(seg);
    q = seg.q;
  }
}

// Drops the tail's segments from the first one holding a node `gone` says is not the unit's to take (claimed by
// another group, or outside the fused graph at Compile); the unit then outputs the codes before it.
template <typename Pred>
void TrimTail(MatMulUnit* u, Pred gone) {
  for (size_t i = 0; i < u->tail.size(); ++i) {
    bool out = gone(u->tail[i].in_dqs[0]);
    for (const OrtNode* m : u->tail[i].nodes) out = out || gone(m);
    if (!out) continue;
    u->tail.resize(i);
    Constant sy, zy;  // what reads the codes now: perhaps a DequantizeLinear that `gone` also says is not the unit's
    u->dq_out = QOperands(u->last_q(), &sy, &zy) ? DequantizedBySame(u->last_q(), sy, zy) : nullptr;
    return;
  }
}

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
  // The consumer: one QuantizeLinear.
  size_t nc = 1;
  std::vector<const OrtNode*> consumers(nc);
  std::vector<int64_t> idx(nc);
  Check(g_api->ValueInfo_GetValueConsumers(out[0], consumers.data(), idx.data(), nc));
  const OrtNode* q = consumers[0];
  if (!q || OpType(q) != "QuantizeLinear" || !Domain(q).empty() || idx[0] != 0) return false;
  if (AttrInt(q, "block_size", 0) != 0 || AttrInt(q, "saturate", 1) != 1) return false;
  Constant unused;
  const auto win = Inputs(dq_w);
  if (win.empty() || !ReadConstant(win[0], &o->w) || o->w.shape.size() != 2) return false;
  o->K = static_cast<size_t>(o->w.shape[trans_b ? 1 : 0]);
  o->N = static_cast<size_t>(o->w.shape[trans_b ? 0 : 1]);
  if (!DqOperands(dq_w, false, o->N, &o->w, &o->sw, &o->zw, &o->wt, trans_b ? 0 : 1)) return false;
  if (!DqOperands(dq_x, true, 0, &unused, &o->sx, &o->zx, &o->xt)) return false;
  if (has_c && !Int32Bias(dq_b, o->N, o->sx, o->sw, &o->bias)) return false;
  const auto qin = Inputs(q);
  if (qin.size() < 3 || !ReadConstant(qin[1], &o->sy) || o->sy.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      o->sy.count() != 1 || !ReadConstant(Input(qin, 2), &o->zy) || !IsQ8(o->zy.type) || o->zy.count() != 1)
    return false;
  const float sy = static_cast<const float*>(o->sy.data)[0];
  if (!(std::isfinite(sy) && sy != 0.0f)) return false;
  u->dq_x = dq_x;
  u->dq_w = dq_w;
  u->dq_bias = dq_b;
  u->matmul = op;
  u->q = q;
  u->trans_b = trans_b;
  u->tail.clear();
  MatchTail(u, o->N);
  Constant sy_last, zy_last;
  if (!QOperands(u->last_q(), &sy_last, &zy_last)) return false;
  u->dq_out = DequantizedBySame(u->last_q(), sy_last, zy_last);
  return true;
}

// ---- the compiled unit ------------------------------------------------------------------------------------

struct CompiledMatMul {
  qie::PackedB packed;
  const qie::MicroKernel* uk = nullptr;
  size_t K = 0, N = 0;
  bool x_signed = false;
  int32_t zx = 0;
  std::vector<int32_t> zw;
  std::vector<float> mult;  // (sx * sw[n]) / sy, in float32 as ORT evaluates it
  qie::OutKind kind = qie::OutKind::kU8;
  int32_t zy = 0;
  std::vector<int32_t> bias;  // Gemm's C, per column (empty: none)
  bool gemm = false;          // Gemm: x must be 2-D
  // The tail: its leading per-column segments of plain arithmetic run on the data (programs.chain, each as its
  // table was built: the same codes, no [N][256] tables to read), the others composed into one table
  // (output code = table[column][code], [tC][256] + 3 bytes; empty: none).
  RegionPlan::Step programs;
  std::vector<uint8_t> table;
  size_t tC = 1;
  QParams out;             // the last QuantizeLinear's scale, zero point and type
  bool float_out = false;  // the unit ends with that Q's DequantizeLinear: outputs (q - zp) * scale
  std::string x_name;
};

OrtStatus* ComputeMatMul(CompiledMatMul& c, OrtKernelContext* ctx) {
  return Guard("MatMul", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, 0, &x));
    const std::vector<int64_t> shape = TensorShape(x);
    const size_t rank = shape.size();
    if (rank == 0 || shape.back() != static_cast<int64_t>(c.K) || (c.gemm && rank != 2))
      throw Failure{"input '" + c.x_name + "' must be " + (c.gemm ? "2-D " : "") +
                    "with last dimension K=" + std::to_string(c.K)};
    size_t rows = 1;
    for (size_t d = 0; d + 1 < rank; ++d) rows *= static_cast<size_t>(shape[d]);
    std::vector<int64_t> out_shape = shape;
    if (rank == 1)
      out_shape = {static_cast<int64_t>(c.N)};
    else
      out_shape.back() = static_cast<int64_t>(c.N);
    OrtValue* y = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &y));
    void* ydata = nullptr;
    Check(g_api->GetTensorMutableData(y, &ydata));
    const void* xdata = nullptr;
    Check(g_api->GetTensorData(x, &xdata));
    if (rows == 0 || c.N == 0) return;
    // the GEMM's codes, when a tail maps them or the unit outputs float values; the tail's codes, when float
    thread_local std::vector<uint8_t> codes, tail_codes;
    const bool tail = !c.table.empty() || !c.programs.chain.empty();
    if (c.float_out || tail) codes.resize(rows * c.N);
    if (c.float_out && tail) tail_codes.resize(rows * c.N);
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
    g.y = c.float_out || tail ? codes.data() : ydata;
    g.ldy = c.N;
    g.batch = 1;
    g.b = &bp;
    const qie::ParallelFor pfor = CtxParallelFor(ctx);
    qie::Gemm(*c.uk, g, pfor);
    const uint8_t* out_codes = codes.data();
    if (tail) {  // programs then table, each in place once the codes are in dst
      uint8_t* dst = c.float_out ? tail_codes.data() : static_cast<uint8_t*>(ydata);
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
    if (c.float_out)
      DequantizeCodes(out_codes, rows * c.N, c.out.is_signed, c.out.zp, c.out.scale, static_cast<float*>(ydata));
    g_runs.fetch_add(1);
  });
}

// The tail's plan: when every segment up to the last per-column one is plain arithmetic, those run as float programs
// on the data and the rest (per-tensor) as one table; otherwise all of it as one composed table.
void PlanTail(const MatMulUnit& u, CompiledMatMul* c) {
  c->programs.chain.clear();
  c->table.clear();
  c->tC = 1;
  size_t direct = 0;  // segments run as programs
  for (size_t i = 0; i < u.tail.size(); ++i) {
    const FloatProgram f = CompileTable(u.tail[i]);
    if (f.C > 1) direct = i + 1;
  }
  for (size_t i = 0; i < direct; ++i)
    if (!CompileTable(u.tail[i]).arithmetic) direct = 0;
  for (size_t i = 0; i < direct; ++i) {
    RegionPlan::Chained link{InputParams(u.tail[i].in_dqs[0]), CompileTable(u.tail[i]), OutputParams(u.tail[i].q)};
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

// Builds the compiled unit from the fused graph (its DequantizeLinear(W) initializers and scales).
std::vector<const OrtNode*> GraphNodes(const OrtGraph* graph) {
  size_t n = 0;
  Check(g_api->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) Check(g_api->Graph_GetNodes(graph, nodes.data(), n));
  return nodes;
}

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
  if (u.dq_out && !in_graph.count(u.dq_out)) u.dq_out = nullptr;
  if (u.Nodes().size() != nodes.size()) throw Failure{"fused graph is not the unit GetCapability claimed"};
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
  const float fsx = static_cast<const float*>(o.sx.data)[0], fsy = static_cast<const float*>(o.sy.data)[0];
  for (size_t j = 0; j < c->N; ++j) {
    const size_t i = o.sw.count() == 1 ? 0 : j;
    c->zw[j] = o.zw.data ? Zp(o.zw, i) : 0;
    c->mult[j] = (fsx * static_cast<const float*>(o.sw.data)[i]) / fsy;
  }
  c->bias = o.bias;
  c->kind = o.zy.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 ? qie::OutKind::kS8 : qie::OutKind::kU8;
  c->zy = Zp(o.zy, 0);
  c->float_out = u.dq_out != nullptr;
  c->out = OutputParams(u.last_q());
  PlanTail(u, c);
  const auto fin = Inputs(fused);
  if (fin.empty()) throw Failure{"fused node has no input"};
  c->x_name = Name(fin[0]);
}

// One fused node: a MatMul/Gemm unit, a Softmax unit or a region.
struct ComputeInfo : OrtNodeComputeInfo {
  CompiledMatMul unit;
  bool is_softmax = false;
  CompiledSoftmax softmax;
  std::unique_ptr<RegionPlan, void (*)(RegionPlan*)> region{nullptr, ReleaseRegion};
  ComputeInfo() : OrtNodeComputeInfo{} {
    ort_version_supported = ORT_API_VERSION;
    CreateState = [](OrtNodeComputeInfo* self, OrtNodeComputeContext*, void** state) noexcept -> OrtStatus* {
      *state = self;
      return nullptr;
    };
    Compute = [](OrtNodeComputeInfo*, void* state, OrtKernelContext* ctx) noexcept -> OrtStatus* {
      auto* self = static_cast<ComputeInfo*>(state);
      if (self->is_softmax) {
        OrtStatus* st = ComputeSoftmax(self->softmax, ctx);
        if (!st) g_runs.fetch_add(1);
        return st;
      }
      if (!self->region) return ComputeMatMul(self->unit, ctx);
      OrtStatus* st = RunRegion(*self->region, ctx);
      if (!st) g_region_runs.fetch_add(1);
      return st;
    };
    ReleaseState = [](OrtNodeComputeInfo*, void*) noexcept {};
  }
};

// ---- the EP -----------------------------------------------------------------------------------------------

struct QieEp : OrtEp {
  bool units_on = true;
  bool regions_on = true;
  bool tails_on = true;
  const OrtLogger* logger = nullptr;  // the session's, from CreateEp
  void Log(OrtLoggingLevel level, const std::string& msg) const {
    if (!logger) return;
    if (OrtStatus* st = g_api->Logger_LogMessage(logger, level, msg.c_str(), ORT_FILE, __LINE__, "qie EP"))
      g_api->ReleaseStatus(st);
  }
  RegionOptions region_opts;
  QieEp() : OrtEp{} {
    ort_version_supported = ORT_API_VERSION;
    GetName = [](const OrtEp*) noexcept -> const char* { return kEpName; };
    GetCapability = [](OrtEp* ep, const OrtGraph* graph, OrtEpGraphSupportInfo* support) noexcept -> OrtStatus* {
      return Guard("GetCapability", [&] {
        const QieEp* self = static_cast<const QieEp*>(ep);
        const std::vector<const OrtNode*> nodes = GraphNodes(graph);
        OrtNodeFusionOptions opts{};
        opts.ort_version_supported = ORT_API_VERSION;
        opts.drop_constant_initializers = true;  // weights and scales are read (and packed) at Compile
        // Regions first; then the Softmax and the MatMul / Gemm units of the nodes left (a MatMul unit's trailing
        // DequantizeLinear that a region or a Softmax unit reads stays with it: the unit then outputs the codes).
        RegionReport report;
        size_t region_nodes = 0;
        std::unordered_set<const OrtNode*> claimed;
        const auto regions = self->regions_on ? MatchRegions(nodes, self->region_opts, &report)
                                              : std::vector<std::vector<const OrtNode*>>{};
        for (const auto& group : regions) {
          Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(support, group.data(), group.size(), &opts));
          g_regions.fetch_add(1);
          region_nodes += group.size();
          claimed.insert(group.begin(), group.end());
        }
        auto outside = [&](const std::vector<const OrtNode*>& group) {
          return std::none_of(group.begin(), group.end(), [&](const OrtNode* n) { return claimed.count(n) > 0; });
        };
        size_t softmaxes = 0;
        for (const OrtNode* node : nodes) {
          if (!self->units_on) break;
          SoftmaxUnit u;
          try {
            if (!MatchSoftmax(node, &u)) continue;
          } catch (const Failure&) { continue; }
          const std::vector<const OrtNode*> group = u.Nodes();
          if (!outside(group)) continue;
          Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(support, group.data(), group.size(), &opts));
          claimed.insert(group.begin(), group.end());
          g_claimed.fetch_add(1);
          ++softmaxes;
        }
        // MatMul / Gemm units: matched first, so that a unit's trailing DequantizeLinear that another unit reads as
        // its input (two units in a chain) is left to that one (the codes pass between them).
        std::vector<MatMulUnit> matched;
        std::unordered_set<const OrtNode*> unit_inputs;
        for (const OrtNode* node : nodes) {
          if (!self->units_on) break;
          // A node whose reading fails is left to ORT: claiming nothing is always safe, failing the session
          // creation never is.
          MatMulUnit u;
          UnitOperands o;
          try {
            if (!MatchUnit(node, &u, &o)) continue;
            if (self->tails_on)
              TrimTail(&u, Assigned);
            else
              TrimTail(&u, [](const OrtNode*) { return true; });
            if (u.dq_out && Assigned(u.dq_out)) u.dq_out = nullptr;
            bool taken = false;
            for (const OrtNode* m : u.Nodes()) taken = taken || Assigned(m);  // GetCapability may run again
            if (taken) continue;
          } catch (const Failure&) { continue; }
          matched.push_back(u);
          unit_inputs.insert(u.dq_x);
        }
        size_t units = 0, segments = 0;
        for (MatMulUnit& u : matched) {
          TrimTail(&u, [&](const OrtNode* m) { return claimed.count(m) > 0; });
          if (u.dq_out && (claimed.count(u.dq_out) || unit_inputs.count(u.dq_out))) u.dq_out = nullptr;
          const std::vector<const OrtNode*> group = u.Nodes();
          if (!outside(group)) continue;
          Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(support, group.data(), group.size(), &opts));
          claimed.insert(group.begin(), group.end());
          g_claimed.fetch_add(1);
          ++units;
          segments += u.tail.size();
        }
        if (!self->regions_on)
          return self->Log(ORT_LOGGING_LEVEL_INFO, "qie EP: " + std::to_string(units) + " MatMul/Gemm units (" +
                                                       std::to_string(segments) + " tail segments) and " +
                                                       std::to_string(softmaxes) +
                                                       " Softmax units claimed; regions off");
        self->Log(ORT_LOGGING_LEVEL_INFO,
                  "qie EP: " + std::to_string(units) + " MatMul/Gemm units (" + std::to_string(segments) +
                      " tail segments) and " + std::to_string(softmaxes) + " Softmax units claimed; " +
                      std::to_string(regions.size()) + " regions of " + std::to_string(region_nodes) + " nodes hold " +
                      std::to_string(report.units_claimed) + " of the " + std::to_string(report.units) +
                      " QDQ units found (the rest: fewer than " + std::to_string(self->region_opts.min_conv_units) +
                      " convolutions in their group, or cut so the fused graph stays acyclic; " +
                      std::to_string(report.dropped_cycles) + " regions dropped for a cycle)");
      });
    };
    Compile = [](OrtEp* ep, const OrtGraph** graphs, const OrtNode** fused, size_t count, OrtNodeComputeInfo** infos,
                 OrtNode** ep_context_nodes) noexcept -> OrtStatus* {
      return Guard("Compile", [&] {
        const QieEp* self = static_cast<const QieEp*>(ep);
        for (size_t i = 0; i < count; ++i) {
          infos[i] = nullptr;
          if (ep_context_nodes) ep_context_nodes[i] = nullptr;
        }
        for (size_t i = 0; i < count; ++i) {
          auto info = std::make_unique<ComputeInfo>();
          const std::vector<const OrtNode*> nodes = GraphNodes(graphs[i]);
          bool matmul = false, softmax = false;
          for (const OrtNode* n : nodes) {
            matmul = matmul || OpType(n) == "MatMul" || OpType(n) == "Gemm";
            softmax = softmax || OpType(n) == "Softmax";
          }
          if (softmax && nodes.size() == 3) {
            info->is_softmax = true;
            CompileSoftmax(nodes, &info->softmax);
          } else if (matmul) {
            CompileMatMul(graphs[i], fused[i], &info->unit);
          } else {
            std::vector<std::string> in_names, out_names;
            for (const OrtValueInfo* v : Inputs(fused[i])) in_names.push_back(v ? Name(v) : "");
            for (const OrtValueInfo* v : Outputs(fused[i])) out_names.push_back(v ? Name(v) : "");
            info->region.reset(CompileRegion(nodes, in_names, out_names, self->region_opts));
          }
          infos[i] = info.release();
        }
      });
    };
    ReleaseNodeComputeInfos = [](OrtEp*, OrtNodeComputeInfo** infos, size_t count) noexcept {
      for (size_t i = 0; i < count; ++i) delete static_cast<ComputeInfo*>(infos[i]);
    };
  }
};

// The EP's options (`register(so, ep_options={...})`, stored by ORT as session config "ep.qie.<key>"):
//   units   "1" (default) / "0": claim MatMul / Gemm and Softmax units
//   regions "1" (default) / "0": claim conv regions
//   tails   "1" (default) / "0": MatMul / Gemm units take the elementwise DQ -> f -> Q segments after them
//   min_region_convs: convolutions a region needs (default 2, >= 1)
//   profile "0" (default) / "1": time the regions' unit kinds (qie_ep_region_profile)
// A bad value fails the session creation with a message naming the option.
std::string ConfigEntry(const OrtSessionOptions* so, const std::string& key, bool* found) {
  *found = false;
  if (!so) return "";
  int has = 0;
  Check(g_api->HasSessionConfigEntry(so, key.c_str(), &has));
  if (!has) return "";
  size_t size = 0;
  Check(g_api->GetSessionConfigEntry(so, key.c_str(), nullptr, &size));
  std::string v(size, '\0');
  Check(g_api->GetSessionConfigEntry(so, key.c_str(), v.data(), &size));
  while (!v.empty() && v.back() == '\0') v.pop_back();
  *found = true;
  return v;
}

void ReadOptions(const OrtSessionOptions* so, QieEp* ep) {
  auto flag = [&](const char* key, bool* out) {
    for (const char* prefix : {"ep.qie.", "ep.QIE."}) {
      bool found = false;
      const std::string v = ConfigEntry(so, std::string(prefix) + key, &found);
      if (!found) continue;
      if (v != "0" && v != "1") throw Failure{std::string("option '") + key + "' must be 0 or 1, got '" + v + "'"};
      *out = v == "1";
    }
  };
  flag("units", &ep->units_on);
  flag("regions", &ep->regions_on);
  flag("tails", &ep->tails_on);
  flag("profile", &ep->region_opts.profile);
  for (const char* prefix : {"ep.qie.", "ep.QIE."}) {
    bool found = false;
    const std::string v = ConfigEntry(so, std::string(prefix) + "min_region_convs", &found);
    if (!found) continue;
    char* end = nullptr;
    const long n = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end || n < 1 || n > 1000000)
      throw Failure{"option 'min_region_convs' must be an integer >= 1, got '" + v + "'"};
    ep->region_opts.min_conv_units = static_cast<size_t>(n);
  }
}

// ---- the factory ------------------------------------------------------------------------------------------

struct QieFactory : OrtEpFactory {
  QieFactory() : OrtEpFactory{} {
    ort_version_supported = ORT_API_VERSION;
    GetName = [](const OrtEpFactory*) noexcept -> const char* { return kEpName; };
    GetVendor = [](const OrtEpFactory*) noexcept -> const char* { return "qie"; };
    GetVendorId = [](const OrtEpFactory*) noexcept -> uint32_t { return 0; };
    GetVersion = [](const OrtEpFactory*) noexcept -> const char* { return "0.1.0"; };
    GetSupportedDevices = [](OrtEpFactory* self, const OrtHardwareDevice* const* devices, size_t num_devices,
                             OrtEpDevice** ep_devices, size_t max_ep_devices,
                             size_t* num_ep_devices) noexcept -> OrtStatus* {
      *num_ep_devices = 0;
      for (size_t i = 0; i < num_devices && *num_ep_devices < max_ep_devices; ++i) {
        if (g_api->HardwareDevice_Type(devices[i]) != OrtHardwareDeviceType_CPU) continue;
        OrtEpDevice* d = nullptr;
        if (OrtStatus* st = g_ep->CreateEpDevice(self, devices[i], nullptr, nullptr, &d)) return st;
        ep_devices[(*num_ep_devices)++] = d;
        break;  // one CPU device
      }
      return nullptr;
    };
    CreateEp = [](OrtEpFactory*, const OrtHardwareDevice* const*, const OrtKeyValuePairs* const*, size_t,
                  const OrtSessionOptions* so, const OrtLogger* logger, OrtEp** ep) noexcept -> OrtStatus* {
      *ep = nullptr;
      return Guard("options", [&] {
        auto e = std::make_unique<QieEp>();
        e->logger = logger;
        ReadOptions(so, e.get());
        *ep = e.release();
      });
    };
    ReleaseEp = [](OrtEpFactory*, OrtEp* ep) noexcept { delete static_cast<QieEp*>(ep); };
    ValidateCompiledModelCompatibilityInfo = [](OrtEpFactory*, const OrtHardwareDevice* const*, size_t, const char*,
                                                OrtCompiledModelCompatibility* c) noexcept -> OrtStatus* {
      *c = OrtCompiledModelCompatibility_EP_NOT_APPLICABLE;
      return nullptr;
    };
    CreateAllocator = [](OrtEpFactory*, const OrtMemoryInfo*, const OrtKeyValuePairs*,
                         OrtAllocator** a) noexcept -> OrtStatus* {
      *a = nullptr;  // ORT's CPU allocator
      return nullptr;
    };
    ReleaseAllocator = [](OrtEpFactory*, OrtAllocator*) noexcept {};
    CreateDataTransfer = [](OrtEpFactory*, OrtDataTransferImpl** t) noexcept -> OrtStatus* {
      *t = nullptr;  // CPU memory: nothing to copy (ORT 1.31 crashes if this entry is NULL)
      return nullptr;
    };
    IsStreamAware = [](const OrtEpFactory*) noexcept -> bool { return false; };
    CreateSyncStreamForDevice = [](OrtEpFactory*, const OrtMemoryDevice*, const OrtKeyValuePairs*,
                                   OrtSyncStreamImpl** s) noexcept -> OrtStatus* {
      *s = nullptr;
      return nullptr;
    };
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* CreateEpFactories(const char* /*registered_name*/,
                                                                    const OrtApiBase* base,
                                                                    const OrtLogger* /*default_logger*/,
                                                                    OrtEpFactory** factories, size_t max_factories,
                                                                    size_t* num_factories) {
  *num_factories = 0;
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* api1 = base->GetApi(1);
    const std::string msg = std::string("qie EP needs ONNX Runtime API version >= ") + std::to_string(ORT_API_VERSION) +
                            "; this runtime is " + base->GetVersionString();
    return api1 ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_api = api;
  g_ep = api->GetEpApi();
  qie::g_ort = api;  // the shared conv geometry code (ops/) reports through it
  if (max_factories < 1) return api->CreateStatus(ORT_INVALID_ARGUMENT, "qie EP: no room for its factory");
  factories[0] = new QieFactory();
  *num_factories = 1;
  return nullptr;
}

__attribute__((visibility("default"))) OrtStatus* ReleaseEpFactory(OrtEpFactory* factory) {
  delete static_cast<QieFactory*>(factory);
  return nullptr;
}

// Units claimed by GetCapability and fused-node runs since load or qie_ep_reset (qie_ep.stats()).
__attribute__((visibility("default"))) void qie_ep_counters(long* claimed, long* runs) {
  *claimed = g_claimed.load();
  *runs = g_runs.load();
}
__attribute__((visibility("default"))) void qie_ep_reset() {
  g_runs.store(0);
  g_region_runs.store(0);
  ResetRegionProfile();
}
// Regions claimed by GetCapability and their runs.
__attribute__((visibility("default"))) void qie_ep_region_counters(long* claimed, long* runs) {
  *claimed = g_regions.load();
  *runs = g_region_runs.load();
}
// Region time per unit kind (profile option): names (space separated), and nanoseconds / runs per kind.
__attribute__((visibility("default"))) const char* qie_ep_region_profile_names() { return RegionProfileNames(); }
__attribute__((visibility("default"))) size_t qie_ep_region_profile(int64_t* ns, int64_t* calls, size_t n) {
  return RegionProfile(ns, calls, n);
}
// The ISA path the EP's kernels use (its library has its own dispatch state; QIE_ISA applies to it too).
__attribute__((visibility("default"))) const char* qie_ep_active_isa() { return qie::IsaName(qie::ActiveIsa()); }

}  // extern "C"
