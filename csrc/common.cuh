// Helpers shared by the kernels: element conversion, 8-wide vector access, dtype dispatch, Chan's
// merge of (count, mean, M2) statistics, and launch error reporting.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

#ifdef FASTRES_EMU
// Host emulation of the CUDA execution model, for running these kernels on a CPU in tests.
#include "emu/cuda_emu.h"
#define FASTRES_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastres_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define FASTRES_DYNAMIC_SMEM(type, name) type* name = ::fastres_emu::dynamic_smem<type>()
// x86 forgives misaligned vector accesses, a GPU faults: the emulator records them.
#define FASTRES_CHECK_ALIGNED16(p) ::fastres_emu::check_aligned16(p)
#else
#define FASTRES_CHECK_ALIGNED16(p)
// kernel<<<grid, block, smem, stream>>>(args...)
#define FASTRES_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define FASTRES_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace fastres {

// fp32 view of a stored element, and back (round to nearest).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ReLU as torch.relu: NaN propagates (fmaxf(NaN, 0) would return 0 and hide it).
__device__ __forceinline__ float relu_f32(float v) { return v < 0.0f ? 0.0f : v; }

// Eight consecutive elements: one 16-byte access for 16-bit types, two for fp32. The caller
// guarantees `p` is 16-byte aligned (see is_aligned16).
constexpr int kVec = 8;

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    FASTRES_CHECK_ALIGNED16(p);
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    FASTRES_CHECK_ALIGNED16(p);
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_f32(e[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    FASTRES_CHECK_ALIGNED16(p);
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = from_f32<T>(v[i]);
    FASTRES_CHECK_ALIGNED16(p);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Chan et al.: fold a partial (nb, mb, m2b) into the running (n, mean, m2). Exact for any mean
// offset, unlike sum / sum-of-squares.
template <typename F>
__device__ __forceinline__ void chan_merge(F& n, F& mean, F& m2, F nb, F mb, F m2b) {
  if (nb <= F(0)) return;
  const F total = n + nb;
  const F delta = mb - mean;
  mean += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

// Calls f(T{}) with T the element type for `dt`.
template <typename Fn>
const char* dispatch_dtype(DType dt, Fn&& f) {
  switch (dt) {
    case DType::kF32:
      return f(float{});
    case DType::kF16:
      return f(__half{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
  }
  return "unknown dtype";
}

// Error of the launch just made (configuration or earlier asynchronous fault), or nullptr.
inline const char* launch_error() {
#ifdef FASTRES_EMU
  return ::fastres_emu::take_error();  // kernels ran synchronously; faults they recorded
#endif
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace fastres
