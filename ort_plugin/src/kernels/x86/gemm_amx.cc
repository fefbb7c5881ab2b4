// AMX-INT8 microkernel: qie_gemm_u8s8_s32_32x48c4k64__amx (32-row tiles: two of AMX's 16). Compiled with this
// file's own flags (AVX-512 and AMX).
//
// Tiling, in steps:
//  1. B is the AVX-512 VNNI kernel's panel (48 columns, K-groups of four bytes per column, 192 bytes per group) with
//     K from 33 on padded to 64 (MicroKernel::kalign / kalign_min): 16 groups of one panel's 16 columns are one AMX
//     B tile (16 rows x 64 bytes, 192 bytes apart), so the panel needs no other layout and the two kernels share
//     PackB.
//  2. 16 rows x 48 columns are three int32 C tiles (tmm0-2); per 64 bytes of K one A tile (tmm3, 16 rows x 64 bytes,
//     lda apart) and three B tiles (tmm4-6) feed three tdpbusd (u8 x s8 -> s32, exact: no intermediate
//     saturation). A 32-row tile is two such passes over the panel, or from K = 2048 one pass of six C tiles with
//     one A and one B register (Multiply2).
//  3. The C tiles are stored to a 32 x 48 int32 block and each row goes through the AVX-512 epilogue (zero points,
//     bias, int32 / float / requantized output) that the VNNI kernel uses.
// A tile of other than 16 or 32 rows reads its rows from a zero-padded copy (tileloadd reads all 16): made once per
// GEMM call and tile (Epilogue::a_call) and reused by the tile's other panels. Where AMX's fixed 16-row work costs
// more than the vector kernel's (under 4 rows, 1-3 rows past 16, K under 33) the AVX-512 VNNI tiles run.
//
// Tile configuration: all eight tiles 16 rows x 64 bytes, which is what MLAS (ONNX Runtime's kernels) loads once
// per thread and then assumes (its AMX kernels never reload it). The outermost tile scope on a thread (a driver's
// task, a region run, or a kernel call made outside both) checks the thread's configuration (sttilecfg), loads this
// one only when it differs, and puts back a different one it found (another library's) when it ends, so ORT's AMX
// kernels and qie's can share a thread in any order.
#include <immintrin.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/x86/epilogue_avx512_inl.h"

