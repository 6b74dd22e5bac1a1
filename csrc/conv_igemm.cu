// Dense (and wide-group) convolution as an implicit GEMM on tensor cores (WMMA, fp16/bf16
// operands, fp32 accumulation), NHWC:
//
//   out[m, n] = sum_k A[m, k] * B[k, n]     per group g
//   m = (image, oh, ow)           M = N * OH * OW
//   n = output channel in group   Ng = K / groups
//   k = (r, s, c in group)        Kd = R * S * Cg
//   A[m, (r, s, c)] = x[image, oh*sh - ph + r*dh, ow*sw - pw + s*dw, g*Cg + c]  (0 off-image)
//   B[(r, s, c), n] = weight[g*Ng + n, r, s, c]   (weight in K, R, S, Cg memory)
//
// A block computes a kBM x kBN output tile with 4 warps (2 x 2, 32 x 32 each, 2 x 2 WMMA 16x16x16
// fragments). The K loop steps one filter tap and 16 channels at a time (Cg % 16 == 0, so a step
// never straddles taps); each thread fetches one 16-byte vector of A and one of B per step into
// registers while the warps multiply the previous step from shared memory.
// Epilogue, as the direct kernel: + bias, per-tile (count, mean, M2) statistics of the raw y, then
// scale/shift, + residual, ReLU, stored 8 channels at a time.

#ifndef FASTRES_EMU
#include <mma.h>
#endif

#include "common.cuh"
#include "conv_plan.h"

