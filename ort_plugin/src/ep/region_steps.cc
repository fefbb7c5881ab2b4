// The kernels of a region's steps (see region_plan.h): tables, float programs, layout changes, convolutions,
// binary units, pools and Concat over NHWC byte tensors. Numerics: region.cc's header and docs/numerics.md.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ep/graph.h"
#include "ep/region_plan.h"
#include "kernels/isa.h"
#include "ops/conv_core.h"

namespace qie_ep {

namespace {

// Output dims and leading pads of a conv or pool step on input `d`; a bad geometry names the node.
void Geometry(const RegionPlan::Step& s, const Dims& d, std::vector<int64_t>* out, std::vector<int64_t>* pad) {
  try {
    qie::ConvGeometry(s.at, {static_cast<int64_t>(d.h), static_cast<int64_t>(d.w)}, s.k, out, pad);
  } catch (const std::exception& e) { throw Failure{s.name + " on input " + d.Nchw() + ": " + e.what()}; }
}

template <bool Signed>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void DequantizeBlock(
    const uint8_t* __restrict x, size_t n, int32_t zp, float scale, float* __restrict y) {
  for (size_t i = 0; i < n; ++i)
    y[i] = static_cast<float>((Signed ? static_cast<int32_t>(static_cast<int8_t>(x[i])) : x[i]) - zp) * scale;
}

// NumPy broadcasting of a binary unit's two NHWC operands: the output dims and each operand's element strides
// (0 along its broadcast axes); shapes that do not broadcast are an error naming the node.
struct Broadcast {
  size_t Y[4], sa[4], sb[4];
  Broadcast(const RegionPlan::Step& s, const Dims& da, const Dims& db) {
    const size_t A[4] = {da.n, da.h, da.w, da.c}, B[4] = {db.n, db.h, db.w, db.c};
    for (int i = 0; i < 4; ++i) {
      if (A[i] != B[i] && A[i] != 1 && B[i] != 1)
        throw Failure{s.name + ": input shapes " + da.Nchw() + " and " + db.Nchw() + " do not broadcast"};
      Y[i] = A[i] == 1 ? B[i] : A[i];
    }
    size_t ea = 1, eb = 1;
    for (int i = 3; i >= 0; --i) {
      sa[i] = A[i] == 1 ? 0 : ea;
      sb[i] = B[i] == 1 ? 0 : eb;
      ea *= A[i];
      eb *= B[i];
    }
  }
};

// y = Q(DQ(a) op DQ(b)) with NumPy broadcasting of two NHWC tensors; one row of C channels (element strides ca,
// cb: 1, or 0 for a broadcast operand), specialised so the loop vectorizes.
template <char Op, bool AS, bool BS>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void BinaryRow(
    const uint8_t* a, size_t ca, const uint8_t* b, size_t cb, uint8_t* y, size_t C, const QParams& qa,
    const QParams& qb, const QParams& qy) {
  const float sa = qa.scale, sb = qb.scale;
  const int32_t za = qa.zp, zb = qb.zp;
  const Quantizer q(qy);
  auto dq = [](uint8_t v, bool s, int32_t z, float sc) {
    return static_cast<float>((s ? static_cast<int32_t>(static_cast<int8_t>(v)) : static_cast<int32_t>(v)) - z) * sc;
  };
  auto f = [&](float fa, float fb) { return Op == '+' ? fa + fb : Op == '-' ? fa - fb : fa * fb; };
  if (ca == 1 && cb == 1) {
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c], AS, za, sa), dq(b[c], BS, zb, sb)));
  } else if (ca == 1) {
    const float fb = dq(b[0], BS, zb, sb);
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c], AS, za, sa), fb));
  } else {
    for (size_t c = 0; c < C; ++c) y[c] = q(f(dq(a[c * ca], AS, za, sa), dq(b[c * cb], BS, zb, sb)));
  }
}

// y = ORT's QLinearAdd / QLinearMul of u8 x and z (units.h QLinearBinary: x the operand ORT walks as a span), one
// row of C channels (element strides cx, cz: 1, or 0 for a broadcast operand).
template <bool Mul>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void QLinearRow(
    const uint8_t* x, size_t cx, const uint8_t* z, size_t cz, uint8_t* y, size_t C, const QLinearBinary& k) {
  if (cx == 1 && cz == 1) {
    for (size_t c = 0; c < C; ++c) y[c] = k.Apply<Mul>(x[c], z[c]);
  } else {
    for (size_t c = 0; c < C; ++c) y[c] = k.Apply<Mul>(x[c * cx], z[c * cz]);
  }
}

// Whether ORT's QLinearAdd walks the second operand as the span and the first as a scalar: ORT breaks the output
// into spans along its innermost axes, and a first operand broadcast along the innermost axis of more than one
// element (or of one element in all) is its scalar (qlinear_binary_op.cc swaps the operands then). The layout is
// NHWC: at ORT_ENABLE_ALL ORT runs a u8 network's QLinearConv in NHWC and moves its QLinearAdd there too (at EXTENDED
// it stays NCHW: a first operand broadcast along C, W or H then rounds as ORT's within one step).
bool FirstIsScalar(const Dims& da, const Dims& out) {
  const size_t A[4] = {da.c, da.w, da.h, da.n}, Y[4] = {out.c, out.w, out.h, out.n};
  for (int i = 0; i < 4; ++i)
    if (Y[i] > 1) return A[i] == 1;
  return true;
}

