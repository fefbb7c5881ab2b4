// Reading ORT's graph API for the plugin EP: status/exception bridging, node and value accessors, constant
// initializers, attributes, and the DequantizeLinear operands every QDQ unit matcher shares. No matching
// policy here (units: qie_ep.cc, region.cc).
#pragma once
#include <onnxruntime_c_api.h>  // includes onnxruntime_ep_c_api.h

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/gemm.h"

namespace qie_ep {

inline const OrtApi* g_api = nullptr;
inline const OrtEpApi* g_ep = nullptr;

struct Failure {
  std::string what;
};
inline void Check(OrtStatus* st) {
  if (!st) return;
  std::string msg = g_api->GetErrorMessage(st);
  g_api->ReleaseStatus(st);
  throw Failure{msg};
}
template <class F>
inline OrtStatus* Guard(const char* where, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const Failure& f) {
    return g_api->CreateStatus(ORT_FAIL, (std::string("qie EP ") + where + ": " + f.what).c_str());
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, (std::string("qie EP ") + where + ": " + e.what()).c_str());
  }
}

// ---- graph reading ----------------------------------------------------------------------------------------

inline std::string OpType(const OrtNode* n) {
  const char* s = nullptr;
  Check(g_api->Node_GetOperatorType(n, &s));
  return s ? s : "";
}
inline std::string Domain(const OrtNode* n) {
  const char* s = nullptr;
  Check(g_api->Node_GetDomain(n, &s));
  return s ? s : "";
}
inline std::string NodeName(const OrtNode* n) {
  const char* s = nullptr;
  Check(g_api->Node_GetName(n, &s));
  return s ? s : "";
}
// A node's inputs or outputs through the API's count / fill pair.
template <class Count, class Fill>
inline std::vector<const OrtValueInfo*> ValueInfos(const OrtNode* n, Count count, Fill fill) {
  size_t k = 0;
  Check(count(n, &k));
  std::vector<const OrtValueInfo*> v(k);
  if (k) Check(fill(n, v.data(), k));
  return v;
}
inline std::vector<const OrtValueInfo*> Inputs(const OrtNode* n) {
  return ValueInfos(n, g_api->Node_GetNumInputs, g_api->Node_GetInputs);
}
inline std::vector<const OrtValueInfo*> Outputs(const OrtNode* n) {
  return ValueInfos(n, g_api->Node_GetNumOutputs, g_api->Node_GetOutputs);
}
inline const OrtNode* Producer(const OrtValueInfo* vi) {
  const OrtNode* n = nullptr;
  size_t idx = 0;
  Check(g_api->ValueInfo_GetValueProducer(vi, &n, &idx));
  return n;
}
inline size_t Consumers(const OrtValueInfo* vi) {
  size_t k = 0;
  Check(g_api->ValueInfo_GetValueNumConsumers(vi, &k));
  return k;
}
// A value the graph receives (at Compile, a fused graph's value produced outside it: it has no producer there).
inline bool IsRequiredGraphInput(const OrtValueInfo* vi) {
  bool b = false;
  Check(g_api->ValueInfo_IsRequiredGraphInput(vi, &b));
  return b;
}
inline bool IsGraphOutput(const OrtValueInfo* vi) {
  bool b = false;
  Check(g_api->ValueInfo_IsGraphOutput(vi, &b));
  return b;
}
inline std::string Name(const OrtValueInfo* vi) {
  const char* s = nullptr;
  Check(g_api->GetValueInfoName(vi, &s));
  return s ? s : "";
}
// The position of `v` (by name) among a fused node's inputs or outputs `vs`, or -1.
inline int IndexByName(const std::vector<const OrtValueInfo*>& vs, const OrtValueInfo* v) {
  for (size_t i = 0; i < vs.size(); ++i)
    if (vs[i] && Name(vs[i]) == Name(v)) return static_cast<int>(i);
  return -1;
}
// The fused node's input (or output) holding `v`, which it must have.
inline int FusedInput(const OrtNode* fused, const OrtValueInfo* v) {
  const int i = IndexByName(Inputs(fused), v);
  if (i < 0) throw Failure{"fused node has no input '" + Name(v) + "'"};
  return i;
}
inline int FusedOutput(const OrtNode* fused, const OrtValueInfo* v) {
  const int i = IndexByName(Outputs(fused), v);
  if (i < 0) throw Failure{"fused node has no output '" + Name(v) + "'"};
  return i;
}

