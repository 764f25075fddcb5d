// Torch bindings of the MSDA kernels: shape and device checks, dtype handling,
// allocation, and the choice between the CPU and CUDA kernels by the value's device.
// The only file here that sees torch types; the kernels take plain pointers.
//
// dtypes: value (and grad_output) stay in their own dtype (float32, float64, float16,
// bfloat16); sampling_locations and attention_weights are read in the accumulation
// type (float64 for float64 values, float32 otherwise: bfloat16 locations would be off
// by ~0.5 px on a 152 px map); gradients come back in each input's own dtype.
#include <torch/extension.h>

#ifdef MSDA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <optional>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "msda_kernels.h"

namespace {

msda::ValueType value_type_of(const at::Tensor& value) {
  switch (value.scalar_type()) {
    case at::kFloat: return msda::ValueType::kFloat32;
    case at::kDouble: return msda::ValueType::kFloat64;
    case at::kHalf: return msda::ValueType::kFloat16;
    case at::kBFloat16: return msda::ValueType::kBFloat16;
    default:
      TORCH_CHECK(false, "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ",
                  value.scalar_type());
  }
}

// The inputs as the kernels read them: contiguous, on the value's device, locations and
// weights in the accumulation type.
struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  msda::Problem problem;
};

Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ", sampling_locations.sizes());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == N && sampling_locations.size(2) == M,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " in N or M");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L = ", L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be [L] with L = ", L, ", got ", level_start_index.sizes());
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) && !at::isFloatingType(level_start_index.scalar_type()),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device, got ",
              value.device(), ", ", sampling_locations.device(), ", ", attention_weights.device());
  TORCH_CHECK(value.is_cpu() || value.is_cuda(), "ms_deform_attn: no kernel for device ", value.device());

  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  (void)value_type_of(value);  // rejects unsupported dtypes before any copy
  Inputs in;
  in.value = value.contiguous();
  in.spatial_shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  in.level_start_index = level_start_index.to(value.device(), at::kLong).contiguous();
  in.sampling_locations = sampling_locations.to(acc_type).contiguous();
  in.attention_weights = attention_weights.to(acc_type).contiguous();
  in.problem = {N, S, M, D, Lq, L, P};
  if (value.is_cpu()) {
    // The CPU kernels index value by these numbers: keep every level inside S, and its
    // pixel indices in int32. (On CUDA this would cost a device sync per call; the Python
    // wrapper checks the contract whenever spatial_shapes lives on the CPU.)
    const int64_t* shape = in.spatial_shapes.data_ptr<int64_t>();
    const int64_t* start = in.level_start_index.data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(shape[2 * l] >= 0 && shape[2 * l + 1] >= 0 && start[l] >= 0 &&
                      shape[2 * l] * shape[2 * l + 1] <= INT32_MAX && start[l] + shape[2 * l] * shape[2 * l + 1] <= S,
                  "ms_deform_attn: level ", l, " (H=", shape[2 * l], ", W=", shape[2 * l + 1], ", start=", start[l],
                  ") does not fit in value's S=", S, " tokens");
    }
  }
  return in;
}

// A new output or gradient buffer. Big CPU buffers come straight from mmap, and faulting
// them in 4 KiB page by page costs more than the kernel on small problems (decoder
// backward: a 40 MB grad_value for 77k samples). Asking for transparent huge pages on the
// 2 MiB-aligned part before the first touch cuts that ~4x; it is only advice (the
// kernel may ignore it, and it does nothing where THP is disabled).
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options, bool zeroed) {
  auto buffer = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (buffer.is_cpu() && buffer.nbytes() >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + buffer.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  if (zeroed) buffer.zero_();
  return buffer;
}

#ifdef MSDA_WITH_CUDA
void check_cuda(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "ms_deform_attn: CUDA ", what, " kernel failed: ", error);
}
#endif

[[noreturn]] void no_cuda_kernels() {
  TORCH_CHECK(false, "ms_deform_attn: this build of the extension has no CUDA kernels (it was built with a "
              "CPU-only torch or without CUDA_HOME); use backend='torch' or a CUDA build");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
#ifdef MSDA_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (value.is_cuda()) guard.emplace(value.device());
#endif
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto& p = in.problem;
  auto output = new_buffer({p.batch, p.queries, p.heads * p.channels}, value.options(), false);
  if (output.numel() == 0) return output;
  if (p.value_len == 0) return output.zero_();  // every sample reads padding
  const msda::ForwardArgs args{in.value.data_ptr(),
                               in.spatial_shapes.data_ptr<int64_t>(),
                               in.level_start_index.data_ptr<int64_t>(),
                               in.sampling_locations.data_ptr(),
                               in.attention_weights.data_ptr(),
                               output.data_ptr()};
  if (value.is_cuda()) {
#ifdef MSDA_WITH_CUDA
    check_cuda(msda::forward_cuda(value_type_of(value), p, args, c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
#else
    no_cuda_kernels();
#endif
  } else {
    msda::forward_cpu(value_type_of(value), p, args);
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
#ifdef MSDA_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (value.is_cuda()) guard.emplace(value.device());
#endif
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto& p = in.problem;
  TORCH_CHECK(grad_output.numel() == p.batch * p.queries * p.heads * p.channels &&
                  grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must be [N, Lq, M*D] on the value's device, got ", grad_output.sizes(),
              " on ", grad_output.device());
  const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
  const auto acc_options = in.sampling_locations.options();
  // grad_value is accumulated in the accumulation type (a scatter of many small terms:
  // bfloat16 accumulation would lose them) and cast back at the end. The CPU kernel
  // writes every location/attention gradient; the CUDA kernel may accumulate them.
  auto grad_value = new_buffer(value.sizes(), acc_options, true);
  auto grad_locations = new_buffer(in.sampling_locations.sizes(), acc_options, value.is_cuda());
  auto grad_attention = new_buffer(in.attention_weights.sizes(), acc_options, value.is_cuda());
  if (grad_out.numel() > 0 && p.value_len > 0) {
    const msda::BackwardArgs args{grad_out.data_ptr(),
                                  in.value.data_ptr(),
                                  in.spatial_shapes.data_ptr<int64_t>(),
                                  in.level_start_index.data_ptr<int64_t>(),
                                  in.sampling_locations.data_ptr(),
                                  in.attention_weights.data_ptr(),
                                  grad_value.data_ptr(),
                                  grad_locations.data_ptr(),
                                  grad_attention.data_ptr()};
    if (value.is_cuda()) {
#ifdef MSDA_WITH_CUDA
      check_cuda(msda::backward_cuda(value_type_of(value), p, args, c10::cuda::getCurrentCUDAStream().stream()),
                 "backward");
#else
      no_cuda_kernels();
#endif
    } else {
      msda::backward_cpu(value_type_of(value), p, args);
    }
  } else {
    grad_locations.zero_();
    grad_attention.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_attention.to(attention_weights.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention kernels (CPU, and CUDA when built with it)";
  m.def("forward", &forward, "ms_deform_attn forward -> output [N, Lq, M*D]");
  m.def("backward", &backward, "ms_deform_attn backward -> (grad_value, grad_sampling_locations, grad_attention_weights)");
#ifdef MSDA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
