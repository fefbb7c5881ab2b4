// The part every convolution adaptor shares: ONNX Conv attributes, output geometry (also used by
// shape inference), validation of X/W against them, weight prepacking at kernel creation, and the
// NCHW <-> NHWC layout around the NHWC kernel layer.
#pragma once
#include <memory>
#include <string>

#include "kernels/conv.h"
#include "kernels/pacing.h"
#include "ops/common.h"

namespace qie {

struct ConvAttrs {
  std::string auto_pad = "NOTSET";
  std::vector<int64_t> kernel_shape, pads, strides, dilations;
  int64_t group = 1;
};
ConvAttrs ReadConvAttrs(const OrtKernelInfo* info);

// Output spatial dims (-1 where an input dim is unknown) and leading pads for input spatial dims
// `in` (-1 = unknown) and kernel `k`; invalid attributes or an empty output raise OpError.
void ConvGeometry(const ConvAttrs& at, const std::vector<int64_t>& in, const std::vector<int64_t>& k,
                  std::vector<int64_t>* out, std::vector<int64_t>* pad_begin);
// Checks W's rank and channels against X's (C = -1 when unknown) and the attributes; returns the kernel dims.
std::vector<int64_t> ConvKernelDims(const ConvAttrs& at, int64_t x_rank, int64_t C,
                                    const std::vector<int64_t>& w_shape);

struct ConvOutput {
  OutKind kind = OutKind::kInt32;
  const int32_t* bias = nullptr;  // [M]
  std::vector<float> scale;       // [M] for quantized outputs
  int32_t y_zp = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
};

class ConvCore {
 public:
  // Reads the attributes; prepacks W (input w_index) when it and its zero point (wzp_index) are constant.
  void Init(const OrtKernelInfo* info, bool channels_last, size_t w_index, size_t wzp_index);
  // x, w: uint8/int8 (the adaptors check dtypes); validates their shapes against the attributes,
  // computes into output 0 (allocated here) and returns the ISA that ran.
  Isa Run(OrtKernelContext* ctx, const Tensor& x, int32_t x_zp, const Tensor& w, const std::vector<int32_t>& w_zp,
          const ConvOutput& out);

 private:
  ConvShape Plan(const Tensor& x, const Tensor& w, std::vector<int64_t>* y_shape) const;
  void PointwiseNchw(const MicroKernel& uk, const ConvShape& s, const Tensor& x, int32_t x_zp, const Tensor& w,
                     const std::vector<int32_t>& w_zp, int32_t* y, const ParallelFor& pfor) const;
  ConvAttrs at_;
  bool channels_last_ = false;
  PackedConv pre_;
  std::vector<int64_t> pre_shape_;
  std::vector<int32_t> pre_zp_;
  bool has_pre_ = false;
  // Whether a call runs on the intra-op pool or the calling thread, learnt per input size (pacing.h)
  std::unique_ptr<Pacing> pacing_ = std::make_unique<Pacing>();
};

}  // namespace qie
