// Adaptors for the matmul-shaped ops. The math, for each (numpy matmul broadcasting over batches):
//   QLinearMatMul (""):   y = saturate(round(float(sum (a-za)(b-zb[n])) * (sa*sb[n]/sy)) + zy)
//   MatMulInteger (""):   y = sum (a-za[m])(b-zb[n])                        (int32)
//   MatMulIntegerToFloat (com.microsoft): y = float(sum (a-za)(b-zb[n])) * (sa*sb[n]) + bias[n]
//   DynamicQuantizeMatMul (com.microsoft): A quantized as DynamicQuantizeLinear does, then as above.
// Each adaptor only unpacks, validates and allocates; MatMulCore and the kernel layer compute.
#include <algorithm>
#include <cmath>

#include "ops/matmul_core.h"
#include "ops/ops.h"

namespace qie {
namespace {

OutKind QuantKind(const Tensor& y_zp) { return y_zp.is_int8() ? OutKind::kS8 : OutKind::kU8; }

class QLinearMatMulKernel : public Kernel {
 public:
  explicit QLinearMatMulKernel(const OrtKernelInfo* info) { core_.Init(info, 3); }
  Isa Compute(OrtKernelContext* ctx) override {
    const Tensor a = RequiredInput(ctx, 0, "a"), a_scale = RequiredInput(ctx, 1, "a_scale");
    const Tensor b = RequiredInput(ctx, 3, "b"), b_scale = RequiredInput(ctx, 4, "b_scale");
    const Tensor y_scale = RequiredInput(ctx, 6, "y_scale"), y_zp = RequiredInput(ctx, 7, "y_zero_point");
    RequireInt8Type(a, "a");
    RequireInt8Type(b, "b");
    RequireInt8Type(y_zp, "y_zero_point");
    const MatMulPlan plan = PlanMatMul(a.shape, b.shape);
    MatMulEpilogue ep;
    const float sa = Scales(a_scale, 0, "a_scale")[0];
    const float sy = Scales(y_scale, 0, "y_scale")[0];
    const std::vector<float> sb = Scales(b_scale, plan.N, "b_scale");
    ep.za = ZeroPoints(Input(ctx, 2), 0, a.type, "a_zero_point");
    ep.zb = ZeroPoints(Input(ctx, 5), plan.N, b.type, "b_zero_point");
    if (y_zp.size() != 1) Fail("y_zero_point must have 1 element, got shape " + ShapeStr(y_zp.shape));
    ep.y_zp = y_zp.is_int8() ? y_zp.as<int8_t>()[0] : y_zp.as<uint8_t>()[0];
    ep.kind = QuantKind(y_zp);
    ep.scale.resize(plan.N);
    for (size_t n = 0; n < plan.N; ++n) ep.scale[n] = sa * sb[n] / sy;
    void* y = Output(ctx, 0, plan.out_shape, ep.kind);
    return core_.Run(ctx, plan, a.as<uint8_t>(), a.is_int8(), b, ep, y);
  }

 private:
  MatMulCore core_;
};

class MatMulIntegerKernel : public Kernel {
 public:
  explicit MatMulIntegerKernel(const OrtKernelInfo* info) { core_.Init(info, 1); }
  Isa Compute(OrtKernelContext* ctx) override {
    const Tensor a = RequiredInput(ctx, 0, "A"), b = RequiredInput(ctx, 1, "B");
    RequireInt8Type(a, "A");
    RequireInt8Type(b, "B");
    const MatMulPlan plan = PlanMatMul(a.shape, b.shape);
    MatMulEpilogue ep;
    ep.kind = OutKind::kInt32;
    ep.za = ZeroPoints(Input(ctx, 2), plan.M, a.type, "a_zero_point");
    ep.zb = ZeroPoints(Input(ctx, 3), plan.N, b.type, "b_zero_point");
    void* y = Output(ctx, 0, plan.out_shape, ep.kind);
    return core_.Run(ctx, plan, a.as<uint8_t>(), a.is_int8(), b, ep, y);
  }

