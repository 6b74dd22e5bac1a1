// Direct convolution on CUDA cores, for grouped / depthwise convolutions with few channels per
// group (ResNeXt 4-32 per group, depthwise), and for any shape the implicit GEMM does not take.
// Such convolutions do a few FLOPs per byte, so the design goal is to read x once from HBM:
//
//  * a block owns an output tile of TH x TW pixels of one image and kBlockK = 32 consecutive
//    output channels (whole or partial groups);
//  * it walks the input channels its groups need in chunks of CC channels; for each chunk it
//    stages the input halo (the receptive field of the tile) and the matching weights in shared
//    memory as fp32; halo loads are 16-byte vectors along channels, coalesced across threads;
//  * a thread computes kVec = 8 consecutive output channels of one pixel, accumulating in fp32;
//  * epilogue: + bias, per-tile per-channel (count, mean, M2) of the raw output (two passes over
//    the tile in shared memory: exact when mean >> std), scale/shift, + residual, ReLU, and a
//    16-byte vector store where aligned.

#include <algorithm>

#include "common.cuh"
#include "conv_plan.h"

namespace fastres {
namespace {

constexpr int kThreads = 256;

// (kThreads, 2): without a minimum-blocks hint ptxas caps the fp32 instance at 64 registers
// on sm_90a and spills; 2 blocks of 256 threads allow up to 128.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    conv_direct_kernel(const ConvArgs a, const DirectPlan p) {
  FASTRES_DYNAMIC_SMEM(float, smem);
  // Shared memory, reused by phase:
  //   main loop: halo[hh * hw][cc] then wts[kBlockK][r * s][cc]
  //   epilogue:  ytile[th * tw][kBlockK] then red[2][kThreads]
  float* halo = smem;
  float* wts = smem + static_cast<int64_t>(p.halo_h) * p.halo_w * p.cc;

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ weight = static_cast<const T*>(a.weight);
  const int tid = threadIdx.x;
  const int64_t kg = a.k / a.groups;  // output channels per group
  const int64_t cg = a.c / a.groups;  // input channels per group
  const int rs = static_cast<int>(a.r * a.s);

  // Which tile: blockIdx.x -> (image, tile row, tile col), blockIdx.y -> output channel block.
  const int64_t tile = blockIdx.x;
  const int64_t tiles_w = ceil_div(a.ow, p.tw);
  const int64_t tiles_h = ceil_div(a.oh, p.th);
  const int64_t img = tile / (tiles_h * tiles_w);
  const int64_t oh0 = (tile / tiles_w) % tiles_h * p.th;
  const int64_t ow0 = tile % tiles_w * p.tw;
  const int64_t ih0 = oh0 * a.stride_h - a.pad_h;
  const int64_t iw0 = ow0 * a.stride_w - a.pad_w;
  const int64_t kb0 = static_cast<int64_t>(blockIdx.y) * kBlockK;
  const int64_t kb1 = imin(kb0 + kBlockK, a.k);
  // Input channels used by the groups of output channels [kb0, kb1).
  const int64_t cs0 = kb0 / kg * cg;
  const int64_t cs1 = ((kb1 - 1) / kg + 1) * cg;

  // This thread's work item: pixel `pix` of the tile, output channels k0 .. k0 + 7.
  constexpr int kQ = kBlockK / kVec;
  const int pix = tid / kQ;
  const int64_t k0 = kb0 + (tid % kQ) * kVec;
  const int py = pix / p.tw, px = pix % p.tw;
  const bool active = pix < p.th * p.tw;
  float acc[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) acc[v] = 0.0f;

  const int halo_pix = p.halo_h * p.halo_w;
  // x rows are 16-byte aligned for vector loads only if C keeps 8-element rows aligned.
  const bool x_vec = (a.c % kVec == 0) && is_aligned16(x);

