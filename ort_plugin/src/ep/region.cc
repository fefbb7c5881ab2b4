// Quantized regions of the plugin EP (see region.h): forming, planning and execution.
//
// Numerics per unit (units.h): a conv computes acc = sum (x - zx)(w - zw[m]) + bias[m] exactly and
// y = saturate(round_half_even(float(acc) * (sx * sw[m] / sy)) + zy), QLinearConv's arithmetic (what ORT runs at
// ORT_ENABLE_EXTENDED and above; within one step of the float DQ -> Conv -> Q below that). Tables are exact
// (units.cc). A binary unit computes the float QDQ graph per element, Q(DQ(a) op DQ(b)): equal to ORT's float
// nodes, within one step of its QLinearAdd / QLinearMul. A global average pool sums the codes exactly and
// quantizes float(sum - HW * zx) * sx / HW (ORT's float kernel sums floats: within one step); AveragePool sums
// the dequantized window in float32, rows then columns, and divides: equal to ORT with count_include_pad, within
// one step at the borders without it (measured; ORT's float kernel sums border windows in another order). Concat and
// MaxPool move codes (max of codes = code of the max: DequantizeLinear is increasing) and requantize them by
// table where the output's scale or zero point differs, exactly as the QDQ graph.
//
// Execution: each region input is transposed once from NCHW to NHWC into a buffer slot; units run in
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
#include <numeric>
#include <set>

#include "ep/graph.h"
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

// Elements per block of a binary unit's activation program.
constexpr size_t kTailBlock = 4096;

// Pixels per block of a per-channel float program (~8 KiB of floats per register).
size_t ProgramRows(size_t C) { return std::max<size_t>(1, 2048 / std::max<size_t>(1, C)); }

struct RegionPlan {
  struct Chained {  // one table unit: DequantizeLinear, f, QuantizeLinear
    QParams in;
    FloatProgram f;
    QParams out;
  };
  struct Value {
    std::string name;
    bool is_signed = false;
    int input = -1, output = -1;  // the fused node's input / output index
    int slot = -1;
  };
  struct Step {
    UnitKind kind = UnitKind::kTable;
    std::string name;  // the unit's op node, for errors
    std::vector<int> in;
    int out = -1;
    std::vector<QParams> qin;
    QParams qout;
    // tables: [tC][256] and 3 bytes of padding (the vector lookup reads dwords); tC = 1 for one table
    size_t tC = 1;
    std::vector<uint8_t> table;
    // the composed units as float programs; per-channel tables of plain arithmetic run them on the data instead
    // of gathering from the tables (same float32 operations, same codes; no dword gathers)
    std::vector<Chained> chain;
    bool arithmetic = false;
    // conv
    qie::ConvAttrs at;
    std::vector<int64_t> k;
    size_t C = 0, M = 0;
    qie::PackedConv packed;
    std::vector<int32_t> wzp, bias;
    std::vector<float> scale;
    // binary: the operation, and the float program of the activations after it (none: tail.steps empty)
    char op = '+';
    FloatProgram tail;
    // binary / gap: per operand, the float program between its DequantizeLinear and the op (empty: none)
    std::vector<FloatProgram> pre;
    bool has_pre = false;
    // average pool: padding counted in the divisor
    bool include_pad = false;
    // concat / maxpool: per input, code -> output code (empty: the identity)
    std::vector<std::vector<uint8_t>> requant;
  };
  std::vector<Value> values;
  std::vector<Step> steps;
  std::vector<int> inputs;  // value of each fused input (-1: not read)
  size_t slots = 0;
  bool profile = false;
};

