// The one registration table of (domain, op) -> adaptor, the OrtCustomOp glue around it, and the
// small exported C API the Python side reads. C++ exceptions become OrtStatus errors that name the
// op and the node.
//
// Input dtypes are declared UNDEFINED (any tensor type): a custom op registered under an ONNX op
// name replaces that op's schema for type checking, so fixed dtypes would make valid int8 models fail
// to load. The adaptors check dtypes themselves and say what is wrong. Output dtypes and shapes come
// from each op's InferOutputShapeFn (shape_infer.cc), which ORT requires for outputs typed by an input.
#include <atomic>
#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "kernels/conv.h"
#include "ops/ops.h"

namespace qie {
const char* IsaEnvError();
double MeasureVnniPeakGops();
ParallelFor ThreadPoolFor(int threads);

namespace {

constexpr auto U = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;

using Factory = std::unique_ptr<Kernel> (*)(const OrtKernelInfo*);

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
      {"", "QLinearMatMul", {U, U, U, U, U, U, U, U}, 8, U, MakeQLinearMatMul, InferQLinearMatMul},
      {"", "MatMulInteger", {U, U, U, U}, 2, U, MakeMatMulInteger, InferMatMulInt32},
      {"com.microsoft", "MatMulIntegerToFloat", {U, U, U, U, U, U, U}, 4, U, MakeMatMulIntegerToFloat, InferMatMulFloat},
      {"com.microsoft", "DynamicQuantizeMatMul", {U, U, U, U, U}, 3, U, MakeDynamicQuantizeMatMul, InferMatMulFloat},
      {"com.microsoft", "QGemm", {U, U, U, U, U, U, U, U, U}, 6, U, MakeQGemm, InferQGemm},
      {"", "QLinearConv", {U, U, U, U, U, U, U, U, U}, 8, U, MakeQLinearConv, InferQLinearConv},
      {"", "ConvInteger", {U, U, U, U}, 2, U, MakeConvInteger, InferConvInteger},
      {"com.microsoft", "QLinearConv", {U, U, U, U, U, U, U, U, U}, 8, U, MakeQLinearConvNhwc, InferQLinearConvNhwc},
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

// For the kernel-level test entries: `threads` std::threads sharing a ParallelFor's tasks.
ParallelFor ThreadPoolFor(int threads) {
  return [threads](size_t total, const std::function<void(size_t)>& fn) {
    std::atomic<size_t> next{0};
    auto worker = [&] { for (size_t i; (i = next.fetch_add(1)) < total;) fn(i); };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
  };
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
  } catch (const std::exception& e) {
    return ErrorStatus(ORT_RUNTIME_EXCEPTION, what, e.what());
  } catch (...) {
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

OrtStatus* ORT_API_CALL InferShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  const QieOp& q = Op(op);
  return Guarded(std::string("qie ") + q.def->name + " (shape inference)", [&] { q.def->infer(ctx); });
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

}  // namespace
}  // namespace qie

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // Negotiate down to the API version of the headers we were built with (ORT >= 1.21 serves it).
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even create a status: ORT older than our headers
  qie::g_ort = api;
  if (const char* err = qie::IsaEnvError()) return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("qie: ") + err).c_str());
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  OrtCustomOpDomain* onnx = nullptr;
  OrtCustomOpDomain* ms = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain("", &onnx)) return st;
  if (OrtStatus* st = api->CreateCustomOpDomain("com.microsoft", &ms)) return st;
  for (auto& op : qie::Ops()) {
    OrtCustomOpDomain* d = std::strcmp(op.def->domain, "") == 0 ? onnx : ms;
    if (OrtStatus* st = api->CustomOpDomain_Add(d, &op)) return st;
  }
  if (OrtStatus* st = api->AddCustomOpDomain(options, onnx)) return st;
  if (OrtStatus* st = api->AddCustomOpDomain(options, ms)) return st;
  // The domains must outlive every session made from these options; they are kept for the process.
  return nullptr;
}

// Writes "domain\top\n" for every (domain, op) the library registers (NUL-terminated, truncated to
// cap); returns the length the full text needs, without the NUL. qie_ep.ops() reads it.
__attribute__((visibility("default"))) size_t qie_ops(char* buf, size_t cap) {
  std::string out;
  for (const qie::OpDef& d : qie::Table()) {
    const std::string line = std::string(d.domain) + "\t" + d.name + "\n";
    if (out.find(line) == std::string::npos) out += line;  // one line per (domain, op), not per opset range
  }
  if (buf && cap) {
    const size_t n = std::min(cap - 1, out.size());
    std::memcpy(buf, out.data(), n);
    buf[n] = '\0';
  }
  return out.size();
}

__attribute__((visibility("default"))) const char* qie_active_isa() { return qie::IsaName(qie::ActiveIsa()); }

