// Conv attributes, geometry and validation, weight prepacking and NCHW/NHWC layout for the
// convolution adaptors (see conv_core.h). No arithmetic: the kernel layer computes.
#include "ops/conv_core.h"

#include <algorithm>

namespace qie {
ConvAttrs ReadConvAttrs(const OrtKernelInfo* info) {
  ConvAttrs at;
  at.auto_pad = AttrString(info, "auto_pad", "NOTSET");
  at.kernel_shape = AttrInts(info, "kernel_shape").value_or(std::vector<int64_t>{});
  at.pads = AttrInts(info, "pads").value_or(std::vector<int64_t>{});
  at.strides = AttrInts(info, "strides").value_or(std::vector<int64_t>{});
  at.dilations = AttrInts(info, "dilations").value_or(std::vector<int64_t>{});
  at.group = AttrInt(info, "group", 1);
  return at;
}

namespace {
// Every per-dimension quantity of a convolution (dims, kernel extent, pads, strides, dilations, the
// padded extent) must fit in 31 bits: int64 attribute values whose sums or products overflow were once
// accepted and produced out-of-range geometry. 2^31 along one spatial axis is beyond any tensor ORT
// could allocate for a real model; the limit is stated in the error.
constexpr int64_t kDimLimit = (int64_t{1} << 31) - 1;
int64_t Bounded(int64_t v, const std::string& what) {
  if (v < 0 || v > kDimLimit) Fail(what + " is " + std::to_string(v) + ", outside 0.." + std::to_string(kDimLimit));
  return v;
}
}  // namespace

std::vector<int64_t> ConvKernelDims(const ConvAttrs& at, int64_t x_rank, int64_t C,
                                    const std::vector<int64_t>& w_shape) {
  if (x_rank < 3 || x_rank > 5)
    Fail("X must have rank 3 to 5 (1-D to 3-D convolution), got rank " + std::to_string(x_rank));
  if (static_cast<int64_t>(w_shape.size()) != x_rank)
    Fail("W must have the rank of X (" + std::to_string(x_rank) + "), got shape " + ShapeStr(w_shape));
  if (at.group < 1 || at.group > kDimLimit)
    Fail("group must be in 1.." + std::to_string(kDimLimit) + ", got " + std::to_string(at.group));
  for (int64_t d : w_shape)
    if (d < 0 || d > kDimLimit) Fail("W has an unsupported dimension in shape " + ShapeStr(w_shape));
  const std::vector<int64_t> k(w_shape.begin() + 2, w_shape.end());
  if (!at.kernel_shape.empty() && at.kernel_shape != k)
    Fail("kernel_shape " + ShapeStr(at.kernel_shape) + " does not match W's spatial dims " + ShapeStr(k));
  for (int64_t d : k)
    if (d < 1) Fail("W's kernel dims must be >= 1, got W shape " + ShapeStr(w_shape));
  if (w_shape[0] % at.group != 0)
    Fail("W has " + std::to_string(w_shape[0]) + " output channels, not a multiple of group " +
         std::to_string(at.group));
  if (C >= 0 && C != w_shape[1] * at.group)
    Fail("X has " + std::to_string(C) + " channels but W " + ShapeStr(w_shape) + " with group " +
         std::to_string(at.group) + " expects " + std::to_string(w_shape[1] * at.group));
  return k;
}

void ConvGeometry(const ConvAttrs& at, const std::vector<int64_t>& in, const std::vector<int64_t>& k,
                  std::vector<int64_t>* out, std::vector<int64_t>* pad_begin) {
  const size_t r = in.size();
  auto per_dim = [&](const std::vector<int64_t>& v, const char* name) {
    if (v.empty()) return std::vector<int64_t>(r, 1);
    if (v.size() != r) Fail(std::string(name) + " must have " + std::to_string(r) + " values, got " + ShapeStr(v));
    for (int64_t e : v)
      if (e < 1 || e > kDimLimit)
        Fail(std::string(name) + " must be in 1.." + std::to_string(kDimLimit) + ", got " + ShapeStr(v));
    return v;
  };
  const std::vector<int64_t> s = per_dim(at.strides, "strides"), d = per_dim(at.dilations, "dilations");
  const bool same = at.auto_pad == "SAME_UPPER" || at.auto_pad == "SAME_LOWER";
  if (!same && at.auto_pad != "NOTSET" && at.auto_pad != "VALID" && !at.auto_pad.empty())
    Fail("auto_pad must be NOTSET, SAME_UPPER, SAME_LOWER or VALID, got '" + at.auto_pad + "'");
  std::vector<int64_t> pads(2 * r, 0);
  if (at.auto_pad == "NOTSET" || at.auto_pad.empty()) {
    if (!at.pads.empty()) {
      if (at.pads.size() != 2 * r)
        Fail("pads must have " + std::to_string(2 * r) + " values, got " + ShapeStr(at.pads));
      for (int64_t p : at.pads)
        if (p < 0 || p > kDimLimit)
          Fail("pads must be in 0.." + std::to_string(kDimLimit) + ", got " + ShapeStr(at.pads));
      pads = at.pads;
    }
  }
  out->assign(r, -1);
  pad_begin->assign(r, 0);
  for (size_t i = 0; i < r; ++i) {
    const std::string dim = " in spatial dim " + std::to_string(i);
    Bounded(k[i], "the kernel size" + dim);
    // All operands < 2^31, so these int64 products and sums cannot overflow; Bounded keeps them < 2^31.
    const int64_t ext = Bounded(d[i] * (k[i] - 1) + 1, "the kernel extent (dilation x (kernel - 1) + 1)" + dim);
    if (in[i] < 0) {
      (*pad_begin)[i] = same ? 0 : pads[i];
      continue;
    }
    Bounded(in[i], "the input size" + dim);
    if (same) {
      const int64_t o = (in[i] + s[i] - 1) / s[i];
      const int64_t total = std::max<int64_t>(0, (o - 1) * s[i] + ext - in[i]);
      Bounded(in[i] + total, "the padded input" + dim);
      (*pad_begin)[i] = at.auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
      (*out)[i] = o;
      continue;
    }
    (*pad_begin)[i] = pads[i];
    const int64_t padded = Bounded(in[i] + pads[i] + pads[i + r], "the padded input" + dim);
    if (padded < ext)
      Fail("kernel extent " + std::to_string(ext) + " (kernel " + std::to_string(k[i]) + ", dilation " +
           std::to_string(d[i]) + ") exceeds the padded input " + std::to_string(padded) + dim);
    (*out)[i] = (padded - ext) / s[i] + 1;
  }
}

void ConvCore::Init(const OrtKernelInfo* info, bool channels_last, size_t w_index, size_t wzp_index) {
  at_ = ReadConvAttrs(info);
  channels_last_ = channels_last;
  auto w = ConstantInput(info, w_index);
  if (w && w->shape.size() >= 3 && w->shape.size() <= 5) {  // attributes checked against W now, as ORT's schemas do
    const std::vector<int64_t> k = ConvKernelDims(at_, static_cast<int64_t>(w->shape.size()), -1, w->shape);
    std::vector<int64_t> out, pad;
    ConvGeometry(at_, std::vector<int64_t>(k.size(), -1), k, &out, &pad);
  }
  if (!w || (!w->is_int8() && !w->is_uint8()) || w->shape.size() < 3 || at_.group < 1) return;
  for (int64_t d : w->shape)
    if (d < 0) return;
  const int64_t M = w->shape[0];
  if (M % at_.group != 0) return;  // reported at run time
  std::vector<int32_t> zp(static_cast<size_t>(M), 0);
  if (wzp_index != SIZE_MAX) {
    auto z = ConstantInput(info, wzp_index);
    size_t n = 0;
    ThrowOnError(g_ort->KernelInfo_GetInputCount(info, &n));
    if (z) {
      if (z->type != w->type || (z->size() != 1 && z->size() != M)) return;
      zp = ZeroPoints(z, static_cast<size_t>(M), w->type, "w_zero_point");
    } else if (wzp_index < n) {
      return;  // a zero point that is not constant: pack per call
    }
  }
  ConvShape s;
  s.M = static_cast<size_t>(M);
  s.group = static_cast<size_t>(at_.group);
  s.C = static_cast<size_t>(w->shape[1]) * s.group;
  const size_t r = w->shape.size() - 2;
  for (size_t i = 0; i < r; ++i) s.k[3 - r + i] = static_cast<size_t>(w->shape[2 + i]);
  PackConv(GetMicroKernel(ActiveIsa()), s, w->as<uint8_t>(), w->is_int8(), zp.data(), &pre_);
  pre_shape_ = w->shape;
  pre_zp_ = zp;
  has_pre_ = true;
}

ConvShape ConvCore::Plan(const Tensor& x, const Tensor& w, std::vector<int64_t>* y_shape) const {
  const int64_t rank = static_cast<int64_t>(x.shape.size());
  if (rank < 3 || rank > 5) Fail("X must have rank 3 to 5 (1-D to 3-D convolution), got shape " + ShapeStr(x.shape));
  const int64_t C = channels_last_ ? x.shape.back() : x.shape[1];
  const std::vector<int64_t> k = ConvKernelDims(at_, rank, C, w.shape);
  std::vector<int64_t> in(channels_last_ ? x.shape.begin() + 1 : x.shape.begin() + 2,
                          channels_last_ ? x.shape.end() - 1 : x.shape.end());
  std::vector<int64_t> out, pad;
  ConvGeometry(at_, in, k, &out, &pad);
  const size_t r = in.size();
  ConvShape s;
  s.batch = static_cast<size_t>(x.shape[0]);
  s.C = static_cast<size_t>(C);
  s.M = static_cast<size_t>(w.shape[0]);
  s.group = static_cast<size_t>(at_.group);
  const auto dim = [&](const std::vector<int64_t>& v, size_t i) { return v.empty() ? 1 : static_cast<size_t>(v[i]); };
  for (size_t i = 0; i < r; ++i) {
    const size_t j = 3 - r + i;
    s.in[j] = static_cast<size_t>(in[i]);
    s.out[j] = static_cast<size_t>(out[i]);
    s.k[j] = static_cast<size_t>(k[i]);
    s.stride[j] = dim(at_.strides, i);
    s.dil[j] = dim(at_.dilations, i);
    s.pad[j] = static_cast<size_t>(pad[i]);
  }
  y_shape->assign({x.shape[0]});
  if (!channels_last_) y_shape->push_back(w.shape[0]);
  y_shape->insert(y_shape->end(), out.begin(), out.end());
  if (channels_last_) y_shape->push_back(w.shape[0]);
  return s;
}

// ConvInteger's pointwise layers in NCHW as GEMMs with the weights as A and each image's channels x pixels as B
// (packed per call: a byte pass over X), so the int32 output is written in NCHW directly: no NHWC transpose of X and
// none of the int32 output (4x X's bytes), which cost ConvInteger's pointwise layers more than their GEMM. Per group:
// Y[b][g] (Mg x HW) = W[g] (Mg x Cg) * X[b][g] (Cg x HW), W's zero points per row, X's one per column.
// One parallel section: each task packs a block of its image's and group's columns (~32 KiB packed) and multiplies
// it at once, while it is in cache (one pool wake-up per call where packing and multiplying were two).
void ConvCore::PointwiseNchw(const MicroKernel& uk, const ConvShape& s, const Tensor& x, int32_t x_zp, const Tensor& w,
                             const std::vector<int32_t>& w_zp, int32_t* y, const ParallelFor& pfor) const {
  const size_t HW = s.in_pixels(), Cg = s.Cg(), Mg = s.Mg();
  const size_t kp = uk.PaddedK(Cg);
  const size_t per = std::max<size_t>(1, (size_t{32} << 10) / std::max<size_t>(1, kp * uk.nr)) * uk.nr;  // columns
  const size_t chunks = (HW + per - 1) / per, tasks = s.batch * s.group * chunks;
  // This thread's buffers, kept between calls (no allocation once warm); referenced through locals, so the tasks on
  // pool threads use these and not their own thread's.
  thread_local std::vector<PackedB> tl_packed;
  thread_local std::vector<int32_t> tl_zb;
  std::vector<PackedB>& packed = tl_packed;
  std::vector<int32_t>& zb = tl_zb;
  if (packed.size() < tasks) packed.resize(tasks);
  zb.assign(std::min(HW, per), x_zp);
  const ParallelFor inline_for = [](size_t n, const std::function<void(size_t)>& fn) {
    for (size_t i = 0; i < n; ++i) fn(i);
  };
  auto task = [&](size_t t) {
    const size_t c = t % chunks, g = t / chunks % s.group, b = t / chunks / s.group;
    const size_t n0 = c * per, n = std::min(HW, n0 + per) - n0;
    PackB(uk, x.as<uint8_t>() + (b * s.C + g * Cg) * HW + n0, x.is_int8(), Cg, n, static_cast<ptrdiff_t>(HW), 1,
          &packed[t]);
    const PackedB* bp = &packed[t];
    GemmArgs ga;
    ga.M = Mg;
    ga.N = n;
    ga.K = Cg;
    ga.a = w.as<uint8_t>() + g * Mg * Cg;
    ga.lda = Cg;
    ga.a_signed = w.is_int8();
    ga.za = w_zp.data() + g * Mg;
    // one weight zero point for the group's rows: folded into the column terms (the kernels' fast epilogue)
    ga.za_per_row =
        std::any_of(w_zp.begin() + g * Mg, w_zp.begin() + (g + 1) * Mg, [&](int32_t z) { return z != ga.za[0]; });
    ga.zb = zb.data();
    ga.kind = OutKind::kInt32;
    ga.y = y + (b * s.M + g * Mg) * HW + n0;
    ga.ldy = HW;
    ga.b = &bp;
    Gemm(uk, ga, inline_for);
  };
  // Small layers (under ~1 us of multiply-adds per task on average) on the calling thread: a wake-up costs more.
  if (tasks > 1 && static_cast<double>(s.batch) * s.M * HW * Cg > 262144.0 * 2)
    pfor(tasks, task);
  else
    for (size_t t = 0; t < tasks; ++t) task(t);
}

Isa ConvCore::Run(OrtKernelContext* ctx, const Tensor& x, int32_t x_zp, const Tensor& w,
                  const std::vector<int32_t>& w_zp, const ConvOutput& out) {
  std::vector<int64_t> y_shape;
  const ConvShape s = Plan(x, w, &y_shape);
  void* y = Output(ctx, 0, y_shape, out.kind);
  const Isa isa = ActiveIsa();
  if (s.batch * s.out_pixels() * s.M == 0) return isa;
  const MicroKernel& uk = GetMicroKernel(isa);
  PackedConv local;
  const PackedConv* pw = &pre_;
  if (!has_pre_ || pre_.isa != isa || pre_shape_ != w.shape || (pre_.depthwise && pre_zp_ != w_zp)) {
    PackConv(uk, s, w.as<uint8_t>(), w.is_int8(), w_zp.data(), &local);
    pw = &local;
  }
  const ParallelFor pool = OrtParallelFor(ctx);
  Pace pace(*pacing_, true, s.batch * s.C * s.in_pixels(), pool);
  const ParallelFor& pfor = pace.For();
  if (!channels_last_ && out.kind == OutKind::kInt32 && s.pointwise()) {
    PointwiseNchw(uk, s, x, x_zp, w, w_zp, static_cast<int32_t*>(y), pfor);
    pace.Done();
    return isa;
  }
  const size_t osz = out.kind == OutKind::kInt32 ? 4 : 1;
  // This thread's NHWC buffers, kept between calls (no allocation, no page faults once warm)
  thread_local std::vector<uint8_t> x_nhwc, y_nhwc;
  ConvArgs a;
  a.x = x.as<uint8_t>();
  if (!channels_last_) {
    x_nhwc.resize(s.batch * s.C * s.in_pixels());
    Transpose2D(x.data, x_nhwc.data(), s.batch, s.C, s.in_pixels(), 1, &pfor);
    a.x = x_nhwc.data();
    y_nhwc.resize(s.batch * s.out_pixels() * s.M * osz);
  }
  a.x_signed = x.is_int8();
  a.x_zp = x_zp;
  a.w_zp = w_zp.data();
  a.bias = out.bias;
  a.kind = out.kind;
  a.scale = out.scale.empty() ? nullptr : out.scale.data();
  a.y_zp = out.y_zp;
  a.y = channels_last_ ? y : y_nhwc.data();
  Conv(uk, s, *pw, a, pfor);
  if (!channels_last_) Transpose2D(y_nhwc.data(), y, s.batch, s.out_pixels(), s.M, osz, &pfor);
  pace.Done();
  return isa;
}

}  // namespace qie