namespace {

std::vector<uint8_t> Requant(const QParams& from, const QParams& to) {
  if (from.scale == to.scale && from.zp == to.zp && from.is_signed == to.is_signed) return {};
  std::vector<uint8_t> t(256 + 3);
  for (int b = 0; b < 256; ++b)
    t[b] = QuantizeOne(static_cast<float>(Code(static_cast<uint8_t>(b), from.is_signed) - from.zp) * from.scale, to);
  return t;
}

// `st`'s tables followed by `t` ([C][256], C = 1 for one table), composed in place.
void ComposeTable(RegionPlan::Step* st, const std::vector<uint8_t>& t, size_t C) {
  const size_t n = std::max(st->tC, C);
  if (st->tC > 1 && C > 1 && st->tC != C)
    throw Failure{"per-channel tables of " + std::to_string(st->tC) + " and " + std::to_string(C) +
                  " channels meet in one region"};
  std::vector<uint8_t> out(n * 256 + 3);
  for (size_t c = 0; c < n; ++c)
    for (int k = 0; k < 256; ++k) {
      const uint8_t first = st->table[(st->tC == 1 ? 0 : c) * 256 + k];
      out[c * 256 + k] = t[(C == 1 ? 0 : c) * 256 + first];
    }
  st->table = std::move(out);
  st->tC = n;
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
  if (units.empty() || covered.size() != nodes.size())
    throw Failure{"fused graph is not the region GetCapability claimed"};
  auto plan = std::make_unique<RegionPlan>();
  RegionPlan& p = *plan;
  p.profile = opts.profile;
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
      if (fresh) {  // read from outside: a fused-node input
        auto in = std::find(inputs.begin(), inputs.end(), name);
        if (in == inputs.end()) throw Failure{"region value '" + name + "' is neither produced nor an input"};
        p.values[v].input = static_cast<int>(in - inputs.begin());
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
      const std::vector<uint8_t> t = EvalTable(u, &C);
      const RegionPlan::Chained link{s.qin[0], CompileTable(u), s.qout};
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
      s.op = op == "Add" ? '+' : op == "Sub" ? '-' : '*';
      if (u.nodes.size() > 2) {
        const std::vector<const OrtNode*> tail(u.nodes.begin() + 1, u.nodes.end() - 1);
        s.tail = CompileProgram(Outputs(u.op)[0], tail, u.q);
        s.tail.Expand(1, kTailBlock);
      }
    } else if (u.kind == UnitKind::kConcat || u.kind == UnitKind::kMaxPool) {
      for (const QParams& q : s.qin) s.requant.push_back(Requant(q, s.qout));
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
  // Per-channel tables of one unit of plain arithmetic run as float code: measured on Zen 4 (AVX-512), a bias Add
  // or BatchNormalization costs ~1.3 cycles per element as DequantizeLinear, f, QuantizeLinear (the division by
  // the output scale dominates) against ~2 for the dword gather; a chain of two units costs twice that while the
  // composed table still costs one gather, so chains keep their tables.
  for (RegionPlan::Step& st : p.steps) {
    if (st.kind != UnitKind::kTable || st.tC == 1 || st.chain.size() != 1) continue;
    st.arithmetic = true;
    for (RegionPlan::Chained& link : st.chain) {
      st.arithmetic = st.arithmetic && link.f.arithmetic && (link.f.C == 1 || link.f.C == st.tC);
      if (link.f.C == 1 || link.f.C == st.tC) link.f.Expand(st.tC, ProgramRows(st.tC));
    }
  }
  AssignSlots(&p);
  return plan.release();
}

void ReleaseRegion(RegionPlan* plan) { delete plan; }

// ---- execution ----------------------------------------------------------------------------------------------

namespace {

constexpr size_t kKinds = static_cast<size_t>(UnitKind::kAvgPool) + 1;  // and one more: layout (transposes)
std::atomic<int64_t> g_ns[kKinds + 1], g_calls[kKinds + 1];

// Adds the time since `t0` to kind `k` when `on`, and restarts `t0`.
void Tick(bool on, size_t k, std::chrono::steady_clock::time_point* t0) {
  if (!on) return;
  const auto t1 = std::chrono::steady_clock::now();
  g_ns[k].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - *t0).count());
  g_calls[k].fetch_add(1);
  *t0 = t1;
}

struct Dims {  // a value's NHWC dims
  size_t n = 0, h = 0, w = 0, c = 0;
  size_t pixels() const { return n * h * w; }
  size_t count() const { return pixels() * c; }
  std::string Nchw() const {
    return "[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," + std::to_string(w) + "]";
  }
};

std::string ShapeText(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

// y = t[c][x] over `pixels` NHWC pixels of C channels (`t`: one table when tC = 1, else tC = C of them, 3 bytes
// of padding after). Blocks of ~32 KiB, in parallel.
void ApplyLut(const uint8_t* t, size_t tC, const uint8_t* x, uint8_t* y, size_t pixels, size_t C,
              const qie::ParallelFor& pfor) {
  const qie::ChannelLutFn lut = qie::KernelsFor(qie::ActiveIsa()).channel_lut;
  if (tC == 1) {  // one table: the tensor as one row
    pixels *= C;
    C = 1;
  }
  if (pixels == 0 || C == 0) return;
  const size_t per = std::max<size_t>(1, (size_t{1} << 15) / C);
  pfor((pixels + per - 1) / per, [&](size_t b) {
    const size_t p0 = b * per, p1 = std::min(pixels, p0 + per);
    if (lut) return lut(t, C, x + p0 * C, y + p0 * C, p1 - p0);
    for (size_t p = p0; p < p1; ++p)
      for (size_t c = 0; c < C; ++c) y[p * C + c] = t[c * 256 + x[p * C + c]];
  });
}

// Output dims and leading pads of a conv or pool step on input `d`; a bad geometry names the node.
void Geometry(const RegionPlan::Step& s, const Dims& d, std::vector<int64_t>* out, std::vector<int64_t>* pad) {
  try {
    qie::ConvGeometry(s.at, {static_cast<int64_t>(d.h), static_cast<int64_t>(d.w)}, s.k, out, pad);
  } catch (const std::exception& e) { throw Failure{s.name + " on input " + d.Nchw() + ": " + e.what()}; }
}

// NCHW -> NHWC and back for n images of c channels and hw pixels, in parallel over blocks of pixels.
void ToNhwc(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor) {
  constexpr size_t kPix = 512;
  const size_t blocks = (hw + kPix - 1) / kPix;
  if (n * c * hw == 0) return;
  pfor(n * blocks, [&](size_t t) {
    const size_t b = t / blocks, j0 = (t % blocks) * kPix, j1 = std::min(hw, j0 + kPix);
    qie::TransposeBytes(x + b * c * hw + j0, hw, y + (b * hw + j0) * c, c, c, j1 - j0);
  });
}
void ToNchw(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor) {
  constexpr size_t kPix = 512;
  const size_t blocks = (hw + kPix - 1) / kPix;
  if (n * c * hw == 0) return;
  pfor(n * blocks, [&](size_t t) {
    const size_t b = t / blocks, i0 = (t % blocks) * kPix, i1 = std::min(hw, i0 + kPix);
    qie::TransposeBytes(x + (b * hw + i0) * c, c, y + b * c * hw + i0, hw, i1 - i0, c);
  });
}

template <bool Signed>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void DequantizeBlock(
    const uint8_t* __restrict x, size_t n, int32_t zp, float scale, float* __restrict y) {
  for (size_t i = 0; i < n; ++i)
    y[i] = static_cast<float>((Signed ? static_cast<int32_t>(static_cast<int8_t>(x[i])) : x[i]) - zp) * scale;
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void QuantizeBlock(
    const float* __restrict x, size_t n, const Quantizer& q, uint8_t* __restrict y) {
  for (size_t i = 0; i < n; ++i) y[i] = q(x[i]);
}

// A per-channel table step of plain arithmetic run on the data: per block of pixels, each composed unit's
// DequantizeLinear, float program and QuantizeLinear, as its tables were built (so the same codes).
void RunChannelPrograms(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, uint8_t* y,
                        const qie::ParallelFor& pfor) {
  const size_t C = d.c, pixels = d.pixels();
  const size_t per = ProgramRows(C);  // pixels per program block
  const size_t task = per * std::max<size_t>(1, (size_t{1} << 15) / (per * std::max<size_t>(1, C)));  // ~32 KiB
  if (pixels == 0 || C == 0) return;
  pfor((pixels + task - 1) / task, [&](size_t t) {
    thread_local std::vector<float> xf;
    thread_local std::vector<std::vector<float>> regs;
    for (size_t p0 = t * task; p0 < std::min(pixels, (t + 1) * task); p0 += per) {
      const size_t rows = std::min(per, pixels - p0), n = rows * C;
      if (xf.size() < n) xf.resize(n);
      const uint8_t* src = x + p0 * C;
      uint8_t* dst = y + p0 * C;
      for (const RegionPlan::Chained& link : s.chain) {
        if (link.in.is_signed)
          DequantizeBlock<true>(src, n, link.in.zp, link.in.scale, xf.data());
        else
          DequantizeBlock<false>(src, n, link.in.zp, link.in.scale, xf.data());
        QuantizeBlock(RunProgram(link.f, xf.data(), rows, &regs), n, Quantizer(link.out), dst);
        src = dst;  // the next unit reads this one's codes
      }
    }
  });
}

void RunConv(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
             const qie::ParallelFor& pfor) {
  if (d.c != s.C) throw Failure{s.name + " expects " + std::to_string(s.C) + " input channels, got " + d.Nchw()};
  std::vector<int64_t> out, pad;
  Geometry(s, d, &out, &pad);
  qie::ConvShape cs;
  cs.batch = d.n;
  cs.C = s.C;
  cs.M = s.M;
  cs.group = static_cast<size_t>(s.at.group);
  cs.in[1] = d.h;
  cs.in[2] = d.w;
  cs.out[1] = static_cast<size_t>(out[0]);
  cs.out[2] = static_cast<size_t>(out[1]);
  cs.k[1] = static_cast<size_t>(s.k[0]);
  cs.k[2] = static_cast<size_t>(s.k[1]);
  for (int i = 0; i < 2; ++i) {
    cs.stride[1 + i] = s.at.strides.empty() ? 1 : static_cast<size_t>(s.at.strides[i]);
    cs.dil[1 + i] = s.at.dilations.empty() ? 1 : static_cast<size_t>(s.at.dilations[i]);
    cs.pad[1 + i] = static_cast<size_t>(pad[i]);
  }
  *od = {d.n, cs.out[1], cs.out[2], s.M};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  if (od->count() == 0) return;
  qie::ConvArgs ca;
  ca.x = x;
  ca.x_signed = s.qin[0].is_signed;
  ca.x_zp = s.qin[0].zp;
  ca.w_zp = s.wzp.data();
  ca.bias = s.bias.empty() ? nullptr : s.bias.data();
  ca.kind = s.qout.is_signed ? qie::OutKind::kS8 : qie::OutKind::kU8;
  ca.scale = s.scale.data();
  ca.y_zp = s.qout.zp;
  ca.y = ybuf->data();
  qie::Conv(qie::GetMicroKernel(s.packed.isa), cs, s.packed, ca, pfor);  // the ISA its weights were packed for
}

// NumPy broadcasting of a binary unit's two NHWC operands: the output dims and each operand's element strides
// (0 along its broadcast axes); shapes that do not broadcast are an error naming the node.
struct Broadcast {
  size_t Y[4], sa[4], sb[4];
  Broadcast(const RegionPlan::Step& s, const Dims& da, const Dims& db) {
    const size_t A[4] = {da.n, da.h, da.w, da.c}, B[4] = {db.n, db.h, db.w, db.c};
    for (int i = 0; i < 4; ++i) {
      if (A[i] != B[i] && A[i] != 1 && B[i] != 1)
        throw Failure{s.name + ": input shapes " + da.Nchw() + " and " + db.Nchw() + " do not broadcast"};
      Y[i] = A[i] == 1 ? B[i] : A[i];
    }
    size_t ea = 1, eb = 1;
    for (int i = 3; i >= 0; --i) {
      sa[i] = A[i] == 1 ? 0 : ea;
      sb[i] = B[i] == 1 ? 0 : eb;
      ea *= A[i];
      eb *= B[i];
    }
  }
};

// y = Q(DQ(a) op DQ(b)) with NumPy broadcasting of two NHWC tensors; one row of C channels (element strides ca,
// cb: 1, or 0 for a broadcast operand), specialised so the loop vectorizes.
template <char Op, bool AS, bool BS>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void BinaryRow(
    const uint8_t* a, size_t ca, const uint8_t* b, size_t cb, uint8_t* y, size_t C, const QParams& qa,
    const QParams& qb, const QParams& qy) {
  const float sa = qa.scale, sb = qb.scale;
  const int32_t za = qa.zp, zb = qb.zp;
  const Quantizer q(qy);
  auto dq = [](uint8_t v, bool s, int32_t z, float sc) {
    return static_cast<float>((s ? static_cast<int32_t>(static_cast<int8_t>(v)) : static_cast<int32_t>(v)) - z) * sc;
  };
  auto f = [&](float fa, float fb) { return Op == '+' ? fa + fb : Op == '-' ? fa - fb : fa * fb; };
  if (ca == 1 && cb == 1) {
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c], AS, za, sa), dq(b[c], BS, zb, sb)));
  } else if (ca == 1) {
    const float fb = dq(b[0], BS, zb, sb);
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c], AS, za, sa), fb));
  } else {
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c * ca], AS, za, sa), dq(b[c * cb], BS, zb, sb)));
  }
}

