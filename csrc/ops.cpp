// Torch binding of the fastres CUDA kernels: the only translation unit that includes torch.
//
// Registers the `fastres_cuda` ops (the `fastres` namespace belongs to the Python custom ops).
// Every op validates its tensors (device, dtype, layout, shapes) with a message naming the
// argument, then calls the C-style launchers of kernels.h on the current CUDA stream.
// Outputs are passed in by the caller (mutated in place, schema `Tensor(a!)`), so the Python side
// allocates, and can poison, every buffer a kernel must write.

#include <Python.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastres {
namespace {

using at::Tensor;

DType to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, "; expected float32, float16 or bfloat16");
  }
}

void check_cuda(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the first tensor argument is on ", like.device());
}

void check_dtype(const Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", want);
}

// A 4-D tensor whose memory is NHWC-dense (PyTorch channels_last, checked on the strides of the
// dimensions with more than one element, where strides are meaningful).
void check_nhwc(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got shape ", t.sizes());
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  const bool ok = (c <= 1 || t.stride(1) == 1) && (w <= 1 || t.stride(3) == c) &&
                  (h <= 1 || t.stride(2) == w * c) && (n <= 1 || t.stride(0) == h * w * c);
  TORCH_CHECK(ok, op, ": ", name, " must be channels_last contiguous (NHWC), got shape ",
              t.sizes(), " strides ", t.strides());
}

// A (K,) fp32 contiguous vector on x's device.
void check_vec(const Tensor& t, int64_t k, const char* op, const char* name, const Tensor& like) {
  check_cuda(t, op, name, like);
  check_dtype(t, at::kFloat, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k && t.is_contiguous(), op, ": ", name,
              " must be a contiguous (", k, ",) float32 vector, got shape ", t.sizes());
}

void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": ", err);
}

std::vector<int64_t> pair(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v.size());
  return {v[0], v[1]};
}

ConvArgs conv_shape(at::IntArrayRef xs, at::IntArrayRef ws, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                    at::ScalarType dtype, const char* op) {
  TORCH_CHECK(xs.size() == 4, op, ": x must be 4-D (N, C, H, W), got ", xs);
  TORCH_CHECK(ws.size() == 4, op, ": weight must be 4-D (K, C/groups, R, S), got ", ws);
  const auto st = pair(stride, op, "stride"), pd = pair(padding, op, "padding"),
             dl = pair(dilation, op, "dilation");
  TORCH_CHECK(st[0] >= 1 && st[1] >= 1 && dl[0] >= 1 && dl[1] >= 1 && pd[0] >= 0 && pd[1] >= 0,
              op, ": need stride >= 1, dilation >= 1, padding >= 0");
  TORCH_CHECK(groups >= 1 && xs[1] % groups == 0 && ws[0] % groups == 0, op, ": groups=", groups,
              " must divide the input channels (", xs[1], ") and output channels (", ws[0], ")");
  TORCH_CHECK(ws[1] * groups == xs[1], op, ": weight ", ws, " with groups=", groups,
              " expects ", ws[1] * groups, " input channels, x has ", xs[1]);
  ConvArgs a{};
  a.n = xs[0];
  a.c = xs[1];
  a.h = xs[2];
  a.w = xs[3];
  a.k = ws[0];
  a.r = ws[2];
  a.s = ws[3];
  a.stride_h = static_cast<int>(st[0]);
  a.stride_w = static_cast<int>(st[1]);
  a.pad_h = static_cast<int>(pd[0]);
  a.pad_w = static_cast<int>(pd[1]);
  a.dil_h = static_cast<int>(dl[0]);
  a.dil_w = static_cast<int>(dl[1]);
  a.groups = static_cast<int>(groups);
  a.oh = (a.h + 2 * a.pad_h - a.dil_h * (a.r - 1) - 1) / a.stride_h + 1;
  a.ow = (a.w + 2 * a.pad_w - a.dil_w * (a.s - 1) - 1) / a.stride_w + 1;
  TORCH_CHECK(a.n > 0 && a.c > 0 && a.k > 0 && a.oh > 0 && a.ow > 0, op,
              ": empty problem: x ", xs, ", weight ", ws, " gives output ", a.oh, "x", a.ow);
  a.dtype = to_dtype(dtype, op);
  return a;
}

// conv_plan(...) -> (path, tiles, reason): the kernel conv would pick (0 direct, 1 implicit GEMM),
// the number of rows T of its (3, T, K) statistics partials, and "" or why it cannot run.
std::tuple<int64_t, int64_t, std::string> conv_plan(at::IntArrayRef x_shape,
                                                   at::IntArrayRef weight_shape,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups,
                                                   at::ScalarType dtype) {
  const ConvArgs a = conv_shape(x_shape, weight_shape, stride, padding, dilation, groups, dtype,
                                "fastres_cuda::conv_plan");
  const char* why = conv_check(a);
  return {static_cast<int64_t>(conv_path(a)), conv_stat_tiles(a), why ? std::string(why) : ""};
}

