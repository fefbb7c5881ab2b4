// The adaptor kernels: one factory per (domain, op); register.cc holds the table that uses them.
#pragma once
#include <memory>
#include <string>

#include "ops/common.h"

namespace qie {

class Kernel {
 public:
  virtual ~Kernel() = default;
  // Validates inputs, allocates outputs, runs the kernel; returns the ISA used. Throws OpError.
  virtual Isa Compute(OrtKernelContext* ctx) = 0;
};

std::unique_ptr<Kernel> MakeQLinearMatMul(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeMatMulInteger(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeMatMulIntegerToFloat(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeDynamicQuantizeMatMul(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeQGemm(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeQLinearConv(const OrtKernelInfo* info);
std::unique_ptr<Kernel> MakeQLinearConvNhwc(const OrtKernelInfo* info);  // com.microsoft, channels_last
std::unique_ptr<Kernel> MakeConvInteger(const OrtKernelInfo* info);

// Output dtype/shape inference (shape_infer.cc); throw OpError on shapes that cannot multiply.
void InferMatMulShape(OrtShapeInferContext* ctx, size_t a_idx, size_t b_idx, ONNXTensorElementDataType type);
void InferQLinearMatMul(OrtShapeInferContext* ctx);
void InferQGemm(OrtShapeInferContext* ctx);
void InferQLinearConv(OrtShapeInferContext* ctx);
void InferQLinearConvNhwc(OrtShapeInferContext* ctx);
void InferConvInteger(OrtShapeInferContext* ctx);

// "domain\top\n" for every (domain, op) in register.cc's table (qie_ops()).
std::string RegisteredOps();

}  // namespace qie