// The same per element in float, before a binary unit's activation program.
template <char Op, bool AS, bool BS>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void BinaryRowF(
    const uint8_t* a, size_t ca, const uint8_t* b, size_t cb, float* y, size_t C, const QParams& qa,
    const QParams& qb) {
  const float sa = qa.scale, sb = qb.scale;
  const int32_t za = qa.zp, zb = qb.zp;
  for (size_t c = 0; c < C; ++c) {
    const float fa =
        static_cast<float>((AS ? static_cast<int32_t>(static_cast<int8_t>(a[c * ca])) : a[c * ca]) - za) * sa;
    const float fb =
        static_cast<float>((BS ? static_cast<int32_t>(static_cast<int8_t>(b[c * cb])) : b[c * cb]) - zb) * sb;
    y[c] = Op == '+' ? fa + fb : Op == '-' ? fa - fb : fa * fb;
  }
}
using BinaryRowFFn = void (*)(const uint8_t*, size_t, const uint8_t*, size_t, float*, size_t, const QParams&,
                              const QParams&);
template <char Op>
BinaryRowFFn BinaryFFor(bool as, bool bs) {
  return as ? (bs ? BinaryRowF<Op, true, true> : BinaryRowF<Op, true, false>)
            : (bs ? BinaryRowF<Op, false, true> : BinaryRowF<Op, false, false>);
}

