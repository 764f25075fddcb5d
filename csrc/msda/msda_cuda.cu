// CUDA kernels of multi-scale deformable attention (float32, float64, float16, bfloat16
// values; float32 accumulation, float64 for float64). Raw pointers only: no torch here,
// so `nvcc -c msda_cuda.cu` builds it; msda_bindings.cpp allocates and launches.
//
// Thread mapping: a group of D / VEC consecutive threads per output row (n, q, m); each
// thread owns VEC consecutive channels and moves them with one 16-byte load (4 floats,
// 8 halves). The group's threads read the same sampling locations (an L1 broadcast) and
// together read a corner's D channels as one coalesced segment. No batch/im2col
// restriction: the grid covers N * Lq * M * (D / VEC) threads directly.
//
// Backward: grad_value is a scatter, done with atomicAdd into a float32 (float64)
// buffer: native bfloat16/half atomics would round every one of the many contributions
// a pixel receives to 8 (11) bits. On sm_90 the float atomics are issued as float4/float2
// vector atomics. The location and attention gradients are sums over the group's
// channels, reduced with warp shuffles: stored by the group's first lane when the group
// is a power of two within a warp (D / VEC <= 32, the usual case), added atomically by
// each warp's first lane when the group spans whole warps, and added atomically by every
// thread otherwise (odd D).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "msda_kernels.h"
#include "msda_sampling.h"

namespace msda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive channels, moved with one load/store instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // float4/float2 vector atomics: sm_90+
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + e), make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]));
    }
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 2) atomicAdd(reinterpret_cast<float2*>(dst + e), make_float2(v[e], v[e + 1]));
  } else {
    atomicAdd(dst, v[0]);  // VEC == 1
  }
#else
#pragma unroll
  for (int e = 0; e < VEC; ++e) atomicAdd(dst + e, v[e]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double* v) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) atomicAdd(dst + e, v[e]);
}

// Sum over the `width` lanes of an aligned power-of-two group within a warp. Every lane
// of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Where one thread works: output row (n, q, m) and its first channel.
struct ThreadSlot {
  int64_t row, n, m, channel;
};

__device__ __forceinline__ ThreadSlot thread_slot(int64_t thread, const Problem& p, int64_t group_size, int vec) {
  ThreadSlot s;
  s.row = thread / group_size;  // (n * Lq + q) * M + m
  s.channel = (thread - s.row * group_size) * vec;
  s.m = s.row % p.heads;
  s.n = s.row / (p.heads * p.queries);
  return s;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start_index,
                   const typename AccumulateType<scalar_t>::type* __restrict__ sampling_locations,
                   const typename AccumulateType<scalar_t>::type* __restrict__ attention_weights,
                   scalar_t* __restrict__ output, Problem p) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t group_size = p.channels / VEC;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= p.batch * p.queries * p.heads * group_size) return;
  const ThreadSlot s = thread_slot(thread, p, group_size, VEC);
  const int64_t pixel_stride = p.heads * p.channels;
  const scalar_t* value_nm = value + s.n * p.value_len * pixel_stride + s.m * p.channels + s.channel;
  const acc_t* loc = sampling_locations + s.row * p.levels * p.points * 2;
  const acc_t* attn = attention_weights + s.row * p.levels * p.points;

  acc_t acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0;
  for (int64_t l = 0; l < p.levels; ++l) {
    const int32_t H = static_cast<int32_t>(spatial_shapes[2 * l]), W = static_cast<int32_t>(spatial_shapes[2 * l + 1]);
    const scalar_t* value_level = value_nm + level_start_index[l] * pixel_stride;
    for (int64_t pt = 0; pt < p.points; ++pt, loc += 2, ++attn) {
      Bilinear<acc_t> b;
      if (!bilinear_corners(loc[0], loc[1], H, W, b)) continue;
      const acc_t a = *attn;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!b.inside[k]) continue;
        const auto v = load_pack<scalar_t, VEC>(value_level + b.offset[k] * pixel_stride);
        const acc_t w = b.weight[k] * a;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += w * to_acc(v.v[e]);
      }
    }
  }
  Pack<scalar_t, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.v[e] = from_acc<scalar_t>(acc[e]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(output + s.row * p.channels + s.channel) = out;
}

