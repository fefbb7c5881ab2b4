// Portable C++ microkernel: qie_gemm_u8s8_s32_4x16c4__scalar. The reference ISA path and the fallback
// on CPUs without AVX2. Same packed layout as the VNNI kernels (K-groups of 4 bytes per column).
#include "kernels/epilogue_scalar.h"

namespace qie {
namespace {

constexpr int kMr = 4, kNr = 16;

void TileScalar(size_t mr, size_t nr, size_t kp, const void* a_v, size_t lda, const void* b_v, const Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_v);
  const int8_t* b = static_cast<const int8_t*>(b_v);
  int32_t acc[kMr][kNr] = {};
  // 1. For each K-group of 4, each row's 4 bytes meet each column's 4 bytes (a u8 x s8 dot of 4).
  for (size_t kb = 0; kb < kp / 4; ++kb) {
    const int8_t* bk = b + kb * kNr * 4;
    for (size_t r = 0; r < mr; ++r) {
      const uint8_t* ar = a + r * lda + kb * 4;
      for (int j = 0; j < kNr; ++j) {
        acc[r][j] += ar[0] * bk[j * 4 + 0] + ar[1] * bk[j * 4 + 1] + ar[2] * bk[j * 4 + 2] + ar[3] * bk[j * 4 + 3];
      }
    }
  }
  // 2. Epilogue.
  EpilogueScalar(&acc[0][0], kNr, mr, nr, ep);
}

}  // namespace

extern const MicroKernel kGemmScalar = {Isa::kScalar, "qie_gemm_u8s8_s32_4x16c4__scalar", kMr, kNr, 4, false,
                                        TileScalar};

}  // namespace qie