using BinaryRowFn = void (*)(const uint8_t*, size_t, const uint8_t*, size_t, uint8_t*, size_t, const QParams&,
                             const QParams&, const QParams&);
template <char Op>
BinaryRowFn BinaryFor(bool as, bool bs) {
  return as ? (bs ? BinaryRow<Op, true, true> : BinaryRow<Op, true, false>)
            : (bs ? BinaryRow<Op, false, true> : BinaryRow<Op, false, false>);
}

void RunBinary(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b, Dims* od,
               std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  const Broadcast bc(s, da, db);
  const size_t* Y = bc.Y;
  const size_t* sa = bc.sa;
  const size_t* sb = bc.sb;
  *od = {Y[0], Y[1], Y[2], Y[3]};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t rows = Y[0] * Y[1];
  const bool as = s.qin[0].is_signed, bs = s.qin[1].is_signed;
  const BinaryRowFn row = s.op == '+'   ? BinaryFor<'+'>(as, bs)
                          : s.op == '-' ? BinaryFor<'-'>(as, bs)
                                        : BinaryFor<'*'>(as, bs);
  if (od->count() == 0) return;
  if (!s.tail.steps.empty()) {  // float per row, then the activations and the quantization in blocks
    const BinaryRowFFn rowf = s.op == '+'   ? BinaryFFor<'+'>(as, bs)
                              : s.op == '-' ? BinaryFFor<'-'>(as, bs)
                                            : BinaryFFor<'*'>(as, bs);
    const Quantizer q(s.qout);
    pfor(rows, [&](size_t r) {
      thread_local std::vector<float> f;
      thread_local std::vector<std::vector<float>> regs;
      const size_t n = r / Y[1], h = r % Y[1], len = Y[2] * Y[3];
      if (f.size() < len) f.resize(len);
      for (size_t w = 0; w < Y[2]; ++w)
        rowf(a + n * sa[0] + h * sa[1] + w * sa[2], sa[3], b + n * sb[0] + h * sb[1] + w * sb[2], sb[3],
             f.data() + w * Y[3], Y[3], s.qin[0], s.qin[1]);
      for (size_t k = 0; k < len; k += kTailBlock) {
        const size_t m = std::min(kTailBlock, len - k);
        QuantizeBlock(RunProgram(s.tail, f.data() + k, m, &regs), m, q, y + r * len + k);
      }
    });
    return;
  }
  pfor(rows, [&](size_t r) {
    const size_t n = r / Y[1], h = r % Y[1];
    for (size_t w = 0; w < Y[2]; ++w) {
      const uint8_t* pa = a + n * sa[0] + h * sa[1] + w * sa[2];
      const uint8_t* pb = b + n * sb[0] + h * sb[1] + w * sb[2];
      uint8_t* py = y + ((r * Y[2]) + w) * Y[3];
      row(pa, sa[3], pb, sb[3], py, Y[3], s.qin[0], s.qin[1], s.qout);
    }
  });
}

