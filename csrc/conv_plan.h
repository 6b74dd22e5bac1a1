// Internal planning interface between the convolution kernels (conv_direct.cu, conv_igemm.cu) and
// the entry points of conv.cu. Host-only declarations; no torch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels.h"

namespace fastres {

// ---- direct kernel (conv_direct.cu) ----
constexpr int kBlockK = 32;                   // output channels per block
constexpr int64_t kDirectMaxSmem = 48 * 1024;  // default dynamic shared-memory limit

struct DirectPlan {
  int th, tw;            // output tile (pixels); th == 0 when no tile fits
  int cc;                // input channels staged per chunk
  int halo_h, halo_w;    // input receptive field of a tile
  int smem_bytes;        // dynamic shared memory per block
  int64_t tiles;         // blocks along grid.x = statistic tiles
};
DirectPlan plan_direct(const ConvArgs& a);
const char* direct_check(const ConvArgs& a);
const char* direct_launch(const ConvArgs& a, cudaStream_t stream);

// ---- implicit GEMM on tensor cores (conv_igemm.cu) ----
bool igemm_applies(const ConvArgs& a);  // fp16/bf16 and channels per group a multiple of 16
int64_t igemm_tiles(const ConvArgs& a);  // statistic tiles = row blocks of M
const char* igemm_launch(const ConvArgs& a, cudaStream_t stream);

}  // namespace fastres