 private:
  MatMulCore core_;
};

// Float output: y = float(acc) * (a_scale * b_scale[n]) + bias[n], as ORT computes it, except that
// ORT rounds twice, (float(acc) * a_scale) * b_scale[n] + bias[n], when B is batched (rank >= 3) and
// b_scale is per column (measured on ORT 1.31.1; tests/test_fuzz_graphs.py reaches both).
void FloatEpilogue(OrtKernelContext* ctx, const MatMulPlan& plan, float a_scale, const Tensor& b_scale, size_t b_rank,
                   size_t bias_index, MatMulEpilogue* ep, std::optional<Tensor>* bias) {
  const std::vector<float> sb = Scales(b_scale, plan.N, "b_scale");
  const bool twice = b_rank >= 3 && b_scale.size() > 1;
  ep->kind = OutKind::kFloat;
  ep->scale.resize(plan.N);
  for (size_t n = 0; n < plan.N; ++n) ep->scale[n] = twice ? a_scale : a_scale * sb[n];
  if (twice) ep->post_scale = sb;
  *bias = Input(ctx, bias_index);
  if (*bias) {
    RequireType(**bias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "bias");
    if ((*bias)->size() != static_cast<int64_t>(plan.N))
      Fail("bias must have N=" + std::to_string(plan.N) + " elements, got shape " + ShapeStr((*bias)->shape));
    (twice ? ep->post_bias : ep->fbias) = (*bias)->as<float>();
  }
}

class MatMulIntegerToFloatKernel : public Kernel {
 public:
  explicit MatMulIntegerToFloatKernel(const OrtKernelInfo* info) { core_.Init(info, 1); }
  Isa Compute(OrtKernelContext* ctx) override {
    const Tensor a = RequiredInput(ctx, 0, "A"), b = RequiredInput(ctx, 1, "B");
    const Tensor a_scale = RequiredInput(ctx, 2, "a_scale"), b_scale = RequiredInput(ctx, 3, "b_scale");
    RequireInt8Type(a, "A");
    RequireInt8Type(b, "B");
    const MatMulPlan plan = PlanMatMul(a.shape, b.shape);
    MatMulEpilogue ep;
    const float sa = Scales(a_scale, 0, "a_scale")[0];
    ep.za = ZeroPoints(Input(ctx, 4), 0, a.type, "a_zero_point");
    ep.zb = ZeroPoints(Input(ctx, 5), plan.N, b.type, "b_zero_point");
    std::optional<Tensor> bias;
    FloatEpilogue(ctx, plan, sa, b_scale, b.shape.size(), 6, &ep, &bias);
    void* y = Output(ctx, 0, plan.out_shape, ep.kind);
    return core_.Run(ctx, plan, a.as<uint8_t>(), a.is_int8(), b, ep, y);
  }

 private:
  MatMulCore core_;
};

class DynamicQuantizeMatMulKernel : public Kernel {
 public:
  explicit DynamicQuantizeMatMulKernel(const OrtKernelInfo* info) { core_.Init(info, 1); }
  Isa Compute(OrtKernelContext* ctx) override {
    const Tensor a = RequiredInput(ctx, 0, "A"), b = RequiredInput(ctx, 1, "B");
    const Tensor b_scale = RequiredInput(ctx, 2, "b_scale");
    RequireType(a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "A");
    RequireInt8Type(b, "B");
    const MatMulPlan plan = PlanMatMul(a.shape, b.shape);
    const size_t n = static_cast<size_t>(a.size());
    // A NaN or infinity has no quantized value: ORT maps a NaN to the zero point (or to an all-NaN
    // output when it comes first) and an infinity to an all-NaN output; qie says so instead.
    const float* af = a.as<float>();
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(af[i]))
        Fail("A contains a non-finite value (" + std::to_string(af[i]) + ") at flat index " + std::to_string(i) +
             "; it cannot be quantized");
    float sa = 1.0f;
    uint8_t za = 0;
    DynamicQuantizeParams(af, n, &sa, &za);
    std::vector<uint8_t> qa(std::max<size_t>(n, 1));  // per call: sessions may run concurrently
    QuantizeLinearU8(a.as<float>(), n, sa, za, qa.data());
    MatMulEpilogue ep;
    ep.za = {za};
    ep.zb = ZeroPoints(Input(ctx, 3), plan.N, b.type, "b_zero_point");
    std::optional<Tensor> bias;
    FloatEpilogue(ctx, plan, sa, b_scale, b.shape.size(), 4, &ep, &bias);
    void* y = Output(ctx, 0, plan.out_shape, ep.kind);
    return core_.Run(ctx, plan, qa.data(), false, b, ep, y);
  }

 private:
  MatMulCore core_;
};

}  // namespace

std::unique_ptr<Kernel> MakeQLinearMatMul(const OrtKernelInfo* info) {
  return std::make_unique<QLinearMatMulKernel>(info);
}
std::unique_ptr<Kernel> MakeMatMulInteger(const OrtKernelInfo* info) {
  return std::make_unique<MatMulIntegerKernel>(info);
}
std::unique_ptr<Kernel> MakeMatMulIntegerToFloat(const OrtKernelInfo* info) {
  return std::make_unique<MatMulIntegerToFloatKernel>(info);
}
std::unique_ptr<Kernel> MakeDynamicQuantizeMatMul(const OrtKernelInfo* info) {
  return std::make_unique<DynamicQuantizeMatMulKernel>(info);
}

}  // namespace qie