// An operand in float32: its DequantizeLinear and, when it has one, its prefix program, over the whole tensor
// (blocks of elements for a program of scalar constants, of pixels for per-channel ones).
void OperandFloat(const RegionPlan::Step& s, size_t k, const Dims& d, const uint8_t* x, std::vector<float>* out,
                  const qie::ParallelFor& pfor) {
  const FloatProgram& f = s.pre[k];
  const QParams& q = s.qin[k];
  const size_t n = d.count();
  if (out->size() < n) out->resize(n);
  if (f.steps.empty() || n == 0) {
    if (q.is_signed)
      DequantizeBlock<true>(x, n, q.zp, q.scale, out->data());
    else
      DequantizeBlock<false>(x, n, q.zp, q.scale, out->data());
    return;
  }
  if (f.C > 1 && d.c != f.C)
    throw Failure{s.name + ": an operand's per-channel constants are for " + std::to_string(f.C) + " channels, got " +
                  d.Nchw()};
  const size_t per = f.C == 1 ? kTailBlock : ProgramRows(f.C) * f.C;  // elements per program block
  pfor((n + per - 1) / per, [&](size_t b) {
    thread_local std::vector<float> xf;
    thread_local std::vector<std::vector<float>> regs;
    const size_t e0 = b * per, m = std::min(per, n - e0);
    if (xf.size() < m) xf.resize(m);
    if (q.is_signed)
      DequantizeBlock<true>(x + e0, m, q.zp, q.scale, xf.data());
    else
      DequantizeBlock<false>(x + e0, m, q.zp, q.scale, xf.data());
    const float* r = RunProgram(f, xf.data(), m / f.C, &regs);
    std::copy(r, r + m, out->data() + e0);
  });
}

