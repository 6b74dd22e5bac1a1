// BatchNorm helpers on NHWC activations seen as (M, K) matrices: finalize (merge conv-epilogue
// statistics), apply (affine + residual + ReLU), and the fused dReLU + dBN backward.
//
// Per-channel reductions use blocks of 32 channels x 8 row lanes: the 32 threads of a warp read 32
// consecutive channels of one row (coalesced), the 8 lanes split the rows, and shared memory
// combines the lanes. Reductions are done in a fixed order (no atomics), so results are
// deterministic.

#include <algorithm>

#include "common.cuh"

namespace fastres {
namespace {

constexpr int kCh = 32;     // channels per block (one warp's width)
constexpr int kLanes = 8;   // row lanes per block
constexpr int kRows = 256;  // rows of one backward statistics tile

// One thread per channel merges the T tiles' (count, mean, M2) in double (counts pass 2^24 and the
// merge is a tiny fraction of the step), then writes mean, biased var, scale, shift.
__global__ void bn_finalize_kernel(const float* __restrict__ partials, int64_t tiles, int64_t k,
                                   const float* __restrict__ gamma,
                                   const float* __restrict__ beta, float eps,
                                   float* __restrict__ mean_out, float* __restrict__ var_out,
                                   float* __restrict__ scale_out, float* __restrict__ shift_out) {
  __shared__ double sh[3][kLanes][kCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCh + tx;
  double n = 0, mean = 0, m2 = 0;
  if (c < k) {
    const float* cnt = partials;
    const float* mu = partials + tiles * k;
    const float* sq = partials + 2 * tiles * k;
    for (int64_t t = ty; t < tiles; t += kLanes) {
      const int64_t i = t * k + c;
      chan_merge<double>(n, mean, m2, cnt[i], mu[i], sq[i]);
    }
  }
  sh[0][ty][tx] = n;
  sh[1][ty][tx] = mean;
  sh[2][ty][tx] = m2;
  __syncthreads();
  if (ty != 0 || c >= k) return;
  for (int l = 1; l < kLanes; ++l) chan_merge<double>(n, mean, m2, sh[0][l][tx], sh[1][l][tx],
                                                      sh[2][l][tx]);
  // n > 0 always: every tile holds at least one output pixel.
  const float m = static_cast<float>(mean);
  const float var = static_cast<float>(m2 / n);
  const float invstd = 1.0f / sqrtf(var + eps);
  const float scale = (gamma ? gamma[c] : 1.0f) * invstd;
  mean_out[c] = m;
  var_out[c] = var;
  scale_out[c] = scale;
  shift_out[c] = (beta ? beta[c] : 0.0f) - m * scale;
}

// Elementwise kernels work on runs of kVec = 8 consecutive elements per thread (grid-stride,
// int64 indices). With `vec` (K % 8 == 0 and 16-byte aligned buffers) a run is 8 channels of one
// pixel, moved with 16-byte accesses; otherwise element by element.

// z = y * scale + shift (+ residual) (ReLU).
template <typename T>
__global__ void bn_apply_kernel(const T* __restrict__ y, const float* __restrict__ scale,
                                const float* __restrict__ shift, const T* __restrict__ residual,
                                T* __restrict__ z, int64_t total, int64_t k, bool relu, bool vec) {
  const int64_t runs = ceil_div(total, kVec);
  for (int64_t run = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; run < runs;
       run += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = run * kVec;
    if (vec) {
      const int64_t c0 = i0 % k;
      float v[kVec], r[kVec];
      load8(y + i0, v);
      if (residual) load8(residual + i0, r);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[j] = fmaf(v[j], scale[c0 + j], shift[c0 + j]);
        if (residual) v[j] += r[j];
        if (relu) v[j] = relu_f32(v[j]);
      }
      store8(z + i0, v);
      continue;
    }
    for (int64_t i = i0; i < imin(i0 + kVec, total); ++i) {
      const int64_t c = i % k;
      float v = fmaf(to_f32(y[i]), scale[c], shift[c]);
      if (residual) v += to_f32(residual[i]);
      if (relu) v = relu_f32(v);
      z[i] = from_f32<T>(v);
    }
  }
}

// g = dz * [z > 0] (ReLU) or dz.
template <typename T>
__device__ __forceinline__ float relu_grad(const T* dz, const T* z, int64_t i, bool relu) {
  const float g = to_f32(dz[i]);
  return (relu && !(to_f32(z[i]) > 0.0f)) ? 0.0f : g;
}

// Per (row tile, channel): sum g and sum g * yhat into work[0][tile][c], work[1][tile][c].
template <typename T>
__global__ void bn_bwd_reduce_kernel(const T* __restrict__ dz, const T* __restrict__ y,
                                     const T* __restrict__ z, const float* __restrict__ mean,
                                     const float* __restrict__ var, float eps, bool relu,
                                     float* __restrict__ work, int64_t m, int64_t k) {
  __shared__ float sh[2][kLanes][kCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tile = blockIdx.x, tiles = gridDim.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kCh + tx;
  float sg = 0.0f, sgy = 0.0f;
  if (c < k) {
    const float mu = mean[c], invstd = 1.0f / sqrtf(var[c] + eps);
    const int64_t row_end = imin(m, (tile + 1) * kRows);
    for (int64_t row = tile * kRows + ty; row < row_end; row += kLanes) {
      const int64_t i = row * k + c;
      const float g = relu_grad(dz, z, i, relu);
      sg += g;
      sgy += g * (to_f32(y[i]) - mu) * invstd;
    }
  }
  sh[0][ty][tx] = sg;
  sh[1][ty][tx] = sgy;
  __syncthreads();
  if (ty != 0 || c >= k) return;
  for (int l = 1; l < kLanes; ++l) {
    sg += sh[0][l][tx];
    sgy += sh[1][l][tx];
  }
  work[tile * k + c] = sg;
  work[(tiles + tile) * k + c] = sgy;
}

// Sum the tiles: dbeta = sum g, dgamma = sum g * yhat (accumulated in double: M reaches millions).
__global__ void bn_bwd_final_kernel(const float* __restrict__ work, int64_t tiles, int64_t k,
                                    float* __restrict__ dgamma, float* __restrict__ dbeta) {
  __shared__ double sh[2][kLanes][kCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCh + tx;
  double sg = 0, sgy = 0;
  if (c < k) {
    for (int64_t t = ty; t < tiles; t += kLanes) {
      sg += work[t * k + c];
      sgy += work[(tiles + t) * k + c];
    }
  }
  sh[0][ty][tx] = sg;
  sh[1][ty][tx] = sgy;
  __syncthreads();
  if (ty != 0 || c >= k) return;
  for (int l = 1; l < kLanes; ++l) {
    sg += sh[0][l][tx];
    sgy += sh[1][l][tx];
  }
  dbeta[c] = static_cast<float>(sg);
  dgamma[c] = static_cast<float>(sgy);
}

// dy = gamma * invstd * (g - dbeta / M - yhat * dgamma / M) (batch statistics) or
// gamma * invstd * g (running statistics); dres = g. Runs of 8 as bn_apply_kernel.
__device__ __forceinline__ void bn_dy_one(float dzv, float yv, float zv, int64_t c,
                                          const float* mean, const float* var, const float* gamma,
                                          const float* dgamma, const float* dbeta, float eps,
                                          float inv_m, bool batch_stats, bool relu, float& dy,
                                          float& g) {
  g = (relu && !(zv > 0.0f)) ? 0.0f : dzv;
  const float invstd = 1.0f / sqrtf(var[c] + eps);
  float d = g;
  if (batch_stats) {
    const float yhat = (yv - mean[c]) * invstd;
    d = g - dbeta[c] * inv_m - yhat * (dgamma[c] * inv_m);
  }
  dy = (gamma ? gamma[c] : 1.0f) * invstd * d;
}

template <typename T>
__global__ void bn_bwd_dy_kernel(const T* __restrict__ dz, const T* __restrict__ y,
                                 const T* __restrict__ z, const float* __restrict__ mean,
                                 const float* __restrict__ var, const float* __restrict__ gamma,
                                 const float* __restrict__ dgamma, const float* __restrict__ dbeta,
                                 float eps, bool batch_stats, bool relu, T* __restrict__ dy,
                                 T* __restrict__ dres, int64_t m, int64_t k, bool vec) {
  const int64_t total = m * k;
  const int64_t runs = ceil_div(total, kVec);
  const float inv_m = 1.0f / static_cast<float>(m);
  for (int64_t run = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; run < runs;
       run += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = run * kVec;
    if (vec) {
      const int64_t c0 = i0 % k;
      float dzv[kVec], yv[kVec], zv[kVec], dyv[kVec], gv[kVec];
      load8(dz + i0, dzv);
      load8(y + i0, yv);
      load8(z + i0, zv);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        bn_dy_one(dzv[j], yv[j], zv[j], c0 + j, mean, var, gamma, dgamma, dbeta, eps, inv_m,
                  batch_stats, relu, dyv[j], gv[j]);
      store8(dy + i0, dyv);
      if (dres) store8(dres + i0, gv);
      continue;
    }
    for (int64_t i = i0; i < imin(i0 + kVec, total); ++i) {
      float d, g;
      bn_dy_one(to_f32(dz[i]), to_f32(y[i]), to_f32(z[i]), i % k, mean, var, gamma, dgamma,
                dbeta, eps, inv_m, batch_stats, relu, d, g);
      dy[i] = from_f32<T>(d);
      if (dres) dres[i] = from_f32<T>(g);
    }
  }
}

// Grid for a grid-stride elementwise loop: enough blocks to fill any current GPU several times.
unsigned elementwise_blocks(int64_t total, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(total, threads), 65536));
}

}  // namespace

const char* bn_finalize_launch(const float* partials, int64_t tiles, int64_t k,
                               const float* gamma, const float* beta, float eps, float* mean,
                               float* var, float* scale, float* shift, cudaStream_t stream) {
  if (tiles <= 0 || k <= 0) return "bn_finalize needs at least one tile and one channel";
  const dim3 block(kCh, kLanes);
  FASTRES_LAUNCH(bn_finalize_kernel, dim3(static_cast<unsigned>(ceil_div(k, kCh))), block, 0,
                 stream, partials, tiles, k, gamma, beta, eps, mean, var, scale, shift);
  return launch_error();
}

const char* bn_apply_launch(const void* y, const float* scale, const float* shift,
                            const void* residual, void* z, int64_t m, int64_t k, bool relu,
                            DType dtype, cudaStream_t stream) {
  const int64_t total = m * k;
  if (total <= 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    constexpr int threads = 256;
    const bool vec = k % kVec == 0 && is_aligned16(y) && is_aligned16(z) &&
                     (residual == nullptr || is_aligned16(residual));
    FASTRES_LAUNCH(bn_apply_kernel<T>, dim3(elementwise_blocks(ceil_div(total, kVec), threads)),
                   dim3(threads), 0, stream, static_cast<const T*>(y), scale, shift,
                   static_cast<const T*>(residual), static_cast<T*>(z), total, k, relu, vec);
    return launch_error();
  });
}

