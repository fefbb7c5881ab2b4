// Helpers shared by the ORT adaptors: the OrtApi pointer, tensor access, attribute reads, error
// reporting and the bridge from ORT's intra-op thread pool to the kernel layer's ParallelFor.
// No arithmetic lives here.
#pragma once
#include <onnxruntime_c_api.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/gemm.h"

namespace qie {

extern const OrtApi* g_ort;

// An input problem the user caused; register.cc turns it into an ORT error naming op and node.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void Fail(const std::string& msg);
void ThrowOnError(OrtStatus* st);  // an error from ORT itself

std::string DtypeName(ONNXTensorElementDataType t);
std::string ShapeStr(const std::vector<int64_t>& s);

struct Tensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t size() const;
  bool is_int8() const { return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8; }
  bool is_uint8() const { return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8; }
  template <class T>
  const T* as() const {
    return static_cast<const T*>(data);
  }
};
Tensor TensorOf(const OrtValue* v);
std::optional<Tensor> Input(OrtKernelContext* ctx, size_t i);  // nullopt when absent
Tensor RequiredInput(OrtKernelContext* ctx, size_t i, const char* name);
// Output i allocated with `shape`; fails (never writes) unless ORT typed it as the kernel will write it.
void* Output(OrtKernelContext* ctx, size_t i, const std::vector<int64_t>& shape, OutKind kind);
std::optional<Tensor> ConstantInput(const OrtKernelInfo* info, size_t i);

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t dflt);
float AttrFloat(const OrtKernelInfo* info, const char* name, float dflt);
std::optional<std::vector<int64_t>> AttrInts(const OrtKernelInfo* info, const char* name);  // nullopt if absent
std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& dflt);
std::string NodeName(const OrtKernelInfo* info);

ParallelFor OrtParallelFor(OrtKernelContext* ctx);

// Validation helpers; `what` names the input in the error.
void RequireInt8Type(const Tensor& t, const char* what);  // uint8 or int8
void RequireType(const Tensor& t, ONNXTensorElementDataType want, const char* what);
// A scale tensor of 1 or n elements (n = 0 allows only 1), each finite and > 0; returned as n floats.
std::vector<float> Scales(const Tensor& t, size_t n, const char* what);
// A zero point of 1 or n elements, matching dtype `like`; returned as n int32 values.
std::vector<int32_t> ZeroPoints(const std::optional<Tensor>& t, size_t n, ONNXTensorElementDataType like,
                                const char* what);

// A constant B, prepacked once at kernel creation for the ISA active then.
struct PrepackedB {
  Isa isa = Isa::kScalar;
  std::vector<int64_t> shape;
  std::vector<std::unique_ptr<PackedB>> mats;  // one per batch matrix
};

// Per-op invocation counters for qie_ep.stats(), per ISA.
int StatsOpId(const char* domain, const char* op);
void StatsCount(int op_id, Isa isa);

}  // namespace qie