namespace fastres {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 16;
constexpr int kThreads = 128;
constexpr int kLd = kBK + 8;   // smem row pitch of the A and B tiles (halves; padded vs. conflicts)
constexpr int kLdC = kBN + 4;  // smem row pitch of the fp32 accumulator tile

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_igemm_kernel(const ConvArgs a) {
  __shared__ __align__(32) T as[kBM * kLd];  // A tile, [m][k]
  __shared__ __align__(32) T bs[kBN * kLd];  // B tile, [n][k] (a column-major K x N tile)
  __shared__ __align__(32) float cs[kBM * kLdC];
  __shared__ float red[2][kThreads];

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ weight = static_cast<const T*>(a.weight);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t cg = a.c / a.groups, ng = a.k / a.groups;
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t g = blockIdx.z;

  // The row of A and the column of B this thread loads, and which 8-channel half of the step.
  const int lrow = tid / 2, lhalf = tid % 2;
  const int64_t m = m0 + lrow;
  const bool m_ok = m < m_total;
  int64_t img = 0, ih_base = 0, iw_base = 0;
  if (m_ok) {
    img = m / (a.oh * a.ow);
    const int64_t rem = m % (a.oh * a.ow);
    ih_base = rem / a.ow * a.stride_h - a.pad_h;
    iw_base = rem % a.ow * a.stride_w - a.pad_w;
  }
  const int64_t n_col = n0 + lrow;
  const bool n_ok = n_col < ng;
  const T* wrow = weight + (g * ng + n_col) * a.r * a.s * cg;
  const bool x_vec = is_aligned16(x), w_vec = is_aligned16(weight);  // C, Cg are % 16

  const int64_t csteps = cg / kBK;
  const int64_t ksteps = a.r * a.s * csteps;
  // Fetch step `kt` of A and B for this thread into registers (zeros outside image / columns).
  auto fetch = [&](int64_t kt, uint4& ra, uint4& rb) {
    const int64_t tap = kt / csteps;
    const int64_t c = (kt % csteps) * kBK + lhalf * kVec;
    const int64_t r = tap / a.s, s = tap % a.s;
    ra = make_uint4(0, 0, 0, 0);
    rb = make_uint4(0, 0, 0, 0);
    const int64_t ih = ih_base + r * a.dil_h, iw = iw_base + s * a.dil_w;
    if (m_ok && ih >= 0 && ih < a.h && iw >= 0 && iw < a.w) {
      const T* src = x + ((img * a.h + ih) * a.w + iw) * a.c + g * cg + c;
      if (x_vec) {
        FASTRES_CHECK_ALIGNED16(src);
        ra = *reinterpret_cast<const uint4*>(src);
      } else {
        T* e = reinterpret_cast<T*>(&ra);
        for (int j = 0; j < kVec; ++j) e[j] = src[j];
      }
    }
    if (n_ok) {
      const T* src = wrow + tap * cg + c;
      if (w_vec) {
        FASTRES_CHECK_ALIGNED16(src);
        rb = *reinterpret_cast<const uint4*>(src);
      } else {
        T* e = reinterpret_cast<T*>(&rb);
        for (int j = 0; j < kVec; ++j) e[j] = src[j];
      }
    }
  };
  auto stash = [&](const uint4& ra, const uint4& rb) {
    FASTRES_CHECK_ALIGNED16(&as[lrow * kLd + lhalf * kVec]);
    FASTRES_CHECK_ALIGNED16(&bs[lrow * kLd + lhalf * kVec]);
    *reinterpret_cast<uint4*>(&as[lrow * kLd + lhalf * kVec]) = ra;
    *reinterpret_cast<uint4*>(&bs[lrow * kLd + lhalf * kVec]) = rb;
  };

  const int wm = warp / 2, wn = warp % 2;  // this warp's 32 x 32 sub-tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  uint4 ra, rb;
  fetch(0, ra, rb);
  stash(ra, rb);
  __syncthreads();
  for (int64_t kt = 0; kt < ksteps; ++kt) {
    const bool more = kt + 1 < ksteps;
    if (more) fetch(kt + 1, ra, rb);  // global loads in flight during the MMAs below
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * kLd, kLd);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs + (wn * 32 + j * 16) * kLd, kLd);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    __syncthreads();  // everyone is done reading as/bs
    if (more) {
      stash(ra, rb);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();

  // ---- epilogue ----
  const int rows_valid = static_cast<int>(imin(kBM, m_total - m0));
  const int cols_valid = static_cast<int>(imin(kBN, ng - n0));
  const int64_t kbase = g * ng + n0;  // global channel of tile column 0
  if (a.bias || a.partials) {
    // y = acc + bias; with statistics, y as stored (rounded to T): normalisation and the
    // backward pass see that y, and with mean >> std its rounding matters (as in PyTorch).
    const T* bias = static_cast<const T*>(a.bias);
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int col = e % kBN;
      if (col >= cols_valid) continue;
      float& y = cs[(e / kBN) * kLdC + col];
      if (bias) y += to_f32(bias[kbase + col]);
      if (a.partials) y = to_f32(from_f32<T>(y));
    }
    __syncthreads();
  }
  if (a.partials) {
    // Two passes over the tile's valid rows per column: thread (col, lane) takes rows lane,
    // lane + 2, ...
    const int col = tid % kBN, lane = tid / kBN;
    float s1 = 0.0f;
    for (int row = lane; row < rows_valid; row += kThreads / kBN) s1 += cs[row * kLdC + col];
    red[0][tid] = s1;
    __syncthreads();
    const float mean = (red[0][col] + red[0][kBN + col]) / static_cast<float>(rows_valid);
    float s2 = 0.0f;
    for (int row = lane; row < rows_valid; row += kThreads / kBN) {
      const float d = cs[row * kLdC + col] - mean;
      s2 = fmaf(d, d, s2);
    }
    red[1][tid] = s2;
    __syncthreads();
    if (lane == 0 && col < cols_valid) {
      const int64_t tiles = gridDim.x;
      const int64_t i = static_cast<int64_t>(blockIdx.x) * a.k + kbase + col;
      a.partials[i] = static_cast<float>(rows_valid);
      a.partials[tiles * a.k + i] = mean;
      a.partials[2 * tiles * a.k + i] = red[1][col] + red[1][kBN + col];
    }
  }
  // Output: (row, 8 consecutive columns) per item.
  T* out = static_cast<T*>(a.out);
  const T* res = static_cast<const T*>(a.residual);
  const bool vec_ok = a.k % kVec == 0 && ng % kVec == 0 && is_aligned16(out) &&
                      (res == nullptr || is_aligned16(res));
  for (int e = tid; e < kBM * (kBN / kVec); e += kThreads) {
    const int row = e / (kBN / kVec), col0 = e % (kBN / kVec) * kVec;
    const int nv = imin(kVec, cols_valid - col0);
    if (row >= rows_valid || nv <= 0) continue;
    const int64_t off = (m0 + row) * a.k + kbase + col0;
    float v[kVec], rv[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = cs[row * kLdC + col0 + j];
    const bool vec = vec_ok && nv == kVec;
    if (res) {
      if (vec) {
        load8(res + off, rv);
      } else {
        for (int j = 0; j < kVec; ++j) if (j < nv) rv[j] = to_f32(res[off + j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j >= nv) continue;
      if (a.scale) v[j] = fmaf(v[j], a.scale[kbase + col0 + j], a.shift[kbase + col0 + j]);
      if (res) v[j] += rv[j];
      if (a.relu) v[j] = relu_f32(v[j]);
    }
    if (vec) {
      store8(out + off, v);
    } else {
      for (int j = 0; j < kVec; ++j) if (j < nv) out[off + j] = from_f32<T>(v[j]);
    }
  }
}

}  // namespace

bool igemm_applies(const ConvArgs& a) {
  if (a.dtype == DType::kF32) return false;  // fp32 stays exact on CUDA cores (direct kernel)
  const int64_t cg = a.c / a.groups, ng = a.k / a.groups;
  return cg % kBK == 0 && ceil_div(a.n * a.oh * a.ow, kBM) <= 0x7fffffff &&
         ceil_div(ng, kBN) <= 65535 && a.groups <= 65535;
}

int64_t igemm_tiles(const ConvArgs& a) { return ceil_div(a.n * a.oh * a.ow, kBM); }

const char* igemm_launch(const ConvArgs& a, cudaStream_t stream) {
  if (!igemm_applies(a)) return "implicit GEMM does not apply to this convolution";
  const dim3 grid(static_cast<unsigned>(igemm_tiles(a)),
                  static_cast<unsigned>(ceil_div(a.k / a.groups, kBN)),
                  static_cast<unsigned>(a.groups));
  if (a.dtype == DType::kF16) {
    FASTRES_LAUNCH(conv_igemm_kernel<__half>, grid, dim3(kThreads), 0, stream, a);
  } else {
    FASTRES_LAUNCH(conv_igemm_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream, a);
  }
  return launch_error();
}

}  // namespace fastres
