// Adaptor for com.microsoft QGemm: Y = alpha * (A' - za)(B' - zb) + C, with A' = transA ? A^T : A and
// B' = transB ? B^T : B (2-D), C an optional int32 bias broadcast to (M, N) and added to the int32
// accumulator; the multiplier is (alpha * a_scale * b_scale[n]) / y_scale as ORT evaluates it. With
// y_zero_point the output is requantized to its dtype; without it the output is float (divided by y_scale
// when that alone is given, as ORT's kernel does).
#include "ops/matmul_core.h"
#include "ops/ops.h"

namespace qie {
namespace {

// A thin adaptor over MatMulCore: QGemm is a 2-D matmul whose B may be stored transposed (packed as such),
// whose A may be transposed (made row-major per call), with C as the int32 bias of the epilogue.
class QGemmKernel : public Kernel {
 public:
  explicit QGemmKernel(const OrtKernelInfo* info)
      : alpha_(AttrFloat(info, "alpha", 1.0f)),
        trans_a_(AttrInt(info, "transA", 0) != 0),
        trans_b_(AttrInt(info, "transB", 0) != 0) {
    core_.Init(info, 3, trans_b_);
  }

  Isa Compute(OrtKernelContext* ctx) override {
    const Tensor a = RequiredInput(ctx, 0, "A"), a_scale = RequiredInput(ctx, 1, "a_scale");
    const Tensor b = RequiredInput(ctx, 3, "B"), b_scale = RequiredInput(ctx, 4, "b_scale");
    RequireInt8Type(a, "A");
    RequireInt8Type(b, "B");
    if (a.shape.size() != 2 || b.shape.size() != 2)
      Fail("A and B must be 2-D, got A " + ShapeStr(a.shape) + " and B " + ShapeStr(b.shape));
    for (int64_t d : a.shape)
      if (d < 0) Fail("negative dimension in A " + ShapeStr(a.shape));
    const int64_t M = trans_a_ ? a.shape[1] : a.shape[0], K = trans_a_ ? a.shape[0] : a.shape[1];
    const int64_t Kb = trans_b_ ? b.shape[1] : b.shape[0], N = trans_b_ ? b.shape[0] : b.shape[1];
    if (K != Kb)
      Fail("inner dimensions differ: A " + ShapeStr(a.shape) + (trans_a_ ? " (transA)" : "") +
           " has K=" + std::to_string(K) + ", B " + ShapeStr(b.shape) + (trans_b_ ? " (transB)" : "") +
           " has K=" + std::to_string(Kb));
    const MatMulPlan plan = PlanMatMul({M, K}, {K, N});
    MatMulEpilogue ep;
    MakeEpilogue(ctx, a, b, plan, &ep);
    void* y = Output(ctx, 0, plan.out_shape, ep.kind);
    std::vector<uint8_t> at;  // A^T made row-major, per call
    const uint8_t* a_data = a.as<uint8_t>();
    if (trans_a_ && plan.M * plan.K > 0) {
      at.resize(plan.M * plan.K);
      for (size_t k = 0; k < plan.K; ++k)
        for (size_t m = 0; m < plan.M; ++m) at[m * plan.K + k] = a_data[k * plan.M + m];
      a_data = at.data();
    }
    return core_.Run(ctx, plan, a_data, a.is_int8(), b, ep, y);
  }

 private:
  // Zero points, the multiplier (alpha * a_scale * b_scale[n]) / y_scale, the output kind and C.
  void MakeEpilogue(OrtKernelContext* ctx, const Tensor& a, const Tensor& b, const MatMulPlan& plan,
                    MatMulEpilogue* ep) const {
    const size_t N = plan.N;
    const float sa = Scales(RequiredInput(ctx, 1, "a_scale"), 0, "a_scale")[0];
    const std::vector<float> sb = Scales(RequiredInput(ctx, 4, "b_scale"), N, "b_scale");
    ep->za = ZeroPoints(Input(ctx, 2), 0, a.type, "a_zero_point");
    ep->zb = ZeroPoints(Input(ctx, 5), N, b.type, "b_zero_point");
    const auto c = Input(ctx, 6), y_scale = Input(ctx, 7), y_zp = Input(ctx, 8);
    if (y_zp && !y_scale) Fail("y_zero_point is given without y_scale");
    float sy = 1.0f;
    if (y_scale) sy = Scales(*y_scale, 0, "y_scale")[0];  // without y_zero_point: float output divided by it, as ORT
    if (y_zp) {
      RequireInt8Type(*y_zp, "y_zero_point");
      if (y_zp->size() != 1) Fail("y_zero_point must have 1 element, got shape " + ShapeStr(y_zp->shape));
      ep->kind = y_zp->is_int8() ? OutKind::kS8 : OutKind::kU8;
      ep->y_zp = y_zp->is_int8() ? y_zp->as<int8_t>()[0] : y_zp->as<uint8_t>()[0];
    } else {
      ep->kind = OutKind::kFloat;
    }
    ep->scale.resize(N);
    for (size_t n = 0; n < N; ++n) {
      ep->scale[n] = alpha_ * sa * sb[n];
      if (y_scale) ep->scale[n] /= sy;
    }
    if (!c) return;
    RequireType(*c, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "C");
    const auto& cs = c->shape;
    const int64_t m = static_cast<int64_t>(plan.M), n = static_cast<int64_t>(N);
    if (c->size() == 1) {
      ep->bias_rs = 0;
      ep->bias_cs = 0;
    } else if ((cs.size() == 1 && cs[0] == n) || (cs.size() == 2 && cs[0] == 1 && cs[1] == n)) {
      ep->bias_rs = 0;
      ep->bias_cs = 1;
    } else if (cs.size() == 2 && cs[0] == m && cs[1] == 1) {
      ep->bias_rs = 1;
      ep->bias_cs = 0;
    } else if (cs.size() == 2 && cs[0] == m && cs[1] == n) {
      ep->bias_rs = n;
      ep->bias_cs = 1;
    } else {
      Fail("C of shape " + ShapeStr(cs) + " does not broadcast to (M, N) = (" + std::to_string(plan.M) + ", " +
           std::to_string(N) + ")");
    }
    ep->bias = c->as<int32_t>();
  }

  float alpha_;
  bool trans_a_, trans_b_;
  MatMulCore core_;
};

}  // namespace

std::unique_ptr<Kernel> MakeQGemm(const OrtKernelInfo* info) { return std::make_unique<QGemmKernel>(info); }

}  // namespace qie
