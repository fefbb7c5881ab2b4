// Output dtype and shape inference for the registered ops (OrtCustomOp::InferOutputShapeFn).
// ORT needs it to type the outputs whose dtype follows an input (QLinearMatMul, QGemm: y_zero_point's
// dtype, or float when QGemm has none); the shapes let later nodes be planned. Unknown dimensions
// stay symbolic. Shapes that cannot multiply or convolve raise here too, but ORT 1.31 ignores a failing
// InferOutputShapeFn (the session loads, the output shape unknown): the kernels report them at run time.
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
  for (size_t d = 0; d < rank; ++d) ts.dims.push_back({v[d], s[d] ? s[d] : ""});
  return ts;
}

int64_t AttrIntCtx(OrtShapeInferContext* ctx, const char* name, int64_t dflt) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_ort->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) { if (st) g_ort->ReleaseStatus(st); return dflt; }
  int64_t v = dflt;
  size_t out = 0;
  st = g_ort->ReadOpAttr(attr, ORT_OP_ATTR_INT, &v, sizeof(v), &out);
  if (st) { g_ort->ReleaseStatus(st); return dflt; }
  return v;
}

std::vector<int64_t> AttrIntsCtx(OrtShapeInferContext* ctx, const char* name) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_ort->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) { if (st) g_ort->ReleaseStatus(st); return {}; }
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
  if (st || !attr) { if (st) g_ort->ReleaseStatus(st); return dflt; }
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
  // without a symbol get a fresh one so they are not written as -1.
  std::vector<int64_t> v;
  std::vector<std::string> names;
  for (size_t i = 0; i < dims.size(); ++i) {
    v.push_back(dims[i].v);
    names.push_back(dims[i].known() ? "" : dims[i].sym.empty() ? "qie_unk_" + std::to_string(i) : dims[i].sym);
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

bool SameDim(const Dim& a, const Dim& b) { return a.known() ? b.known() && a.v == b.v : !b.known() && !a.sym.empty() && a.sym == b.sym; }

std::string DimsStr(const std::vector<Dim>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + (d[i].known() ? std::to_string(d[i].v) : (d[i].sym.empty() ? "?" : d[i].sym));
  return s + "]";
}

std::vector<Dim> MatMulDims(const TypeShape& a, const TypeShape& b) {
  if (a.dims.empty() || b.dims.empty()) Fail("A and B must have rank >= 1, got A " + DimsStr(a.dims) + " and B " + DimsStr(b.dims));
  const bool a1 = a.dims.size() == 1, b1 = b.dims.size() == 1;
  std::vector<Dim> as = a1 ? std::vector<Dim>{{1, ""}, a.dims[0]} : a.dims;
  std::vector<Dim> bs = b1 ? std::vector<Dim>{b.dims[0], {1, ""}} : b.dims;
  const Dim& ka = as.back();
  const Dim& kb = bs[bs.size() - 2];
  if (ka.known() && kb.known() && ka.v != kb.v)
    Fail("inner dimensions differ: A " + DimsStr(a.dims) + " has K=" + std::to_string(ka.v) + ", B " + DimsStr(b.dims) + " has K=" + std::to_string(kb.v));
  std::vector<Dim> ab(as.begin(), as.end() - 2), bb(bs.begin(), bs.end() - 2);
  const size_t r = std::max(ab.size(), bb.size());
  ab.insert(ab.begin(), r - ab.size(), Dim{1, ""});
  bb.insert(bb.begin(), r - bb.size(), Dim{1, ""});
  std::vector<Dim> out;
  for (size_t d = 0; d < r; ++d) {
    if (SameDim(ab[d], bb[d]) || (bb[d].known() && bb[d].v == 1)) out.push_back(ab[d]);
    else if (ab[d].known() && ab[d].v == 1) out.push_back(bb[d]);
    else if (ab[d].known() && bb[d].known()) Fail("batch dimensions do not broadcast: A " + DimsStr(a.dims) + ", B " + DimsStr(b.dims));
    else out.push_back(ab[d].known() ? ab[d] : bb[d].known() ? bb[d] : Dim{});
  }
  if (!a1) out.push_back(as[as.size() - 2]);
  if (!b1) out.push_back(bs.back());
  return out;
}

}  // namespace

void InferMatMulShape(OrtShapeInferContext* ctx, size_t a_idx, size_t b_idx, ONNXTensorElementDataType type) {
  const TypeShape a = InputTS(ctx, a_idx), b = InputTS(ctx, b_idx);
  SetOutput(ctx, type, MatMulDims(a, b));
}

