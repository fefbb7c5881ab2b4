// The matmul-shaped part every GEMM-family adaptor shares: numpy matmul broadcasting (N-D, 1-D
// operands), prepacking a constant B at kernel creation, per-call packing otherwise, and one call of
// the kernel layer per batch matrix (or one folded call when B has no batch).
#pragma once
#include <memory>

#include "kernels/pacing.h"
#include "ops/common.h"

namespace qie {

struct MatMulPlan {
  size_t M = 0, K = 0, N = 0;
  std::vector<int64_t> out_shape;
  std::vector<size_t> a_off, b_idx;  // per output batch: A element offset, B matrix index
  bool folded = false;               // B has no batch: all A rows form one GEMM
  size_t rows = 0;                   // rows of that GEMM (batch of A x M)
};
// a_shape x b_shape with numpy matmul semantics; shapes that cannot multiply raise OpError.
MatMulPlan PlanMatMul(const std::vector<int64_t>& a_shape, const std::vector<int64_t>& b_shape);

// The plan's part of a GEMM's arguments: sizes (a folded plan's rows as M), A with its per-batch offsets, the
// output's row stride and batch stride, the batch count; `b` gets one packed B per batch (from `mats`, by the plan's
// B index). The epilogue and zero points are the caller's.
void PlanArgs(const MatMulPlan& plan, const uint8_t* a, void* y, const std::vector<std::unique_ptr<PackedB>>& mats,
              std::vector<const PackedB*>* b, GemmArgs* g);

// Output epilogue of one matmul call, already validated and expanded.
struct MatMulEpilogue {
  OutKind kind = OutKind::kInt32;
  std::vector<int32_t> za;       // 1 or M (per row) A zero points
  std::vector<int32_t> zb;       // N B zero points
  std::vector<float> scale;      // N multipliers (float/quantized outputs)
  const float* fbias = nullptr;  // N float bias or nullptr
  int32_t y_zp = 0;
  // Float outputs ORT rounds twice, (float(acc) * a_scale) * b_scale[n] (+ bias[n]): after the GEMM
  // (whose scale is then a_scale alone and fbias null) every column is multiplied again (kernel layer).
  std::vector<float> post_scale;
  const float* post_bias = nullptr;
  // int32 bias added to the accumulator (QGemm's C): element (m, n) at bias[m * bias_rs + n * bias_cs].
  // Only for a plan without B batches (one GEMM).
  const int32_t* bias = nullptr;
  ptrdiff_t bias_rs = 0;
  int bias_cs = 0;
};

class MatMulCore {
 public:
  // Prepacks input `b_index` when ORT reports it constant. `trans_b`: B is a 2-D [N, K] (QGemm's transB).
  void Init(const OrtKernelInfo* info, size_t b_index, bool trans_b = false);
  // a: uint8/int8 data of a_shape, b: the B input (its data is used unless prepacked for this ISA).
  // Returns the ISA that ran.
  Isa Run(OrtKernelContext* ctx, const MatMulPlan& plan, const uint8_t* a, bool a_signed, const Tensor& b,
          const MatMulEpilogue& ep, void* y);

 private:
  PrepackedB pre_;
  bool has_pre_ = false;
  bool trans_b_ = false;
  // Whether a call runs on the intra-op pool or the calling thread, learnt per size of A (pacing.h): a pool that does
  // not spin costs a ~10 us wake-up, more than a GEMV's work (1 x 768 x 768: 11 us at one thread, 29 at two).
  std::unique_ptr<Pacing> pacing_ = std::make_unique<Pacing>();
};

// Packs every batch matrix of B (`trans_b`: a 2-D B stored [N, K]).
void PackAllB(const MicroKernel& uk, const Tensor& b, bool trans_b, PrepackedB* out);

}  // namespace qie
