// Quantized regions of the plugin EP (see region.h): forming, planning and execution.
//
// Numerics per unit (units.h): a conv computes acc = sum (x - zx)(w - zw[m]) + bias[m] exactly and
// y = saturate(round_half_even(float(acc) * (sx * sw[m] / sy)) + zy), QLinearConv's arithmetic (what ORT runs at
// ORT_ENABLE_EXTENDED and above; within one step of the float DQ -> Conv -> Q below that). Tables are exact
// (units.cc). A binary unit of u8 tensors that ORT fuses into QLinearAdd / QLinearMul computes their arithmetic
// (units.h QLinearBinary: equal to ORT at ORT_ENABLE_ALL, within one step of the float graph); any other computes
// the float QDQ graph per element, Q(DQ(a) op DQ(b)), as ORT's float nodes. A global average pool sums the codes
// exactly and quantizes float(sum - HW * zx) * sx / HW, u8 ones as QLinearGlobalAveragePool (one multiplier);
// AveragePool sums the dequantized window in float32, rows then columns, and divides (u8: rounded as
// QLinearAveragePool, the zero point added first): equal to ORT with count_include_pad, within
// one step at the borders without it (measured; ORT's float kernel sums border windows in another order). Concat and
// MaxPool move codes (max of codes = code of the max: DequantizeLinear is increasing) and requantize them by
// table where the output's scale or zero point differs, exactly as the QDQ graph; so does a channel shuffle.
//
// The step kernels are in region_steps.cc, the compiled form in region_plan.h.
//
// Execution: each region input is transposed once from NCHW to NHWC into a buffer slot (an input that a QuantizeLinear
// of a 4-D float tensor produced, read only by the region, is that float tensor quantized straight into the slot: the
// QuantizeLinear joins the region, see InputQuantizer); units run in
// topological order on slots (per-thread, planned at Compile by liveness, grown and never shrunk: no steady-state
// allocation); consecutive tables are composed at Compile and applied in place; each region output is
// transposed back to NCHW into the fused node's output as soon as it is produced.
#include "ep/region.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include "ep/graph.h"
#include "ep/region_plan.h"
#include "ep/team.h"
#include "ep/units.h"
#include "kernels/conv.h"
#include "kernels/isa.h"
#include "ops/conv_core.h"

