// Implementation of the ORT adaptor helpers declared in common.h.
#include "ops/common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace qie {

const OrtApi* g_ort = nullptr;

void Fail(const std::string& msg) { throw OpError(msg); }

void ThrowOnError(OrtStatus* st) {
  if (!st) return;
  std::string msg = g_ort->GetErrorMessage(st);
  g_ort->ReleaseStatus(st);
  throw std::runtime_error(msg);
}

std::string DtypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    default: return "dtype#" + std::to_string(static_cast<int>(t));
  }
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? "," : "") << s[i];
  o << "]";
  return o.str();
}

int64_t Tensor::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Tensor TensorOf(const OrtValue* v) {
  Tensor t;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ThrowOnError(g_ort->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_ort->GetTensorElementType(info, &t.type);
  if (!st) st = g_ort->GetDimensionsCount(info, &rank);
  if (!st) {
    t.shape.resize(rank);
    st = g_ort->GetDimensions(info, t.shape.data(), rank);
  }
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  ThrowOnError(st);
  void* data = nullptr;
  ThrowOnError(g_ort->GetTensorMutableData(const_cast<OrtValue*>(v), &data));
  t.data = data;
  return t;
}

std::optional<Tensor> Input(OrtKernelContext* ctx, size_t i) {
  size_t n = 0;
  ThrowOnError(g_ort->KernelContext_GetInputCount(ctx, &n));
  if (i >= n) return std::nullopt;
  const OrtValue* v = nullptr;
  ThrowOnError(g_ort->KernelContext_GetInput(ctx, i, &v));
  if (!v) return std::nullopt;
  return TensorOf(v);
}

Tensor RequiredInput(OrtKernelContext* ctx, size_t i, const char* name) {
  auto t = Input(ctx, i);
  if (!t) Fail(std::string("required input ") + name + " is missing");
  return *t;
}

void* Output(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& shape, OutKind kind) {
  ONNXTensorElementDataType want = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  switch (kind) {
    case OutKind::kInt32: want = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; break;
    case OutKind::kFloat: want = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; break;
    case OutKind::kU8: want = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8; break;
    case OutKind::kS8: want = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8; break;
  }
  OrtValue* v = nullptr;
  ThrowOnError(g_ort->KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &v));
  if (!v) Fail("ONNX Runtime gave no buffer for output " + std::to_string(i));
  const Tensor t = TensorOf(v);
  // The last line of defence against writing past a buffer: ORT sizes it by the dtype it inferred.
  if (t.type != want)
    Fail("output " + std::to_string(i) + " was typed " + DtypeName(t.type) + " by the graph but this op computes " +
         DtypeName(want) + "; the model's type information for this node is inconsistent");
  if (t.shape != shape)
    Fail("output " + std::to_string(i) + " has shape " + ShapeStr(t.shape) + ", expected " + ShapeStr(shape));
  return const_cast<void*>(t.data);
}

std::optional<Tensor> ConstantInput(const OrtKernelInfo* info, size_t i) {
  size_t n = 0;
  ThrowOnError(g_ort->KernelInfo_GetInputCount(info, &n));
  if (i >= n) return std::nullopt;
  int is_const = 0;
  const OrtValue* v = nullptr;
  OrtStatus* st = g_ort->KernelInfoGetConstantInput_tensor(info, i, &is_const, &v);
  if (st) {  // an absent optional input reports an error here: treat as not constant
    g_ort->ReleaseStatus(st);
    return std::nullopt;
  }
  if (!is_const || !v) return std::nullopt;
  return TensorOf(v);
}

namespace {
// Attribute kinds as the kernel-info API can read them; used to tell "absent" (take the default) from
// "present with another type" (an error, as ORT's own schemas make it).
bool StatusOk(OrtStatus* st) {
  if (!st) return true;
  g_ort->ReleaseStatus(st);
  return false;
}
const char* PresentKindOtherThan(const OrtKernelInfo* info, const char* name, const char* want) {
  int64_t i = 0;
  float f = 0;
  size_t n = 0;
  if (std::strcmp(want, "an int") != 0 && StatusOk(g_ort->KernelInfoGetAttribute_int64(info, name, &i)))
    return "an int";
  if (std::strcmp(want, "a float") != 0 && StatusOk(g_ort->KernelInfoGetAttribute_float(info, name, &f)))
    return "a float";
  if (std::strcmp(want, "a string") != 0 && StatusOk(g_ort->KernelInfoGetAttribute_string(info, name, nullptr, &n)))
    return "a string";
  // ORT's list getters do not check the attribute's type (any attribute reads as an empty list), so a
  // list counts as present only when it has elements.
  if (std::strcmp(want, "a list of ints") != 0 &&
      StatusOk(g_ort->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) && n)
    return "a list of ints";
  n = 0;
  if (StatusOk(g_ort->KernelInfoGetAttributeArray_float(info, name, nullptr, &n)) && n) return "a list of floats";
  return nullptr;
}
// Called when reading `name` as `want` failed: absent is fine, any other type is the user's error.
void RequireAbsent(const OrtKernelInfo* info, const char* name, const char* want) {
  if (const char* got = PresentKindOtherThan(info, name, want))
    Fail(std::string("attribute '") + name + "' must be " + want + ", got " + got);
}
}  // namespace

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  if (StatusOk(g_ort->KernelInfoGetAttribute_int64(info, name, &v))) return v;
  RequireAbsent(info, name, "an int");
  return dflt;
}

