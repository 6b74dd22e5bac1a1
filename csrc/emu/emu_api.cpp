// Flat extern "C" entry points over the launchers of kernels.h, for the CPU emulation build
// (ctypes in tests/backends/test_cuda.py). All pointers are host pointers.
#include <cstdint>

#include "../kernels.h"

using fastres::ConvArgs;
using fastres::DType;

namespace {

ConvArgs shape(const int64_t* s, const int* p, int dtype) {
  // s: n, h, w, c, k, r, s, oh, ow; p: stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups
  ConvArgs a{};
  a.n = s[0]; a.h = s[1]; a.w = s[2]; a.c = s[3]; a.k = s[4]; a.r = s[5]; a.s = s[6];
  a.oh = s[7]; a.ow = s[8];
  a.stride_h = p[0]; a.stride_w = p[1]; a.pad_h = p[2]; a.pad_w = p[3];
  a.dil_h = p[4]; a.dil_w = p[5]; a.groups = p[6];
  a.dtype = static_cast<DType>(dtype);
  return a;
}

}  // namespace

extern "C" {

int64_t emu_conv_tiles(const int64_t* s, const int* p, int dtype) {
  return fastres::conv_stat_tiles(shape(s, p, dtype));
}

const char* emu_conv_check(const int64_t* s, const int* p, int dtype) {
  return fastres::conv_check(shape(s, p, dtype));
}

int emu_conv_path(const int64_t* s, const int* p, int dtype) {
  return static_cast<int>(fastres::conv_path(shape(s, p, dtype)));
}

const char* emu_conv(const int64_t* s, const int* p, int dtype, const void* x, const void* weight,
                     const void* bias, const float* scale, const float* shift,
                     const void* residual, void* out, float* partials, int relu) {
  ConvArgs a = shape(s, p, dtype);
  a.x = x; a.weight = weight; a.bias = bias; a.scale = scale; a.shift = shift;
  a.residual = residual; a.out = out; a.partials = partials; a.relu = relu != 0;
  return fastres::conv_launch(a, nullptr);
}

const char* emu_bn_finalize(const float* partials, int64_t tiles, int64_t k, const float* gamma,
                            const float* beta, float eps, float* mean, float* var, float* scale,
                            float* shift) {
  return fastres::bn_finalize_launch(partials, tiles, k, gamma, beta, eps, mean, var, scale,
                                     shift, nullptr);
}

const char* emu_bn_apply(const void* y, const float* scale, const float* shift,
                         const void* residual, void* z, int64_t m, int64_t k, int relu,
                         int dtype) {
  return fastres::bn_apply_launch(y, scale, shift, residual, z, m, k, relu != 0,
                                  static_cast<DType>(dtype), nullptr);
}

int64_t emu_bn_backward_workspace(int64_t m, int64_t k) {
  return fastres::bn_backward_workspace(m, k);
}

const char* emu_bn_backward(const void* dz, const void* y, const void* z, const float* mean,
                            const float* var, const float* gamma, float eps, int batch_stats,
                            int relu, void* dy, void* dres, float* dgamma, float* dbeta,
                            float* workspace, int64_t m, int64_t k, int dtype) {
  return fastres::bn_backward_launch(dz, y, z, mean, var, gamma, eps, batch_stats != 0, relu != 0,
                                     dy, dres, dgamma, dbeta, workspace, m, k,
                                     static_cast<DType>(dtype), nullptr);
}

}  // extern "C"
