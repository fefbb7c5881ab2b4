// The one registration table of (domain, op) -> adaptor, the OrtCustomOp glue around it, and
// RegisterCustomOps (ORT's entry point). C++ exceptions become OrtStatus errors that name the op and the
// node. What Python reads is in c_api.cc; the kernel-level test entries are in testing.cc (a separate
// library, not part of the shipped one).
//
// Input dtypes are declared UNDEFINED (any tensor type) except where a variant fixes one to select its
// output dtype (see OpDef): a custom op registered under an ONNX op name replaces that op's schema for
// type checking, so fixed dtypes would make valid int8 models fail to load. The adaptors check dtypes
// themselves and say what is wrong. Output shapes come from each op's InferOutputShapeFn (shape_infer.cc).
#include <atomic>
#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <string>

#include "kernels/conv.h"
#include "ops/ops.h"

namespace qie {
const char* IsaEnvError();

namespace {

constexpr auto U = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr auto I8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;

using Factory = std::unique_ptr<Kernel> (*)(const OrtKernelInfo*);

// One registered variant of an op. Every output dtype is declared here, never left for ORT to guess:
// ORT types an UNDEFINED custom-op output from the last input present (b_zero_point, C, ...) and ignores
// the shape-inference function's verdict, so a guessed dtype made qie write int32/float into a uint8
// or int8 buffer. Ops whose output dtype follows y_zero_point are registered once per dtype, with
// y_zero_point's slot fixed to it; QGemm's float variant comes first and fixes that slot to float, a
// dtype no zero point has, so it matches exactly the nodes without y_zero_point. The variants share
// the adaptor; ORT picks the one whose fixed dtypes the node's inputs have.
struct OpDef {
  const char* domain;
  const char* name;
  std::vector<ONNXTensorElementDataType> inputs;
  size_t required;  // leading inputs that are required; the rest are optional
  ONNXTensorElementDataType output;
  Factory make;
  void (*infer)(OrtShapeInferContext*);
};

void InferMatMulInt32(OrtShapeInferContext* c) { InferMatMulShape(c, 0, 1, I32); }
void InferMatMulFloat(OrtShapeInferContext* c) { InferMatMulShape(c, 0, 1, F32); }

const std::vector<OpDef>& Table() {
  static const std::vector<OpDef> table = {
      {"", "QLinearMatMul", {U, U, U, U, U, U, U, U8}, 8, U8, MakeQLinearMatMul, InferQLinearMatMul},
      {"", "QLinearMatMul", {U, U, U, U, U, U, U, I8}, 8, I8, MakeQLinearMatMul, InferQLinearMatMul},
      {"", "MatMulInteger", {U, U, U, U}, 2, I32, MakeMatMulInteger, InferMatMulInt32},
      {"com.microsoft",
       "MatMulIntegerToFloat",
       {U, U, U, U, U, U, U},
       4,
       F32,
       MakeMatMulIntegerToFloat,
       InferMatMulFloat},
      {"com.microsoft", "DynamicQuantizeMatMul", {U, U, U, U, U}, 3, F32, MakeDynamicQuantizeMatMul, InferMatMulFloat},
      {"com.microsoft", "QGemm", {U, U, U, U, U, U, U, U, F32}, 6, F32, MakeQGemm, InferQGemm},
      {"com.microsoft", "QGemm", {U, U, U, U, U, U, U, U, U8}, 6, U8, MakeQGemm, InferQGemm},
      {"com.microsoft", "QGemm", {U, U, U, U, U, U, U, U, I8}, 6, I8, MakeQGemm, InferQGemm},
      {"", "QLinearConv", {U, U, U, U, U, U, U, U8, U}, 8, U8, MakeQLinearConv, InferQLinearConv},
      {"", "QLinearConv", {U, U, U, U, U, U, U, I8, U}, 8, I8, MakeQLinearConv, InferQLinearConv},
      {"", "ConvInteger", {U, U, U, U}, 2, I32, MakeConvInteger, InferConvInteger},
      {"com.microsoft", "QLinearConv", {U, U, U, U, U, U, U, U8, U}, 8, U8, MakeQLinearConvNhwc, InferQLinearConvNhwc},
      {"com.microsoft", "QLinearConv", {U, U, U, U, U, U, U, I8, U}, 8, I8, MakeQLinearConvNhwc, InferQLinearConvNhwc},
  };
  return table;
}

struct QieOp : OrtCustomOp {
  const OpDef* def;
  int stats_id;
};

struct KernelHolder {
  std::unique_ptr<Kernel> kernel;
  std::string what;  // "qie QLinearMatMul (node 'x')"
  int stats_id;
};

}  // namespace

// The (domain, op) lines qie_ops() reports, one per op (not per variant).
std::string RegisteredOps() {
  std::string out;
  for (const OpDef& d : Table()) {
    const std::string line = std::string(d.domain) + "\t" + d.name + "\n";
    if (out.find(line) == std::string::npos) out += line;
  }
  return out;
}

namespace {

const QieOp& Op(const OrtCustomOp* op) { return *static_cast<const QieOp*>(op); }

OrtStatus* ErrorStatus(OrtErrorCode code, const std::string& what, const char* msg) {
  return g_ort->CreateStatus(code, (what + ": " + msg).c_str());
}

// Runs `body`, turning any exception into an ORT error status prefixed with `what`.
template <class F>
OrtStatus* Guarded(const std::string& what, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return ErrorStatus(ORT_INVALID_ARGUMENT, what, e.what());
  } catch (const std::bad_alloc&) {
    return ErrorStatus(ORT_RUNTIME_EXCEPTION, what, "out of memory");
  } catch (const std::exception& e) { return ErrorStatus(ORT_RUNTIME_EXCEPTION, what, e.what()); } catch (...) {
    return ErrorStatus(ORT_RUNTIME_EXCEPTION, what, "unknown error");
  }
}

OrtStatus* ORT_API_CALL CreateKernelV2(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  const QieOp& q = Op(op);
  const std::string what = std::string("qie ") + q.def->name + " (node '" + NodeName(info) + "')";
  return Guarded(what, [&] {
    auto holder = std::make_unique<KernelHolder>();
    holder->what = what;
    holder->stats_id = q.stats_id;
    holder->kernel = q.def->make(info);
    *kernel = holder.release();
  });
}

OrtStatus* ORT_API_CALL KernelComputeV2(void* kernel, OrtKernelContext* ctx) {
  auto* h = static_cast<KernelHolder*>(kernel);
  return Guarded(h->what, [&] { StatsCount(h->stats_id, h->kernel->Compute(ctx)); });
}

// ORT ignores (and leaks) a status returned here, so none is: a shape that cannot be inferred is left
// unset and the kernel reports the problem at run time (shape_infer.cc, rule 1).
OrtStatus* ORT_API_CALL InferShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  try {
    Op(op).def->infer(ctx);
  } catch (...) {  // NOLINT: every failure means "no shape", see above
  }
  return nullptr;
}

