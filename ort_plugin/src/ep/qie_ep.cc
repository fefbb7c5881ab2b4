// qie as an ONNX Runtime plugin execution provider (libqie_ep.so, built against the API-27 headers; ORT >= 1.27):
// the factory, the CPU device, the EP's options, GetCapability (which node groups it claims: regions, region.h;
// attention units, attention.h; Softmax units, softmax.h; MatMul / Gemm units with their tails, matmul_unit.h; in that
// order, each group's nodes
// claimed once) and Compile (one compiled form per fused node). A group qie cannot prove it computes exactly is
// left to ORT; GetCapability never guesses, and a node whose reading fails is left to ORT too.
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

#include "ep/attention.h"
#include "ep/graph.h"
#include "ep/matmul_unit.h"
#include "ep/region.h"
#include "ep/region_plan.h"
#include "ep/shapes.h"
#include "ep/softmax.h"
#include "kernels/gemm.h"
#include "ops/common.h"

namespace {

using namespace qie_ep;  // NOLINT: the EP's own graph helpers

std::atomic<long> g_claimed{0}, g_runs{0}, g_regions{0}, g_region_runs{0}, g_attentions{0}, g_attention_runs{0};
constexpr const char* kEpName = "QIE";

// One fused node: a MatMul/Gemm unit, a Softmax unit, an attention unit or a region.
struct ComputeInfo : OrtNodeComputeInfo {
  CompiledMatMul unit;
  bool is_softmax = false;
  CompiledSoftmax softmax;
  bool is_attention = false;
  CompiledAttention attention;
  bool is_shapes = false;
  CompiledShapes shapes;
  std::unique_ptr<RegionPlan, void (*)(RegionPlan*)> region{nullptr, ReleaseRegion};
  ComputeInfo() : OrtNodeComputeInfo{} {
    ort_version_supported = ORT_API_VERSION;
    CreateState = [](OrtNodeComputeInfo* self, OrtNodeComputeContext*, void** state) noexcept -> OrtStatus* {
      *state = self;
      return nullptr;
    };
    Compute = [](OrtNodeComputeInfo*, void* state, OrtKernelContext* ctx) noexcept -> OrtStatus* {
      auto* self = static_cast<ComputeInfo*>(state);
      if (self->is_shapes) return ComputeShapes(self->shapes, ctx);
      if (self->is_softmax || self->is_attention) {
        OrtStatus* st = self->is_softmax ? ComputeSoftmax(self->softmax, ctx) : ComputeAttention(self->attention, ctx);
        if (!st) (self->is_softmax ? g_runs : g_attention_runs).fetch_add(1);
        return st;
      }
      if (!self->region) {
        OrtStatus* st = ComputeMatMul(self->unit, ctx);
        if (!st) g_runs.fetch_add(1);
        return st;
      }
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
  bool attention_on = true;
  bool shapes_on = true;
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
        // Regions first; then the attention, Softmax and MatMul / Gemm units of the nodes left (a MatMul unit's
        // trailing DequantizeLinear that another group reads stays with it: the unit then outputs the codes).
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
        // Attention, then Softmax units: each group whose nodes are all free, claimed whole.
        auto claim_each = [&](bool on, auto match) {
          size_t count = 0;
          for (const OrtNode* node : nodes) {
            if (!on) break;
            std::vector<const OrtNode*> group;
            try {
              if (!match(node, &group) || std::any_of(group.begin(), group.end(), Assigned)) continue;
            } catch (const Failure&) { continue; }
            if (!outside(group)) continue;
            Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(support, group.data(), group.size(), &opts));
            claimed.insert(group.begin(), group.end());
            ++count;
          }
          return count;
        };
        const size_t attentions = claim_each(self->units_on && self->attention_on, [](const OrtNode* n, auto* g) {
          AttentionUnit u;
          if (!MatchAttention(n, &u)) return false;
          *g = u.Nodes();
          return true;
        });
        g_attentions.fetch_add(static_cast<long>(attentions));
        const size_t softmaxes = claim_each(self->units_on, [](const OrtNode* n, auto* g) {
          SoftmaxUnit u;
          if (!MatchSoftmax(n, &u)) return false;
          *g = u.Nodes();
          return true;
        });
        g_claimed.fetch_add(static_cast<long>(softmaxes));
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
            if (u.dq_out && Assigned(u.dq_out)) u.DropOutput();
            if (!u.Complete()) continue;
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
          if (u.dq_out && (claimed.count(u.dq_out) || unit_inputs.count(u.dq_out))) u.DropOutput();
          if (!u.Complete()) continue;
          const std::vector<const OrtNode*> group = u.Nodes();
          if (!outside(group)) continue;
          Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(support, group.data(), group.size(), &opts));
          claimed.insert(group.begin(), group.end());
          g_claimed.fetch_add(1);
          ++units;
          segments += u.tail.size();
        }
        // Shape units on what is left: a Shape, the Gather -> Unsqueeze nodes picking its dims and the
        // DequantizeLinear only it reads (the units above took the Shapes reading their own values).
        const size_t shape_units = claim_each(self->units_on && self->shapes_on, [](const OrtNode* n, auto* g) {
          ShapeUnit u;
          if (!MatchShapeUnit(n, &u)) return false;
          *g = u.Nodes();
          return true;
        });
        if (!self->regions_on)
          return self->Log(ORT_LOGGING_LEVEL_INFO,
                           "qie EP: " + std::to_string(units) + " MatMul/Gemm units (" + std::to_string(segments) +
                               " tail segments) and " + std::to_string(softmaxes) + " Softmax and " +
                               std::to_string(attentions) + " attention units, " + std::to_string(shape_units) +
                               " shape units claimed; regions off");
        self->Log(ORT_LOGGING_LEVEL_INFO,
                  "qie EP: " + std::to_string(units) + " MatMul/Gemm units (" + std::to_string(segments) +
                      " tail segments), " + std::to_string(softmaxes) + " Softmax and " + std::to_string(attentions) +
                      " attention units, " + std::to_string(shape_units) + " shape units claimed; " +
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
          bool matmul = false, softmax = false, shape_only = !nodes.empty();
          size_t matmuls = 0;
          for (const OrtNode* n : nodes) {
            const std::string t = OpType(n);
            shape_only = shape_only && (t == "Shape" || t == "Gather" || t == "Unsqueeze" || t == "DequantizeLinear" ||
                                        t == "Concat");
            matmul = matmul || OpType(n) == "MatMul" || OpType(n) == "Gemm";
            matmuls += OpType(n) == "MatMul";
            softmax = softmax || OpType(n) == "Softmax";
          }
          if (shape_only) {
            info->is_shapes = true;
            CompileShapes(graphs[i], fused[i], &info->shapes);
          } else if (softmax && matmuls == 2) {
            info->is_attention = true;
            CompileAttention(graphs[i], fused[i], &info->attention);
            info->attention.adaptive = self->region_opts.pacing;
          } else if (softmax && nodes.size() == 3) {
            info->is_softmax = true;
            CompileSoftmax(nodes, &info->softmax);
            info->softmax.adaptive = self->region_opts.pacing;
          } else if (matmul) {
            CompileMatMul(graphs[i], fused[i], &info->unit);
            info->unit.adaptive = self->region_opts.pacing;
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
//   units   "1" (default) / "0": claim MatMul / Gemm, Softmax and attention units
//   attention "1" (default) / "0": claim attention units (units on)
//   shapes  "1" (default) / "0": claim shape units, Shape -> Gather -> Unsqueeze (units on)
//   regions "1" (default) / "0": claim conv regions
//   tails   "1" (default) / "0": MatMul / Gemm units take the elementwise DQ -> f -> Q segments after them
//   min_region_convs: convolutions a region needs (default 2, >= 1)
//   profile "0" (default) / "1": time the regions' unit kinds (qie_ep_region_profile)
//   pacing  "1" (default) / "0": each region step, MatMul / Gemm unit and Softmax unit learns from its first runs
//           whether the intra-op pool pays for its work (pacing.h); "0": always the pool
//   conv_tables "1" (default) / "0": a region's table step whose input only it reads from a conv runs inside the
//           conv's tasks (FuseConvTables); "0": as its own step
//   team    "1" (default) / "0": a region run wakes the intra-op pool once and its members take every parallel
//           section of the run (team.h); "0": one pool call per section
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
  flag("attention", &ep->attention_on);
  flag("shapes", &ep->shapes_on);
  flag("profile", &ep->region_opts.profile);
  flag("pacing", &ep->region_opts.pacing);
  flag("conv_tables", &ep->region_opts.conv_tables);
  flag("team", &ep->region_opts.team);
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
// Attention units claimed and their runs.
__attribute__((visibility("default"))) void qie_ep_attention_counters(long* claimed, long* runs) {
  *claimed = g_attentions.load();
  *runs = g_attention_runs.load();
}
__attribute__((visibility("default"))) void qie_ep_reset() {
  g_runs.store(0);
  g_attention_runs.store(0);
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
// The same per step: lines "name\tnanoseconds\truns" (valid until this thread's next call).
__attribute__((visibility("default"))) const char* qie_ep_region_step_profile() {
  thread_local std::string text;
  text = RegionStepProfile();
  return text.c_str();
}
// The ISA path the EP's kernels use (its library has its own dispatch state; QIE_ISA applies to it too).
__attribute__((visibility("default"))) const char* qie_ep_active_isa() { return qie::IsaName(qie::ActiveIsa()); }

}  // extern "C"