// The same per element in float, before a binary unit's activation program.
template <char Op, bool AS, bool BS>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void BinaryRowF(
    const uint8_t* a, size_t ca, const uint8_t* b, size_t cb, float* y, size_t C, const QParams& qa,
    const QParams& qb) {
  const float sa = qa.scale, sb = qb.scale;
  const int32_t za = qa.zp, zb = qb.zp;
  for (size_t c = 0; c < C; ++c) {
    const float fa =
        static_cast<float>((AS ? static_cast<int32_t>(static_cast<int8_t>(a[c * ca])) : a[c * ca]) - za) * sa;
    const float fb =
        static_cast<float>((BS ? static_cast<int32_t>(static_cast<int8_t>(b[c * cb])) : b[c * cb]) - zb) * sb;
    y[c] = Op == '+' ? fa + fb : Op == '-' ? fa - fb : fa * fb;
  }
}

using BinaryRowFFn = void (*)(const uint8_t*, size_t, const uint8_t*, size_t, float*, size_t, const QParams&,
                              const QParams&);
template <char Op>
BinaryRowFFn BinaryFFor(bool as, bool bs) {
  return as ? (bs ? BinaryRowF<Op, true, true> : BinaryRowF<Op, true, false>)
            : (bs ? BinaryRowF<Op, false, true> : BinaryRowF<Op, false, false>);
}

using BinaryRowFn = void (*)(const uint8_t*, size_t, const uint8_t*, size_t, uint8_t*, size_t, const QParams&,
                             const QParams&, const QParams&);
template <char Op>
BinaryRowFn BinaryFor(bool as, bool bs) {
  return as ? (bs ? BinaryRow<Op, true, true> : BinaryRow<Op, true, false>)
            : (bs ? BinaryRow<Op, false, true> : BinaryRow<Op, false, false>);
}

// An operand in float32: its DequantizeLinear and, when it has one, its prefix program, over the whole tensor
// (blocks of elements for a program of scalar constants, of pixels for per-channel ones).
void OperandFloat(const RegionPlan::Step& s, size_t k, const Dims& d, const uint8_t* x, std::vector<float>* out,
                  const qie::ParallelFor& pfor) {
  const FloatProgram& f = s.pre[k];
  const QParams& q = s.qin[k];
  const size_t n = d.count();
  if (out->size() < n) out->resize(n);
  if (f.steps.empty() || n == 0) {
    if (q.is_signed)
      DequantizeBlock<true>(x, n, q.zp, q.scale, out->data());
    else
      DequantizeBlock<false>(x, n, q.zp, q.scale, out->data());
    return;
  }
  if (f.C > 1 && d.c != f.C)
    throw Failure{s.name + ": an operand's per-channel constants are for " + std::to_string(f.C) + " channels, got " +
                  d.Nchw()};
  const size_t per = f.C == 1 ? kTailBlock : ProgramRows(f.C) * f.C;  // elements per program block
  pfor((n + per - 1) / per, [&](size_t b) {
    thread_local std::vector<float> xf;
    thread_local std::vector<std::vector<float>> regs;
    const size_t e0 = b * per, m = std::min(per, n - e0);
    if (xf.size() < m) xf.resize(m);
    if (q.is_signed)
      DequantizeBlock<true>(x + e0, m, q.zp, q.scale, xf.data());
    else
      DequantizeBlock<false>(x + e0, m, q.zp, q.scale, xf.data());
    const float* r = RunProgram(f, xf.data(), m / f.C, &regs);
    std::copy(r, r + m, out->data() + e0);
  });
}

// py[c] = max(py[c], px[c] ^ flip): signed codes compared as unsigned once their sign bit is flipped.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void MaxInto(uint8_t* __restrict py,
                                                                                           const uint8_t* __restrict px,
                                                                                           size_t C, uint8_t flip) {
  for (size_t c = 0; c < C; ++c) {
    const uint8_t v = px[c] ^ flip;
    py[c] = py[c] > v ? py[c] : v;
  }
}

// A 2-D pooling step's window over NHWC input `d`: sets the output dims (growing the output buffer) and visits,
// for one output pixel, the taps that lie inside the input, rows then columns.
struct PoolWindow {
  const RegionPlan::Step& s;
  const Dims& d;
  const uint8_t* x;
  std::vector<int64_t> out, pad;
  int64_t sh, sw, dh, dw;
  PoolWindow(const RegionPlan::Step& st, const Dims& dd, const uint8_t* xx, Dims* od, std::vector<uint8_t>* ybuf)
      : s(st), d(dd), x(xx) {
    Geometry(s, d, &out, &pad);
    *od = {d.n, static_cast<size_t>(out[0]), static_cast<size_t>(out[1]), d.c};
    if (ybuf->size() < od->count()) ybuf->resize(od->count());
    sh = s.at.strides.empty() ? 1 : s.at.strides[0];
    sw = s.at.strides.empty() ? 1 : s.at.strides[1];
    dh = s.at.dilations.empty() ? 1 : s.at.dilations[0];
    dw = s.at.dilations.empty() ? 1 : s.at.dilations[1];
  }
  template <class F>
  void ForTaps(size_t n, int64_t oh, size_t ow, F&& fn) const {
    for (int64_t kh = 0; kh < s.k[0]; ++kh) {
      const int64_t ih = oh * sh - pad[0] + kh * dh;
      if (ih < 0 || ih >= static_cast<int64_t>(d.h)) continue;
      for (int64_t kw = 0; kw < s.k[1]; ++kw) {
        const int64_t iw = static_cast<int64_t>(ow) * sw - pad[1] + kw * dw;
        if (iw < 0 || iw >= static_cast<int64_t>(d.w)) continue;
        fn(x + ((n * d.h + static_cast<size_t>(ih)) * d.w + static_cast<size_t>(iw)) * d.c);
      }
    }
  }
};

}  // namespace

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void QuantizeBlock(
    const float* __restrict x, size_t n, const Quantizer& q, uint8_t* __restrict y) {
  const Quantizer local = q;  // not reloaded after each byte store
  for (size_t i = 0; i < n; ++i) y[i] = local(x[i]);
}