// How a group of threads combines its partial location/attention gradients.
enum class Reduce { kShuffleStore, kShuffleWarpAtomic, kAtomic };

template <typename scalar_t, int VEC, Reduce kReduce>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                    const typename AccumulateType<scalar_t>::type* __restrict__ sampling_locations,
                    const typename AccumulateType<scalar_t>::type* __restrict__ attention_weights,
                    typename AccumulateType<scalar_t>::type* __restrict__ grad_value,
                    typename AccumulateType<scalar_t>::type* __restrict__ grad_locations,
                    typename AccumulateType<scalar_t>::type* __restrict__ grad_attention, Problem p) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t group_size = p.channels / VEC;
  const int64_t total = p.batch * p.queries * p.heads * group_size;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = thread < total;
  // With shuffles every lane of the warp must run the loop: lanes past the end work on
  // the last slot with a zero gradient and write nothing.
  if (kReduce == Reduce::kAtomic && !active) return;
  const ThreadSlot s = thread_slot(active ? thread : total - 1, p, group_size, VEC);
  const int64_t pixel_stride = p.heads * p.channels;
  const int64_t value_nm_offset = s.n * p.value_len * pixel_stride + s.m * p.channels + s.channel;
  const int64_t first_sample = s.row * p.levels * p.points;

  acc_t g[VEC];
  {
    const auto go = load_pack<scalar_t, VEC>(grad_output + s.row * p.channels + s.channel);
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = active ? to_acc(go.v[e]) : acc_t(0);
  }
  for (int64_t l = 0; l < p.levels; ++l) {
    const int32_t H = static_cast<int32_t>(spatial_shapes[2 * l]), W = static_cast<int32_t>(spatial_shapes[2 * l + 1]);
    const int64_t level_offset = value_nm_offset + level_start_index[l] * pixel_stride;
    for (int64_t pt = 0; pt < p.points; ++pt) {
      const int64_t i = first_sample + l * p.points + pt;
      Bilinear<acc_t> b;
      acc_t grad_x = 0, grad_y = 0, grad_a = 0;
      if (bilinear_corners(sampling_locations[2 * i], sampling_locations[2 * i + 1], H, W, b)) {
        const acc_t a = attention_weights[i];
        acc_t dot[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dot[k] = 0;
          if (!b.inside[k]) continue;
          const int64_t offset = level_offset + b.offset[k] * pixel_stride;
          const auto v = load_pack<scalar_t, VEC>(value + offset);
          const acc_t w = b.weight[k] * a;
          acc_t scatter[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            dot[k] += g[e] * to_acc(v.v[e]);
            scatter[e] = w * g[e];
          }
          if (active) atomic_add_pack<VEC>(grad_value + offset, scatter);
        }
        sample_gradients(b, dot, a, H, W, grad_x, grad_y, grad_a);
      }
      if constexpr (kReduce == Reduce::kAtomic) {
        if (grad_x != 0 || grad_y != 0 || grad_a != 0) {
          atomicAdd(grad_locations + 2 * i, grad_x);
          atomicAdd(grad_locations + 2 * i + 1, grad_y);
          atomicAdd(grad_attention + i, grad_a);
        }
      } else {
        const int width = kReduce == Reduce::kShuffleStore ? static_cast<int>(group_size) : kWarpSize;
        grad_x = group_sum(grad_x, width);
        grad_y = group_sum(grad_y, width);
        grad_a = group_sum(grad_a, width);
        if (kReduce == Reduce::kShuffleStore && active && s.channel == 0) {
          grad_locations[2 * i] = grad_x;
          grad_locations[2 * i + 1] = grad_y;
          grad_attention[i] = grad_a;
        } else if (kReduce == Reduce::kShuffleWarpAtomic && active && threadIdx.x % kWarpSize == 0) {
          atomicAdd(grad_locations + 2 * i, grad_x);
          atomicAdd(grad_locations + 2 * i + 1, grad_y);
          atomicAdd(grad_attention + i, grad_a);
        }
      }
    }
  }
}

