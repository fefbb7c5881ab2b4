// Output shape inference for the registered ops (OrtCustomOp::InferOutputShapeFn); the output dtypes
// are declared in the op table (register.cc). Three rules keep ORT's planner and type checker right:
// 1. Never fail on a legal graph. ORT ignores a failing InferOutputShapeFn, so a shape that cannot be
//    inferred (unknown rank, shapes that do not multiply) leaves the output shape unset and the kernel
//    reports real problems at run time, naming the node.
// 2. An unknown rank stays unknown. The C API shows an input of unknown rank as rank 0, and every
//    input these ops read for shapes has rank >= 1 (conv X >= 3), so rank 0 means "unknown here".
// 3. An unknown dimension gets a symbol of its own. ORT's planner treats equal symbols as equal sizes
//    and reuses buffers on that basis; a symbol is shared only when it is the input's own symbol
//    passed through (M of a matmul, N of a conv), never invented twice.
#include <atomic>
#include <string>

#include "ops/conv_core.h"
#include "ops/ops.h"

namespace qie {
namespace {

struct Dim {
  int64_t v = -1;
  std::string sym;
  bool known() const { return v >= 0; }
};
struct TypeShape {
  bool present = false;
  bool ranked = false;  // rank known (and >= 1)
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<Dim> dims;
};

TypeShape InputTS(OrtShapeInferContext* ctx, size_t i) {
  TypeShape ts;
  size_t n = 0;
  ThrowOnError(g_ort->ShapeInferContext_GetInputCount(ctx, &n));
  if (i >= n) return ts;
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context: never released here
  OrtStatus* st = g_ort->ShapeInferContext_GetInputTypeShape(ctx, i, &info);
  if (st || !info) {  // absent optional input
    if (st) g_ort->ReleaseStatus(st);
    return ts;
  }
  size_t rank = 0;
  st = g_ort->GetTensorElementType(info, &ts.type);
  if (!st) st = g_ort->GetDimensionsCount(info, &rank);
  std::vector<int64_t> v(rank);
  std::vector<const char*> s(rank, nullptr);
  if (!st && rank) st = g_ort->GetDimensions(info, v.data(), rank);
  if (!st && rank) st = g_ort->GetSymbolicDimensions(info, s.data(), rank);
  ThrowOnError(st);
  ts.present = ts.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ts.ranked = rank > 0;
  for (size_t d = 0; d < rank; ++d) ts.dims.push_back({v[d], s[d] ? s[d] : ""});
  return ts;
}

int64_t AttrIntCtx(OrtShapeInferContext* ctx, const char* name, int64_t dflt) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_ort->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) {
    if (st) g_ort->ReleaseStatus(st);
    return dflt;
  }
  int64_t v = dflt;
  size_t out = 0;
  ThrowOnError(g_ort->ReadOpAttr(attr, ORT_OP_ATTR_INT, &v, sizeof(v), &out));  // wrong type: no inference
  return v;
}

std::vector<int64_t> AttrIntsCtx(OrtShapeInferContext* ctx, const char* name) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_ort->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) {
    if (st) g_ort->ReleaseStatus(st);
    return {};
  }
  size_t bytes = 0;
  st = g_ort->ReadOpAttr(attr, ORT_OP_ATTR_INTS, nullptr, 0, &bytes);
  if (st) g_ort->ReleaseStatus(st);  // expected: reports the size needed
  std::vector<int64_t> v(bytes / sizeof(int64_t));
  if (v.empty()) return v;
  ThrowOnError(g_ort->ReadOpAttr(attr, ORT_OP_ATTR_INTS, v.data(), v.size() * sizeof(int64_t), &bytes));
  return v;
}

std::string AttrStringCtx(OrtShapeInferContext* ctx, const char* name, const char* dflt) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_ort->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) {
    if (st) g_ort->ReleaseStatus(st);
    return dflt;
  }
  size_t bytes = 0;
  st = g_ort->ReadOpAttr(attr, ORT_OP_ATTR_STRING, nullptr, 0, &bytes);
  if (st) g_ort->ReleaseStatus(st);
  std::string s(bytes, '\0');
  if (bytes) ThrowOnError(g_ort->ReadOpAttr(attr, ORT_OP_ATTR_STRING, s.data(), bytes, &bytes));
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