void DequantizeCodes(const uint8_t* q, size_t n, bool is_signed, int32_t zp, float scale, float* y) {
  if (is_signed)
    DequantizeBlock<true>(q, n, zp, scale, y);
  else
    DequantizeBlock<false>(q, n, zp, scale, y);
}

// Byte steps smaller than this run on the calling thread: with ORT's pool not spinning (its setting when sessions
// share cores), a worker's wake-up costs ~10-20 us, more than a table over 128 KiB at ~0.2 ns per byte.
constexpr size_t kSerialBytes = size_t{128} << 10;

// y = t[c][x] over `pixels` NHWC pixels of C channels (`t`: one table when tC = 1, else tC = C of them, 3 bytes
// of padding after). Blocks of ~32 KiB, in parallel.
void ApplyLut(const uint8_t* t, size_t tC, const uint8_t* x, uint8_t* y, size_t pixels, size_t C,
              const qie::ParallelFor& pfor) {
  const qie::ChannelLutFn lut = qie::KernelsFor(qie::ActiveIsa()).channel_lut;
  if (tC == 1) {  // one table: the tensor as one row
    pixels *= C;
    C = 1;
  }
  if (pixels == 0 || C == 0) return;
  // Blocks of ~32 KiB; a tensor under kSerialBytes in one call (a worker's wake-up costs more than the table).
  const size_t per = pixels * C < kSerialBytes ? pixels : std::max<size_t>(1, (size_t{1} << 15) / C);
  pfor((pixels + per - 1) / per, [&](size_t b) {
    const size_t p0 = b * per, p1 = std::min(pixels, p0 + per);
    if (lut) return lut(t, C, x + p0 * C, y + p0 * C, p1 - p0, C);
    for (size_t p = p0; p < p1; ++p)
      for (size_t c = 0; c < C; ++c) y[p * C + c] = t[c * 256 + x[p * C + c]];
  });
}

// NCHW -> NHWC and back for n images of c channels and hw pixels, in parallel over blocks of pixels.
void ToNhwc(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor) {
  constexpr size_t kPix = 512;
  const size_t blocks = (hw + kPix - 1) / kPix;
  if (n * c * hw == 0) return;
  pfor(n * blocks, [&](size_t t) {
    const size_t b = t / blocks, j0 = (t % blocks) * kPix, j1 = std::min(hw, j0 + kPix);
    qie::TransposeBytes(x + b * c * hw + j0, hw, y + (b * hw + j0) * c, c, c, j1 - j0);
  });
}

void QuantizeInput(const float* x, uint8_t* y, const Dims& d, const QParams& q, const qie::ParallelFor& pfor) {
  constexpr size_t kPix = 1024;
  const size_t hw = d.h * d.w, blocks = (hw + kPix - 1) / kPix;
  if (d.count() == 0) return;
  pfor(d.n * blocks, [&](size_t t) {
    const size_t b = t / blocks, p0 = (t % blocks) * kPix, p1 = std::min(hw, p0 + kPix);
    qie::QuantizeToNhwc(x + b * d.c * hw, d.c, hw, p0, p1, q.scale, q.zp, q.is_signed, y + b * hw * d.c);
  });
}

void ToNchw(const uint8_t* x, uint8_t* y, size_t n, size_t c, size_t hw, const qie::ParallelFor& pfor) {
  constexpr size_t kPix = 512;
  const size_t blocks = (hw + kPix - 1) / kPix;
  if (n * c * hw == 0) return;
  pfor(n * blocks, [&](size_t t) {
    const size_t b = t / blocks, i0 = (t % blocks) * kPix, i1 = std::min(hw, i0 + kPix);
    qie::TransposeBytes(x + (b * hw + i0) * c, c, y + b * c * hw + i0, hw, i1 - i0, c);
  });
}

// A per-channel table step of plain arithmetic run on the data: per block of pixels, each composed unit's
// DequantizeLinear, float program and QuantizeLinear, as its tables were built (so the same codes).
void RunChannelPrograms(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, uint8_t* y,
                        const qie::ParallelFor& pfor) {
  const size_t C = d.c, pixels = d.pixels();
  const size_t per = ProgramRows(C);  // pixels per program block
  const size_t task = per * std::max<size_t>(1, (size_t{1} << 15) / (per * std::max<size_t>(1, C)));  // ~32 KiB
  if (pixels == 0 || C == 0) return;
  pfor((pixels + task - 1) / task, [&](size_t t) {
    thread_local std::vector<float> xf;
    thread_local std::vector<std::vector<float>> regs;
    for (size_t p0 = t * task; p0 < std::min(pixels, (t + 1) * task); p0 += per) {
      const size_t rows = std::min(per, pixels - p0), n = rows * C;
      if (xf.size() < n) xf.resize(n);
      const uint8_t* src = x + p0 * C;
      uint8_t* dst = y + p0 * C;
      for (const RegionPlan::Chained& link : s.chain) {
        if (link.in.is_signed)
          DequantizeBlock<true>(src, n, link.in.zp, link.in.scale, xf.data());
        else
          DequantizeBlock<false>(src, n, link.in.zp, link.in.scale, xf.data());
        QuantizeBlock(RunProgram(link.f, xf.data(), rows, &regs), n, Quantizer(link.out), dst);
        src = dst;  // the next unit reads this one's codes
      }
    }
  });
}

