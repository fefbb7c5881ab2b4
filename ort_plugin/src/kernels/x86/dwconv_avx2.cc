// Depthwise convolution, AVX2 build (also serves AVX-VNNI, which adds nothing to a depthwise loop):
// qie_dwconv_u8s8_s32__avx2.
#include "kernels/depthwise_inl.h"

namespace qie {
extern const DepthwiseFn kDepthwiseAvx2 = Depthwise;
}  // namespace qie