// Optional node input i (absent, or the empty name of an omitted optional input) -> nullptr.
inline const OrtValueInfo* Input(const std::vector<const OrtValueInfo*>& in, size_t i) {
  return i < in.size() && in[i] && !Name(in[i]).empty() ? in[i] : nullptr;
}

// A constant initializer's element type, shape and data (nullptr when `vi` is not a constant initializer).
struct Constant {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t count() const {
    size_t c = 1;
    for (int64_t d : shape) c *= static_cast<size_t>(d);
    return c;
  }
};
inline bool ReadConstant(const OrtValueInfo* vi, Constant* out) {
  if (!vi) return false;
  bool is_const = false;
  Check(g_api->ValueInfo_IsConstantInitializer(vi, &is_const));
  if (!is_const) return false;
  const OrtValue* v = nullptr;
  Check(g_api->ValueInfo_GetInitializerValue(vi, &v));
  if (!v) return false;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &out->type);
  if (!st) st = g_api->GetDimensionsCount(info, &rank);
  out->shape.assign(rank, 0);
  if (!st && rank) st = g_api->GetDimensions(info, out->shape.data(), rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  Check(st);
  for (int64_t d : out->shape)
    if (d < 0) return false;
  Check(g_api->GetTensorData(v, &out->data));
  return true;
}
// A value's tensor type info (owned by the graph; nullptr when the value is not a tensor).
inline const OrtTensorTypeAndShapeInfo* TensorInfo(const OrtValueInfo* vi) {
  const OrtTypeInfo* ti = nullptr;
  Check(g_api->GetValueInfoTypeInfo(vi, &ti));
  const OrtTensorTypeAndShapeInfo* tsi = nullptr;
  Check(g_api->CastTypeInfoToTensorInfo(ti, &tsi));
  return tsi;
}
inline ONNXTensorElementDataType ValueType(const OrtValueInfo* vi) {
  const OrtTensorTypeAndShapeInfo* tsi = TensorInfo(vi);
  if (!tsi) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Check(g_api->GetTensorElementType(tsi, &t));
  return t;
}
// The rank of a tensor value from its type info, or -1 when the shape is unknown.
inline int64_t ValueRank(const OrtValueInfo* vi) {
  const OrtTensorTypeAndShapeInfo* tsi = TensorInfo(vi);
  if (!tsi) return -1;
  size_t rank = 0;
  if (OrtStatus* st = g_api->GetDimensionsCount(tsi, &rank)) {
    g_api->ReleaseStatus(st);
    return -1;
  }
  return static_cast<int64_t>(rank);
}
// A tensor value's dims from its type info, -1 where unknown or symbolic; empty when the rank is unknown.
inline std::vector<int64_t> StaticDims(const OrtValueInfo* vi) {
  const OrtTensorTypeAndShapeInfo* tsi = vi ? TensorInfo(vi) : nullptr;
  size_t rank = 0;
  if (!tsi) return {};
  if (OrtStatus* st = g_api->GetDimensionsCount(tsi, &rank)) {
    g_api->ReleaseStatus(st);
    return {};
  }
  std::vector<int64_t> dims(rank);
  if (rank) Check(g_api->GetDimensions(tsi, dims.data(), rank));
  return dims;
}
// Whether two tensor values provably have one shape: known ranks, and per axis the same fixed size or the same
// (named) symbol, which ORT's shape inference gives only to equal sizes.
inline bool SameShape(const OrtValueInfo* a, const OrtValueInfo* b) {
  auto read = [](const OrtValueInfo* vi, std::vector<int64_t>* dims, std::vector<std::string>* syms) {
    const OrtTensorTypeAndShapeInfo* tsi = TensorInfo(vi);
    size_t rank = 0;
    if (!tsi) return false;
    if (OrtStatus* st = g_api->GetDimensionsCount(tsi, &rank)) {
      g_api->ReleaseStatus(st);
      return false;
    }
    dims->resize(rank);
    std::vector<const char*> names(rank, nullptr);
    if (rank) {
      Check(g_api->GetDimensions(tsi, dims->data(), rank));
      Check(g_api->GetSymbolicDimensions(tsi, names.data(), rank));
    }
    for (const char* n : names) syms->push_back(n ? n : "");
    return true;
  };
  std::vector<int64_t> da, db;
  std::vector<std::string> sa, sb;
  if (!read(a, &da, &sa) || !read(b, &db, &sb) || da.size() != db.size()) return false;
  for (size_t i = 0; i < da.size(); ++i) {
    const bool fixed = da[i] >= 0 && da[i] == db[i];
    const bool symbol = da[i] < 0 && db[i] < 0 && !sa[i].empty() && sa[i] == sb[i];
    if (!fixed && !symbol) return false;
  }
  return true;
}
// ONNX Shape's output for dims `d`: d[start:end], each bound made non-negative and clamped to the rank.
inline std::vector<int64_t> ShapeSlice(const std::vector<int64_t>& d, int64_t start, int64_t end) {
  const auto r = static_cast<int64_t>(d.size());
  int64_t s = start < 0 ? start + r : start, e = end < 0 ? end + r : end;
  s = std::min(std::max<int64_t>(s, 0), r);
  e = std::min(std::max<int64_t>(e, 0), r);
  return std::vector<int64_t>(d.begin() + s, d.begin() + std::max(s, e));
}
// Fused-node output `index` as an int64 tensor of `shape` holding `values`.
inline void Int64Output(OrtKernelContext* ctx, int index, const std::vector<int64_t>& shape,
                        const std::vector<int64_t>& values) {
  OrtValue* v = nullptr;
  Check(g_api->KernelContext_GetOutput(ctx, static_cast<size_t>(index), shape.data(), shape.size(), &v));
  void* p = nullptr;
  Check(g_api->GetTensorMutableData(v, &p));
  if (!values.empty()) std::memcpy(p, values.data(), values.size() * sizeof(int64_t));
}

