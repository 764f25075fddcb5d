// The kernel entry points the torch bindings call: plain pointers and sizes, no torch
// and no CUDA types, so that msda_cuda.cu compiles with a bare `nvcc -c`.
//
// Layouts (all contiguous):
//   value               [N, S, M, D]        in `value_type`
//   spatial_shapes      [L, 2] (H, W)       int64
//   level_start_index   [L]                 int64
//   sampling_locations  [N, Lq, M, L, P, 2] in the accumulation type (x, y in 0..1)
//   attention_weights   [N, Lq, M, L, P]    in the accumulation type
//   output / grad_output [N, Lq, M, D]      in `value_type`
//   grad_value          [N, S, M, D]        in the accumulation type, zero-filled by the caller
//   grad_sampling_locations, grad_attention_weights: like their inputs, accumulation type
// The accumulation type is double for double values and float otherwise.
#pragma once

#include <stdint.h>

namespace msda {

enum class ValueType { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct Problem {
  int64_t batch;        // N
  int64_t value_len;    // S = sum over levels of H * W
  int64_t heads;        // M
  int64_t channels;     // D, per head
  int64_t queries;      // Lq
  int64_t levels;       // L
  int64_t points;       // P
};

struct ForwardArgs {
  const void* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const void* sampling_locations;
  const void* attention_weights;
  void* output;
};

struct BackwardArgs {
  const void* grad_output;
  const void* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const void* sampling_locations;
  const void* attention_weights;
  void* grad_value;
  void* grad_sampling_locations;
  void* grad_attention_weights;
};

void forward_cpu(ValueType type, const Problem& problem, const ForwardArgs& args);
void backward_cpu(ValueType type, const Problem& problem, const BackwardArgs& args);

// Launch on `stream` (a cudaStream_t); the pointers are device pointers, except that
// nothing is read on the host. Return nullptr on success, else the CUDA error string.
const char* forward_cuda(ValueType type, const Problem& problem, const ForwardArgs& args, void* stream);
const char* backward_cuda(ValueType type, const Problem& problem, const BackwardArgs& args, void* stream);

}  // namespace msda