int64_t bn_backward_workspace(int64_t m, int64_t k) { return 2 * ceil_div(m, kRows) * k; }

const char* bn_backward_launch(const void* dz, const void* y, const void* z, const float* mean,
                               const float* var, const float* gamma, float eps, bool batch_stats,
                               bool relu, void* dy, void* dres, float* dgamma, float* dbeta,
                               float* workspace, int64_t m, int64_t k, DType dtype,
                               cudaStream_t stream) {
  if (m <= 0 || k <= 0) return "bn_backward needs a non-empty (M, K) problem";
  const int64_t tiles = ceil_div(m, kRows);
  if (tiles > 0x7fffffff || ceil_div(k, kCh) > 65535) return "bn_backward: problem too large";
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    const T* dz_ = static_cast<const T*>(dz);
    const T* y_ = static_cast<const T*>(y);
    const T* z_ = static_cast<const T*>(z);
    const dim3 block(kCh, kLanes);
    FASTRES_LAUNCH(bn_bwd_reduce_kernel<T>,
                   dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(k, kCh))),
                   block, 0, stream, dz_, y_, z_, mean, var, eps, relu, workspace, m, k);
    if (const char* e = launch_error()) return e;
    FASTRES_LAUNCH(bn_bwd_final_kernel, dim3(static_cast<unsigned>(ceil_div(k, kCh))), block, 0,
                   stream, workspace, tiles, k, dgamma, dbeta);
    if (const char* e = launch_error()) return e;
    constexpr int threads = 256;
    const bool vec = k % kVec == 0 && is_aligned16(dz) && is_aligned16(y) && is_aligned16(z) &&
                     is_aligned16(dy) && (dres == nullptr || is_aligned16(dres));
    FASTRES_LAUNCH(bn_bwd_dy_kernel<T>, dim3(elementwise_blocks(ceil_div(m * k, kVec), threads)),
                   dim3(threads), 0, stream, dz_, y_, z_, mean, var, gamma, dgamma, dbeta, eps,
                   batch_stats, relu, static_cast<T*>(dy), static_cast<T*>(dres), m, k, vec);
    return launch_error();
  });
}

}  // namespace fastres