void SetOutput(OrtShapeInferContext* ctx, ONNXTensorElementDataType type, const std::vector<Dim>& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ThrowOnError(g_ort->CreateTensorTypeAndShapeInfo(&info));
  // ORT writes a dimension as its symbol when it has one, else as its value: unknown dimensions
  // without a symbol get a fresh one (rule 3) so they are not written as -1.
  static std::atomic<uint64_t> fresh{0};
  std::vector<int64_t> v;
  std::vector<std::string> names;
  for (size_t i = 0; i < dims.size(); ++i) {
    v.push_back(dims[i].v);
    names.push_back(dims[i].known()       ? ""
                    : dims[i].sym.empty() ? "qie_unk_" + std::to_string(fresh.fetch_add(1))
                                          : dims[i].sym);
  }
  std::vector<const char*> s;
  for (const auto& n : names) s.push_back(n.c_str());
  OrtStatus* st = g_ort->SetTensorElementType(info, type);
  if (!st) st = g_ort->SetDimensions(info, v.data(), v.size());
  if (!st) st = g_ort->SetSymbolicDimensions(info, s.data(), s.size());
  if (!st) st = g_ort->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  ThrowOnError(st);
}

bool SameDim(const Dim& a, const Dim& b) {
  return a.known() ? b.known() && a.v == b.v : !b.known() && !a.sym.empty() && a.sym == b.sym;
}

std::string DimsStr(const std::vector<Dim>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i)
    s += (i ? "," : "") + (d[i].known() ? std::to_string(d[i].v) : (d[i].sym.empty() ? "?" : d[i].sym));
  return s + "]";
}

std::vector<Dim> MatMulDims(const TypeShape& a, const TypeShape& b) {
  if (a.dims.empty() || b.dims.empty())
    Fail("A and B must have rank >= 1, got A " + DimsStr(a.dims) + " and B " + DimsStr(b.dims));
  const bool a1 = a.dims.size() == 1, b1 = b.dims.size() == 1;
  std::vector<Dim> as = a1 ? std::vector<Dim>{{1, ""}, a.dims[0]} : a.dims;
  std::vector<Dim> bs = b1 ? std::vector<Dim>{b.dims[0], {1, ""}} : b.dims;
  const Dim& ka = as.back();
  const Dim& kb = bs[bs.size() - 2];
  if (ka.known() && kb.known() && ka.v != kb.v)
    Fail("inner dimensions differ: A " + DimsStr(a.dims) + " has K=" + std::to_string(ka.v) + ", B " + DimsStr(b.dims) +
         " has K=" + std::to_string(kb.v));
  std::vector<Dim> ab(as.begin(), as.end() - 2), bb(bs.begin(), bs.end() - 2);
  const size_t r = std::max(ab.size(), bb.size());
  ab.insert(ab.begin(), r - ab.size(), Dim{1, ""});
  bb.insert(bb.begin(), r - bb.size(), Dim{1, ""});
  std::vector<Dim> out;
  for (size_t d = 0; d < r; ++d) {
    if (SameDim(ab[d], bb[d]) || (bb[d].known() && bb[d].v == 1))
      out.push_back(ab[d]);
    else if (ab[d].known() && ab[d].v == 1)
      out.push_back(bb[d]);
    else if (ab[d].known() && bb[d].known())
      Fail("batch dimensions do not broadcast: A " + DimsStr(a.dims) + ", B " + DimsStr(b.dims));
    else
      out.push_back(ab[d].known() ? ab[d] : bb[d].known() ? bb[d] : Dim{});
  }
  if (!a1) out.push_back(as[as.size() - 2]);
  if (!b1) out.push_back(bs.back());
  return out;
}

ONNXTensorElementDataType QuantizedOutputType(const TypeShape& y_zp) {
  return y_zp.present ? y_zp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}

}  // namespace

void InferMatMulShape(OrtShapeInferContext* ctx, size_t a_idx, size_t b_idx, ONNXTensorElementDataType type) {
  const TypeShape a = InputTS(ctx, a_idx), b = InputTS(ctx, b_idx);
  if (!a.ranked || !b.ranked) return;  // rule 2
  SetOutput(ctx, type, MatMulDims(a, b));
}