__attribute__((visibility("default"))) int qie_isa_supported(const char* name) {
  qie::Isa isa;
  return qie::IsaFromName(name, &isa) && qie::IsaSupported(isa) ? 1 : 0;
}

// Forces the ISA used by kernels from now on (tests, benchmarks). 0 on success, -1 if unknown or
// not supported by this CPU.
__attribute__((visibility("default"))) int qie_force_isa(const char* name) {
  qie::Isa isa;
  if (!qie::IsaFromName(name, &isa) || !qie::ForceIsa(isa)) return -1;
  return 0;
}

// Kernel-level entry for the exhaustive kernel tests: one GEMM on a named ISA path, with `threads`
// std::threads sharing its tasks. Returns 0, or -1 when the ISA is unknown or unsupported here.
__attribute__((visibility("default"))) int qie_test_gemm(
    const char* isa_name, size_t M, size_t N, size_t K, const uint8_t* a, int a_signed, const uint8_t* b,
    int b_signed, const int32_t* za, int za_per_row, const int32_t* zb, const int32_t* bias, ptrdiff_t bias_rs,
    int bias_cs, int out_kind, const float* scale, const float* fbias, int32_t y_zp, void* y, int threads) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::IsaSupported(isa)) return -1;
  const qie::MicroKernel& uk = qie::GetMicroKernel(isa);
  qie::PackedB pb;
  qie::PackB(uk, b, b_signed != 0, K, N, static_cast<ptrdiff_t>(N), 1, &pb);
  const qie::PackedB* bp = &pb;
  qie::GemmArgs g;
  g.M = M; g.N = N; g.K = K;
  g.a = a; g.lda = K; g.a_signed = a_signed != 0;
  g.za = za; g.za_per_row = za_per_row;
  g.zb = zb;
  g.bias = bias; g.bias_rs = bias_rs; g.bias_cs = bias_cs;
  g.kind = static_cast<qie::OutKind>(out_kind);
  g.scale = scale; g.fbias = fbias; g.y_zp = y_zp;
  g.y = y; g.ldy = N;
  g.batch = 1; g.b = &bp;
  qie::Gemm(uk, g, qie::ThreadPoolFor(threads));
  return 0;
}

// Kernel-level entry for the convolution kernel tests: one NHWC convolution on a named ISA path.
// geom: 3 spatial dims each of in, out, k, stride, dil, pad (leading pads), D/H/W order.
__attribute__((visibility("default"))) int qie_test_conv(
    const char* isa_name, size_t batch, size_t C, size_t M, size_t group, const size_t* geom, const uint8_t* x,
    int x_signed, int32_t x_zp, const uint8_t* w, int w_signed, const int32_t* w_zp, const int32_t* bias, int out_kind,
    const float* scale, int32_t y_zp, void* y, int threads) {
  qie::Isa isa;
  if (!qie::IsaFromName(isa_name, &isa) || !qie::IsaSupported(isa)) return -1;
  const qie::MicroKernel& uk = qie::GetMicroKernel(isa);
  qie::ConvShape s;
  s.batch = batch; s.C = C; s.M = M; s.group = group;
  for (int d = 0; d < 3; ++d) {
    s.in[d] = geom[d]; s.out[d] = geom[3 + d]; s.k[d] = geom[6 + d];
    s.stride[d] = geom[9 + d]; s.dil[d] = geom[12 + d]; s.pad[d] = geom[15 + d];
  }
  qie::PackedConv pw;
  qie::PackConv(uk, s, w, w_signed != 0, w_zp, &pw);
  qie::ConvArgs a;
  a.x = x; a.x_signed = x_signed != 0; a.x_zp = x_zp;
  a.w_zp = w_zp; a.bias = bias;
  a.kind = static_cast<qie::OutKind>(out_kind);
  a.scale = scale; a.y_zp = y_zp; a.y = y;
  qie::Conv(uk, s, pw, a, qie::ThreadPoolFor(threads));
  return 0;
}

// Measured single-core vpdpbusd peak (benchmarks); 0 when the CPU lacks AVX-512 VNNI.
__attribute__((visibility("default"))) double qie_bench_vnni_peak_gops() {
  return qie::IsaSupported(qie::Isa::kAvx512Vnni) ? qie::MeasureVnniPeakGops() : 0.0;
}

// DynamicQuantizeLinear as the DynamicQuantizeMatMul kernel applies it (for the reference tests).
__attribute__((visibility("default"))) void qie_test_quantize_dynamic(const float* x, size_t n, float* scale, uint8_t* zp, uint8_t* q) {
  qie::DynamicQuantizeParams(x, n, scale, zp);
  qie::QuantizeLinearU8(x, n, *scale, *zp, q);
}

}  // extern "C"