float AttrFloat(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  if (StatusOk(g_ort->KernelInfoGetAttribute_float(info, name, &v))) return v;
  RequireAbsent(info, name, "a float");
  return dflt;
}

std::optional<std::vector<int64_t>> AttrInts(const OrtKernelInfo* info, const char* name) {
  size_t n = 0;
  if (!StatusOk(g_ort->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n))) {
    RequireAbsent(info, name, "a list of ints");
    return std::nullopt;
  }
  if (n == 0) RequireAbsent(info, name, "a list of ints");  // an empty list, or another type read as one
  std::vector<int64_t> v(n);
  if (n) ThrowOnError(g_ort->KernelInfoGetAttributeArray_int64(info, name, v.data(), &n));
  return v;
}

std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  size_t n = 0;
  if (!StatusOk(g_ort->KernelInfoGetAttribute_string(info, name, nullptr, &n))) {
    RequireAbsent(info, name, "a string");
    return dflt;
  }
  std::string s(n, '\0');
  ThrowOnError(g_ort->KernelInfoGetAttribute_string(info, name, s.data(), &n));
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string NodeName(const OrtKernelInfo* info) {
  size_t n = 0;
  OrtStatus* st = g_ort->KernelInfo_GetNodeName(info, nullptr, &n);
  if (st) {
    g_ort->ReleaseStatus(st);
    return "";
  }
  std::string s(n, '\0');
  st = g_ort->KernelInfo_GetNodeName(info, s.data(), &n);
  if (st) {
    g_ort->ReleaseStatus(st);
    return "";
  }
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

namespace {
struct PforCall {
  const std::function<void(size_t)>* fn;
};
void PforTrampoline(void* data, size_t i) { (*static_cast<PforCall*>(data)->fn)(i); }
}  // namespace

ParallelFor OrtParallelFor(OrtKernelContext* ctx) {
  return [ctx](size_t total, const std::function<void(size_t)>& fn) {
    PforCall call{&fn};
    ThrowOnError(g_ort->KernelContext_ParallelFor(ctx, PforTrampoline, total, 0, &call));
  };
}

void RequireInt8Type(const Tensor& t, const char* what) {
  if (!t.is_int8() && !t.is_uint8()) Fail(std::string(what) + " must be uint8 or int8, got " + DtypeName(t.type));
}

void RequireType(const Tensor& t, ONNXTensorElementDataType want, const char* what) {
  if (t.type != want) Fail(std::string(what) + " must be " + DtypeName(want) + ", got " + DtypeName(t.type));
}

namespace {
// A scale / zero point holds 1 element, or n (per column) when n > 0; returns its element count.
int64_t RequireCount(const Tensor& t, size_t n, const char* what) {
  const int64_t sz = t.size();
  if (sz == 1 || (n > 0 && sz == static_cast<int64_t>(n))) return sz;
  if (n == 0)
    Fail(std::string(what) + " must have 1 element (per-row quantization of this input is not supported), got shape " +
         ShapeStr(t.shape));
  Fail(std::string(what) + " must have 1 or " + std::to_string(n) + " elements, got shape " + ShapeStr(t.shape));
}

float HalfToFloat(uint16_t h) {  // IEEE binary16 -> binary32, exact
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F)
    bits = sign | 0x7F800000u | (man << 13);
  else if (exp != 0)
    bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (man == 0)
    bits = sign;
  else {  // subnormal half: normalise
    int e = -1;
    uint32_t m = man;
    do {
      m <<= 1;
      ++e;
    } while (!(m & 0x400));
    bits = sign | ((112 - e) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
float ScaleAt(const Tensor& t, size_t i) {
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return HalfToFloat(t.as<uint16_t>()[i]);
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    const uint32_t bits = static_cast<uint32_t>(t.as<uint16_t>()[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return t.as<float>()[i];
}
}  // namespace

// Scales may be float, float16 or bfloat16 (opset 21); all widen exactly to float32.
std::vector<float> Scales(const Tensor& t, size_t n, const char* what) {
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
    Fail(std::string(what) + " must be float, float16 or bfloat16, got " + DtypeName(t.type));
  const int64_t sz = RequireCount(t, n, what);
  std::vector<float> out(n ? n : 1);
  for (int64_t i = 0; i < sz; ++i) {  // validate the stored elements, then broadcast
    const float v = ScaleAt(t, static_cast<size_t>(i));
    if (!std::isfinite(v) || !(v > 0.0f))
      Fail(std::string(what) + " must be finite and > 0, got " + std::to_string(v) + " at index " + std::to_string(i));
    out[static_cast<size_t>(i)] = v;
  }
  if (sz == 1) std::fill(out.begin(), out.end(), out[0]);
  return out;
}

std::vector<int32_t> ZeroPoints(const std::optional<Tensor>& t, size_t n, ONNXTensorElementDataType like,
                                const char* what) {
  std::vector<int32_t> out(n ? n : 1, 0);
  if (!t) return out;
  if (t->type != like)
    Fail(std::string(what) + " must have the dtype of its tensor (" + DtypeName(like) + "), got " + DtypeName(t->type));
  const int64_t sz = RequireCount(*t, n, what);
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t j = sz == 1 ? 0 : i;
    out[i] = t->is_int8() ? t->as<int8_t>()[j] : t->as<uint8_t>()[j];
  }
  return out;
}

}  // namespace qie