// Binary units with a prefix on an operand: both operands in float32, the operation with broadcasting, the
// activation program, QuantizeLinear.
void RunBinaryFloat(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b,
                    Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  thread_local std::vector<float> fa, fb;
  OperandFloat(s, 0, da, a, &fa, pfor);
  OperandFloat(s, 1, db, b, &fb, pfor);
  const Broadcast bc(s, da, db);
  const size_t* Y = bc.Y;
  const size_t* sa = bc.sa;
  const size_t* sb = bc.sb;
  *od = {Y[0], Y[1], Y[2], Y[3]};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const Quantizer q(s.qout);
  const float* pa0 = fa.data();
  const float* pb0 = fb.data();
  pfor(Y[0] * Y[1], [&](size_t r) {
    thread_local std::vector<float> f;
    thread_local std::vector<std::vector<float>> regs;
    const size_t n = r / Y[1], h = r % Y[1], len = Y[2] * Y[3];
    if (f.size() < len) f.resize(len);
    for (size_t w = 0; w < Y[2]; ++w) {
      const float* pa = pa0 + n * sa[0] + h * sa[1] + w * sa[2];
      const float* pb = pb0 + n * sb[0] + h * sb[1] + w * sb[2];
      float* pf = f.data() + w * Y[3];
      for (size_t c = 0; c < Y[3]; ++c) {
        const float x = pa[c * sa[3]], z = pb[c * sb[3]];
        pf[c] = s.op == '+' ? x + z : s.op == '-' ? x - z : x * z;
      }
    }
    for (size_t k = 0; k < len; k += kTailBlock) {
      const size_t m = std::min(kTailBlock, len - k);
      const float* v = s.tail.steps.empty() ? f.data() + k : RunProgram(s.tail, f.data() + k, m, &regs);
      QuantizeBlock(v, m, q, y + r * len + k);
    }
  });
}