namespace qie {

extern const MicroKernel kGemmAvx512Vnni;

namespace {

constexpr size_t kMr = 32, kTileRows = 16, kNr = 48, kKTile = 64;  // two tiles of rows per call
constexpr size_t kGroupBytes = kNr * 4;                            // one K-group (four rows of K) of a panel
// Tiles of fewer rows run the AVX-512 VNNI tile (each AMX tile multiply costs the same for 1 row as for 16).
constexpr size_t kMinAmxRows = 4;
// K from which products run on tiles (padded to 64); shorter K keeps the VNNI tiles, whose epilogue stays in
// registers (PP-LCNet's pointwise 16 -> 32 convolution: 84-108 us on VNNI, 204-224 us padded to 64 on AMX).
constexpr size_t kMinAmxK = 33;
// K from which a 32-row tile runs as one snake (Multiply2: half the B traffic, but its one A and one B register
// serialize loads and multiplies) instead of two 16-row passes over the panel (which then comes from L1).
// Measured (bench.gemm, 1 thread, against MLAS's AMX path): K = 768 two passes 1.05-1.06x, the snake 0.86-0.94x;
// K = 1024 two passes 1.55x, the snake 1.20x; K = 3072 the snake 1.01-1.05x, two passes 0.93x.
constexpr size_t kSnakeK = 2048;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// constexpr: constant-initialized, no load-time code. A dynamic initializer in this file would run this file's
// AVX-512 instructions when the library loads, on every CPU (valgrind, which hides AVX-512, caught one: SIGILL).
constexpr TileConfig Standard() {
  TileConfig c{};
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}
constexpr TileConfig kStandard = Standard();

// The standard configuration for a scope on this thread (see the file comment). Scopes nest (a driver's task
// around its tiles' own): only the outermost checks the configuration and puts back a foreign one, so another
// library's configuration left on the thread costs two ldtilecfg per task, not per tile.
struct TileState {
  TileConfig saved;
  int depth = 0;
  bool changed = false;
};
thread_local TileState tl_tiles;  // constant-initialized: no load-time code (see kStandard)

void EnterTiles() {
  TileState& t = tl_tiles;
  if (t.depth++ != 0) return;
  _tile_storeconfig(&t.saved);
  t.changed = std::memcmp(&t.saved, &kStandard, sizeof(TileConfig)) != 0;
  if (t.changed) _tile_loadconfig(&kStandard);
}
void LeaveTiles() {
  TileState& t = tl_tiles;
  if (--t.depth != 0) return;
  if (t.changed && t.saved.palette_id != 0) _tile_loadconfig(&t.saved);
}

class TileScope {
 public:
  TileScope() { EnterTiles(); }
  ~TileScope() { LeaveTiles(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// A's rows for a tile of other than 16 or 32 rows: kp bytes each, zero below the real rows (32 rows: read as 16 or 32),
// kept for the tile's other panels.
struct ShortTile {
  std::vector<uint8_t> rows;
  uint64_t call = 0;
  const void* a = nullptr;
  size_t lda = 0, mr = 0, kp = 0;
};

const uint8_t* ShortRows(size_t mr, size_t kp, const uint8_t* a, size_t lda, uint64_t call) {
  thread_local ShortTile t;
  if (call != 0 && t.call == call && t.a == a && t.lda == lda && t.mr == mr && t.kp == kp) return t.rows.data();
  t.rows.assign(kMr * kp, 0);
  for (size_t r = 0; r < mr; ++r) std::memcpy(t.rows.data() + r * kp, a + r * lda, kp);
  t.call = call;
  t.a = a;
  t.lda = lda;
  t.mr = mr;
  t.kp = kp;
  return t.rows.data();
}

// C tiles 0..V-1 = 16 rows of A (lda apart, kp bytes each: kp a multiple of 64) x the panel's first 16 * V columns.
template <int V>
inline void Multiply(size_t kp, const uint8_t* a, size_t lda, const int8_t* b) {
  _tile_zero(0);
  if constexpr (V > 1) _tile_zero(1);
  if constexpr (V > 2) _tile_zero(2);
  for (size_t k0 = 0; k0 < kp; k0 += kKTile) {
    const int8_t* bk = b + (k0 / 4) * kGroupBytes;
    _tile_loadd(3, a + k0, static_cast<long>(lda));
    _tile_loadd(4, bk, static_cast<long>(kGroupBytes));
    _tile_dpbusd(0, 3, 4);
    if constexpr (V > 1) {
      _tile_loadd(5, bk + 64, static_cast<long>(kGroupBytes));
      _tile_dpbusd(1, 3, 5);
    }
    if constexpr (V > 2) {
      _tile_loadd(6, bk + 128, static_cast<long>(kGroupBytes));
      _tile_dpbusd(2, 3, 6);
    }
  }
}

// C tiles 0..V-1 (rows 0..15) and 3..3+V-1 (rows 16..31) = 32 rows of A x the panel's first 16 * V columns: one A
// and one B register (tmm6, tmm7) walked in a snake (B0: A0, A1; B1: A1, A0; B2: A0, A1), so each B tile read from
// L2 serves 32 rows (half the B traffic per multiply-add of the 16-row form, which large K makes L2-bound).
template <int V>
inline void Multiply2(size_t kp, const uint8_t* a, size_t lda, const int8_t* b) {
  _tile_zero(0);
  _tile_zero(3);
  if constexpr (V > 1) {
    _tile_zero(1);
    _tile_zero(4);
  }
  if constexpr (V > 2) {
    _tile_zero(2);
    _tile_zero(5);
  }
  const uint8_t* a1 = a + kTileRows * lda;
  const long ls = static_cast<long>(lda), bs = static_cast<long>(kGroupBytes);
  for (size_t k0 = 0; k0 < kp; k0 += kKTile) {
    const int8_t* bk = b + (k0 / 4) * kGroupBytes;
    _tile_loadd(7, bk, bs);
    _tile_loadd(6, a + k0, ls);
    _tile_dpbusd(0, 6, 7);
    _tile_loadd(6, a1 + k0, ls);
    _tile_dpbusd(3, 6, 7);
    if constexpr (V > 1) {
      _tile_loadd(7, bk + 64, bs);
      _tile_dpbusd(4, 6, 7);
      _tile_loadd(6, a + k0, ls);
      _tile_dpbusd(1, 6, 7);
    }
    if constexpr (V > 2) {
      _tile_loadd(7, bk + 128, bs);
      _tile_dpbusd(2, 6, 7);
      _tile_loadd(6, a1 + k0, ls);
      _tile_dpbusd(5, 6, 7);
    }
  }
}

constexpr long kLdc = static_cast<long>(kNr * sizeof(int32_t));
// C tiles 0..V-1 to 16 rows of a 16 x 48 int32 block.
template <int V>
inline void StoreC(int32_t* c) {
  _tile_stored(0, c, kLdc);
  if constexpr (V > 1) _tile_stored(1, c + 16, kLdc);
  if constexpr (V > 2) _tile_stored(2, c + 32, kLdc);
}

// One tile of mr <= 32 rows (A readable for 16 rows, or 32 where mr > 16) x nr <= 48 columns, then its epilogue; `pre`:
// the strip's epilogue constants, or nullptr.
template <int V>
void TileV(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep,
           const FastEpilogue* pre) {
  alignas(64) int32_t c[kMr * kNr];
  int32_t* c1 = c + kTileRows * kNr;
  if (mr > kTileRows && kp >= kSnakeK) {
    Multiply2<V>(kp, a, lda, b);
    _tile_stored(3, c1, kLdc);
    if constexpr (V > 1) _tile_stored(4, c1 + 16, kLdc);
    if constexpr (V > 2) _tile_stored(5, c1 + 32, kLdc);
    StoreC<V>(c);
  } else {
    Multiply<V>(kp, a, lda, b);
    StoreC<V>(c);
    if (mr > kTileRows) {
      Multiply<V>(kp, a + kTileRows * lda, lda, b);
      StoreC<V>(c1);
    }
  }
  FastEpilogue own;
  if (pre || MakeFast<V>(nr, ep, &own)) {
    const FastEpilogue& f = pre ? *pre : own;
    for (size_t r = 0; r < mr; ++r) {
      __m512i row[4];
      for (int v = 0; v < V; ++v) row[v] = _mm512_load_si512(c + r * kNr + 16 * v);
      FastRow<V>(row, f, ep.y, static_cast<ptrdiff_t>(r) * ep.ldy, ep.zb_rows, r);
    }
    return;
  }
  for (size_t r = 0; r < mr; ++r)
    for (int v = 0; v < V; ++v)
      if (nr > 16 * static_cast<size_t>(v))
        StoreRow(_mm512_load_si512(c + r * kNr + 16 * v), r, 16 * v, Mask(nr, v), ep);
}

void VnniRows(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const void* b, const Epilogue& ep);

template <int V>
void TileAny(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep,
             const FastEpilogue* pre) {
  if (mr > kTileRows && mr - kTileRows < kMinAmxRows) {  // a few rows past one tile (17-19 tokens): on VNNI tiles
    TileAny<V>(kTileRows, nr, kp, a, lda, b, ep, pre);
    return VnniRows(mr - kTileRows, nr, kp, a + kTileRows * lda, lda, b, RowsFrom(ep, kTileRows));
  }
  if (mr != kMr && mr != kTileRows) {  // tileloadd reads 16 or 32 rows
    a = ShortRows(mr, kp, a, lda, ep.a_call);
    lda = kp;
  }
  TileV<V>(mr, nr, kp, a, lda, b, ep, pre);
}

// The AVX-512 VNNI tile over mr <= 32 rows, in its tiles of up to 8.
void VnniRows(size_t mr, size_t nr, size_t kp, const uint8_t* a, size_t lda, const void* b, const Epilogue& ep) {
  const size_t vmr = static_cast<size_t>(kGemmAvx512Vnni.mr);
  for (size_t r0 = 0; r0 < mr; r0 += vmr)
    kGemmAvx512Vnni.tile(std::min(vmr, mr - r0), nr, kp, a + r0 * lda, lda, b, RowsFrom(ep, r0));
}

void Tile(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  if (mr < kMinAmxRows || kp % kKTile != 0) return VnniRows(mr, nr, kp, a, lda, b_v, ep);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  TileScope scope;
  ByVectors(nr, [&](auto v) { TileAny<decltype(v)::value>(mr, nr, kp, a, lda, b, ep, nullptr); });
}

template <int V>
void StripV(size_t m, size_t nr, size_t kp, const uint8_t* a, size_t lda, const int8_t* b, const Epilogue& ep) {
  FastEpilogue f;
  const FastEpilogue* pre = MakeFast<V>(nr, ep, &f) ? &f : nullptr;  // else each tile's own epilogue
  for (size_t m0 = 0; m0 < m; m0 += kMr) {
    const size_t rows = std::min(kMr, m - m0);
    const Epilogue e = RowsFrom(ep, m0);
    if (rows < kMinAmxRows)
      VnniRows(rows, nr, kp, a + m0 * lda, lda, b, e);
    else
      TileAny<V>(rows, nr, kp, a + m0 * lda, lda, b, e, pre);
  }
}

void Strip(size_t m, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  if (m < kMinAmxRows || kp % kKTile != 0) return kGemmAvx512Vnni.strip(m, nr, kp, a_v, lda, b_v, ep);
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  TileScope scope;
  ByVectors(nr, [&](auto v) { StripV<decltype(v)::value>(m, nr, kp, a, lda, b, ep); });
}

}  // namespace

extern const MicroKernel kGemmAmx = {Isa::kAmx,
                                     "qie_gemm_u8s8_s32_32x48c4k64__amx",
                                     kMr,
                                     kNr,
                                     4,
                                     false,
                                     Tile,
                                     Strip,
                                     static_cast<int>(kKTile),
                                     kMinAmxK,
                                     EnterTiles,
                                     LeaveTiles};

}  // namespace qie

namespace qie {
// For the tests: one 16 x 48 x 64 tile (A all 1, B all 2: every int32 output 128) run on a thread whose tiles hold a
// foreign configuration (8-row tiles, as another library might leave them). 0: the output right and the foreign
// configuration back in place; 1: the configuration changed; 2: a wrong output.
int AmxForeignConfigCheck() {
  TileConfig foreign = Standard();
  for (int t = 0; t < 8; ++t) foreign.rows[t] = 8;
  _tile_loadconfig(&foreign);
  alignas(64) uint8_t a[kMr * kKTile];
  alignas(64) int8_t b[kKTile / 4 * kGroupBytes];
  std::memset(a, 1, sizeof(a));
  std::memset(b, 2, sizeof(b));
  int32_t y[kMr * kNr], zero[kNr] = {};
  Epilogue ep{};
  ep.kind = OutKind::kInt32;
  ep.csk = zero;
  ep.folded = true;
  ep.bias = zero;
  ep.bias_cs = 1;
  ep.y = y;
  ep.ldy = kNr;
  Tile(kMr, kNr, kKTile, a, kKTile, b, ep);
  TileConfig now;
  _tile_storeconfig(&now);
  const bool kept = std::memcmp(&now, &foreign, sizeof(TileConfig)) == 0;
  _tile_release();
  if (!kept) return 1;
  for (int32_t v : y)
    if (v != 128) return 2;
  return 0;
}
}  // namespace qie

namespace qie {
// Single-core tdpbusd throughput in GOPS (2 ops per u8 x s8 multiply-add), for the benchmark's "% of peak": four
// independent C tiles on two loaded operand tiles, so latency never limits it.
double MeasureAmxPeakGops() {
  TileScope scope;
  alignas(64) uint8_t zeros[kTileRows * kKTile] = {};
  _tile_loadd(4, zeros, static_cast<long>(kKTile));
  _tile_loadd(5, zeros, static_cast<long>(kKTile));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const long iters = 1000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    _tile_dpbusd(0, 4, 5);
    _tile_dpbusd(1, 4, 5);
    _tile_dpbusd(2, 4, 5);
    _tile_dpbusd(3, 4, 5);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 4.0 * iters * kTileRows * 16 * kKTile * 2 / s / 1e9;
}
}  // namespace qie