void InferQLinearMatMul(OrtShapeInferContext* ctx) {
  InferMatMulShape(ctx, 0, 3, QuantizedOutputType(InputTS(ctx, 7)));
}

void InferQGemm(OrtShapeInferContext* ctx) {
  const TypeShape a = InputTS(ctx, 0), b = InputTS(ctx, 3), yzp = InputTS(ctx, 8);
  if (a.dims.size() != 2 || b.dims.size() != 2) return;  // unknown rank, or the kernel reports it
  const bool ta = AttrIntCtx(ctx, "transA", 0) != 0, tb = AttrIntCtx(ctx, "transB", 0) != 0;
  const Dim& m = a.dims[ta ? 1 : 0];
  const Dim& ka = a.dims[ta ? 0 : 1];
  const Dim& kb = b.dims[tb ? 1 : 0];
  const Dim& n = b.dims[tb ? 0 : 1];
  if (ka.known() && kb.known() && ka.v != kb.v)
    Fail("inner dimensions differ: A " + DimsStr(a.dims) + " has K=" + std::to_string(ka.v) + ", B " + DimsStr(b.dims) +
         " has K=" + std::to_string(kb.v));
  SetOutput(ctx, yzp.present ? yzp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {m, n});
}

// Conv: [N, M, out...] (NCHW) or [N, out..., M] (channels_last); unknown spatial dims stay unknown.
void InferConv(OrtShapeInferContext* ctx, size_t w_idx, ONNXTensorElementDataType type, bool nhwc_domain) {
  const TypeShape x = InputTS(ctx, 0), w = InputTS(ctx, w_idx);
  if (!x.ranked || x.dims.size() < 3) return;  // rule 2 (rank 1-2 is the kernel's error to report)
  const bool nhwc = nhwc_domain && AttrIntCtx(ctx, "channels_last", 0) != 0;
  ConvAttrs at;
  at.auto_pad = AttrStringCtx(ctx, "auto_pad", "NOTSET");
  at.kernel_shape = AttrIntsCtx(ctx, "kernel_shape");
  at.pads = AttrIntsCtx(ctx, "pads");
  at.strides = AttrIntsCtx(ctx, "strides");
  at.dilations = AttrIntsCtx(ctx, "dilations");
  at.group = AttrIntCtx(ctx, "group", 1);
  const size_t rank = x.dims.size(), r = rank - 2;
  bool w_known = w.dims.size() == rank;
  std::vector<int64_t> ws;
  for (const Dim& d : w.dims) {
    ws.push_back(d.v);
    w_known = w_known && d.known();
  }
  const Dim m = w.dims.size() == rank ? w.dims[0] : Dim{};
  std::vector<Dim> spatial(r, Dim{});
  if (w_known) {
    const Dim& c = nhwc ? x.dims.back() : x.dims[1];
    const std::vector<int64_t> k = ConvKernelDims(at, static_cast<int64_t>(rank), c.known() ? c.v : -1, ws);
    std::vector<int64_t> in;
    for (size_t i = 0; i < r; ++i) in.push_back(x.dims[nhwc ? i + 1 : i + 2].v);
    std::vector<int64_t> out, pad;
    ConvGeometry(at, in, k, &out, &pad);
    for (size_t i = 0; i < r; ++i)
      if (out[i] >= 0) spatial[i] = Dim{out[i], ""};
  }
  std::vector<Dim> out_dims{x.dims[0]};
  if (!nhwc) out_dims.push_back(m);
  out_dims.insert(out_dims.end(), spatial.begin(), spatial.end());
  if (nhwc) out_dims.push_back(m);
  SetOutput(ctx, type, out_dims);
}

void InferQLinearConv(OrtShapeInferContext* ctx) { InferConv(ctx, 3, QuantizedOutputType(InputTS(ctx, 7)), false); }
void InferQLinearConvNhwc(OrtShapeInferContext* ctx) { InferConv(ctx, 3, QuantizedOutputType(InputTS(ctx, 7)), true); }
void InferConvInteger(OrtShapeInferContext* ctx) { InferConv(ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, false); }

}  // namespace qie
