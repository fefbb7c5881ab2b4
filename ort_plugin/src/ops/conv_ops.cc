// Adaptors for the convolution ops. The math (acc over taps and the group's input channels):
//   acc[n, m, o...] = sum (x - x_zp) * (w[m] - w_zp[m]) + B[m]
//   QLinearConv (""; com.microsoft with channels_last=1 for NHWC):
//       y = saturate(round_half_even(float(acc) * (x_scale * w_scale[m] / y_scale)) + y_zp)
//   ConvInteger (""): y = acc (int32, no bias)
// Each adaptor only unpacks and validates; ConvCore and the kernel layer compute.
#include "ops/conv_core.h"
#include "ops/ops.h"

namespace qie {
namespace {

int32_t ScalarZeroPoint(const std::optional<Tensor>& t, ONNXTensorElementDataType like, const char* what) {
  if (t && t->size() != 1) Fail(std::string(what) + " must have 1 element, got shape " + ShapeStr(t->shape));
  return ZeroPoints(t, 0, like, what)[0];
}

// X, W and their zero points, as both ops take them: uint8/int8 tensors, x_zero_point per tensor,
// w_zero_point per tensor or per output channel (M of them).
struct ConvOperands {
  Tensor x, w;
  size_t M = 0;
  int32_t x_zp = 0;
  std::vector<int32_t> w_zp;
};
ConvOperands ReadOperands(OrtKernelContext* ctx, size_t x_idx, size_t w_idx, size_t xzp_idx, size_t wzp_idx) {
  ConvOperands o;
  o.x = RequiredInput(ctx, x_idx, "x");
  o.w = RequiredInput(ctx, w_idx, "w");
  RequireInt8Type(o.x, "x");
  RequireInt8Type(o.w, "w");
  if (o.w.shape.empty()) Fail("w must have rank 3 to 5, got a scalar");
  o.M = static_cast<size_t>(o.w.shape[0]);
  o.x_zp = ScalarZeroPoint(Input(ctx, xzp_idx), o.x.type, "x_zero_point");
  o.w_zp = ZeroPoints(Input(ctx, wzp_idx), o.M, o.w.type, "w_zero_point");
  return o;
}

class QLinearConvKernel : public Kernel {
 public:
  QLinearConvKernel(const OrtKernelInfo* info, bool nhwc_domain) {
    core_.Init(info, nhwc_domain && AttrInt(info, "channels_last", 0) != 0, 3, 5);
  }
  Isa Compute(OrtKernelContext* ctx) override {
    const ConvOperands op = ReadOperands(ctx, 0, 3, 2, 5);
    const size_t M = op.M;
    const Tensor x_scale = RequiredInput(ctx, 1, "x_scale"), w_scale = RequiredInput(ctx, 4, "w_scale");
    const Tensor y_scale = RequiredInput(ctx, 6, "y_scale"), y_zp = RequiredInput(ctx, 7, "y_zero_point");
    RequireInt8Type(y_zp, "y_zero_point");
    const float sx = Scales(x_scale, 0, "x_scale")[0], sy = Scales(y_scale, 0, "y_scale")[0];
    const std::vector<float> sw = Scales(w_scale, M, "w_scale");
    ConvOutput out;
    out.y_zp = ScalarZeroPoint(y_zp, y_zp.type, "y_zero_point");
    out.kind = y_zp.is_int8() ? OutKind::kS8 : OutKind::kU8;
    out.scale.resize(M);
    for (size_t m = 0; m < M; ++m) out.scale[m] = sx * sw[m] / sy;
    const std::optional<Tensor> bias = Input(ctx, 8);
    if (bias) {
      RequireType(*bias, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "B");
      if (bias->shape.size() != 1 || bias->shape[0] != static_cast<int64_t>(M))
        Fail("B must have shape [" + std::to_string(M) + "] (one per output channel), got " + ShapeStr(bias->shape));
      out.bias = bias->as<int32_t>();
    }
    return core_.Run(ctx, op.x, op.x_zp, op.w, op.w_zp, out);
  }

 private:
  ConvCore core_;
};

class ConvIntegerKernel : public Kernel {
 public:
  explicit ConvIntegerKernel(const OrtKernelInfo* info) { core_.Init(info, false, 1, 3); }
  Isa Compute(OrtKernelContext* ctx) override {
    const ConvOperands op = ReadOperands(ctx, 0, 1, 2, 3);
    return core_.Run(ctx, op.x, op.x_zp, op.w, op.w_zp, ConvOutput{});
  }

 private:
  ConvCore core_;
};

}  // namespace

std::unique_ptr<Kernel> MakeQLinearConv(const OrtKernelInfo* info) {
  return std::make_unique<QLinearConvKernel>(info, false);
}
std::unique_ptr<Kernel> MakeQLinearConvNhwc(const OrtKernelInfo* info) {
  return std::make_unique<QLinearConvKernel>(info, true);
}
std::unique_ptr<Kernel> MakeConvInteger(const OrtKernelInfo* info) { return std::make_unique<ConvIntegerKernel>(info); }

}  // namespace qie
