// Host emulation of the CUDA execution model: enough to run fastres's kernels, unmodified, on a
// CPU so that their indexing, tiling, reductions and epilogues are tested where no GPU exists.
// Built only by the tests (g++ -DFASTRES_EMU, see tests/backends/test_cuda.py), never shipped.
//
//  * blocks run one after another; the threads of a block are OS threads, so __syncthreads is a
//    std::barrier and a thread that returns early drops out of it (as on a GPU, where an exited
//    thread no longer counts);
//  * __shared__ variables become statics (one block runs at a time); dynamic shared memory is a
//    host buffer sized by the launch and filled with NaN before each block;
//  * WMMA fragments hold the whole 16 x 16 tile in every lane: each lane of the warp performs the
//    same load / multiply / store (identical values), with fp32 products and accumulation.
//
// It does not emulate timing, memory coalescing, bank conflicts, or the hardware's limits on
// shared memory and registers; the real-target compile (nvcc for sm_80 / sm_90a) covers those.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

// The CUDA headers give these CUDA meanings under g++; give them host meanings.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))

namespace fastres_emu {

inline dim3 grid_dim, block_dim, block_idx;
inline thread_local dim3 thread_idx;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::max_align_t> dyn_smem;

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(dyn_smem.data());
}

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// First fault recorded by a kernel (returned, and cleared, by the launchers' error check).
inline std::atomic<const char*> fault{nullptr};

inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    const char* none = nullptr;
    fault.compare_exchange_strong(none, "misaligned 16-byte vector access");
  }
}

inline const char* take_error() { return fault.exchange(nullptr); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
            Args... args) {
  grid_dim = grid;
  block_dim = block;
  dyn_smem.assign(smem_bytes / sizeof(std::max_align_t) + 1, std::max_align_t{});
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        // Shared memory starts as garbage on a GPU: all-ones bytes are NaN in fp32/fp16/bf16,
        // so a read of an element this block did not write shows up in the results.
        std::memset(static_cast<void*>(dyn_smem.data()), 0xff,
                    dyn_smem.size() * sizeof(std::max_align_t));
        std::barrier<> bar(nthreads);
        block_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            thread_idx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            kernel(args...);
            bar.arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
      }
}

}  // namespace fastres_emu

#define threadIdx (::fastres_emu::thread_idx)
#define blockIdx (::fastres_emu::block_idx)
#define blockDim (::fastres_emu::block_dim)
#define gridDim (::fastres_emu::grid_dim)
#define __syncthreads() ::fastres_emu::syncthreads()

// ---- WMMA subset used by conv_igemm.cu ----
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Element (i, j) of the 16 x 16 tile at x[i * 16 + j], as fp32.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16 * 16];
};

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T>
float as_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = as_float(p[i * ldm + k]);
}

template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) f.x[k * 16 + j] = as_float(p[j * ldm + k]);
}

template <typename A, typename B, typename C>
void mma_sync(C& d, const A& a, const B& b, const C& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], s);
      out[i * 16 + j] = s;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

template <typename C>
void store_matrix_sync(float* p, const C& c, unsigned ldm, layout_t layout) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const float v = c.x[i * 16 + j];
      if (layout == mem_row_major) {
        p[i * ldm + j] = v;
      } else {
        p[j * ldm + i] = v;
      }
    }
}

}  // namespace wmma
}  // namespace nvcuda