// A global average pool whose operand has a prefix: the float values summed pixel by pixel in float32, / HW.
void RunGapFloat(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                 const qie::ParallelFor& pfor) {
  thread_local std::vector<float> fx;
  OperandFloat(s, 0, d, x, &fx, pfor);
  *od = {d.n, 1, 1, d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t hw = d.h * d.w, C = d.c;
  const Quantizer q(s.qout);
  const float* f = fx.data();
  pfor(d.n, [&](size_t n) {
    thread_local std::vector<float> acc;
    acc.assign(C, 0.0f);
    for (size_t p = 0; p < hw; ++p)
      for (size_t c = 0; c < C; ++c) acc[c] += f[(n * hw + p) * C + c];
    for (size_t c = 0; c < C; ++c) y[n * C + c] = q(acc[c] / static_cast<float>(hw));
  });
}

void RunGap(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
            const qie::ParallelFor& pfor) {
  *od = {d.n, 1, 1, d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t hw = d.h * d.w, C = d.c;
  const QParams& qx = s.qin[0];
  constexpr size_t kBlock = 256;  // channels per task
  const size_t blocks = (C + kBlock - 1) / kBlock;
  if (od->count() == 0) return;
  pfor(d.n * blocks, [&](size_t t) {
    const size_t n = t / blocks, c0 = (t % blocks) * kBlock, cn = std::min(kBlock, C - c0);
    int64_t acc[kBlock] = {};
    for (size_t p = 0; p < hw; ++p) {
      const uint8_t* px = x + (n * hw + p) * C + c0;
      for (size_t k = 0; k < cn; ++k) acc[k] += Code(px[k], qx.is_signed);
    }
    for (size_t k = 0; k < cn; ++k) {
      const int64_t centered = acc[k] - static_cast<int64_t>(hw) * qx.zp;
      const float mean = static_cast<float>(centered) * qx.scale / static_cast<float>(hw);
      y[n * C + c0 + k] = QuantizeOne(mean, s.qout);
    }
  });
}

void RunConcat(const RegionPlan::Step& s, const std::vector<const Dims*>& ds, const std::vector<const uint8_t*>& xs,
               Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  Dims o = *ds[0];
  o.c = 0;
  for (const Dims* d : ds) {
    if (d->n != o.n || d->h != o.h || d->w != o.w)
      throw Failure{s.name + ": inputs " + ds[0]->Nchw() + " and " + d->Nchw() + " differ outside the channel axis"};
    o.c += d->c;
  }
  *od = o;
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t pixels = o.pixels(), per = std::max<size_t>(1, (size_t{1} << 14) / std::max<size_t>(1, o.c));
  if (od->count() == 0) return;
  pfor((pixels + per - 1) / per, [&](size_t b) {
    for (size_t p = b * per; p < std::min(pixels, (b + 1) * per); ++p) {
      uint8_t* py = y + p * o.c;
      for (size_t i = 0; i < xs.size(); ++i) {
        const size_t C = ds[i]->c;
        const uint8_t* px = xs[i] + p * C;
        if (s.requant[i].empty()) {
          std::memcpy(py, px, C);
        } else {
          for (size_t c = 0; c < C; ++c) py[c] = s.requant[i][px[c]];
        }
        py += C;
      }
    }
  });
}

// py[c] = max(py[c], px[c] ^ flip): signed codes compared as unsigned once their sign bit is flipped.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void MaxInto(uint8_t* __restrict py,
                                                                                           const uint8_t* __restrict px,
                                                                                           size_t C, uint8_t flip) {
  for (size_t c = 0; c < C; ++c) {
    const uint8_t v = px[c] ^ flip;
    py[c] = py[c] > v ? py[c] : v;
  }
}

void RunMaxPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor) {
  std::vector<int64_t> out, pad;
  Geometry(s, d, &out, &pad);
  *od = {d.n, static_cast<size_t>(out[0]), static_cast<size_t>(out[1]), d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t C = d.c;
  const uint8_t flip = s.qin[0].is_signed ? 0x80 : 0;
  const int64_t sh = s.at.strides.empty() ? 1 : s.at.strides[0], sw = s.at.strides.empty() ? 1 : s.at.strides[1];
  const int64_t dh = s.at.dilations.empty() ? 1 : s.at.dilations[0];
  const int64_t dw = s.at.dilations.empty() ? 1 : s.at.dilations[1];
  const std::vector<uint8_t>& rq = s.requant[0];
  pfor(od->n * od->h, [&](size_t r) {
    const size_t n = r / od->h;
    const int64_t oh = static_cast<int64_t>(r % od->h);
    for (size_t ow = 0; ow < od->w; ++ow) {
      uint8_t* py = y + (r * od->w + ow) * C;
      std::fill_n(py, C, 0);
      for (int64_t kh = 0; kh < s.k[0]; ++kh) {
        const int64_t ih = oh * sh - pad[0] + kh * dh;
        if (ih < 0 || ih >= static_cast<int64_t>(d.h)) continue;
        for (int64_t kw = 0; kw < s.k[1]; ++kw) {
          const int64_t iw = static_cast<int64_t>(ow) * sw - pad[1] + kw * dw;
          if (iw < 0 || iw >= static_cast<int64_t>(d.w)) continue;
          const uint8_t* px = x + ((n * d.h + static_cast<size_t>(ih)) * d.w + static_cast<size_t>(iw)) * C;
          MaxInto(py, px, C, flip);
        }
      }
      if (rq.empty()) {
        for (size_t c = 0; c < C; ++c) py[c] ^= flip;
      } else {
        for (size_t c = 0; c < C; ++c) py[c] = rq[py[c] ^ flip];
      }
    }
  });
}

// y = Q(sum of the window's dequantized values / count), summed in float32 in ORT's order (rows, then columns).
void RunAvgPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor) {
  std::vector<int64_t> out, pad;
  Geometry(s, d, &out, &pad);
  *od = {d.n, static_cast<size_t>(out[0]), static_cast<size_t>(out[1]), d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t C = d.c;
  const QParams& qx = s.qin[0];
  const Quantizer q(s.qout);
  const int64_t sh = s.at.strides.empty() ? 1 : s.at.strides[0], sw = s.at.strides.empty() ? 1 : s.at.strides[1];
  const int64_t dh = s.at.dilations.empty() ? 1 : s.at.dilations[0];
  const int64_t dw = s.at.dilations.empty() ? 1 : s.at.dilations[1];
  pfor(od->n * od->h, [&](size_t r) {
    thread_local std::vector<float> acc;
    acc.resize(C);
    const size_t n = r / od->h;
    const int64_t oh = static_cast<int64_t>(r % od->h);
    for (size_t ow = 0; ow < od->w; ++ow) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      int64_t taps = 0;
      for (int64_t kh = 0; kh < s.k[0]; ++kh) {
        const int64_t ih = oh * sh - pad[0] + kh * dh;
        if (ih < 0 || ih >= static_cast<int64_t>(d.h)) continue;
        for (int64_t kw = 0; kw < s.k[1]; ++kw) {
          const int64_t iw = static_cast<int64_t>(ow) * sw - pad[1] + kw * dw;
          if (iw < 0 || iw >= static_cast<int64_t>(d.w)) continue;
          const uint8_t* px = x + ((n * d.h + static_cast<size_t>(ih)) * d.w + static_cast<size_t>(iw)) * C;
          for (size_t c = 0; c < C; ++c) acc[c] += static_cast<float>(Code(px[c], qx.is_signed) - qx.zp) * qx.scale;
          ++taps;
        }
      }
      // The divisor: the window's taps inside the input, or with count_include_pad every tap inside the padded
      // input (ONNX: the pads, not the window's overhang past them).
      int64_t count = taps;
      if (s.include_pad) {
        const int64_t h0 = oh * sh - pad[0], w0 = static_cast<int64_t>(ow) * sw - pad[1];
        const int64_t hlim = static_cast<int64_t>(d.h) + (s.at.pads.size() == 4 ? s.at.pads[2] : pad[0]);
        const int64_t wlim = static_cast<int64_t>(d.w) + (s.at.pads.size() == 4 ? s.at.pads[3] : pad[1]);
        int64_t hk = 0, wk = 0;
        for (int64_t kh = 0; kh < s.k[0]; ++kh) hk += h0 + kh * dh < hlim;
        for (int64_t kw = 0; kw < s.k[1]; ++kw) wk += w0 + kw * dw < wlim;
        count = hk * wk;
      }
      uint8_t* py = y + (r * od->w + ow) * C;
      const float div = static_cast<float>(count);
      for (size_t c = 0; c < C; ++c) py[c] = q(acc[c] / div);
    }
  });
}

}  // namespace