void RunConv(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
             const qie::ParallelFor& pfor) {
  if (d.c != s.C) throw Failure{s.name + " expects " + std::to_string(s.C) + " input channels, got " + d.Nchw()};
  std::vector<int64_t> out, pad;
  Geometry(s, d, &out, &pad);
  qie::ConvShape cs;
  cs.batch = d.n;
  cs.C = s.C;
  cs.M = s.M;
  cs.group = static_cast<size_t>(s.at.group);
  cs.in[1] = d.h;
  cs.in[2] = d.w;
  cs.out[1] = static_cast<size_t>(out[0]);
  cs.out[2] = static_cast<size_t>(out[1]);
  cs.k[1] = static_cast<size_t>(s.k[0]);
  cs.k[2] = static_cast<size_t>(s.k[1]);
  for (int i = 0; i < 2; ++i) {
    cs.stride[1 + i] = s.at.strides.empty() ? 1 : static_cast<size_t>(s.at.strides[i]);
    cs.dil[1 + i] = s.at.dilations.empty() ? 1 : static_cast<size_t>(s.at.dilations[i]);
    cs.pad[1 + i] = static_cast<size_t>(pad[i]);
  }
  *od = {d.n, cs.out[1], cs.out[2], s.M};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  if (od->count() == 0) return;
  qie::ConvArgs ca;
  ca.x = x;
  ca.x_signed = s.qin[0].is_signed;
  ca.x_zp = s.qin[0].zp;
  ca.w_zp = s.wzp.data();
  ca.bias = s.bias.empty() ? nullptr : s.bias.data();
  ca.kind = s.qout.is_signed ? qie::OutKind::kS8 : qie::OutKind::kU8;
  ca.scale = s.scale.data();
  ca.y_zp = s.qout.zp;
  ca.y = ybuf->data();
  ca.lut = s.post.empty() ? nullptr : s.post.data();
  ca.lut_tables = s.post_tC;
  qie::Conv(qie::GetMicroKernel(s.packed.isa), cs, s.packed, ca, pfor);  // the ISA its weights were packed for
}

// y[i] = clamp(code(y[i]), lo, hi) for i < n: a Relu / Clip after a binary unit, on its codes.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void ClampCodes(uint8_t* y, size_t n,
                                                                                              bool is_signed, int lo,
                                                                                              int hi) {
  if (is_signed) {
    int8_t* v = reinterpret_cast<int8_t*>(y);
    const int8_t l = static_cast<int8_t>(lo), u = static_cast<int8_t>(hi);
    for (size_t i = 0; i < n; ++i) v[i] = v[i] < l ? l : v[i] > u ? u : v[i];
  } else {
    const uint8_t l = static_cast<uint8_t>(lo), u = static_cast<uint8_t>(hi);
    for (size_t i = 0; i < n; ++i) y[i] = y[i] < l ? l : y[i] > u ? u : y[i];
  }
}

void RunBinary(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b, Dims* od,
               std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  const Broadcast bc(s, da, db);
  const size_t* Y = bc.Y;
  const size_t* sa = bc.sa;
  const size_t* sb = bc.sb;
  *od = {Y[0], Y[1], Y[2], Y[3]};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t rows = Y[0] * Y[1];
  const bool as = s.qin[0].is_signed, bs = s.qin[1].is_signed;
  const BinaryRowFn row = s.op == '+'   ? BinaryFor<'+'>(as, bs)
                          : s.op == '-' ? BinaryFor<'-'>(as, bs)
                                        : BinaryFor<'*'>(as, bs);
  if (od->count() == 0) return;
  if (!s.tail.steps.empty()) {  // float per row, then the activations and the quantization in blocks
    const BinaryRowFFn rowf = s.op == '+'   ? BinaryFFor<'+'>(as, bs)
                              : s.op == '-' ? BinaryFFor<'-'>(as, bs)
                                            : BinaryFFor<'*'>(as, bs);
    const Quantizer q(s.qout);
    pfor(rows, [&](size_t r) {
      thread_local std::vector<float> f;
      thread_local std::vector<std::vector<float>> regs;
      const size_t n = r / Y[1], h = r % Y[1], len = Y[2] * Y[3];
      if (f.size() < len) f.resize(len);
      if (sa[3] == 1 && sb[3] == 1 && sa[2] == Y[3] && sb[2] == Y[3])  // no broadcast along W and C: one call
        rowf(a + n * sa[0] + h * sa[1], 1, b + n * sb[0] + h * sb[1], 1, f.data(), len, s.qin[0], s.qin[1]);
      else
        for (size_t w = 0; w < Y[2]; ++w)
          rowf(a + n * sa[0] + h * sa[1] + w * sa[2], sa[3], b + n * sb[0] + h * sb[1] + w * sb[2], sb[3],
               f.data() + w * Y[3], Y[3], s.qin[0], s.qin[1]);
      for (size_t k = 0; k < len; k += kTailBlock) {
        const size_t m = std::min(kTailBlock, len - k);
        QuantizeBlock(RunProgram(s.tail, f.data() + k, m, &regs), m, q, y + r * len + k);
      }
    });
    return;
  }
  // ORT's QLinearAdd / QLinearMul: its operands in the order it walks them
  const bool swap = s.qlinear && FirstIsScalar(da, *od);
  const QLinearBinary ql(s.op, s.qin[swap ? 1 : 0], s.qin[swap ? 0 : 1], s.qout);
  const auto qrow = ql.mul ? QLinearRow<true> : QLinearRow<false>;
  const auto call = [&](const uint8_t* pa, size_t ca, const uint8_t* pb, size_t cb, uint8_t* py, size_t C) {
    if (!s.qlinear)
      row(pa, ca, pb, cb, py, C, s.qin[0], s.qin[1], s.qout);
    else if (swap)
      qrow(pb, cb, pa, ca, py, C, ql);
    else
      qrow(pa, ca, pb, cb, py, C, ql);
  };
  // Operands laid out like the output along W and C (no broadcast there): one call per output row.
  const bool flat = sa[3] == 1 && sb[3] == 1 && sa[2] == Y[3] && sb[2] == Y[3];
  const bool is_signed = s.qout.is_signed;
  pfor(rows, [&](size_t r) {
    const size_t n = r / Y[1], h = r % Y[1];
    if (flat) {
      call(a + n * sa[0] + h * sa[1], 1, b + n * sb[0] + h * sb[1], 1, y + r * Y[2] * Y[3], Y[2] * Y[3]);
      for (const auto& [lo, hi] : s.clamps) ClampCodes(y + r * Y[2] * Y[3], Y[2] * Y[3], is_signed, lo, hi);
      return;
    }
    for (size_t w = 0; w < Y[2]; ++w) {
      const uint8_t* pa = a + n * sa[0] + h * sa[1] + w * sa[2];
      const uint8_t* pb = b + n * sb[0] + h * sb[1] + w * sb[2];
      call(pa, sa[3], pb, sb[3], y + ((r * Y[2]) + w) * Y[3], Y[3]);
    }
    for (const auto& [lo, hi] : s.clamps) ClampCodes(y + r * Y[2] * Y[3], Y[2] * Y[3], is_signed, lo, hi);
  });
}