  for (int64_t cc0 = cs0; cc0 < cs1; cc0 += p.cc) {
    const int cw = static_cast<int>(imin(p.cc, cs1 - cc0));
    // Stage the halo: (pixel, 8-channel segment) per thread, zero outside the image.
    const int segs = (cw + kVec - 1) / kVec;
    for (int e = tid; e < halo_pix * segs; e += kThreads) {
      const int hp = e / segs, seg = e % segs;
      const int64_t ih = ih0 + hp / p.halo_w, iw = iw0 + hp % p.halo_w;
      const int64_t c = cc0 + seg * kVec;
      const int nv = static_cast<int>(imin(kVec, cc0 + cw - c));
      float v[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = 0.0f;
      if (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w) {
        const T* src = x + ((img * a.h + ih) * a.w + iw) * a.c + c;
        if (x_vec && nv == kVec && c % kVec == 0) {
          load8(src, v);
        } else {
          for (int j = 0; j < kVec; ++j) if (j < nv) v[j] = to_f32(src[j]);
        }
      }
      float* dst = halo + static_cast<int64_t>(hp) * p.cc + seg * kVec;
      for (int j = 0; j < kVec; ++j) if (j < nv) dst[j] = v[j];
    }
    // Stage the weights of this chunk: wts[kk][tap][ci] = weight[k][tap][c - group start], zero
    // where input channel c is outside output channel k's group.
    for (int e = tid; e < kBlockK * rs * cw; e += kThreads) {
      const int kk = e / (rs * cw), rem = e % (rs * cw);
      const int tap = rem / cw, ci = rem % cw;
      const int64_t k = kb0 + kk, c = cc0 + ci;
      float wv = 0.0f;
      if (k < kb1) {
        const int64_t cl = c - k / kg * cg;
        if (cl >= 0 && cl < cg) wv = to_f32(weight[(k * rs + tap) * cg + cl]);
      }
      wts[(static_cast<int64_t>(kk) * rs + tap) * p.cc + ci] = wv;
    }
    __syncthreads();
    if (active) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t k = k0 + v;
        if (k >= kb1) continue;
        // Only the chunk channels inside k's group contribute.
        const int64_t g0 = k / kg * cg;
        const int lo = static_cast<int>(imax(g0, cc0) - cc0);
        const int hi = static_cast<int>(imin(g0 + cg, cc0 + cw) - cc0);
        if (lo >= hi) continue;
        const float* wk = wts + static_cast<int64_t>(k - kb0) * rs * p.cc;
        float sum = 0.0f;
        for (int r = 0; r < a.r; ++r) {
          const int hy = py * a.stride_h + r * a.dil_h;
          for (int s = 0; s < a.s; ++s) {
            const int hx = px * a.stride_w + s * a.dil_w;
            const float* hrow = halo + static_cast<int64_t>(hy * p.halo_w + hx) * p.cc;
            const float* wrow = wk + static_cast<int64_t>(r * a.s + s) * p.cc;
            for (int ci = lo; ci < hi; ++ci) sum = fmaf(hrow[ci], wrow[ci], sum);
          }
        }
        acc[v] += sum;
      }
    }
    __syncthreads();  // the next chunk overwrites halo and wts
  }

  // ---- epilogue ----
  const int64_t oh = oh0 + py, ow = ow0 + px;
  const bool valid = active && oh < a.oh && ow < a.ow;
  if (a.bias) {
    const T* bias = static_cast<const T*>(a.bias);
#pragma unroll
    for (int v = 0; v < kVec; ++v)
      if (k0 + v < kb1) acc[v] += to_f32(bias[k0 + v]);
  }
  if (a.partials) {
    // Statistics of y as stored (rounded to T): normalisation and the backward pass see that y,
    // and with mean >> std the rounding is not negligible against the spread (as in PyTorch).
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = to_f32(from_f32<T>(acc[v]));
    // Two-pass statistics of the raw y over the tile's valid pixels, per channel.
    float* ytile = smem;  // [th * tw][kBlockK]
    float* red = smem + p.th * p.tw * kBlockK;
    if (valid) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) ytile[pix * kBlockK + (tid % kQ) * kVec + v] = acc[v];
    }
    const int64_t rows_valid = imin(p.th, a.oh - oh0);
    const int64_t cols_valid = imin(p.tw, a.ow - ow0);
    const int count = static_cast<int>(rows_valid * cols_valid);
    __syncthreads();
    // Thread (kk, lane) sums pixels lane, lane + 8, ... of channel kk.
    constexpr int kLanes = kThreads / kBlockK;
    const int kk = tid % kBlockK, lane = tid / kBlockK;
    auto pixel_valid = [&](int q) {
      return q / p.tw < rows_valid && q % p.tw < cols_valid;
    };
    float s1 = 0.0f;
    for (int q = lane; q < p.th * p.tw; q += kLanes)
      if (pixel_valid(q)) s1 += ytile[q * kBlockK + kk];
    red[tid] = s1;
    __syncthreads();
    float mean = 0.0f;
    for (int l = 0; l < kLanes; ++l) mean += red[l * kBlockK + kk];
    mean /= static_cast<float>(count);
    float s2 = 0.0f;
    for (int q = lane; q < p.th * p.tw; q += kLanes) {
      if (pixel_valid(q)) {
        const float d = ytile[q * kBlockK + kk] - mean;
        s2 = fmaf(d, d, s2);
      }
    }
    red[kThreads + tid] = s2;
    __syncthreads();
    if (lane == 0 && kb0 + kk < kb1) {
      float m2 = 0.0f;
      for (int l = 0; l < kLanes; ++l) m2 += red[kThreads + l * kBlockK + kk];
      const int64_t tiles = gridDim.x;
      const int64_t i = tile * a.k + kb0 + kk;
      a.partials[i] = static_cast<float>(count);
      a.partials[tiles * a.k + i] = mean;
      a.partials[2 * tiles * a.k + i] = m2;
    }
  }
  if (!valid) return;
  const int64_t base = ((img * a.oh + oh) * a.ow + ow) * a.k + k0;
  const int nv = static_cast<int>(imin(kVec, kb1 - k0));
  if (nv <= 0) return;
  T* out = static_cast<T*>(a.out) + base;
  const T* res = a.residual ? static_cast<const T*>(a.residual) + base : nullptr;
  // Vector access needs full, 16-byte aligned 8-channel runs: K % 8 == 0 and aligned buffers.
  const bool vec = nv == kVec && a.k % kVec == 0 && is_aligned16(out) &&
                   (res == nullptr || is_aligned16(res));
  float rv[kVec];
  if (res) {
    if (vec) {
      load8(res, rv);
    } else {
      for (int v = 0; v < kVec; ++v) if (v < nv) rv[v] = to_f32(res[v]);
    }
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    float o = acc[v];
    if (a.scale && v < nv) o = fmaf(o, a.scale[k0 + v], a.shift[k0 + v]);
    if (res && v < nv) o += rv[v];
    if (a.relu) o = relu_f32(o);
    acc[v] = o;
  }
  if (vec) {
    store8(out, acc);
  } else {
    for (int v = 0; v < kVec; ++v) if (v < nv) out[v] = from_f32<T>(acc[v]);
  }
}

}  // namespace

