// Implementation of MatMulCore: numpy matmul broadcasting, B packing and the kernel-layer calls.
#include "ops/matmul_core.h"

#include <algorithm>

namespace qie {

MatMulPlan PlanMatMul(const std::vector<int64_t>& a_shape, const std::vector<int64_t>& b_shape) {
  if (a_shape.empty() || b_shape.empty())
    Fail("A and B must have rank >= 1, got A " + ShapeStr(a_shape) + " and B " + ShapeStr(b_shape));
  for (int64_t d : a_shape)
    if (d < 0) Fail("A has a negative dimension " + ShapeStr(a_shape));
  for (int64_t d : b_shape)
    if (d < 0) Fail("B has a negative dimension " + ShapeStr(b_shape));
  const bool a1 = a_shape.size() == 1, b1 = b_shape.size() == 1;
  std::vector<int64_t> as = a1 ? std::vector<int64_t>{1, a_shape[0]} : a_shape;
  std::vector<int64_t> bs = b1 ? std::vector<int64_t>{b_shape[0], 1} : b_shape;
  MatMulPlan p;
  p.M = static_cast<size_t>(as[as.size() - 2]);
  p.K = static_cast<size_t>(as.back());
  p.N = static_cast<size_t>(bs.back());
  const auto kb = static_cast<size_t>(bs[bs.size() - 2]);
  if (p.K != kb)
    Fail("inner dimensions differ: A " + ShapeStr(a_shape) + " has K=" + std::to_string(p.K) + ", B " +
         ShapeStr(b_shape) + " has K=" + std::to_string(kb));
  std::vector<int64_t> ab(as.begin(), as.end() - 2), bb(bs.begin(), bs.end() - 2);
  const size_t r = std::max(ab.size(), bb.size());
  ab.insert(ab.begin(), r - ab.size(), 1);
  bb.insert(bb.begin(), r - bb.size(), 1);
  std::vector<int64_t> ob(r);
  for (size_t d = 0; d < r; ++d) {
    if (ab[d] == bb[d] || bb[d] == 1)
      ob[d] = ab[d];
    else if (ab[d] == 1)
      ob[d] = bb[d];
    else
      Fail("batch dimensions do not broadcast: A " + ShapeStr(a_shape) + ", B " + ShapeStr(b_shape));
  }
  p.out_shape = ob;
  if (!a1) p.out_shape.push_back(static_cast<int64_t>(p.M));
  if (!b1) p.out_shape.push_back(static_cast<int64_t>(p.N));
  size_t total = 1, b_count = 1, a_count = 1;
  for (size_t d = 0; d < r; ++d) {
    total *= ob[d];
    b_count *= bb[d];
    a_count *= ab[d];
  }
  if (b_count == 1) {
    p.folded = true;
    p.rows = a_count * p.M;
    return p;
  }
  p.a_off.resize(total);
  p.b_idx.resize(total);
  std::vector<int64_t> idx(r, 0);
  for (size_t t = 0; t < total; ++t) {
    size_t ao = 0, bo = 0;
    for (size_t d = 0; d < r; ++d) {
      ao = ao * ab[d] + (ab[d] == 1 ? 0 : idx[d]);
      bo = bo * bb[d] + (bb[d] == 1 ? 0 : idx[d]);
    }
    p.a_off[t] = ao * p.M * p.K;
    p.b_idx[t] = bo;
    for (size_t d = r; d-- > 0;) {
      if (++idx[d] < ob[d]) break;
      idx[d] = 0;
    }
  }
  return p;
}

void PlanArgs(const MatMulPlan& plan, const uint8_t* a, void* y, const std::vector<std::unique_ptr<PackedB>>& mats,
              std::vector<const PackedB*>* b, GemmArgs* g) {
  const size_t batch = plan.folded ? 1 : plan.a_off.size();
  b->resize(batch);
  for (size_t i = 0; i < batch; ++i) (*b)[i] = mats[plan.folded ? 0 : plan.b_idx[i]].get();
  g->M = plan.folded ? plan.rows : plan.M;
  g->N = plan.N;
  g->K = plan.K;
  g->a = a;
  g->lda = plan.K;
  g->a_offsets = plan.folded ? nullptr : plan.a_off.data();
  g->y = y;
  g->ldy = plan.N;
  g->y_batch_stride = static_cast<ptrdiff_t>(plan.M * plan.N);
  g->batch = batch;
  g->b = b->data();
}

void PackAllB(const MicroKernel& uk, const Tensor& b, bool trans_b, PrepackedB* out) {
  out->isa = uk.isa;
  out->shape = b.shape;
  // The matrices' buffers are reused when `out` held some before (a per-call pack into a thread's buffers).
  auto mat = [&](size_t i) -> PackedB* {
    if (out->mats.size() <= i) out->mats.push_back(std::make_unique<PackedB>());
    return out->mats[i].get();
  };
  if (trans_b) {  // 2-D [N, K]: element (k, n) at n * K + k
    const size_t N = static_cast<size_t>(b.shape[0]), K = static_cast<size_t>(b.shape[1]);
    PackB(uk, b.as<uint8_t>(), b.is_int8(), K, N, 1, static_cast<ptrdiff_t>(K), mat(0));
    out->mats.resize(1);
    return;
  }
  const bool b1 = b.shape.size() == 1;
  const size_t K = static_cast<size_t>(b1 ? b.shape[0] : b.shape[b.shape.size() - 2]);
  const size_t N = b1 ? 1 : static_cast<size_t>(b.shape.back());
  size_t count = 1;
  for (size_t d = 0; d + 2 < b.shape.size(); ++d) count *= static_cast<size_t>(b.shape[d]);
  const uint8_t* data = b.as<uint8_t>();
  for (size_t i = 0; i < count; ++i)
    PackB(uk, data + i * K * N, b.is_int8(), K, N, static_cast<ptrdiff_t>(N), 1, mat(i));
  out->mats.resize(count);
}

void MatMulCore::Init(const OrtKernelInfo* info, size_t b_index, bool trans_b) {
  trans_b_ = trans_b;
  auto b = ConstantInput(info, b_index);
  if (!b || (!b->is_int8() && !b->is_uint8()) || b->shape.empty() || (trans_b && b->shape.size() != 2)) return;
  for (int64_t d : b->shape)
    if (d < 0) return;
  PackAllB(GetMicroKernel(ActiveIsa()), *b, trans_b_, &pre_);
  has_pre_ = true;
}

Isa MatMulCore::Run(OrtKernelContext* ctx, const MatMulPlan& plan, const uint8_t* a, bool a_signed, const Tensor& b,
                    const MatMulEpilogue& ep, void* y) {
  const Isa isa = ActiveIsa();
  const MicroKernel& uk = GetMicroKernel(isa);
  const size_t rows = plan.folded ? plan.rows : plan.M;
  const size_t batch = plan.folded ? 1 : plan.a_off.size();
  if (rows == 0 || plan.N == 0 || batch == 0) return isa;
  // A B packed per call goes to this thread's buffers, kept between calls (no allocation in the steady state).
  thread_local PrepackedB local;
  const PrepackedB* pb = &pre_;
  if (!has_pre_ || pre_.isa != isa || pre_.shape != b.shape) {
    PackAllB(uk, b, trans_b_, &local);
    pb = &local;
  }
  std::vector<const PackedB*> bptrs;
  std::vector<int32_t> za_rows;
  GemmArgs g;
  PlanArgs(plan, a, y, pb->mats, &bptrs, &g);
  g.a_signed = a_signed;
  if (ep.za.size() > 1) {  // per-row zero point: repeat it for every folded batch
    za_rows.resize(rows);
    for (size_t r = 0; r < rows; ++r) za_rows[r] = ep.za[r % plan.M];
    g.za = za_rows.data();
    g.za_per_row = 1;
  } else {
    g.za = ep.za.data();
  }
  g.zb = ep.zb.empty() ? nullptr : ep.zb.data();
  g.bias = ep.bias;
  g.bias_rs = ep.bias_rs;
  g.bias_cs = ep.bias_cs;
  g.kind = ep.kind;
  g.scale = ep.scale.empty() ? nullptr : ep.scale.data();
  g.fbias = ep.fbias;
  g.y_zp = ep.y_zp;
  const ParallelFor pool = OrtParallelFor(ctx);
  Pace pace(*pacing_, true, rows * batch * plan.K, pool);
  Gemm(uk, g, pace.For());
  pace.Done();
  if (!ep.post_scale.empty())
    ScaleColumns(static_cast<float*>(y), rows * batch, plan.N, ep.post_scale.data(), ep.post_bias);
  return isa;
}

}  // namespace qie