// Binary units with a prefix on an operand: both operands in float32, the operation with broadcasting, the
// activation program, QuantizeLinear.
void RunBinaryFloat(const RegionPlan::Step& s, const Dims& da, const uint8_t* a, const Dims& db, const uint8_t* b,
                    Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  thread_local std::vector<float> fa, fb;
  OperandFloat(s, 0, da, a, &fa, pfor);
  OperandFloat(s, 1, db, b, &fb, pfor);
  const Broadcast bc(s, da, db);
  const size_t* Y = bc.Y;
  const size_t* sa = bc.sa;
  const size_t* sb = bc.sb;
  *od = {Y[0], Y[1], Y[2], Y[3]};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const Quantizer q(s.qout);
  const float* pa0 = fa.data();
  const float* pb0 = fb.data();
  pfor(Y[0] * Y[1], [&](size_t r) {
    thread_local std::vector<float> f;
    thread_local std::vector<std::vector<float>> regs;
    const size_t n = r / Y[1], h = r % Y[1], len = Y[2] * Y[3];
    if (f.size() < len) f.resize(len);
    for (size_t w = 0; w < Y[2]; ++w) {
      const float* pa = pa0 + n * sa[0] + h * sa[1] + w * sa[2];
      const float* pb = pb0 + n * sb[0] + h * sb[1] + w * sb[2];
      float* pf = f.data() + w * Y[3];
      for (size_t c = 0; c < Y[3]; ++c) {
        const float x = pa[c * sa[3]], z = pb[c * sb[3]];
        pf[c] = s.op == '+' ? x + z : s.op == '-' ? x - z : x * z;
      }
    }
    for (size_t k = 0; k < len; k += kTailBlock) {
      const size_t m = std::min(kTailBlock, len - k);
      const float* v = s.tail.steps.empty() ? f.data() + k : RunProgram(s.tail, f.data() + k, m, &regs);
      QuantizeBlock(v, m, q, y + r * len + k);
    }
  });
}

void RunGap(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
            const qie::ParallelFor& pfor) {
  *od = {d.n, 1, 1, d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t hw = d.h * d.w, C = d.c;
  const QParams& qx = s.qin[0];
  // u8 throughout: what ORT fuses into QLinearGlobalAveragePool from ORT_ENABLE_EXTENDED on, whose arithmetic (MLAS's
  // x86 kernel: one float multiplier, as a conv's requantization) this takes; else the float graph's mean, then Q.
  const bool ort_form = !qx.is_signed && !s.qout.is_signed;
  const float scale = qx.scale / (s.qout.scale * static_cast<float>(hw));
  const float lo = static_cast<float>(-s.qout.zp), hi = static_cast<float>(255 - s.qout.zp);
  constexpr size_t kBlock = 256;  // channels per task
  const size_t blocks = (C + kBlock - 1) / kBlock;
  if (od->count() == 0) return;
  pfor(d.n * blocks, [&](size_t t) {
    const size_t n = t / blocks, c0 = (t % blocks) * kBlock, cn = std::min(kBlock, C - c0);
    int64_t acc[kBlock] = {};
    for (size_t p = 0; p < hw; ++p) {
      const uint8_t* px = x + (n * hw + p) * C + c0;
      for (size_t k = 0; k < cn; ++k) acc[k] += Code(px[k], qx.is_signed);
    }
    for (size_t k = 0; k < cn; ++k) {
      const int64_t centered = acc[k] - static_cast<int64_t>(hw) * qx.zp;
      if (ort_form) {  // QLinearGlobalAveragePool: float(sum - HW zx) * (sx / (sy HW)), rounded, + zy
        float v = static_cast<float>(centered) * scale;
        v = v < lo ? lo : v > hi ? hi : v;
        y[n * C + c0 + k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(v)) + s.qout.zp);
        continue;
      }
      const float mean = static_cast<float>(centered) * qx.scale / static_cast<float>(hw);
      y[n * C + c0 + k] = QuantizeOne(mean, s.qout);
    }
  });
}