// A run-time tensor's shape.
inline std::vector<int64_t> TensorShape(const OrtValue* v) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(g_api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> shape(rank);
  if (!st && rank) st = g_api->GetDimensions(info, shape.data(), rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  Check(st);
  return shape;
}
// Attribute `name` of node `n` read as `type` (ORT_OP_ATTR_INT into int64_t, ORT_OP_ATTR_FLOAT into float), or
// `dflt` when the node has no such attribute. A wrong type is an error (the unit is then left to ORT).
template <class T>
inline T Attr(const OrtNode* n, const char* name, OrtOpAttrType type, T dflt) {
  const OrtOpAttr* a = nullptr;
  if (OrtStatus* st = g_api->Node_GetAttributeByName(n, name, &a)) {  // not found
    g_api->ReleaseStatus(st);
    return dflt;
  }
  if (!a) return dflt;
  T v = dflt;
  size_t size = 0;
  Check(g_api->ReadOpAttr(a, type, &v, sizeof(v), &size));
  return v;
}
inline int64_t AttrInt(const OrtNode* n, const char* name, int64_t dflt) {
  return Attr(n, name, ORT_OP_ATTR_INT, dflt);
}
inline float AttrFloat(const OrtNode* n, const char* name, float dflt) {
  return Attr(n, name, ORT_OP_ATTR_FLOAT, dflt);
}

inline bool IsQ8(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
}
inline int32_t Zp(const Constant& c, size_t i) {
  return c.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 ? static_cast<const int8_t*>(c.data)[i]
                                                      : static_cast<const uint8_t*>(c.data)[i];
}

// Attribute `name` as a list of ints (empty when absent).
inline std::vector<int64_t> AttrInts(const OrtNode* n, const char* name) {
  const OrtOpAttr* a = nullptr;
  if (OrtStatus* st = g_api->Node_GetAttributeByName(n, name, &a)) {
    g_api->ReleaseStatus(st);
    return {};
  }
  if (!a) return {};
  size_t size = 0;
  if (OrtStatus* st = g_api->ReadOpAttr(a, ORT_OP_ATTR_INTS, nullptr, 0, &size)) g_api->ReleaseStatus(st);
  std::vector<int64_t> v(size / sizeof(int64_t) + 1);
  Check(g_api->ReadOpAttr(a, ORT_OP_ATTR_INTS, v.data(), v.size() * sizeof(int64_t), &size));
  v.resize(size / sizeof(int64_t));
  return v;
}
// Attribute `name` as a string (`dflt` when absent).
inline std::string AttrString(const OrtNode* n, const char* name, const std::string& dflt) {
  const OrtOpAttr* a = nullptr;
  if (OrtStatus* st = g_api->Node_GetAttributeByName(n, name, &a)) {
    g_api->ReleaseStatus(st);
    return dflt;
  }
  if (!a) return dflt;
  size_t size = 0;
  if (OrtStatus* st = g_api->ReadOpAttr(a, ORT_OP_ATTR_STRING, nullptr, 0, &size)) g_api->ReleaseStatus(st);
  std::string s(size, '\0');
  Check(g_api->ReadOpAttr(a, ORT_OP_ATTR_STRING, s.data(), s.size(), &size));
  s.resize(size);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}
// The one consumer of `vi` (nullptr unless it has exactly one and is not a graph output), and the input index.
inline const OrtNode* SoleConsumer(const OrtValueInfo* vi, int64_t* index = nullptr) {
  if (IsGraphOutput(vi) || Consumers(vi) != 1) return nullptr;
  const OrtNode* c = nullptr;
  int64_t i = 0;
  Check(g_api->ValueInfo_GetValueConsumers(vi, &c, &i, 1));
  if (index) *index = i;
  return c;
}
// Every consumer of `vi`.
inline std::vector<const OrtNode*> AllConsumers(const OrtValueInfo* vi) {
  const size_t k = Consumers(vi);
  std::vector<const OrtNode*> c(k);
  std::vector<int64_t> idx(k);
  if (k) Check(g_api->ValueInfo_GetValueConsumers(vi, c.data(), idx.data(), k));
  return c;
}
inline bool IsOp(const OrtNode* n, const char* type) { return n && Domain(n).empty() && OpType(n) == type; }
inline bool Assigned(const OrtNode* n) {
  const char* e = nullptr;
  Check(g_api->Node_GetEpName(n, &e));
  return e && *e;
}
// Per-tensor QuantizeLinear q (float32 scale, u8/s8 zero point, all constant, saturating, not blocked).
inline bool QOperands(const OrtNode* q, Constant* sy, Constant* zy) {
  if (!IsOp(q, "QuantizeLinear")) return false;
  if (AttrInt(q, "block_size", 0) != 0 || AttrInt(q, "saturate", 1) != 1) return false;
  const auto qin = Inputs(q);
  if (qin.size() < 3 || !ReadConstant(qin[1], sy) || sy->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      sy->count() != 1 || !ReadConstant(Input(qin, 2), zy) || !IsQ8(zy->type) || zy->count() != 1)
    return false;
  const float s = static_cast<const float*>(sy->data)[0];
  return std::isfinite(s) && s != 0.0f;
}

// DequantizeLinear node producing `vi` with a per-tensor (or, when `per_column_n` > 0, per-channel along
// `channel_axis` of a 2-D input) float32 scale and a matching zero point, all constant except the data when
// `data_runtime`.
inline bool DqOperands(const OrtNode* dq, bool data_runtime, size_t per_column_n, Constant* data, Constant* scale,
                       Constant* zp, ONNXTensorElementDataType* data_type, int64_t channel_axis = 1) {
  if (!dq || OpType(dq) != "DequantizeLinear" || !Domain(dq).empty()) return false;
  if (AttrInt(dq, "block_size", 0) != 0) return false;
  const auto in = Inputs(dq);
  if (in.size() < 2 || !in[0]) return false;
  *data_type = ValueType(in[0]);
  if (!IsQ8(*data_type)) return false;
  if (data_runtime) {
    Constant c;
    if (ReadConstant(in[0], &c)) return false;  // a constant activation: leave it to ORT's constant folding
  } else if (!ReadConstant(in[0], data)) {
    return false;
  }
  if (!ReadConstant(in[1], scale) || scale->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return false;
  const size_t ns = scale->count();
  if (ns != 1 && !(per_column_n && ns == per_column_n)) return false;
  if (ns > 1) {
    const int64_t axis = AttrInt(dq, "axis", 1);
    if (axis != channel_axis && axis != channel_axis - 2) return false;
  }
  if (const OrtValueInfo* z = Input(in, 2)) {
    if (!ReadConstant(z, zp) || zp->type != *data_type || zp->count() != ns) return false;
  } else {
    zp->type = *data_type;
    zp->data = nullptr;
  }
  return true;
}

// A bias (Gemm's C, Conv's B) as DequantizeLinear(int32 [N], scale == sx * sw[n] in float32, zero point 0): the
// int32 bias the integer accumulator takes (what ORT's QGemm / QLinearConv do with it). Fills `bias`; false for any
// other C.
inline bool Int32Bias(const OrtNode* dq_b, size_t n, const Constant& sx, const Constant& sw,
                      std::vector<int32_t>* bias) {
  if (!dq_b || OpType(dq_b) != "DequantizeLinear" || !Domain(dq_b).empty()) return false;
  const auto in = Inputs(dq_b);
  Constant b, sb, zb;
  if (in.size() < 2 || !ReadConstant(in[0], &b) || b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || b.count() != n)
    return false;
  if (!ReadConstant(in[1], &sb) || sb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      (sb.count() != 1 && sb.count() != n))
    return false;
  if (const OrtValueInfo* z = Input(in, 2)) {
    if (!ReadConstant(z, &zb) || zb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) return false;
    for (size_t i = 0; i < zb.count(); ++i)
      if (static_cast<const int32_t*>(zb.data)[i] != 0) return false;
  }
  const float fsx = static_cast<const float*>(sx.data)[0];
  for (size_t j = 0; j < n; ++j) {
    const float want = fsx * static_cast<const float*>(sw.data)[sw.count() == 1 ? 0 : j];
    if (static_cast<const float*>(sb.data)[sb.count() == 1 ? 0 : j] != want) return false;
  }
  bias->assign(static_cast<const int32_t*>(b.data), static_cast<const int32_t*>(b.data) + n);
  return true;
}

inline void ParallelTrampoline(void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); }
// ORT's intra-op pool (the fused node's kernel context) as the kernel layer's ParallelFor.
inline qie::ParallelFor CtxParallelFor(OrtKernelContext* ctx) {
  return [ctx](size_t total, const std::function<void(size_t)>& fn) {
    if (total == 1) return fn(0);
    Check(g_api->KernelContext_ParallelFor(ctx, ParallelTrampoline, total, 0,
                                           const_cast<std::function<void(size_t)>*>(&fn)));
  };
}

}  // namespace qie_ep