const char* RegionProfileNames() { return "conv table binary gap concat maxpool avgpool layout"; }
size_t RegionProfile(int64_t* ns, int64_t* calls, size_t n) {
  for (size_t k = 0; k < std::min(n, kKinds + 1); ++k) {
    ns[k] = g_ns[k].load();
    calls[k] = g_calls[k].load();
  }
  return kKinds + 1;
}
void ResetRegionProfile() {
  for (size_t k = 0; k <= kKinds; ++k) {
    g_ns[k].store(0);
    g_calls[k].store(0);
  }
}

OrtStatus* RunRegion(RegionPlan& p, OrtKernelContext* ctx) {
  return Guard("region", [&] {
    thread_local std::vector<std::vector<uint8_t>> slots;  // grown, never shrunk: nothing allocated once warm
    thread_local std::vector<Dims> dims;
    if (slots.size() < p.slots) slots.resize(p.slots);
    dims.assign(p.values.size(), Dims{});
    const qie::ParallelFor pfor = CtxParallelFor(ctx);
    auto t0 = std::chrono::steady_clock::now();
    auto buf = [&](int v) -> std::vector<uint8_t>& { return slots[static_cast<size_t>(p.values[v].slot)]; };
    for (size_t i = 0; i < p.inputs.size(); ++i) {
      const int v = p.inputs[i];
      if (v < 0) continue;
      const OrtValue* x = nullptr;
      Check(g_api->KernelContext_GetInput(ctx, i, &x));
      const std::vector<int64_t> shape = TensorShape(x);
      if (shape.size() != 4)
        throw Failure{"input '" + p.values[v].name + "' must be 4-D (N, C, H, W), got " + ShapeText(shape)};
      Dims& d = dims[v];
      d = {static_cast<size_t>(shape[0]), static_cast<size_t>(shape[2]), static_cast<size_t>(shape[3]),
           static_cast<size_t>(shape[1])};
      std::vector<uint8_t>& b = buf(v);
      if (b.size() < d.count()) b.resize(d.count());
      const void* xd = nullptr;
      Check(g_api->GetTensorData(x, &xd));
      ToNhwc(static_cast<const uint8_t*>(xd), b.data(), d.n, d.c, d.h * d.w, pfor);
      Tick(p.profile, kKinds, &t0);
    }
    for (const RegionPlan::Step& s : p.steps) {
      const Dims& d0 = dims[s.in[0]];
      std::vector<uint8_t>& y = buf(s.out);
      Dims& od = dims[s.out];
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
      Tick(p.profile, static_cast<size_t>(s.kind), &t0);
      const RegionPlan::Value& ov = p.values[s.out];
      if (ov.output < 0) continue;
      const int64_t shape[4] = {static_cast<int64_t>(od.n), static_cast<int64_t>(od.c), static_cast<int64_t>(od.h),
                                static_cast<int64_t>(od.w)};
      OrtValue* out = nullptr;
      Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(ov.output), shape, 4, &out));
      void* yd = nullptr;
      Check(g_api->GetTensorMutableData(out, &yd));
      ToNchw(y.data(), static_cast<uint8_t*>(yd), od.n, od.c, od.h * od.w, pfor);
      Tick(p.profile, kKinds, &t0);
    }
  });
}

}  // namespace qie_ep