void conv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
          const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
          const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
          at::IntArrayRef dilation, int64_t groups, bool relu, const Tensor& out,
          const Tensor& partials) {
  const char* op = "fastres_cuda::conv";
  check_cuda(x, op, "x", x);
  check_cuda(weight, op, "weight", x);
  check_nhwc(x, op, "x");
  check_nhwc(weight, op, "weight (its memory must be K, R, S, C/groups: channels_last)");
  ConvArgs a = conv_shape(x.sizes(), weight.sizes(), stride, padding, dilation, groups,
                          x.scalar_type(), op);
  check_dtype(weight, x.scalar_type(), op, "weight");
  const char* why = conv_check(a);
  TORCH_CHECK(why == nullptr, op, ": unsupported configuration: ", why);

  const std::vector<int64_t> out_shape{a.n, a.k, a.oh, a.ow};
  check_cuda(out, op, "out", x);
  check_dtype(out, x.scalar_type(), op, "out");
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), op, ": out has shape ", out.sizes(),
              ", expected ", out_shape);
  check_nhwc(out, op, "out");
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.out = out.data_ptr();
  if (bias.has_value()) {
    check_cuda(*bias, op, "bias", x);
    check_dtype(*bias, x.scalar_type(), op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.k && bias->is_contiguous(), op,
                ": bias must be a contiguous (", a.k, ",) vector, got ", bias->sizes());
    a.bias = bias->data_ptr();
  }
  TORCH_CHECK(scale.has_value() == shift.has_value(), op,
              ": pass both scale and shift, or neither");
  if (scale.has_value()) {
    check_vec(*scale, a.k, op, "scale", x);
    check_vec(*shift, a.k, op, "shift", x);
    a.scale = scale->data_ptr<float>();
    a.shift = shift->data_ptr<float>();
  }
  if (residual.has_value()) {
    check_cuda(*residual, op, "residual", x);
    check_dtype(*residual, x.scalar_type(), op, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), op, ": residual has shape ",
                residual->sizes(), ", expected ", out_shape);
    check_nhwc(*residual, op, "residual");
    a.residual = residual->data_ptr();
  }
  check_cuda(partials, op, "partials", x);
  if (partials.numel() > 0) {  // an empty tensor means: no statistics wanted
    check_dtype(partials, at::kFloat, op, "partials");
    const int64_t tiles = conv_stat_tiles(a);
    TORCH_CHECK(partials.dim() == 3 && partials.size(0) == 3 && partials.size(1) == tiles &&
                    partials.size(2) == a.k && partials.is_contiguous(),
                op, ": partials must be a contiguous float32 (3, ", tiles, ", ", a.k,
                ") tensor (see conv_plan), got ", partials.sizes());
    a.partials = partials.data_ptr<float>();
  }
  a.relu = relu;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(conv_launch(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), op);
}

void bn_finalize(const Tensor& partials, const std::optional<Tensor>& gamma,
                 const std::optional<Tensor>& beta, double eps, const Tensor& mean,
                 const Tensor& var, const Tensor& scale, const Tensor& shift) {
  const char* op = "fastres_cuda::bn_finalize";
  TORCH_CHECK(partials.is_cuda(), op, ": partials must be a CUDA tensor, got ", partials.device());
  check_dtype(partials, at::kFloat, op, "partials");
  TORCH_CHECK(partials.dim() == 3 && partials.size(0) == 3 && partials.size(1) > 0 &&
                  partials.is_contiguous(),
              op, ": partials must be a contiguous (3, T, K) tensor, got ", partials.sizes());
  const int64_t k = partials.size(2);
  check_vec(mean, k, op, "mean", partials);
  check_vec(var, k, op, "var", partials);
  check_vec(scale, k, op, "scale", partials);
  check_vec(shift, k, op, "shift", partials);
  if (gamma.has_value()) check_vec(*gamma, k, op, "gamma", partials);
  if (beta.has_value()) check_vec(*beta, k, op, "beta", partials);
  const c10::cuda::CUDAGuard guard(partials.device());
  check_launch(
      bn_finalize_launch(partials.data_ptr<float>(), partials.size(1), k,
                         gamma.has_value() ? gamma->data_ptr<float>() : nullptr,
                         beta.has_value() ? beta->data_ptr<float>() : nullptr,
                         static_cast<float>(eps), mean.data_ptr<float>(), var.data_ptr<float>(),
                         scale.data_ptr<float>(), shift.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream(partials.device().index()).stream()),
      op);
}

// Checks `t` is an NHWC tensor of y's shape, dtype and device.
void check_like_y(const Tensor& t, const Tensor& y, const char* op, const char* name) {
  check_cuda(t, op, name, y);
  check_dtype(t, y.scalar_type(), op, name);
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ",
              y.sizes());
  check_nhwc(t, op, name);
}

