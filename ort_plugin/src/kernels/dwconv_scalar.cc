// Depthwise convolution, portable C++ build: qie_dwconv_u8s8_s32__scalar (the reference ISA path).
#include "kernels/depthwise_inl.h"

namespace qie {
extern const DepthwiseFn kDepthwiseScalar = Depthwise;
}  // namespace qie