void InferQLinearMatMul(OrtShapeInferContext* ctx) {
  const TypeShape yzp = InputTS(ctx, 7);
  InferMatMulShape(ctx, 0, 3, yzp.present ? yzp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
}

void InferQGemm(OrtShapeInferContext* ctx) {
  const TypeShape a = InputTS(ctx, 0), b = InputTS(ctx, 3), yzp = InputTS(ctx, 8);
  if (a.dims.size() != 2 || b.dims.size() != 2) Fail("A and B must be 2-D, got A " + DimsStr(a.dims) + " and B " + DimsStr(b.dims));
  const bool ta = AttrIntCtx(ctx, "transA", 0) != 0, tb = AttrIntCtx(ctx, "transB", 0) != 0;
  const Dim& m = a.dims[ta ? 1 : 0];
  const Dim& ka = a.dims[ta ? 0 : 1];
  const Dim& kb = b.dims[tb ? 1 : 0];
  const Dim& n = b.dims[tb ? 0 : 1];
  if (ka.known() && kb.known() && ka.v != kb.v)
    Fail("inner dimensions differ: A " + DimsStr(a.dims) + " has K=" + std::to_string(ka.v) + ", B " + DimsStr(b.dims) + " has K=" + std::to_string(kb.v));
  SetOutput(ctx, yzp.present ? yzp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {m, n});
}

// Conv: [N, M, out...] (NCHW) or [N, out..., M] (channels_last); unknown spatial dims stay unknown.
void InferConv(OrtShapeInferContext* ctx, size_t w_idx, ONNXTensorElementDataType type, bool nhwc_domain) {
  const TypeShape x = InputTS(ctx, 0), w = InputTS(ctx, w_idx);
  const bool nhwc = nhwc_domain && AttrIntCtx(ctx, "channels_last", 0) != 0;
  ConvAttrs at;
  at.auto_pad = AttrStringCtx(ctx, "auto_pad", "NOTSET");
  at.kernel_shape = AttrIntsCtx(ctx, "kernel_shape");
  at.pads = AttrIntsCtx(ctx, "pads");
  at.strides = AttrIntsCtx(ctx, "strides");
  at.dilations = AttrIntsCtx(ctx, "dilations");
  at.group = AttrIntCtx(ctx, "group", 1);
  const int64_t rank = static_cast<int64_t>(x.dims.size());
  std::vector<Dim> out_dims;
  bool w_known = !w.dims.empty();
  std::vector<int64_t> ws;
  for (const Dim& d : w.dims) { ws.push_back(d.v); w_known = w_known && d.known(); }
  if (rank == 0 || !w_known) {  // shapes not known yet: dtype only
    if (rank == 0) { SetOutput(ctx, type, {}); return; }
    out_dims.assign(static_cast<size_t>(rank), Dim{});
    out_dims[0] = x.dims[0];
    SetOutput(ctx, type, out_dims);
    return;
  }
  const Dim& c = nhwc ? x.dims.back() : x.dims.size() > 1 ? x.dims[1] : Dim{};
  const std::vector<int64_t> k = ConvKernelDims(at, rank, c.known() ? c.v : -1, ws);
  std::vector<int64_t> in;
  for (size_t i = 0; i + 2 < x.dims.size(); ++i) in.push_back(x.dims[nhwc ? i + 1 : i + 2].v);
  std::vector<int64_t> out, pad;
  ConvGeometry(at, in, k, &out, &pad);
  out_dims.push_back(x.dims[0]);
  if (!nhwc) out_dims.push_back({ws[0], ""});
  for (int64_t o : out) out_dims.push_back({o, ""});
  if (nhwc) out_dims.push_back({ws[0], ""});
  SetOutput(ctx, type, out_dims);
}

void InferQLinearConv(OrtShapeInferContext* ctx) {
  const TypeShape yzp = InputTS(ctx, 7);
  InferConv(ctx, 3, yzp.present ? yzp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, false);
}
void InferQLinearConvNhwc(OrtShapeInferContext* ctx) {
  const TypeShape yzp = InputTS(ctx, 7);
  InferConv(ctx, 3, yzp.present ? yzp.type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true);
}
void InferConvInteger(OrtShapeInferContext* ctx) { InferConv(ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, false); }

}  // namespace qie