void bn_apply(const Tensor& y, const Tensor& scale, const Tensor& shift,
              const std::optional<Tensor>& residual, bool relu, const Tensor& z) {
  const char* op = "fastres_cuda::bn_apply";
  TORCH_CHECK(y.is_cuda(), op, ": y must be a CUDA tensor, got ", y.device());
  check_nhwc(y, op, "y");
  const DType dt = to_dtype(y.scalar_type(), op);
  const int64_t k = y.size(1);
  check_vec(scale, k, op, "scale", y);
  check_vec(shift, k, op, "shift", y);
  if (residual.has_value()) check_like_y(*residual, y, op, "residual");
  check_like_y(z, y, op, "z");
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(bn_apply_launch(y.data_ptr(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                               residual.has_value() ? residual->data_ptr() : nullptr,
                               z.data_ptr(), y.numel() / k, k, relu, dt,
                               c10::cuda::getCurrentCUDAStream(y.device().index()).stream()),
               op);
}

void bn_backward(const Tensor& dz, const Tensor& y, const Tensor& z, const Tensor& mean,
                 const Tensor& var, const std::optional<Tensor>& gamma, double eps,
                 bool batch_stats, bool relu, const Tensor& dy, const Tensor& dres,
                 const Tensor& dgamma, const Tensor& dbeta) {
  const char* op = "fastres_cuda::bn_backward";
  TORCH_CHECK(y.is_cuda(), op, ": y must be a CUDA tensor, got ", y.device());
  check_nhwc(y, op, "y");
  const DType dt = to_dtype(y.scalar_type(), op);
  const int64_t k = y.size(1), m = y.numel() / k;
  check_like_y(dz, y, op, "dz");
  check_like_y(z, y, op, "z");
  check_like_y(dy, y, op, "dy");
  check_cuda(dres, op, "dres", y);
  if (dres.numel() > 0) check_like_y(dres, y, op, "dres");  // empty: not wanted
  check_vec(mean, k, op, "mean", y);
  check_vec(var, k, op, "var", y);
  check_vec(dgamma, k, op, "dgamma", y);
  check_vec(dbeta, k, op, "dbeta", y);
  if (gamma.has_value()) check_vec(*gamma, k, op, "gamma", y);
  const c10::cuda::CUDAGuard guard(y.device());
  const Tensor work = at::empty({bn_backward_workspace(m, k)}, y.options().dtype(at::kFloat));
  check_launch(
      bn_backward_launch(dz.data_ptr(), y.data_ptr(), z.data_ptr(), mean.data_ptr<float>(),
                         var.data_ptr<float>(),
                         gamma.has_value() ? gamma->data_ptr<float>() : nullptr,
                         static_cast<float>(eps), batch_stats, relu, dy.data_ptr(),
                         dres.numel() > 0 ? dres.data_ptr() : nullptr, dgamma.data_ptr<float>(),
                         dbeta.data_ptr<float>(), work.data_ptr<float>(), m, k, dt,
                         c10::cuda::getCurrentCUDAStream(y.device().index()).stream()),
      op);
}

// The code this library holds, as setup.py built it ("sm_80,sm_90a,compute_80": machine code for
// sm_80 and sm_90a, PTX for compute_80); the Python side checks it against the device.
#ifndef FASTRES_CUDA_ARCHS
#error "setup.py passes -DFASTRES_CUDA_ARCHS=<the -gencode targets>"
#endif
#define FASTRES_STR2(...) #__VA_ARGS__
#define FASTRES_STR(...) FASTRES_STR2(__VA_ARGS__)
std::string built_archs() { return FASTRES_STR(FASTRES_CUDA_ARCHS); }

}  // namespace
}  // namespace fastres

TORCH_LIBRARY(fastres_cuda, m) {
  m.def("built_archs() -> str", &fastres::built_archs);
  m.def(
      "conv_plan(int[] x_shape, int[] weight_shape, int[] stride, int[] padding, int[] dilation, "
      "int groups, ScalarType dtype) -> (int, int, str)",
      &fastres::conv_plan);
  m.def(
      "conv(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
      "Tensor(a!) out, Tensor(b!) partials) -> ()");
  m.def(
      "bn_finalize(Tensor partials, Tensor? gamma, Tensor? beta, float eps, Tensor(a!) mean, "
      "Tensor(b!) var, Tensor(c!) scale, Tensor(d!) shift) -> ()");
  m.def(
      "bn_apply(Tensor y, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
      "Tensor(a!) z) -> ()");
  m.def(
      "bn_backward(Tensor dz, Tensor y, Tensor z, Tensor mean, Tensor var, Tensor? gamma, "
      "float eps, bool batch_stats, bool relu, Tensor(a!) dy, Tensor(b!) dres, "
      "Tensor(c!) dgamma, Tensor(d!) dbeta) -> ()");
}

TORCH_LIBRARY_IMPL(fastres_cuda, CUDA, m) {
  m.impl("conv", &fastres::conv);
  m.impl("bn_finalize", &fastres::bn_finalize);
  m.impl("bn_apply", &fastres::bn_apply);
  m.impl("bn_backward", &fastres::bn_backward);
}

// `import fastres._C` loads this library, which runs the registrations above. The module itself
// holds nothing: the ops are reached through torch.ops.fastres_cuda.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fastres._C",
                            "fastres CUDA kernels (ops in torch.ops.fastres_cuda)", -1, nullptr};
  return PyModule_Create(&def);
}
