// C-style launcher API between the CUDA kernels (csrc/*.cu, plain CUDA C++ without torch headers)
// and the torch binding (csrc/ops.cpp). Everything here is raw pointers and sizes: the binding has
// already checked devices, dtypes, shapes and layouts.
//
// Layout conventions (all activations NHWC, i.e. PyTorch channels_last):
//   x         (N, H, W, C)            activation dtype
//   weight    (K, R, S, C / groups)   activation dtype (PyTorch weight in channels_last memory)
//   y, z, dz  (N, OH, OW, K)          activation dtype; seen as an (M, K) row-major matrix,
//                                     M = N * OH * OW
//   BN vectors (K,) fp32
//
// Launchers return nullptr on success, else a static string describing the failure (an
// unsupported configuration or the CUDA error of the launch).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastres {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---------------------------------------------------------------------------------------------
// Convolution with fused epilogue:
//   y = conv(x, weight) (+ bias)
//   partials <- per-tile, per-channel (count, mean, M2) of y          (when partials != nullptr)
//   out = y * scale + shift (+ residual) (ReLU)  where scale/shift are given, else
//   out = y (+ residual) (ReLU)
// ---------------------------------------------------------------------------------------------
struct ConvArgs {
  const void* x;         // (N, H, W, C)
  const void* weight;    // (K, R, S, C / groups)
  const void* bias;      // (K,) activation dtype, or nullptr
  const float* scale;    // (K,) or nullptr: per-channel affine of the epilogue (eval BN) ...
  const float* shift;    // (K,) ... given together with scale
  const void* residual;  // (N, OH, OW, K) or nullptr, added after the affine
  void* out;             // (N, OH, OW, K)
  float* partials;       // (3, T, K) fp32 or nullptr; T = conv_stat_tiles(args)
  int64_t n, h, w, c;    // input sizes
  int64_t k, r, s;       // output channels, filter height and width
  int64_t oh, ow;        // output sizes
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int groups;
  bool relu;
  DType dtype;
};

// Which kernel conv_launch picks for these shapes (for tests and error messages).
enum class ConvPath : int { kDirect = 0, kImplicitGemm = 1 };
ConvPath conv_path(const ConvArgs& a);

// Number of statistic tiles T (rows of the partials) conv_launch writes for these shapes; only the
// size fields and dtype of `a` are read.
int64_t conv_stat_tiles(const ConvArgs& a);

// nullptr if conv_launch supports these sizes, else why not (no launch).
const char* conv_check(const ConvArgs& a);

const char* conv_launch(const ConvArgs& a, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// BatchNorm helpers
// ---------------------------------------------------------------------------------------------

// Merge (3, T, K) partials with Chan's formula; write the batch mean, the biased variance and the
// epilogue affine scale = gamma / sqrt(var + eps), shift = beta - mean * scale. gamma/beta may be
// nullptr (1 and 0).
const char* bn_finalize_launch(const float* partials, int64_t tiles, int64_t k,
                               const float* gamma, const float* beta, float eps, float* mean,
                               float* var, float* scale, float* shift, cudaStream_t stream);

// z = y * scale + shift (+ residual) (ReLU) over an (M, K) matrix.
const char* bn_apply_launch(const void* y, const float* scale, const float* shift,
                            const void* residual, void* z, int64_t m, int64_t k, bool relu,
                            DType dtype, cudaStream_t stream);

// fp32 floats of workspace bn_backward_launch needs for an (M, K) problem.
int64_t bn_backward_workspace(int64_t m, int64_t k);

// dReLU + dBN over an (M, K) matrix:
//   g = dz * [z > 0] (or dz without ReLU);  dbeta = sum g;  dgamma = sum g * yhat,
//   yhat = (y - mean) * invstd, invstd = 1 / sqrt(var + eps);
//   dy = gamma * invstd * (g - dbeta / M - yhat * dgamma / M)  with batch statistics,
//   dy = gamma * invstd * g                                     with running statistics;
//   dres = g (skipped when dres is nullptr).
// gamma may be nullptr (1). dgamma/dbeta are (K,) fp32 and always written.
const char* bn_backward_launch(const void* dz, const void* y, const void* z, const float* mean,
                               const float* var, const float* gamma, float eps, bool batch_stats,
                               bool relu, void* dy, void* dres, float* dgamma, float* dbeta,
                               float* workspace, int64_t m, int64_t k, DType dtype,
                               cudaStream_t stream);

}  // namespace fastres