// A global average pool whose operand has a prefix: the float values summed pixel by pixel in float32, / HW.
void RunGapFloat(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                 const qie::ParallelFor& pfor) {
  thread_local std::vector<float> fx;
  OperandFloat(s, 0, d, x, &fx, pfor);
  *od = {d.n, 1, 1, d.c};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t hw = d.h * d.w, C = d.c;
  const Quantizer q(s.qout);
  const float* f = fx.data();
  pfor(d.n, [&](size_t n) {
    thread_local std::vector<float> acc;
    acc.assign(C, 0.0f);
    for (size_t p = 0; p < hw; ++p)
      for (size_t c = 0; c < C; ++c) acc[c] += f[(n * hw + p) * C + c];
    for (size_t c = 0; c < C; ++c) y[n * C + c] = q(acc[c] / static_cast<float>(hw));
  });
}

void RunConcat(const RegionPlan::Step& s, const std::vector<const Dims*>& ds, const std::vector<const uint8_t*>& xs,
               Dims* od, std::vector<uint8_t>* ybuf, const qie::ParallelFor& pfor) {
  Dims o = *ds[0];
  o.c = 0;
  for (const Dims* d : ds) {
    if (d->n != o.n || d->h != o.h || d->w != o.w)
      throw Failure{s.name + ": inputs " + ds[0]->Nchw() + " and " + d->Nchw() + " differ outside the channel axis"};
    o.c += d->c;
  }
  *od = o;
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t pixels = o.pixels(), per = std::max<size_t>(1, (size_t{1} << 14) / std::max<size_t>(1, o.c));
  if (od->count() == 0) return;
  // Per block of pixels and input: an input of another scale is requantized in one vector table pass (the ISA's
  // byte lookup over the block, contiguous) into scratch, then each pixel's channels are copied into place.
  const qie::ChannelLutFn lut = qie::KernelsFor(qie::ActiveIsa()).channel_lut;
  pfor((pixels + per - 1) / per, [&](size_t b) {
    thread_local std::vector<uint8_t> tmp;
    const size_t p0 = b * per, np = std::min(pixels, p0 + per) - p0;
    size_t offset = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      const size_t C = ds[i]->c;
      const uint8_t* px = xs[i] + p0 * C;
      if (!s.requant[i].empty() && np * C > 0) {
        if (tmp.size() < np * C) tmp.resize(np * C);
        if (lut) {
          lut(s.requant[i].data(), 1, px, tmp.data(), np * C, 1);
        } else {
          for (size_t k = 0; k < np * C; ++k) tmp[k] = s.requant[i][px[k]];
        }
        px = tmp.data();
      }
      uint8_t* py = y + p0 * o.c + offset;
      for (size_t p = 0; p < np; ++p) std::memcpy(py + p * o.c, px + p * C, C);
      offset += C;
    }
  });
}

void RunSlice(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
              const qie::ParallelFor& pfor) {
  const int64_t C = static_cast<int64_t>(d.c);
  auto at = [C](int64_t v) { return std::clamp<int64_t>(v < 0 ? v + C : v, 0, C); };
  const size_t c0 = static_cast<size_t>(at(s.k[0])), c1 = std::max(c0, static_cast<size_t>(at(s.k[1])));
  *od = {d.n, d.h, d.w, c1 - c0};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t W = c1 - c0, pixels = d.pixels(), per = std::max<size_t>(qie::kLutRows, (size_t{1} << 14) / W);
  const std::vector<uint8_t>& rq = s.requant[0];
  const qie::Isa isa = qie::ActiveIsa();
  pfor((pixels + per - 1) / per, [&](size_t b) {
    const size_t p0 = b * per, np = std::min(pixels, p0 + per) - p0;
    for (size_t p = p0; p < p0 + np; ++p) std::memcpy(y + p * W, x + p * d.c + c0, W);
    if (!rq.empty()) qie::LookupBlock(isa, rq.data(), 1, y + p0 * W, np, W, W);
  });
}

void RunResize(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
               const qie::ParallelFor& pfor) {
  const size_t sh = static_cast<size_t>(s.k[0]), sw = static_cast<size_t>(s.k[1]), C = d.c;
  *od = {d.n, d.h * sh, d.w * sw, C};
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const std::vector<uint8_t>& rq = s.requant[0];
  const qie::Isa isa = qie::ActiveIsa();
  const size_t row = od->w * C;  // bytes per output row
  pfor(od->n * od->h, [&](size_t r) {
    const size_t n = r / od->h, ih = (r % od->h) / sh;
    const uint8_t* src = x + ((n * d.h + ih) * d.w) * C;
    uint8_t* dst = y + r * row;
    for (size_t iw = 0; iw < d.w; ++iw)
      for (size_t k = 0; k < sw; ++k) std::memcpy(dst + (iw * sw + k) * C, src + iw * C, C);
    if (!rq.empty()) qie::LookupBlock(isa, rq.data(), 1, dst, 1, row, row);
  });
}

