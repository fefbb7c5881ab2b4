// Adaptor for com.microsoft QGemm: Y = alpha * (A' - za)(B' - zb) + C, with A' = transA ? A^T : A and
// B' = transB ? B^T : B (2-D), C an optional int32 bias broadcast to (M, N) and added to the int32
// accumulator; the multiplier is (alpha * a_scale * b_scale[n]) / y_scale as ORT evaluates it. With
// y_zero_point the output is requantized to its dtype; without it the output is float (divided by y_scale
// when that alone is given, as ORT's kernel does).
#include <cstring>

#include "ops/matmul_core.h"
#include "ops/ops.h"

namespace qie {
namespace {

class QGemmKernel : public Kernel {
 public:
  explicit QGemmKernel(const OrtKernelInfo* info)
      : alpha_(AttrFloat(info, "alpha", 1.0f)),
        trans_a_(AttrInt(info, "transA", 0) != 0),
        trans_b_(AttrInt(info, "transB", 0) != 0) {
    auto b = ConstantInput(info, 3);
    if (b && (b->is_int8() || b->is_uint8()) && b->shape.size() == 2 && b->shape[0] >= 0 && b->shape[1] >= 0) {
      Pack(*b, &pre_);
      has_pre_ = true;
    }
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
    const size_t M = static_cast<size_t>(trans_a_ ? a.shape[1] : a.shape[0]);
    const size_t K = static_cast<size_t>(trans_a_ ? a.shape[0] : a.shape[1]);
    const size_t Kb = static_cast<size_t>(trans_b_ ? b.shape[1] : b.shape[0]);
    const size_t N = static_cast<size_t>(trans_b_ ? b.shape[0] : b.shape[1]);
    if (K != Kb)
      Fail("inner dimensions differ: A " + ShapeStr(a.shape) + (trans_a_ ? " (transA)" : "") +
           " has K=" + std::to_string(K) + ", B " + ShapeStr(b.shape) + (trans_b_ ? " (transB)" : "") +
           " has K=" + std::to_string(Kb));
    const float sa = Scales(a_scale, 0, "a_scale")[0];
    const std::vector<float> sb = Scales(b_scale, N, "b_scale");
    MatMulEpilogue ep;
    ep.za = ZeroPoints(Input(ctx, 2), 0, a.type, "a_zero_point");
    ep.zb = ZeroPoints(Input(ctx, 5), N, b.type, "b_zero_point");
    const auto c = Input(ctx, 6), y_scale = Input(ctx, 7), y_zp = Input(ctx, 8);
    if (y_zp && !y_scale) Fail("y_zero_point is given without y_scale");
    ep.scale.resize(N);
    float sy = 1.0f;
    if (y_scale) sy = Scales(*y_scale, 0, "y_scale")[0];  // without y_zero_point: float output divided by it, as ORT
    if (y_zp) {
      RequireInt8Type(*y_zp, "y_zero_point");
      if (y_zp->size() != 1) Fail("y_zero_point must have 1 element, got shape " + ShapeStr(y_zp->shape));
      ep.kind = y_zp->is_int8() ? OutKind::kS8 : OutKind::kU8;
      ep.y_zp = y_zp->is_int8() ? y_zp->as<int8_t>()[0] : y_zp->as<uint8_t>()[0];
    } else {
      ep.kind = OutKind::kFloat;
    }
    for (size_t n = 0; n < N; ++n) {
      ep.scale[n] = alpha_ * sa * sb[n];
      if (y_scale) ep.scale[n] /= sy;
    }
    GemmArgs g;
    if (c) {
      RequireType(*c, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "C");
      const auto& cs = c->shape;
      const int64_t m = static_cast<int64_t>(M), n = static_cast<int64_t>(N);
      if (c->size() == 1) {
        g.bias_rs = 0;
        g.bias_cs = 0;
      } else if ((cs.size() == 1 && cs[0] == n) || (cs.size() == 2 && cs[0] == 1 && cs[1] == n)) {
        g.bias_rs = 0;
        g.bias_cs = 1;
      } else if (cs.size() == 2 && cs[0] == m && cs[1] == 1) {
        g.bias_rs = 1;
        g.bias_cs = 0;
      } else if (cs.size() == 2 && cs[0] == m && cs[1] == n) {
        g.bias_rs = n;
        g.bias_cs = 1;
      } else
        Fail("C of shape " + ShapeStr(cs) + " does not broadcast to (M, N) = (" + std::to_string(M) + ", " +
             std::to_string(N) + ")");
      g.bias = c->as<int32_t>();
    }
    void* y = Output(ctx, 0, {static_cast<int64_t>(M), static_cast<int64_t>(N)}, ep.kind);
    const Isa isa = ActiveIsa();
    if (M == 0 || N == 0) return isa;
    const MicroKernel& uk = GetMicroKernel(isa);
    PrepackedB local;
    const PrepackedB* pb = &pre_;
    if (!has_pre_ || pre_.isa != isa || pre_.shape != b.shape) {
      Pack(b, &local);
      pb = &local;
    }
    std::vector<uint8_t> at;  // A^T made row-major, per call
    const uint8_t* a_data = a.as<uint8_t>();
    if (trans_a_) {
      at.resize(M * K);
      for (size_t k = 0; k < K; ++k)
        for (size_t m = 0; m < M; ++m) at[m * K + k] = a_data[k * M + m];
      a_data = at.data();
    }
    const PackedB* bp = pb->mats[0].get();
    g.M = M;
    g.N = N;
    g.K = K;
    g.a = a_data;
    g.lda = K;
    g.a_signed = a.is_int8();
    g.za = ep.za.data();
    g.zb = ep.zb.data();
    g.kind = ep.kind;
    g.scale = ep.scale.data();
    g.y_zp = ep.y_zp;
    g.y = y;
    g.ldy = N;
    g.batch = 1;
    g.b = &bp;
    Gemm(uk, g, OrtParallelFor(ctx));
    return isa;
  }

 private:
  void Pack(const Tensor& b, PrepackedB* out) const {
    const MicroKernel& uk = GetMicroKernel(ActiveIsa());
    out->isa = uk.isa;
    out->shape = b.shape;
    out->mats.clear();
    const size_t r = static_cast<size_t>(b.shape[0]), c = static_cast<size_t>(b.shape[1]);
    auto pb = std::make_unique<PackedB>();
    if (trans_b_)
      PackB(uk, b.as<uint8_t>(), b.is_int8(), c, r, 1, static_cast<ptrdiff_t>(c), pb.get());
    else
      PackB(uk, b.as<uint8_t>(), b.is_int8(), r, c, static_cast<ptrdiff_t>(c), 1, pb.get());
    out->mats.push_back(std::move(pb));
  }

  float alpha_;
  bool trans_a_, trans_b_;
  PrepackedB pre_;
  bool has_pre_ = false;
};

}  // namespace

std::unique_ptr<Kernel> MakeQGemm(const OrtKernelInfo* info) { return std::make_unique<QGemmKernel>(info); }

}  // namespace qie