namespace qie_ep {

namespace {

// ---- forming ------------------------------------------------------------------------------------------------

struct UnionFind {
  std::vector<size_t> p;
  explicit UnionFind(size_t n) : p(n) { std::iota(p.begin(), p.end(), size_t{0}); }
  size_t Find(size_t x) {
    while (p[x] != x) x = p[x] = p[p[x]];
    return x;
  }
  void Unite(size_t a, size_t b) { p[Find(a)] = Find(b); }
};

// The units not excluded, grouped: units joined by Q -> DQ edges or a shared DequantizeLinear.
std::vector<std::vector<size_t>> Components(const std::vector<Unit>& units, const std::vector<bool>& excluded) {
  UnionFind uf(units.size());
  std::map<const OrtValueInfo*, size_t> by_output;
  std::map<const OrtNode*, size_t> by_dq;
  for (size_t i = 0; i < units.size(); ++i)
    if (!excluded[i]) by_output[Outputs(units[i].q)[0]] = i;
  for (size_t i = 0; i < units.size(); ++i) {
    if (excluded[i]) continue;
    for (const OrtNode* dq : units[i].in_dqs) {
      auto it = by_output.find(Inputs(dq)[0]);
      if (it != by_output.end()) uf.Unite(i, it->second);
      auto [d, fresh] = by_dq.emplace(dq, i);
      if (!fresh) uf.Unite(i, d->second);
    }
    for (const auto& pre : units[i].prefix)
      for (const OrtNode* m : pre) {
        auto [d, fresh] = by_dq.emplace(m, i);  // shared like a DequantizeLinear
        if (!fresh) uf.Unite(i, d->second);
      }
  }
  std::map<size_t, std::vector<size_t>> groups;
  for (size_t i = 0; i < units.size(); ++i)
    if (!excluded[i]) groups[uf.Find(i)].push_back(i);
  std::vector<std::vector<size_t>> out;
  for (auto& [root, g] : groups) out.push_back(std::move(g));
  return out;
}

// The units of `comp` that keep it from being one fused node: those whose input DequantizeLinear has a consumer
// outside (its float output would leave the fused node), then those a path from outside re-enters (fusing them
// would make a cycle). Empty when `comp` is a region.
std::set<size_t> Violations(const std::vector<Unit>& units, const std::vector<size_t>& comp) {
  std::set<const OrtNode*> inside;
  std::map<const OrtNode*, std::vector<size_t>> owner;
  for (size_t i : comp) {
    for (const OrtNode* n : units[i].nodes) owner[n].push_back(i);
    for (const OrtNode* n : units[i].in_dqs) owner[n].push_back(i);
    for (const auto& pre : units[i].prefix)
      for (const OrtNode* n : pre) owner[n].push_back(i);
  }
  for (const auto& [n, o] : owner) inside.insert(n);
  std::set<size_t> bad;
  auto shared_leaves = [&](const OrtNode* n) {  // a float value of the region read outside it
    const OrtValueInfo* v = Outputs(n)[0];
    bool leaves = IsGraphOutput(v);
    for (const OrtNode* c : AllConsumers(v)) leaves = leaves || !inside.count(c);
    if (leaves) bad.insert(owner[n].begin(), owner[n].end());
  };
  for (size_t i : comp) {
    for (const OrtNode* dq : units[i].in_dqs) shared_leaves(dq);
    for (const auto& pre : units[i].prefix)
      for (const OrtNode* n : pre) shared_leaves(n);
  }
  if (!bad.empty()) return bad;
  std::vector<const OrtNode*> stack;
  std::set<const OrtNode*> seen;
  auto visit_consumers = [&](const OrtNode* n) {
    for (const OrtValueInfo* v : Outputs(n)) {
      if (!v) continue;
      for (const OrtNode* c : AllConsumers(v)) {
        if (inside.count(c)) {
          if (!inside.count(n)) bad.insert(owner[c].begin(), owner[c].end());  // re-entered from outside
        } else if (seen.insert(c).second) {
          stack.push_back(c);
        }
      }
    }
  };
  for (const OrtNode* n : inside) visit_consumers(n);
  while (!stack.empty()) {
    const OrtNode* n = stack.back();
    stack.pop_back();
    visit_consumers(n);
  }
  return bad;
}

}  // namespace

namespace {

// Regions among the units not in `taken`: components with enough convolutions, cut where Violations says until
// none has any. Units cut away stay free for the next call.
std::vector<std::vector<size_t>> FormRegions(const std::vector<Unit>& units, const std::vector<bool>& taken,
                                             size_t min_convs) {
  std::vector<bool> excluded = taken;
  auto convs = [&](const std::vector<size_t>& comp) {
    size_t k = 0;
    for (size_t i : comp) k += units[i].kind == UnitKind::kConv;
    return k;
  };
  for (size_t round = 0; round <= units.size(); ++round) {  // each round excludes a unit or ends
    bool changed = false;
    const auto comps = Components(units, excluded);
    for (const auto& comp : comps) {
      if (convs(comp) < min_convs) continue;
      for (size_t i : Violations(units, comp)) {
        excluded[i] = true;
        changed = true;
      }
    }
    if (changed) continue;
    std::vector<std::vector<size_t>> out;
    for (const auto& comp : comps)
      if (convs(comp) >= min_convs) out.push_back(comp);
    return out;
  }
  return {};
}

// Drops regions until the graph with each region contracted to one node has no cycle (two regions can each be
// convex and still close a cycle through each other once fused).
void DropCycles(const std::vector<const OrtNode*>& nodes, std::vector<std::set<const OrtNode*>>* regions) {
  for (;;) {
    std::map<const OrtNode*, size_t> id;
    for (size_t r = 0; r < regions->size(); ++r)
      for (const OrtNode* n : (*regions)[r]) id[n] = r;
    auto id_of = [&](const OrtNode* n) {
      auto it = id.find(n);
      if (it != id.end()) return it->second;
      const size_t k = regions->size() + id.size();
      return id[n] = k;
    };
    std::map<size_t, std::set<size_t>> edges;
    std::map<size_t, size_t> indegree;
    for (const OrtNode* n : nodes) {
      const size_t a = id_of(n);
      indegree.emplace(a, 0);
      for (const OrtValueInfo* v : Outputs(n)) {
        if (!v) continue;
        for (const OrtNode* c : AllConsumers(v)) {
          const size_t b = id_of(c);
          indegree.emplace(b, 0);
          if (a != b && edges[a].insert(b).second) ++indegree[b];
        }
      }
    }
    std::vector<size_t> ready;
    for (const auto& [k, d] : indegree)
      if (d == 0) ready.push_back(k);
    size_t done = 0;
    while (!ready.empty()) {
      const size_t k = ready.back();
      ready.pop_back();
      ++done;
      for (size_t b : edges[k])
        if (--indegree[b] == 0) ready.push_back(b);
    }
    if (done == indegree.size()) return;
    size_t drop = regions->size();  // a region left on the cycle (or behind it): the smallest
    for (const auto& [k, d] : indegree)
      if (d > 0 && k < regions->size() && (drop == regions->size() || (*regions)[k].size() < (*regions)[drop].size()))
        drop = k;
    if (drop == regions->size()) return;  // a cycle without regions: not ours to judge
    regions->erase(regions->begin() + static_cast<long>(drop));
  }
}

// The QuantizeLinear producing a region input (`dq` reads it) that the region can run itself, on entry: a 4-D float
// tensor quantized per tensor (an image's input Q) whose codes nothing outside `group` reads. It then quantizes
// straight into the region's NHWC buffer (one pass, no separate QuantizeLinear node and NCHW -> NHWC transpose).
const OrtNode* InputQuantizer(const OrtNode* dq, const std::set<const OrtNode*>& group,
                              const std::set<const OrtNode*>& candidates) {
  const OrtValueInfo* v = Inputs(dq)[0];
  if (!v || IsGraphOutput(v)) return nullptr;
  const OrtNode* q = Producer(v);
  Constant sy, zy;
  if (!q || !candidates.count(q) || group.count(q) || !QOperands(q, &sy, &zy)) return nullptr;
  const OrtValueInfo* x = Inputs(q)[0];
  if (!x || ValueType(x) != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || ValueRank(x) != 4) return nullptr;
  for (const OrtValueInfo* o : Outputs(q))
    if (o && o != v && Consumers(o) > 0) return nullptr;
  for (const OrtNode* c : AllConsumers(v))
    if (!group.count(c)) return nullptr;
  // Nothing of the region upstream of x (the fused node would feed itself): x's producers, back to the inputs.
  std::vector<const OrtNode*> todo;
  std::set<const OrtNode*> seen;
  if (const OrtNode* n = Producer(x)) todo.push_back(n);
  while (!todo.empty()) {
    const OrtNode* n = todo.back();
    todo.pop_back();
    if (!seen.insert(n).second) continue;
    if (group.count(n)) return nullptr;
    for (const OrtValueInfo* in : Inputs(n))
      if (const OrtNode* up = in ? Producer(in) : nullptr) todo.push_back(up);
  }
  return q;
}

}  // namespace

std::vector<std::vector<const OrtNode*>> MatchRegions(const std::vector<const OrtNode*>& nodes,
                                                      const RegionOptions& opts, RegionReport* report) {
  const std::vector<Unit> units = FindUnits(nodes);
  std::vector<bool> taken(units.size(), false);
  std::vector<std::set<const OrtNode*>> regions;
  for (size_t pass = 0; pass < units.size(); ++pass) {  // units cut from one region may form the next
    const auto formed = FormRegions(units, taken, opts.min_conv_units);
    if (formed.empty()) break;
    for (const auto& comp : formed) {
      std::set<const OrtNode*> group;
      for (size_t i : comp) {
        taken[i] = true;
        group.insert(units[i].nodes.begin(), units[i].nodes.end());
        group.insert(units[i].in_dqs.begin(), units[i].in_dqs.end());
        for (const auto& pre : units[i].prefix) group.insert(pre.begin(), pre.end());
      }
      regions.push_back(std::move(group));
    }
  }
  const std::set<const OrtNode*> candidates(nodes.begin(), nodes.end());
  for (auto& group : regions) {  // input QuantizeLinears joining their region
    std::vector<const OrtNode*> take;
    for (const OrtNode* n : group)
      if (IsOp(n, "DequantizeLinear"))
        if (const OrtNode* q = InputQuantizer(n, group, candidates)) take.push_back(q);
    for (const OrtNode* q : take) {
      bool free = true;  // not already taken by another region
      for (const auto& other : regions) free = free && !other.count(q);
      if (free) group.insert(q);
    }
  }
  const size_t formed = regions.size();
  DropCycles(nodes, &regions);
  if (report) {
    report->units = units.size();
    std::set<const OrtNode*> kept;
    for (const auto& g : regions) kept.insert(g.begin(), g.end());
    report->units_claimed = 0;
    for (const Unit& u : units) report->units_claimed += kept.count(u.q) > 0;
    report->dropped_cycles = formed - regions.size();
  }
  std::map<const OrtNode*, size_t> position;
  for (size_t i = 0; i < nodes.size(); ++i) position[nodes[i]] = i;
  std::vector<std::vector<const OrtNode*>> out;
  for (const auto& group : regions) {
    std::vector<const OrtNode*> g(group.begin(), group.end());
    std::sort(g.begin(), g.end(), [&](const OrtNode* a, const OrtNode* b) { return position[a] < position[b]; });
    out.push_back(g);
  }
  return out;
}

// ---- planning -----------------------------------------------------------------------------------------------

namespace {

std::vector<uint8_t> Requant(const QParams& from, const QParams& to) {
  if (from.scale == to.scale && from.zp == to.zp && from.is_signed == to.is_signed) return {};
  std::vector<uint8_t> t(256 + 3);
  for (int b = 0; b < 256; ++b)
    t[b] = QuantizeOne(static_cast<float>(Code(static_cast<uint8_t>(b), from.is_signed) - from.zp) * from.scale, to);
  return t;
}

// Input k of a Concat or shuffle unit through its float prefix (scalar constants), requantized to the output: one
// table, Q(prefix(DQ(code))) for every code, the float steps ORT runs on each element.
std::vector<uint8_t> PrefixTable(const Unit& u, size_t k, const QParams& from, const QParams& to) {
  FloatProgram f = CompileProgramTo(Outputs(u.in_dqs[k])[0], u.prefix[k], Inputs(u.op)[k]);
  if (f.C != 1)
    throw Failure{OpType(u.op) + " '" + NodeName(u.op) + "': per-channel constants before a Concat or channel shuffle"};
  f.Expand(1, 256);
  std::vector<float> x(256);
  for (int b = 0; b < 256; ++b)
    x[b] = static_cast<float>(Code(static_cast<uint8_t>(b), from.is_signed) - from.zp) * from.scale;
  std::vector<std::vector<float>> regs;
  const float* y = RunProgram(f, x.data(), 256, &regs);
  std::vector<uint8_t> t(256 + 3);
  for (int b = 0; b < 256; ++b) t[b] = QuantizeOne(y[b], to);
  return t;
}

// `st`'s tables followed by `t` ([C][256], C = 1 for one table), composed in place.
void ComposeTable(RegionPlan::Step* st, const std::vector<uint8_t>& t, size_t C) {
  ComposeTables(&st->table, &st->tC, t, C);
}

// A table step whose input is a conv step's output that nothing else reads (no other step, not a fused output) is
// folded into the conv: the conv's tasks look their output blocks up while they are in cache, which saves the table
// step's pass over memory and its parallel section (the same codes: the same tables on the same conv codes).
void FuseConvTables(RegionPlan* p) {
  std::vector<int> reads(p->values.size(), 0);
  for (const RegionPlan::Step& st : p->steps)
    for (int v : st.in) ++reads[static_cast<size_t>(v)];
  std::vector<int> producer(p->values.size(), -1);
  for (size_t i = 0; i < p->steps.size(); ++i) producer[static_cast<size_t>(p->steps[i].out)] = static_cast<int>(i);
  for (size_t i = 0; i < p->steps.size();) {
    const RegionPlan::Step& tab = p->steps[i];
    const size_t v = tab.kind == UnitKind::kTable ? static_cast<size_t>(tab.in[0]) : 0;
    const int c = tab.kind == UnitKind::kTable ? producer[v] : -1;
    if (c < 0 || p->steps[c].kind != UnitKind::kConv || !p->steps[c].post.empty() || reads[v] != 1 ||
        p->values[v].output >= 0 || (tab.tC != 1 && tab.tC != p->steps[c].M)) {
      ++i;
      continue;
    }
    RegionPlan::Step& conv = p->steps[static_cast<size_t>(c)];
    conv.post = tab.table;
    conv.post.resize(tab.tC * 256 + 3, 0);  // the lookup kernels read 3 bytes past the last table
    conv.post_tC = tab.tC;
    conv.out = tab.out;
    producer[static_cast<size_t>(tab.out)] = c;
    p->steps.erase(p->steps.begin() + static_cast<std::ptrdiff_t>(i));
    for (int& ps : producer) ps = ps > static_cast<int>(i) ? ps - 1 : ps;
  }
}

// A binary unit whose operands are one value x and a table step's output t = T(x) (SiLU / Swish as x * Sigmoid(x),
// x + f(x), ...) is itself a table of x: y[c][k] = Q(DQ_x(k) op DQ_t(T[c][k])), the same float32 operations as its
// row kernel, so the same codes, at one lookup per element instead of two dequantizations, the operation and a
// quantization. Only without prefix or activation programs. `s` becomes that table step; returns the index of the
// table step when nothing else reads its output (the caller drops it), else -1.
int FoldSelfBinary(const RegionPlan* p, const std::vector<int>& producer_step,
                   const std::map<std::string, int>& readers, RegionPlan::Step* s) {
  if (s->in.size() != 2 || s->has_pre || !s->tail.steps.empty() || !s->clamps.empty()) return -1;
  for (int t = 0; t < 2; ++t) {
    const int x = 1 - t, ps = producer_step[static_cast<size_t>(s->in[t])];
    if (ps < 0 || s->in[x] == s->in[t]) continue;
    const RegionPlan::Step& tab = p->steps[static_cast<size_t>(ps)];
    if (tab.kind != UnitKind::kTable || tab.in[0] != s->in[x]) continue;
    const QParams qx = s->qin[x];
    const Quantizer q(s->qout);
    const QLinearBinary ql(s->op, s->qin[0], s->qin[1], s->qout);  // x and T(x): the same shape, no operand swap
    const auto dq = [](uint8_t v, const QParams& qp) {
      return static_cast<float>(Code(v, qp.is_signed) - qp.zp) * qp.scale;
    };
    std::vector<uint8_t> table(tab.tC * 256 + 3, 0);
    for (size_t c = 0; c < tab.tC; ++c)
      for (int k = 0; k < 256; ++k) {
        const uint8_t kt = tab.table[c * 256 + static_cast<size_t>(k)], kx = static_cast<uint8_t>(k);
        const uint8_t ka = t == 1 ? kx : kt, kb = t == 1 ? kt : kx;
        const float a = dq(ka, s->qin[0]), b = dq(kb, s->qin[1]);
        table[c * 256 + static_cast<size_t>(k)] = s->qlinear ? ql(ka, kb)
                                                             : q(s->op == '+'   ? a + b
                                                                 : s->op == '-' ? a - b
                                                                                : a * b);
      }
    const std::string& tname = p->values[static_cast<size_t>(s->in[t])].name;
    const auto r = readers.find(tname);
    const bool only_reader =
        r != readers.end() && r->second == 1 && p->values[static_cast<size_t>(s->in[t])].output < 0;
    s->kind = UnitKind::kTable;
    s->in = {s->in[x]};
    s->qin = {qx};
    s->tC = tab.tC;
    s->table = std::move(table);
    s->chain.clear();
    s->lookup_only = true;
    return only_reader ? ps : -1;
  }
  return -1;
}

// A binary unit's activations when they are Relu / Clip nodes only (ResNet's Add -> Relu): the clamps they are on the
// output codes, Q(clip(v, lo, hi)) = clamp(Q(v), Q(lo), Q(hi)) since Q does not decrease (exact; NaN, which Relu and
// Clip make 0 or pass on, cannot come from two finite dequantized operands but by overflow, and -inf / inf map to
// the same codes both ways). False for any other tail: it runs as a float program.
bool TailClamps(const std::vector<const OrtNode*>& tail, const QParams& qy, std::vector<std::pair<int, int>>* clamps) {
  std::vector<std::pair<int, int>> out;
  for (const OrtNode* n : tail) {
    float lo = -INFINITY, hi = INFINITY;
    if (IsOp(n, "Relu")) {
      lo = 0.0f;
    } else if (IsOp(n, "Clip")) {
      const auto in = Inputs(n);
      if (in.size() == 1) {  // opset < 11: attributes
        lo = AttrFloat(n, "min", -INFINITY);
        hi = AttrFloat(n, "max", INFINITY);
      }
      for (size_t i = 1; i < in.size() && i < 3; ++i) {
        if (!Input(in, i)) continue;
        Constant c;
        if (!ReadConstant(in[i], &c) || c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.count() != 1) return false;
        (i == 1 ? lo : hi) = static_cast<const float*>(c.data)[0];
      }
      if (!(lo <= hi)) return false;  // ORT's Clip then gives max; left to the float program
    } else {
      return false;
    }
    out.emplace_back(Code(QuantizeOne(lo, qy), qy.is_signed), Code(QuantizeOne(hi, qy), qy.is_signed));
  }
  *clamps = out;
  return !out.empty();
}

// Whether ORT fuses the binary unit into QLinearAdd / QLinearMul from ORT_ENABLE_EXTENDED on, whose arithmetic it then
// takes (units.h QLinearBinary): an Add or Mul of two plain DequantizeLinears into a QuantizeLinear, u8 throughout,
// with a Relu / Clip between only where ORT drops it (ReluQuantFusion / ClipQuantFusion: where it clamps no output
// code). Measured on ORT 1.31, x86: DQ, DQ -> Add -> Relu -> Q is QLinearAdd with a zero point of 0, float nodes with
// another; with s8 activations (quantize_static's QInt8) ORT leaves a network's Add / Mul (and some of its Conv) as
// float nodes, so s8 units keep the float graph's arithmetic.
bool QLinearOp(const std::string& op, const RegionPlan::Step& s) {
  if ((op != "Add" && op != "Mul") || s.has_pre || !s.tail.steps.empty() || s.qin.size() != 2) return false;
  if (s.qout.is_signed || s.qin[0].is_signed || s.qin[1].is_signed) return false;
  for (const auto& [lo, hi] : s.clamps)
    if (lo > 0 || hi < 255) return false;
  return true;
}

void PlanConv(const Unit& u, RegionPlan::Step* s) {
  Unit again;
  ConvOperands o;
  if (!MatchConv(u.op, &again, &o)) throw Failure{"conv unit changed between GetCapability and Compile"};
  s->at = o.at;
  s->k = qie::ConvKernelDims(o.at, 4, -1, o.w.shape);
  s->M = static_cast<size_t>(o.w.shape[0]);
  s->C = static_cast<size_t>(o.w.shape[1] * o.at.group);
  s->wzp.resize(s->M);
  s->scale.resize(s->M);
  for (size_t m = 0; m < s->M; ++m) {
    const size_t j = o.sw.count() == 1 ? 0 : m;
    s->wzp[m] = o.zw.data ? Zp(o.zw, j) : 0;
    s->scale[m] = (s->qin[0].scale * static_cast<const float*>(o.sw.data)[j]) / s->qout.scale;  // QLinearConv's order
  }
  s->bias = o.bias;
  qie::ConvShape cs;
  cs.M = s->M;
  cs.group = static_cast<size_t>(o.at.group);
  cs.C = s->C;
  cs.k[1] = static_cast<size_t>(s->k[0]);
  cs.k[2] = static_cast<size_t>(s->k[1]);
  qie::PackConv(qie::GetMicroKernel(qie::ActiveIsa()), cs, static_cast<const uint8_t*>(o.w.data),
                o.wt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, s->wzp.data(), &s->packed);
}

// Units in an order where each one's inputs are produced before it.
std::vector<size_t> TopologicalOrder(const std::vector<Unit>& units) {
  std::map<std::string, size_t> producer;
  for (size_t i = 0; i < units.size(); ++i) producer[Name(Outputs(units[i].q)[0])] = i;
  std::vector<std::set<size_t>> deps(units.size());
  for (size_t i = 0; i < units.size(); ++i)
    for (const OrtNode* dq : units[i].in_dqs) {
      auto it = producer.find(Name(Inputs(dq)[0]));
      if (it != producer.end()) deps[i].insert(it->second);
    }
  std::vector<size_t> order;
  std::vector<bool> done(units.size(), false);
  while (order.size() < units.size()) {
    bool progress = false;
    for (size_t i = 0; i < units.size(); ++i) {
      if (done[i]) continue;
      bool ready = true;
      for (size_t d : deps[i]) ready = ready && done[d];
      if (!ready) continue;
      done[i] = true;
      order.push_back(i);
      progress = true;
    }
    if (!progress) throw Failure{"region units form a cycle"};
  }
  return order;
}

// Buffer slots by liveness: a value's slot is free after its last reader; a table runs in place on an input it
// is the last reader of; a value only the fused node's output needs is freed once written out.
void AssignSlots(RegionPlan* p) {
  std::vector<long> last(p->values.size(), -1);
  for (size_t s = 0; s < p->steps.size(); ++s)
    for (int v : p->steps[s].in) last[v] = static_cast<long>(s);
  std::vector<int> free;
  int next = 0;
  auto take = [&] {
    if (free.empty()) return next++;
    const int s = free.back();
    free.pop_back();
    return s;
  };
  for (int v : p->inputs)
    if (v >= 0) p->values[v].slot = take();
  for (size_t s = 0; s < p->steps.size(); ++s) {
    RegionPlan::Step& st = p->steps[s];
    const bool in_place = st.kind == UnitKind::kTable && last[st.in[0]] == static_cast<long>(s);
    p->values[st.out].slot = in_place ? p->values[st.in[0]].slot : take();
    std::set<int> ins(st.in.begin(), st.in.end());
    for (int v : ins)
      if (last[v] == static_cast<long>(s) && !(in_place && v == st.in[0])) free.push_back(p->values[v].slot);
    if (last[st.out] == -1) free.push_back(p->values[st.out].slot);
  }
  p->slots = static_cast<size_t>(next);
}

}  // namespace

RegionPlan* CompileRegion(const std::vector<const OrtNode*>& nodes, const std::vector<std::string>& inputs,
                          const std::vector<std::string>& outputs, const RegionOptions& opts) {
  const std::vector<Unit> units = FindUnits(nodes);
  std::set<const OrtNode*> covered;
  for (const Unit& u : units) {
    covered.insert(u.nodes.begin(), u.nodes.end());
    covered.insert(u.in_dqs.begin(), u.in_dqs.end());
    for (const auto& pre : u.prefix) covered.insert(pre.begin(), pre.end());
  }
  std::map<std::string, const OrtNode*> quantizers;  // input QuantizeLinears: their output's name -> the node
  for (const OrtNode* n : nodes)
    if (!covered.count(n) && IsOp(n, "QuantizeLinear") && Outputs(n).size() >= 1 && Outputs(n)[0]) {
      quantizers[Name(Outputs(n)[0])] = n;
      covered.insert(n);
    }
  if (units.empty() || covered.size() != nodes.size())
    throw Failure{"fused graph is not the region GetCapability claimed"};
  auto plan = std::make_unique<RegionPlan>();
  RegionPlan& p = *plan;
  p.profile = opts.profile;
  p.adaptive = opts.pacing;
  p.team = opts.team;
  p.inputs.assign(inputs.size(), -1);
  std::map<std::string, int> ids;
  std::map<std::string, int> readers;  // how many unit operands read each value
  for (const Unit& u : units)
    for (const OrtNode* dq : u.in_dqs) ++readers[Name(Inputs(dq)[0])];
  std::vector<int> producer_step;
  auto value = [&](const std::string& name, bool is_signed) {
    auto it = ids.find(name);
    if (it != ids.end()) return it->second;
    RegionPlan::Value v;
    v.name = name;
    v.is_signed = is_signed;
    auto o = std::find(outputs.begin(), outputs.end(), name);
    if (o != outputs.end()) v.output = static_cast<int>(o - outputs.begin());
    p.values.push_back(v);
    producer_step.push_back(-1);
    return ids[name] = static_cast<int>(p.values.size() - 1);
  };
  for (size_t i : TopologicalOrder(units)) {
    const Unit& u = units[i];
    RegionPlan::Step s;
    s.kind = u.kind;
    s.name = OpType(u.op) + " '" + NodeName(u.op) + "'";
    for (const OrtNode* dq : u.in_dqs) {
      const std::string name = Name(Inputs(dq)[0]);
      s.qin.push_back(InputParams(dq));
      const bool fresh = !ids.count(name);
      const int v = value(name, s.qin.back().is_signed);
      if (fresh) {  // read from outside: a fused-node input, or the codes of one quantized on entry
        auto q = quantizers.find(name);
        const std::string outer = q != quantizers.end() ? Name(Inputs(q->second)[0]) : name;
        auto in = std::find(inputs.begin(), inputs.end(), outer);
        if (in == inputs.end()) throw Failure{"region value '" + name + "' is neither produced nor an input"};
        p.values[v].input = static_cast<int>(in - inputs.begin());
        if (q != quantizers.end()) {
          p.values[v].quantize = true;
          p.values[v].q = OutputParams(q->second);
        }
        p.inputs[in - inputs.begin()] = v;
      }
      s.in.push_back(v);
    }
    s.qout = OutputParams(u.q);
    const std::string out_name = Name(Outputs(u.q)[0]);
    for (size_t k = 0; k < u.prefix.size(); ++k) {
      s.pre.emplace_back();
      if (u.prefix[k].empty()) continue;
      s.pre.back() = CompileProgramTo(Outputs(u.in_dqs[k])[0], u.prefix[k], Inputs(u.op)[k]);
      FloatProgram& f = s.pre.back();
      f.Expand(f.C, f.C == 1 ? kTailBlock : ProgramRows(f.C));
      s.has_pre = true;
    }
    if (u.kind == UnitKind::kTable) {
      size_t C = 1;
      bool qlinear = false;
      const std::vector<uint8_t> t = EvalTable(u, &C, &qlinear);
      RegionPlan::Chained link{s.qin[0], CompileTable(u), s.qout};
      link.f.arithmetic = link.f.arithmetic && !qlinear;  // its table is QLinearMul's, not the float program's
      const int v = s.in[0];
      const int ps = producer_step[v];
      if (ps >= 0 && p.steps[ps].kind == UnitKind::kTable && readers[p.values[v].name] == 1 && p.values[v].output < 0 &&
          (p.steps[ps].tC == 1 || C == 1 || p.steps[ps].tC == C)) {
        // compose into the table producing this unit's input (per-channel tables of different channel counts are
        // a model error that only a run can report, as ORT does: kept apart)
        ComposeTable(&p.steps[ps], t, C);
        p.steps[ps].chain.push_back(link);
        p.steps[ps].qout = s.qout;
        const int out = value(out_name, s.qout.is_signed);
        p.steps[ps].out = out;
        producer_step[out] = ps;
        continue;
      }
      s.table.assign(257 + 2, 0);
      for (int k = 0; k < 256; ++k) s.table[k] = static_cast<uint8_t>(k);  // identity, then this unit's tables
      ComposeTable(&s, t, C);
      s.chain = {link};
    } else if (u.kind == UnitKind::kConv) {
      PlanConv(u, &s);
    } else if (u.kind == UnitKind::kBinary) {
      const std::string op = OpType(u.op);
      s.op = op == "Add" || op == "Sum" ? '+' : op == "Sub" ? '-' : '*';
      if (u.nodes.size() > 2) {
        const std::vector<const OrtNode*> tail(u.nodes.begin() + 1, u.nodes.end() - 1);
        if (s.has_pre || !TailClamps(tail, s.qout, &s.clamps)) {
          s.tail = CompileProgram(Outputs(u.op)[0], tail, u.q);
          s.tail.Expand(1, kTailBlock);
        }
      }
      s.qlinear = QLinearOp(op, s);
      const int dead = FoldSelfBinary(&p, producer_step, readers, &s);
      if (dead >= 0) {  // the table the binary read is folded into it and read by nothing else
        p.steps.erase(p.steps.begin() + dead);
        for (int& ps : producer_step) ps = ps == dead ? -1 : ps > dead ? ps - 1 : ps;
      }
    } else if (u.kind == UnitKind::kShuffle) {
      const ShuffleShape sh = ShuffleOf(u);
      s.C = sh.C;
      s.M = sh.groups;
      s.k = {static_cast<int64_t>(sh.H), static_cast<int64_t>(sh.W)};
      // Code to code through every QuantizeLinear of the chain (a Q -> DQ pair's, one scale, then the unit's): the
      // requantizations composed, as the QDQ graph rounds at each (pairs of the input's scale are the identity).
      std::vector<QParams> hops;
      for (const OrtNode* n : u.nodes)
        if (IsOp(n, "QuantizeLinear")) hops.push_back(OutputParams(n));
      std::vector<uint8_t> t = u.prefix[0].empty() ? Requant(s.qin[0], hops[0]) : PrefixTable(u, 0, s.qin[0], hops[0]);
      size_t tC = 1;
      for (size_t k = 1; k < hops.size(); ++k) ComposeTables(&t, &tC, Requant(hops[k - 1], hops[k]), 1);
      s.requant.push_back(t);
      s.pre.clear();  // the prefix is in the table
      s.has_pre = false;
    } else if (u.kind == UnitKind::kConcat || u.kind == UnitKind::kMaxPool || u.kind == UnitKind::kSlice ||
               u.kind == UnitKind::kResize) {
      for (size_t k = 0; k < s.qin.size(); ++k)
        s.requant.push_back(k < u.prefix.size() && !u.prefix[k].empty() ? PrefixTable(u, k, s.qin[k], s.qout)
                                                                        : Requant(s.qin[k], s.qout));
      s.pre.clear();  // a Concat input's prefix is in its table
      s.has_pre = false;
    }
    if (u.kind == UnitKind::kSlice) {
      int64_t start = 0, end = 0;
      SliceRange(u, &start, &end);
      s.k = {start, end};
    } else if (u.kind == UnitKind::kResize) {
      int64_t sh = 1, sw = 1;
      ResizeScales(u, &sh, &sw);
      s.k = {sh, sw};
    }
    if (u.kind == UnitKind::kLrn) {
      s.lrn_size = AttrInt(u.op, "size", 1);
      s.lrn_alpha = AttrFloat(u.op, "alpha", 1e-4f);
      s.lrn_beta = AttrFloat(u.op, "beta", 0.75f);
      s.lrn_bias = AttrFloat(u.op, "bias", 1.0f);
    }
    if (u.kind == UnitKind::kMaxPool || u.kind == UnitKind::kAvgPool) {
      s.at = PoolAttrs(u.op);
      s.k = s.at.kernel_shape;
      s.include_pad = AttrInt(u.op, "count_include_pad", 0) != 0;
    }
    s.out = value(out_name, s.qout.is_signed);
    producer_step[s.out] = static_cast<int>(p.steps.size());
    p.steps.push_back(std::move(s));
  }
  for (size_t o = 0; o < outputs.size(); ++o)
    if (!ids.count(outputs[o])) throw Failure{"fused output '" + outputs[o] + "' is not a region value"};
  if (opts.conv_tables) FuseConvTables(&p);
  // Per-channel tables of one unit of plain arithmetic run as float code: measured on Zen 4 (AVX-512), a bias Add
  // or BatchNormalization costs ~1.3 cycles per element as DequantizeLinear, f, QuantizeLinear (the division by
  // the output scale dominates) against ~2 for the dword gather; a chain of two units costs twice that while the
  // composed table still costs one gather, so chains keep their tables.
  for (RegionPlan::Step& st : p.steps) {
    if (st.kind != UnitKind::kTable || st.tC == 1 || st.chain.size() != 1 || st.lookup_only) continue;
    st.arithmetic = true;
    for (RegionPlan::Chained& link : st.chain) {
      st.arithmetic = st.arithmetic && link.f.arithmetic && (link.f.C == 1 || link.f.C == st.tC);
      if (link.f.C == 1 || link.f.C == st.tC) link.f.Expand(st.tC, ProgramRows(st.tC));
    }
  }
  AssignSlots(&p);
  p.pacing.reset(new Pacing[2 * p.steps.size() + p.inputs.size()]);
  return plan.release();
}

void ReleaseRegion(RegionPlan* plan) { delete plan; }

// ---- execution ----------------------------------------------------------------------------------------------

namespace {

// and two more: layout (transposes), conv steps with a folded table (conv+table)
constexpr size_t kKinds = static_cast<size_t>(UnitKind::kResize) + 1, kConvTable = kKinds + 1;
std::atomic<int64_t> g_ns[kKinds + 2], g_calls[kKinds + 2];

// Per step (its unit's op node, e.g. "Conv 'stem'"): nanoseconds and runs, merged across regions of that name.
std::mutex g_steps_mu;
std::map<std::string, std::pair<int64_t, int64_t>> g_steps;

// Adds the time since `t0` to kind `k` when `on`, and restarts `t0`; returns that time (0 when off).
int64_t Tick(bool on, size_t k, std::chrono::steady_clock::time_point* t0) {
  if (!on) return 0;
  const auto t1 = std::chrono::steady_clock::now();
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - *t0).count();
  g_ns[k].fetch_add(ns);
  g_calls[k].fetch_add(1);
  *t0 = t1;
  return ns;
}

void TickStep(const std::string& name, int64_t ns) {
  const std::lock_guard<std::mutex> lock(g_steps_mu);
  std::pair<int64_t, int64_t>& e = g_steps[name];
  e.first += ns;
  ++e.second;
}

std::string ShapeText(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

const char* RegionProfileNames() {
  return "conv table binary gap concat maxpool avgpool shuffle lrn slice resize layout conv+table";
}
size_t RegionProfile(int64_t* ns, int64_t* calls, size_t n) {
  for (size_t k = 0; k < std::min(n, kKinds + 2); ++k) {
    ns[k] = g_ns[k].load();
    calls[k] = g_calls[k].load();
  }
  return kKinds + 2;
}
std::string RegionStepProfile() {
  const std::lock_guard<std::mutex> lock(g_steps_mu);
  std::string out;
  for (const auto& [name, e] : g_steps)
    out += name + "\t" + std::to_string(e.first) + "\t" + std::to_string(e.second) + "\n";
  return out;
}
void ResetRegionProfile() {
  for (size_t k = 0; k < kKinds + 2; ++k) {
    g_ns[k].store(0);
    g_calls[k].store(0);
  }
  const std::lock_guard<std::mutex> lock(g_steps_mu);
  g_steps.clear();
}

// The region's steps in order, their parallel sections on `pool` (ORT's, or a team's), buffers the caller's.
static void RunSteps(RegionPlan& p, OrtKernelContext* ctx, const qie::ParallelFor& pool,
                     std::vector<std::vector<uint8_t>>& slots, std::vector<Dims>& dims);

OrtStatus* RunRegion(RegionPlan& p, OrtKernelContext* ctx) {
  return Guard("region", [&] {
    // The calling thread's buffers (the body may run on a pool thread: these references, not its thread_locals)
    thread_local std::vector<std::vector<uint8_t>> tl_slots;  // grown, never shrunk: nothing allocated once warm
    thread_local std::vector<Dims> tl_dims;
    std::vector<std::vector<uint8_t>>& slots = tl_slots;
    std::vector<Dims>& dims = tl_dims;
    if (slots.size() < p.slots) slots.resize(p.slots);
    dims.assign(p.values.size(), Dims{});
    const qie::ParallelFor ort_pool = CtxParallelFor(ctx);
    if (!p.team || p.solo_runs.load(std::memory_order_relaxed) >= RegionPlan::kSoloRuns)
      return RunSteps(p, ctx, ort_pool, slots, dims);
    // One pool wake-up for the run (team.h); every task past the pool's threads finds the run done.
    static const size_t width = std::min<size_t>(64, std::max(2u, std::thread::hardware_concurrency()));
    const bool joined =
        Team::Run(ort_pool, width, [&](const qie::ParallelFor& team) { RunSteps(p, ctx, team, slots, dims); });
    if (joined)
      p.solo_runs.store(INT32_MIN / 2, std::memory_order_relaxed);  // a pool of several threads: the team stays
    else
      p.solo_runs.fetch_add(1, std::memory_order_relaxed);
  });
}

static void RunSteps(RegionPlan& p, OrtKernelContext* ctx, const qie::ParallelFor& pool,
                     std::vector<std::vector<uint8_t>>& slots, std::vector<Dims>& dims) {
  // The steps' kernels on this thread share one kernel set-up (pool threads: each task its own).
  const qie::KernelScope scope(qie::GetMicroKernel(qie::ActiveIsa()));
  auto t0 = std::chrono::steady_clock::now();
  auto buf = [&](int v) -> std::vector<uint8_t>& { return slots[static_cast<size_t>(p.values[v].slot)]; };
  for (size_t i = 0; i < p.inputs.size(); ++i) {
    const int v = p.inputs[i];
    if (v < 0) continue;
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, i, &x));
    const RegionPlan::Value& val = p.values[v];
    const std::vector<int64_t> shape = TensorShape(x);
    if (shape.size() != 4) throw Failure{"input '" + val.name + "' must be 4-D (N, C, H, W), got " + ShapeText(shape)};
    Dims& d = dims[v];
    d = {static_cast<size_t>(shape[0]), static_cast<size_t>(shape[2]), static_cast<size_t>(shape[3]),
         static_cast<size_t>(shape[1])};
    std::vector<uint8_t>& b = buf(v);
    if (b.size() < d.count()) b.resize(d.count());
    const void* xd = nullptr;
    Check(g_api->GetTensorData(x, &xd));
    Pace pace(p.pacing[p.steps.size() + i], p.adaptive, d.count(), pool);
    if (val.quantize)
      QuantizeInput(static_cast<const float*>(xd), b.data(), d, val.q, pace.For());
    else
      ToNhwc(static_cast<const uint8_t*>(xd), b.data(), d.n, d.c, d.h * d.w, pace.For());
    pace.Done();
    Tick(p.profile, kKinds, &t0);
  }
  for (size_t si = 0; si < p.steps.size(); ++si) {
    const RegionPlan::Step& s = p.steps[si];
    const Dims& d0 = dims[s.in[0]];
    std::vector<uint8_t>& y = buf(s.out);
    Dims& od = dims[s.out];
    Pace pace(p.pacing[si], p.adaptive, d0.count(), pool);
    const qie::ParallelFor& pfor = pace.For();  // this step's choice: the pool or the calling thread
    switch (s.kind) {
      case UnitKind::kTable: {
        if (s.tC > 1 && d0.c != s.tC)
          throw Failure{s.name + " has per-channel constants for " + std::to_string(s.tC) + " channels, got " +
                        d0.Nchw()};
        const Dims d = d0;
        if (y.size() < d.count()) y.resize(d.count());  // in place: already large enough
        if (s.arithmetic)
          RunChannelPrograms(s, d, buf(s.in[0]).data(), y.data(), pfor);
        else
          ApplyLut(s.table.data(), s.tC, buf(s.in[0]).data(), y.data(), d.pixels(), d.c, pfor);
        od = d;
        break;
      }
      case UnitKind::kConv: RunConv(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kBinary:
        if (s.has_pre)
          RunBinaryFloat(s, d0, buf(s.in[0]).data(), dims[s.in[1]], buf(s.in[1]).data(), &od, &y, pfor);
        else
          RunBinary(s, d0, buf(s.in[0]).data(), dims[s.in[1]], buf(s.in[1]).data(), &od, &y, pfor);
        break;
      case UnitKind::kGap:
        if (s.has_pre)
          RunGapFloat(s, d0, buf(s.in[0]).data(), &od, &y, pfor);
        else
          RunGap(s, d0, buf(s.in[0]).data(), &od, &y, pfor);
        break;
      case UnitKind::kMaxPool: RunMaxPool(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kAvgPool: RunAvgPool(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kShuffle: RunShuffle(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kLrn: RunLrn(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kSlice: RunSlice(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kResize: RunResize(s, d0, buf(s.in[0]).data(), &od, &y, pfor); break;
      case UnitKind::kConcat: {
        std::vector<const Dims*> ds;
        std::vector<const uint8_t*> xs;
        for (int v : s.in) {
          ds.push_back(&dims[v]);
          xs.push_back(buf(v).data());
        }
        RunConcat(s, ds, xs, &od, &y, pfor);
        break;
      }
    }
    pace.Done();
    const int64_t ns = Tick(p.profile, s.post.empty() ? static_cast<size_t>(s.kind) : kConvTable, &t0);
    if (p.profile) TickStep(s.name, ns);
    const RegionPlan::Value& ov = p.values[s.out];
    if (ov.output < 0) continue;
    const int64_t shape[4] = {static_cast<int64_t>(od.n), static_cast<int64_t>(od.c), static_cast<int64_t>(od.h),
                              static_cast<int64_t>(od.w)};
    OrtValue* out = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(ov.output), shape, 4, &out));
    void* yd = nullptr;
    Check(g_api->GetTensorMutableData(out, &yd));
    Pace out_pace(p.pacing[p.steps.size() + p.inputs.size() + si], p.adaptive, od.count(), pool);
    ToNchw(y.data(), static_cast<uint8_t*>(yd), od.n, od.c, od.h * od.w, out_pace.For());
    out_pace.Done();
    Tick(p.profile, kKinds, &t0);
  }
}

}  // namespace qie_ep