void RunShuffle(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor) {
  const size_t C = s.C, g = s.M, cg = g ? C / g : 0;
  if (d.c != C || d.h != static_cast<size_t>(s.k[0]) || d.w != static_cast<size_t>(s.k[1]))
    throw Failure{s.name + ": a channel shuffle of [N," + std::to_string(C) + "," + std::to_string(s.k[0]) + "," +
                  std::to_string(s.k[1]) + "] in " + std::to_string(g) + " groups, got " + d.Nchw()};
  *od = d;
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  const size_t pixels = d.pixels(), per = std::max<size_t>(qie::kLutRows, (size_t{1} << 14) / std::max<size_t>(1, C));
  if (od->count() == 0) return;
  const std::vector<uint8_t>& rq = s.requant[0];
  const qie::Isa isa = qie::ActiveIsa();
  pfor((pixels + per - 1) / per, [&](size_t b) {
    const size_t p0 = b * per, np = std::min(pixels, p0 + per) - p0;
    for (size_t p = p0; p < p0 + np; ++p) {
      const uint8_t* px = x + p * C;
      uint8_t* py = y + p * C;
      for (size_t j = 0; j < cg; ++j)
        for (size_t i = 0; i < g; ++i) py[j * g + i] = px[i * cg + j];
    }
    if (!rq.empty()) qie::LookupBlock(isa, rq.data(), 1, y + p0 * C, np, C, C);
  });
}

// LRN over a block of np <= 16 pixels v [np][C] -> w [np][C] = v * sum^-beta. The squares are laid out [channel][16
// pixels] so that each step of ORT's window sum (started at bias, slid by adding the head and subtracting the
// tail) is one vector operation over the pixels: each lane one pixel's sums in ORT's order (a pixel's own chain
// of dependent adds, ~8 cycles a channel, was the cost). beta = 0.75 (GoogLeNet's, AlexNet's) as
// 1 / (sqrt(s) * sqrt(sqrt(s))): sqrt is correctly rounded, so within a few ulps of powf, and vectors instead of
// ~35 cycles of powf per element. `t`: scratch of (3 C + size - 1) * 16 floats.
constexpr size_t kLrnPixels = 16;
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void LrnBlock(
    const float* __restrict v, size_t np, size_t C, size_t size, float bias, float aos, float beta, float* __restrict t,
    float* __restrict w) {
  constexpr size_t P = kLrnPixels;
  const size_t pre = (size - 1) / 2;
  float* sq = t;                        // [C + size - 1][P]: (size - 1) / 2 zero rows, the squares, zero rows
  float* vt = sq + (C + size - 1) * P;  // [C][P]
  float* st = vt + C * P;               // [C][P]: the sums, then the results
  std::fill(sq, vt + C * P, 0.0f);
  for (size_t p = 0; p < np; ++p)
    for (size_t c = 0; c < C; ++c) {
      const float x = v[p * C + c];
      vt[c * P + p] = x;
      sq[(pre + c) * P + p] = x * x;
    }
  float acc[P];
  for (size_t j = 0; j < P; ++j) acc[j] = bias;
  for (size_t k = 0; k < size; ++k)
    for (size_t j = 0; j < P; ++j) acc[j] += aos * sq[k * P + j];
  for (size_t j = 0; j < P; ++j) st[j] = acc[j];
  for (size_t c = 1; c < C; ++c) {
    for (size_t j = 0; j < P; ++j) acc[j] += aos * sq[(c + size - 1) * P + j];
    for (size_t j = 0; j < P; ++j) acc[j] += -aos * sq[(c - 1) * P + j];
    for (size_t j = 0; j < P; ++j) st[c * P + j] = acc[j];
  }
  if (beta == 0.75f) {
    for (size_t i = 0; i < C * P; ++i) {
      const float r = std::sqrt(st[i]);
      st[i] = vt[i] / (r * std::sqrt(r));
    }
  } else {
    for (size_t i = 0; i < C * P; ++i) st[i] = vt[i] * std::pow(st[i], -beta);
  }
  for (size_t p = 0; p < np; ++p)
    for (size_t c = 0; c < C; ++c) w[p * C + c] = st[c * P + p];
}

void RunLrn(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
            const qie::ParallelFor& pfor) {
  thread_local std::vector<float> fx;
  OperandFloat(s, 0, d, x, &fx, pfor);  // the dequantized codes (through the prefix, when there is one)
  *od = d;
  if (ybuf->size() < od->count()) ybuf->resize(od->count());
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t C = d.c, pixels = d.pixels(), size = static_cast<size_t>(s.lrn_size);
  const float aos = s.lrn_alpha / static_cast<float>(s.lrn_size);
  const Quantizer q(s.qout);
  const float* f = fx.data();
  constexpr size_t P = kLrnPixels;
  const size_t per = P * std::max<size_t>(1, 256 / C);  // pixels per task: whole blocks of P
  pfor((pixels + per - 1) / per, [&](size_t b) {
    thread_local std::vector<float> t, w;
    t.resize((3 * C + size - 1) * P);
    w.resize(P * C);
    const size_t p1 = std::min(pixels, (b + 1) * per);
    for (size_t p = b * per; p < p1; p += P) {
      const size_t np = std::min(P, p1 - p);
      LrnBlock(f + p * C, np, C, size, s.lrn_bias, aos, s.lrn_beta, t.data(), w.data());
      QuantizeBlock(w.data(), np * C, q, y + p * C);
    }
  });
}

void RunMaxPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor) {
  const PoolWindow win(s, d, x, od, ybuf);
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t C = d.c, W = od->w;
  const uint8_t flip = s.qin[0].is_signed ? 0x80 : 0;
  const std::vector<uint8_t>& rq = s.requant[0];
  // The max is taken on flipped bytes (ordered as their codes); one table maps it back and requantizes it.
  uint8_t tab[256 + 3] = {};
  for (int v = 0; v < 256; ++v)
    tab[v] = rq.empty() ? static_cast<uint8_t>(v ^ flip) : rq[static_cast<size_t>(v ^ flip)];
  const bool identity = flip == 0 && rq.empty();
  const qie::Isa isa = qie::ActiveIsa();
  // Stride and dilation 1 along W: each tap (kh, kw) is one max over a contiguous span of the output row (the
  // output pixels whose tap lies inside the input), so a row costs a few long vector loops, not C-byte ones per
  // pixel and tap (PP-OCRv6's 2x2 SAME MaxPool over 24 x 160 x 48: 298 us that way, 18 us by spans).
  const bool spans = win.sw == 1 && win.dw == 1;
  pfor(od->n * od->h, [&](size_t r) {
    const size_t n = r / od->h;
    const int64_t oh = static_cast<int64_t>(r % od->h);
    uint8_t* yrow = y + r * W * C;
    std::fill_n(yrow, W * C, 0);
    if (spans) {
      for (int64_t kh = 0; kh < s.k[0]; ++kh) {
        const int64_t ih = oh * win.sh - win.pad[0] + kh * win.dh;
        if (ih < 0 || ih >= static_cast<int64_t>(d.h)) continue;
        const uint8_t* xrow = x + (n * d.h + static_cast<size_t>(ih)) * d.w * C;
        for (int64_t kw = 0; kw < s.k[1]; ++kw) {
          const int64_t off = kw - win.pad[1];  // input column of output column ow: ow + off
          const int64_t ow0 = std::max<int64_t>(0, -off);
          const int64_t ow1 = std::min<int64_t>(static_cast<int64_t>(W), static_cast<int64_t>(d.w) - off);
          if (ow1 > ow0)
            MaxInto(yrow + static_cast<size_t>(ow0) * C, xrow + static_cast<size_t>(ow0 + off) * C,
                    static_cast<size_t>(ow1 - ow0) * C, flip);
        }
      }
    } else {
      for (size_t ow = 0; ow < W; ++ow)
        win.ForTaps(n, oh, ow, [&](const uint8_t* px) { MaxInto(yrow + ow * C, px, C, flip); });
    }
    if (!identity) qie::LookupBlock(isa, tab, 1, yrow, 1, W * C, W * C);
  });
}

// y = Q(sum of the window's dequantized values / count), summed in float32 in ORT's order (rows, then columns).
// acc[c] += float(code(px[c]) - zp) * scale for c < C: one tap of an average pool, in vectors over the channels
// (the same float32 operations per element as the scalar loop).
template <bool S>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void AccumulateTap(
    const uint8_t* __restrict px, size_t C, int32_t zp, float scale, float* __restrict acc) {
  for (size_t c = 0; c < C; ++c)
    acc[c] += static_cast<float>((S ? static_cast<int32_t>(static_cast<int8_t>(px[c])) : px[c]) - zp) * scale;
}

void RunAvgPool(const RegionPlan::Step& s, const Dims& d, const uint8_t* x, Dims* od, std::vector<uint8_t>* ybuf,
                const qie::ParallelFor& pfor) {
  const PoolWindow win(s, d, x, od, ybuf);
  uint8_t* y = ybuf->data();
  if (od->count() == 0) return;
  const size_t C = d.c;
  const QParams& qx = s.qin[0];
  const Quantizer q(s.qout);
  // u8 throughout: what ORT fuses into QLinearAveragePool from ORT_ENABLE_EXTENDED on; its window sum and division are
  // these, its quantization adds the zero point before rounding (a .5 tie rounds to the other side for an odd one)
  const bool ort_form = !qx.is_signed && !s.qout.is_signed;
  const float zy = static_cast<float>(s.qout.zp);
  const auto tap = qx.is_signed ? AccumulateTap<true> : AccumulateTap<false>;
  pfor(od->n * od->h, [&](size_t r) {
    thread_local std::vector<float> acc;
    acc.resize(C);
    const size_t n = r / od->h;
    const int64_t oh = static_cast<int64_t>(r % od->h);
    for (size_t ow = 0; ow < od->w; ++ow) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      int64_t taps = 0;
      win.ForTaps(n, oh, ow, [&](const uint8_t* px) {
        tap(px, C, qx.zp, qx.scale, acc.data());
        ++taps;
      });
      // The divisor: the window's taps inside the input, or with count_include_pad every tap inside the padded
      // input (ONNX: the pads, not the window's overhang past them).
      int64_t count = taps;
      if (s.include_pad) {
        const int64_t h0 = oh * win.sh - win.pad[0], w0 = static_cast<int64_t>(ow) * win.sw - win.pad[1];
        const int64_t hlim = static_cast<int64_t>(d.h) + (s.at.pads.size() == 4 ? s.at.pads[2] : win.pad[0]);
        const int64_t wlim = static_cast<int64_t>(d.w) + (s.at.pads.size() == 4 ? s.at.pads[3] : win.pad[1]);
        int64_t hk = 0, wk = 0;
        for (int64_t kh = 0; kh < s.k[0]; ++kh) hk += h0 + kh * win.dh < hlim;
        for (int64_t kw = 0; kw < s.k[1]; ++kw) wk += w0 + kw * win.dw < wlim;
        count = hk * wk;
      }
      const float div = static_cast<float>(count);
      for (size_t c = 0; c < C; ++c) acc[c] /= div;
      uint8_t* out = y + (r * od->w + ow) * C;
      if (ort_form) {  // QLinearAveragePool's quantization: nearbyint(v / s + zp), the zero point added in float first
        for (size_t c = 0; c < C; ++c) {
          const float v = std::nearbyint(acc[c] / s.qout.scale + zy);
          out[c] = static_cast<uint8_t>(v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v);
        }
        continue;
      }
      QuantizeBlock(acc.data(), C, q, out);
    }
  });
}

}  // namespace qie_ep