void ORT_API_CALL KernelDestroy(void* kernel) { delete static_cast<KernelHolder*>(kernel); }

const char* ORT_API_CALL GetName(const OrtCustomOp* op) { return Op(op).def->name; }
const char* ORT_API_CALL GetEp(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL InCount(const OrtCustomOp* op) { return Op(op).def->inputs.size(); }
ONNXTensorElementDataType ORT_API_CALL InType(const OrtCustomOp* op, size_t i) { return Op(op).def->inputs[i]; }
size_t ORT_API_CALL OutCount(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL OutType(const OrtCustomOp* op, size_t) { return Op(op).def->output; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL InChar(const OrtCustomOp* op, size_t i) {
  return i < Op(op).def->required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL OutChar(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL InMem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL Zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL One(const OrtCustomOp*) { return 1; }
int ORT_API_CALL StartVersion(const OrtCustomOp*) { return 1; }
int ORT_API_CALL EndVersion(const OrtCustomOp*) { return INT_MAX; }

std::vector<QieOp>& Ops() {
  static std::vector<QieOp> ops = [] {
    std::vector<QieOp> v;
    for (const OpDef& d : Table()) {
      QieOp q;
      std::memset(static_cast<OrtCustomOp*>(&q), 0, sizeof(OrtCustomOp));
      q.version = ORT_API_VERSION;
      q.CreateKernel = nullptr;
      q.GetName = GetName;
      q.GetExecutionProviderType = GetEp;
      q.GetInputType = InType;
      q.GetInputTypeCount = InCount;
      q.GetOutputType = OutType;
      q.GetOutputTypeCount = OutCount;
      q.KernelCompute = nullptr;
      q.KernelDestroy = KernelDestroy;
      q.GetInputCharacteristic = InChar;
      q.GetOutputCharacteristic = OutChar;
      q.GetInputMemoryType = InMem;
      q.GetVariadicInputMinArity = One;
      q.GetVariadicInputHomogeneity = Zero;
      q.GetVariadicOutputMinArity = One;
      q.GetVariadicOutputHomogeneity = Zero;
      q.CreateKernelV2 = CreateKernelV2;
      q.KernelComputeV2 = KernelComputeV2;
      q.InferOutputShapeFn = InferShape;
      q.GetStartVersion = StartVersion;
      q.GetEndVersion = EndVersion;
      q.def = &d;
      q.stats_id = StatsOpId(d.domain, d.name);
      v.push_back(q);
    }
    return v;
  }();
  return ops;
}

// The two custom-op domains, made once per load of the library and shared by every SessionOptions it
// is registered with (ORT only reads them), released when the library is unloaded: registering many
// times costs nothing and leaks nothing.
struct Domains {
  std::mutex mu;
  OrtCustomOpDomain* onnx = nullptr;
  OrtCustomOpDomain* ms = nullptr;
  ~Domains() {
    if (!g_ort) return;
    if (onnx) g_ort->ReleaseCustomOpDomain(onnx);
    if (ms) g_ort->ReleaseCustomOpDomain(ms);
  }
  OrtStatus* Make(const OrtApi* api) {  // under mu
    if (onnx && ms) return nullptr;
    OrtCustomOpDomain* d[2] = {nullptr, nullptr};
    OrtStatus* st = api->CreateCustomOpDomain("", &d[0]);
    if (!st) st = api->CreateCustomOpDomain("com.microsoft", &d[1]);
    for (auto& op : Ops()) {
      if (st) break;
      st = api->CustomOpDomain_Add(std::strcmp(op.def->domain, "") == 0 ? d[0] : d[1], &op);
    }
    if (st) {
      for (OrtCustomOpDomain* x : d)
        if (x) api->ReleaseCustomOpDomain(x);
      return st;
    }
    onnx = d[0];
    ms = d[1];
    return nullptr;
  }
};
Domains g_domains;
// Set in a SessionOptions once qie's ops are in it: a second registration (which ORT would turn into
// "Domain already set in registry" at every session creation) is then a no-op.
constexpr const char* kRegisteredKey = "qie.custom_ops_registered";
// Set to "0" by qie_ep.register when qie's execution provider is added: the library then registers no
// com.microsoft domain. ORT registers a custom domain at opset 1000, and a model that does not import
// com.microsoft then fails to resolve the com.microsoft nodes ORT's own fusions create (Gelu,
// QLinearSoftmax, ...): with the EP taking the QDQ units, only the ONNX-domain ops stay custom.
constexpr const char* kContribKey = "qie.contrib_ops";
}  // namespace
}  // namespace qie

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  // Negotiate the API version of the headers we were built with. An older runtime returns no API for
  // it; API 1's CreateStatus (the first entry of every OrtApi) still reports why, instead of qie being
  // silently absent.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* api1 = api_base->GetApi(1);
    const std::string msg = std::string("qie needs ONNX Runtime API version >= ") + std::to_string(ORT_API_VERSION) +
                            " (ONNX Runtime 1." + std::to_string(ORT_API_VERSION) + "); this runtime is " +
                            api_base->GetVersionString();
    return api1 ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  qie::g_ort = api;
  if (const char* err = qie::IsaEnvError())
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("qie: ") + err).c_str());
  std::lock_guard<std::mutex> lock(qie::g_domains.mu);
  int registered = 0;
  if (OrtStatus* st = api->HasSessionConfigEntry(options, qie::kRegisteredKey, &registered)) return st;
  if (registered) return nullptr;
  if (OrtStatus* st = qie::g_domains.Make(api)) return st;
  if (OrtStatus* st = api->AddCustomOpDomain(options, qie::g_domains.onnx)) return st;
  char contrib[8] = {0};
  size_t contrib_len = sizeof(contrib);
  int has_contrib = 0;
  if (OrtStatus* st = api->HasSessionConfigEntry(options, qie::kContribKey, &has_contrib)) return st;
  if (has_contrib) {
    if (OrtStatus* st = api->GetSessionConfigEntry(options, qie::kContribKey, contrib, &contrib_len)) {
      api->ReleaseStatus(st);  // a value longer than "0"/"1": keep the default
      contrib[0] = '1';
    }
  }
  if (!has_contrib || std::strcmp(contrib, "0") != 0)
    if (OrtStatus* st = api->AddCustomOpDomain(options, qie::g_domains.ms)) return st;
  return api->AddSessionConfigEntry(options, qie::kRegisteredKey, "1");
}

}  // extern "C"
