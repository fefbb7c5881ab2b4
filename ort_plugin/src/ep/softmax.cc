// The EP's quantized Softmax unit (softmax.h).
#include "ep/softmax.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/isa.h"

namespace qie_ep {

bool MatchSoftmax(const OrtNode* op, SoftmaxUnit* u) {
  if (!IsOp(op, "Softmax")) return false;
  const auto in = Inputs(op), out = Outputs(op);
  if (in.size() != 1 || out.size() != 1 || !in[0] || !out[0]) return false;
  // The last axis only: opset >= 13 normalises along `axis` (default -1); older opsets over the flattened
  // dimensions from `axis` (default 1), the same thing when axis is the last one.
  int since = 0;
  Check(g_api->Node_GetSinceVersion(op, &since));
  const int64_t axis = AttrInt(op, "axis", since >= 13 ? -1 : 1);
  if (axis != -1) {
    const int64_t rank = ValueRank(in[0]);
    if (rank < 1 || axis != rank - 1) return false;
  }
  const OrtNode* dq = Producer(in[0]);
  if (!dq || IsGraphOutput(in[0]) || Consumers(in[0]) != 1) return false;
  Constant unused, sx, zx;
  ONNXTensorElementDataType xt;
  if (!DqOperands(dq, true, 0, &unused, &sx, &zx, &xt)) return false;
  const float s = static_cast<const float*>(sx.data)[0];
  if (!(std::isfinite(s) && s > 0.0f)) return false;  // the largest code is the largest value
  int64_t idx = 0;
  const OrtNode* q = SoleConsumer(out[0], &idx);
  Constant sy, zy;
  if (!q || idx != 0 || !QOperands(q, &sy, &zy)) return false;
  if (Assigned(dq) || Assigned(op) || Assigned(q)) return false;
  u->dq = dq;
  u->op = op;
  u->q = q;
  return true;
}

void CompileSoftmax(const std::vector<const OrtNode*>& nodes, CompiledSoftmax* c) {
  for (const OrtNode* n : nodes)
    if (IsOp(n, "Softmax")) {
      SoftmaxUnit u;
      const auto in = Inputs(n);
      const OrtNode* dq = in.empty() ? nullptr : Producer(in[0]);
      const OrtNode* q = Outputs(n).empty() ? nullptr : SoleConsumer(Outputs(n)[0]);
      if (!dq || !q) throw Failure{"fused graph is not the Softmax unit GetCapability claimed"};
      c->in = InputParams(dq);
      c->out = OutputParams(q);
      c->name = NodeName(n);
      for (int k = 0; k < 256; ++k) c->exp[k] = std::exp(-static_cast<float>(k) * c->in.scale);
      return;
    }
  throw Failure{"fused graph has no Softmax"};
}

namespace {

// Rows shorter than this take the direct path (no histogram and table).
constexpr size_t kDirectRow = 512;

// One row of D codes: y = Q(softmax(DQ(x))) (softmax.h). `key` = byte ^ flip orders the codes as their values.
void SoftmaxRow(const CompiledSoftmax& c, qie::ChannelLutFn lut, const uint8_t* x, uint8_t* y, size_t D) {
  const uint8_t flip = c.in.is_signed ? 0x80 : 0;
  uint8_t top = 0;
  for (size_t i = 0; i < D; ++i) top = std::max<uint8_t>(top, x[i] ^ flip);
  const Quantizer quant(c.out);
  if (D < kDirectRow) {  // per element: e = exp(-(top - key) * s), sum, then the codes
    float e[kDirectRow];
    double sum = 0.0;
    for (size_t i = 0; i < D; ++i) {
      e[i] = c.exp[top - (x[i] ^ flip)];
      sum += e[i];
    }
    const float inv = 1.0f / static_cast<float>(sum);
    for (size_t i = 0; i < D; ++i) y[i] = quant(e[i] * inv);
    return;
  }
  uint32_t count[4][256];  // four sub-histograms hide the store-to-load latency of repeated codes
  std::memset(count, 0, sizeof(count));
  size_t i = 0;
  for (; i + 4 <= D; i += 4) {
    ++count[0][x[i]];
    ++count[1][x[i + 1]];
    ++count[2][x[i + 2]];
    ++count[3][x[i + 3]];
  }
  for (; i < D; ++i) ++count[0][x[i]];
  double sum = 0.0;
  for (int b = 0; b < 256; ++b) {
    count[0][b] += count[1][b] + count[2][b] + count[3][b];  // the row's count of code b
    if (count[0][b]) sum += static_cast<double>(count[0][b]) * c.exp[top - (b ^ flip)];
  }
  const float inv = 1.0f / static_cast<float>(sum);
  alignas(64) uint8_t table[256 + 64] = {};  // 3+ bytes of padding for the gather path
  for (int b = 0; b < 256; ++b)
    if (count[0][b]) table[b] = quant(c.exp[top - (b ^ flip)] * inv);
  if (lut)
    lut(table, 1, x, y, D, 1);
  else
    for (size_t k = 0; k < D; ++k) y[k] = table[x[k]];
}

}  // namespace

OrtStatus* ComputeSoftmax(const CompiledSoftmax& c, OrtKernelContext* ctx) {
  return Guard("Softmax", [&] {
    const OrtValue* x = nullptr;
    Check(g_api->KernelContext_GetInput(ctx, 0, &x));
    const std::vector<int64_t> shape = TensorShape(x);
    if (shape.empty()) throw Failure{c.name + ": Softmax input must have rank >= 1, got a scalar"};
    OrtValue* y = nullptr;
    Check(g_api->KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &y));
    const size_t D = static_cast<size_t>(shape.back());
    size_t rows = 1;
    for (size_t d = 0; d + 1 < shape.size(); ++d) rows *= static_cast<size_t>(shape[d]);
    if (rows == 0 || D == 0) return;
    const void* xd = nullptr;
    void* yd = nullptr;
    Check(g_api->GetTensorData(x, &xd));
    Check(g_api->GetTensorMutableData(y, &yd));
    const qie::ChannelLutFn lut = qie::KernelsFor(qie::ActiveIsa()).channel_lut;
    const size_t per = std::max<size_t>(1, (size_t{1} << 14) / D);  // rows per task: ~16 KiB
    const auto* xb = static_cast<const uint8_t*>(xd);
    auto* yb = static_cast<uint8_t*>(yd);
    const qie::ParallelFor pool = CtxParallelFor(ctx);
    Pace pace(c.pacing, c.adaptive, rows * D, pool);
    pace.For()((rows + per - 1) / per, [&](size_t t) {
      for (size_t r = t * per; r < std::min(rows, (t + 1) * per); ++r) SoftmaxRow(c, lut, xb + r * D, yb + r * D, D);
    });
    pace.Done();
  });
}

}  // namespace qie_ep
