// Depthwise convolution, AVX-512 build: qie_dwconv_u8s8_s32__avx512vnni.
#include "kernels/depthwise_inl.h"

namespace qie {
extern const DepthwiseFn kDepthwiseAvx512 = Depthwise;
}  // namespace qie
