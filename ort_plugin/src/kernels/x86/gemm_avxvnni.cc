// AVX-VNNI (VEX, ymm) microkernel: qie_gemm_u8s8_s32_6x16c4__avxvnni. vpdpbusd sums four u8 x s8
// products into int32 without intermediate saturation.
#include "kernels/x86/gemm_ymm_inl.h"

namespace qie {
namespace {
struct AvxVnniDot {
  static constexpr size_t kGroup = 4, kElem = 1;
  static __m256i Dot(__m256i acc, __m256i a, __m256i b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
};
}  // namespace

extern const MicroKernel kGemmAvxVnni = {
    Isa::kAvxVnni, "qie_gemm_u8s8_s32_6x16c4__avxvnni", kYmmMr, kYmmNr, 4, false, YmmTile<AvxVnniDot>};

}  // namespace qie
