// AVX2 microkernel: qie_gemm_u8s8_s32_6x16c2__avx2. Exact: operands are widened to int16 when packed
// and multiplied with vpmaddwd (int16 x int16 pairs summed into int32), never with vpmaddubsw, whose
// int16 pair sums of u8 x s8 saturate (ORT issues 6004, 5849, 16105).
#include "kernels/x86/gemm_ymm_inl.h"

namespace qie {
namespace {
struct Avx2Dot {
  static constexpr size_t kGroup = 2, kElem = 2;
  static __m256i Dot(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
};
}  // namespace

extern const MicroKernel kGemmAvx2 = {Isa::kAvx2,      "qie_gemm_u8s8_s32_6x16c2__avx2", kYmmMr, kYmmNr, 2, true,
                                      YmmTile<Avx2Dot>};

}  // namespace qie
