// Convolution entry points of kernels.h: pick the kernel for a shape and run it.
//   implicit GEMM (tensor cores): fp16/bf16 with channels per group a multiple of 16 (dense convs,
//                                 ResNeXt groups of 16 or more channels);
//   direct (CUDA cores):          everything else: few channels per group, depthwise, fp32, odd
//                                 channel counts.

#include "common.cuh"
#include "conv_plan.h"

namespace fastres {

ConvPath conv_path(const ConvArgs& a) {
  return igemm_applies(a) ? ConvPath::kImplicitGemm : ConvPath::kDirect;
}

int64_t conv_stat_tiles(const ConvArgs& a) {
  return conv_path(a) == ConvPath::kImplicitGemm ? igemm_tiles(a) : plan_direct(a).tiles;
}

const char* conv_check(const ConvArgs& a) {
  if (a.n <= 0 || a.c <= 0 || a.k <= 0 || a.oh <= 0 || a.ow <= 0) return "empty problem";
  if (a.groups <= 0 || a.c % a.groups != 0 || a.k % a.groups != 0)
    return "groups must divide the input and output channels";
  if (conv_path(a) == ConvPath::kImplicitGemm) return nullptr;
  return direct_check(a);
}

const char* conv_launch(const ConvArgs& a, cudaStream_t stream) {
  if (const char* why = conv_check(a)) return why;
  if (conv_path(a) == ConvPath::kImplicitGemm) return igemm_launch(a, stream);
  return direct_launch(a, stream);
}

}  // namespace fastres