DirectPlan plan_direct(const ConvArgs& a) {
  DirectPlan p{};
  const int64_t kg = a.k / a.groups, cg = a.c / a.groups;
  // Widest input span any channel block needs (it covers one or more whole groups).
  int64_t span = 0;
  for (int64_t kb0 = 0; kb0 < a.k; kb0 += kBlockK) {
    const int64_t kb1 = std::min<int64_t>(kb0 + kBlockK, a.k);
    span = std::max(span, ((kb1 - 1) / kg + 1 - kb0 / kg) * cg);
  }
  // Largest tile (<= 8 x 8 pixels: one work item per thread) and chunk (<= 16 channels) whose
  // halo and weights fit the default 48 KiB of shared memory.
  const int tiles[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 4}, {2, 2}, {1, 2}, {1, 1}};
  for (const auto& t : tiles) {
    for (int cc = static_cast<int>(std::min<int64_t>(16, span)); cc >= 1; cc /= 2) {
      const int64_t hh = (t[0] - 1) * int64_t{a.stride_h} + (a.r - 1) * a.dil_h + 1;
      const int64_t hw = (t[1] - 1) * int64_t{a.stride_w} + (a.s - 1) * a.dil_w + 1;
      const int64_t main_floats = hh * hw * cc + int64_t{kBlockK} * a.r * a.s * cc;
      const int64_t epi_floats = int64_t{t[0]} * t[1] * kBlockK + 2 * kThreads;
      const int64_t bytes = std::max(main_floats, epi_floats) * 4;
      if (bytes <= kDirectMaxSmem) {
        p.th = t[0];
        p.tw = t[1];
        p.cc = cc;
        p.halo_h = static_cast<int>(hh);
        p.halo_w = static_cast<int>(hw);
        p.smem_bytes = static_cast<int>(bytes);
        p.tiles = a.n * ceil_div(a.oh, t[0]) * ceil_div(a.ow, t[1]);
        return p;
      }
      if (cc == 1) break;
    }
  }
  return p;  // th == 0: does not fit
}

const char* direct_check(const ConvArgs& a) {
  const DirectPlan p = plan_direct(a);
  if (p.th == 0) return "the filter is too large for the direct kernel's shared-memory tile";
  if (p.tiles > 0x7fffffff) return "too many output tiles for one launch (grid.x > 2^31 - 1)";
  if (ceil_div(a.k, kBlockK) > 65535) return "too many output channels (grid.y > 65535)";
  return nullptr;
}

const char* direct_launch(const ConvArgs& a, cudaStream_t stream) {
  if (const char* why = direct_check(a)) return why;
  const DirectPlan p = plan_direct(a);
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(ceil_div(a.k, kBlockK)));
  return dispatch_dtype(a.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    FASTRES_LAUNCH(conv_direct_kernel<T>, grid, dim3(kThreads), p.smem_bytes, stream, a, p);
    return launch_error();
  });
}

}  // namespace fastres