int64_t blocks_for(int64_t threads) { return (threads + kThreadsPerBlock - 1) / kThreadsPerBlock; }

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// 16-byte packs when D and the pointers allow, else one channel per thread.
template <typename scalar_t>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
const char* launch_forward(const Problem& p, const ForwardArgs& a, cudaStream_t stream) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  constexpr int kVec = kPackWidth<scalar_t>;
  const bool packed = p.channels % kVec == 0 && aligned(a.value, 16) && aligned(a.output, 16);
  const int64_t rows = p.batch * p.queries * p.heads;
  const auto* value = static_cast<const scalar_t*>(a.value);
  const auto* loc = static_cast<const acc_t*>(a.sampling_locations);
  const auto* attn = static_cast<const acc_t*>(a.attention_weights);
  auto* out = static_cast<scalar_t*>(a.output);
  if (packed) {
    forward_kernel<scalar_t, kVec><<<blocks_for(rows * p.channels / kVec), kThreadsPerBlock, 0, stream>>>(
        value, a.spatial_shapes, a.level_start_index, loc, attn, out, p);
  } else {
    forward_kernel<scalar_t, 1><<<blocks_for(rows * p.channels), kThreadsPerBlock, 0, stream>>>(
        value, a.spatial_shapes, a.level_start_index, loc, attn, out, p);
  }
  return last_error();
}

template <typename scalar_t, int VEC>
void launch_backward_with(const Problem& p, const BackwardArgs& a, cudaStream_t stream) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t group_size = p.channels / VEC;
  const int64_t threads = p.batch * p.queries * p.heads * group_size;
  const auto launch = [&](auto kernel) {
    kernel<<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(
        static_cast<const scalar_t*>(a.grad_output), static_cast<const scalar_t*>(a.value), a.spatial_shapes,
        a.level_start_index, static_cast<const acc_t*>(a.sampling_locations),
        static_cast<const acc_t*>(a.attention_weights), static_cast<acc_t*>(a.grad_value),
        static_cast<acc_t*>(a.grad_sampling_locations), static_cast<acc_t*>(a.grad_attention_weights), p);
  };
  // Groups are aligned runs of threads (blocks are whole warps), so a power-of-two group
  // of at most 32 lies within one warp, and a group of a multiple of 32 covers whole warps.
  if (group_size <= kWarpSize && (group_size & (group_size - 1)) == 0) {
    launch(backward_kernel<scalar_t, VEC, Reduce::kShuffleStore>);
  } else if (group_size % kWarpSize == 0) {
    launch(backward_kernel<scalar_t, VEC, Reduce::kShuffleWarpAtomic>);
  } else {
    launch(backward_kernel<scalar_t, VEC, Reduce::kAtomic>);
  }
}

template <typename scalar_t>
const char* launch_backward(const Problem& p, const BackwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = kPackWidth<scalar_t>;
  const bool packed = p.channels % kVec == 0 && aligned(a.value, 16) && aligned(a.grad_output, 16) &&
                      aligned(a.grad_value, 16);
  if (packed) {
    launch_backward_with<scalar_t, kVec>(p, a, stream);
  } else {
    launch_backward_with<scalar_t, 1>(p, a, stream);
  }
  return last_error();
}

}  // namespace

const char* forward_cuda(ValueType type, const Problem& problem, const ForwardArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case ValueType::kFloat32: return launch_forward<float>(problem, args, s);
    case ValueType::kFloat64: return launch_forward<double>(problem, args, s);
    case ValueType::kFloat16: return launch_forward<__half>(problem, args, s);
    case ValueType::kBFloat16: return launch_forward<__nv_bfloat16>(problem, args, s);
  }
  return "unknown value type";
}

const char* backward_cuda(ValueType type, const Problem& problem, const BackwardArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case ValueType::kFloat32: return launch_backward<float>(problem, args, s);
    case ValueType::kFloat64: return launch_backward<double>(problem, args, s);
    case ValueType::kFloat16: return launch_backward<__half>(problem, args, s);
    case ValueType::kBFloat16: return launch_backward<__nv_bfloat16>(problem, args, s);
  }
  return "unknown value type";
}

}  // namespace msda
