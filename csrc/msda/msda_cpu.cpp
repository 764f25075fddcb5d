// CPU kernels of multi-scale deformable attention.
//
// Forward: at::parallel_for over output rows (n, q, m). Each row's L * P samples are
// located first (corners and bilinear weights, from msda_sampling.h) and their corner
// rows prefetched; the channel loops of a row run while the next row's corners are on
// their way, since gathering corner rows from a value tensor larger than the caches is
// what the op waits on. Per sample, one loop over the D channels of the head (contiguous:
// value is [N, S, M, D]) a SIMD register at a time (msda_cpu_lanes.h).
//
// Backward: grad_value is a scatter. A sample of head m in image n at level l only
// touches grad_value[n, level l's pixels, m, :], so tasks (n, level group, m) own
// disjoint slices of grad_value: race-free with no lock and no per-thread copies. The
// gradients of sampling_locations and attention_weights are per (n, q, m, l, p), owned
// by the same task. All levels form one group unless there are fewer (n, m) pairs than
// threads. Every task handles Lq * P samples per level whatever the level's size, so
// tasks cost the same.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "msda_cpu_lanes.h"
#include "msda_kernels.h"
#include "msda_sampling.h"

namespace msda {
namespace {

struct Level {
  int32_t height, width;  // the bindings check that H * W fits in int32
  int64_t start;
};

std::vector<Level> read_levels(const Problem& p, const int64_t* spatial_shapes, const int64_t* level_start_index) {
  std::vector<Level> levels(p.levels);
  for (int64_t l = 0; l < p.levels; ++l) {
    levels[l] = {static_cast<int32_t>(spatial_shapes[2 * l]), static_cast<int32_t>(spatial_shapes[2 * l + 1]),
                 level_start_index[l]};
  }
  return levels;
}

// One sample, located: its bilinear corners and where their rows start, as element
// offsets from value[n, 0, m, 0] (the same offsets index grad_value).
template <typename acc_t>
struct Sample {
  Bilinear<acc_t> b;
  bool on_map;  // false: every corner is padding, the sample and its gradients are zero
  int64_t row_offset[4];
};

// Offset of value[n, 0, m, 0] (and of grad_value's) for output row (n * Lq + q) * M + m.
inline int64_t head_offset(const Problem& p, int64_t row) {
  const int64_t m = row % p.heads, n = row / (p.heads * p.queries);
  return (n * p.value_len * p.heads + m) * p.channels;
}

// Brings the first lines of a corner row towards L1 (a few lines: the hardware
// prefetcher follows a long row by itself).
inline void prefetch_row(const void* row, int64_t bytes, bool for_write) {
  const char* p = static_cast<const char*>(row);
  const int64_t end = std::min<int64_t>(bytes, 256);
  for (int64_t offset = 0; offset < end; offset += 64) {
    if (for_write) {
      __builtin_prefetch(p + offset, 1);
    } else {
      __builtin_prefetch(p + offset, 0);
    }
  }
}

// Locates the samples of output row `row` on levels [level_begin, level_end) into
// samples[l * P + p], and prefetches their corner rows in value (and in grad_value, for
// writing, when given).
template <typename scalar_t, typename acc_t>
void locate_row(const Problem& p, const std::vector<Level>& levels, const acc_t* locations, int64_t row,
                int64_t level_begin, int64_t level_end, Sample<acc_t>* samples, const scalar_t* value,
                const acc_t* grad_value) {
  const int64_t pixel_stride = p.heads * p.channels, offset = head_offset(p, row);
  for (int64_t l = level_begin; l < level_end; ++l) {
    const Level& level = levels[l];
    for (int64_t s = l * p.points; s < (l + 1) * p.points; ++s) {
      const acc_t* xy = locations + (row * p.levels * p.points + s) * 2;
      Sample<acc_t>& sample = samples[s];
      sample.on_map = bilinear_corners(xy[0], xy[1], level.height, level.width, sample.b);
      if (!sample.on_map) continue;
      for (int k = 0; k < 4; ++k) {
        sample.row_offset[k] = sample.b.inside[k] ? (level.start + sample.b.offset[k]) * pixel_stride : -1;
        if (sample.row_offset[k] < 0) continue;
        prefetch_row(value + offset + sample.row_offset[k], p.channels * sizeof(scalar_t), false);
        if (grad_value != nullptr) {
          prefetch_row(grad_value + offset + sample.row_offset[k], p.channels * sizeof(acc_t), true);
        }
      }
    }
  }
}

// acc[c] += sum_k weight[k] * value_k[c]
template <typename scalar_t, typename acc_t>
inline void accumulate_sample(acc_t* acc, const scalar_t* const value[4], const acc_t weight[4], int64_t channels) {
  const acc_t w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  const scalar_t *v0 = value[0], *v1 = value[1], *v2 = value[2], *v3 = value[3];
  int64_t c = 0;
  for (; c + kLaneCount<acc_t> <= channels; c += kLaneCount<acc_t>) {
    store_lanes(acc + c, load_lanes(acc + c) + w0 * load_lanes(v0 + c) + w1 * load_lanes(v1 + c) +
                             w2 * load_lanes(v2 + c) + w3 * load_lanes(v3 + c));
  }
  for (; c < channels; ++c) {
    acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) + w2 * static_cast<acc_t>(v2[c]) +
              w3 * static_cast<acc_t>(v3[c]);
  }
}

// One sample's backward over the channels: grad_value_k[c] += weight[k] * grad_out[c]
// (the scatter) and dot[k] = <grad_out, value_k> (for the location and attention
// gradients).
template <typename scalar_t, typename acc_t>
inline void backprop_sample(const acc_t* grad_out, const scalar_t* const value[4], acc_t* const grad_value[4],
                            const acc_t weight[4], int64_t channels, acc_t dot[4]) {
  // Four named accumulators rather than an array: they must stay in registers.
  Lanes<acc_t> d0 = {}, d1 = {}, d2 = {}, d3 = {};
  const scalar_t *v0 = value[0], *v1 = value[1], *v2 = value[2], *v3 = value[3];
  acc_t *g0 = grad_value[0], *g1 = grad_value[1], *g2 = grad_value[2], *g3 = grad_value[3];
  const acc_t w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  int64_t c = 0;
  for (; c + kLaneCount<acc_t> <= channels; c += kLaneCount<acc_t>) {
    const auto g = load_lanes(grad_out + c);
    d0 += g * load_lanes(v0 + c);
    d1 += g * load_lanes(v1 + c);
    d2 += g * load_lanes(v2 + c);
    d3 += g * load_lanes(v3 + c);
    store_lanes(g0 + c, load_lanes(g0 + c) + w0 * g);
    store_lanes(g1 + c, load_lanes(g1 + c) + w1 * g);
    store_lanes(g2 + c, load_lanes(g2 + c) + w2 * g);
    store_lanes(g3 + c, load_lanes(g3 + c) + w3 * g);
  }
  dot[0] = sum_lanes(d0);
  dot[1] = sum_lanes(d1);
  dot[2] = sum_lanes(d2);
  dot[3] = sum_lanes(d3);
  for (; c < channels; ++c) {
    const acc_t g = grad_out[c];
    for (int k = 0; k < 4; ++k) {
      dot[k] += g * static_cast<acc_t>(value[k][c]);
      grad_value[k][c] += weight[k] * g;
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const Problem& p, const ForwardArgs& args) {
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* locations = static_cast<const acc_t*>(args.sampling_locations);
  const auto* attention = static_cast<const acc_t*>(args.attention_weights);
  auto* output = static_cast<scalar_t*>(args.output);
  const auto levels = read_levels(p, args.spatial_shapes, args.level_start_index);
  const int64_t D = p.channels, L = p.levels, P = p.points;
  // ~16k multiply-adds per chunk at least, so tiny problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * P * 4 * D));

  at::parallel_for(0, p.batch * p.queries * p.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    const std::vector<scalar_t> zero_row(D, scalar_t(0));
    std::vector<Sample<acc_t>> located(L * P), next(L * P);
    const acc_t* no_grad = nullptr;
    locate_row(p, levels, locations, begin, 0, L, located.data(), value, no_grad);
    for (int64_t row = begin; row < end; ++row) {  // row = (n * Lq + q) * M + m
      if (row + 1 < end) locate_row(p, levels, locations, row + 1, 0, L, next.data(), value, no_grad);
      const scalar_t* value_head = value + head_offset(p, row);
      const acc_t* attn = attention + row * L * P;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < L * P; ++s) {
        const Sample<acc_t>& sample = located[s];
        if (!sample.on_map) continue;
        const scalar_t* corner[4];
        acc_t weight[4];
        for (int k = 0; k < 4; ++k) {
          corner[k] = sample.row_offset[k] >= 0 ? value_head + sample.row_offset[k] : zero_row.data();
          weight[k] = sample.b.weight[k] * attn[s];
        }
        accumulate_sample(acc.data(), corner, weight, D);
      }
      scalar_t* out = output + row * D;
      for (int64_t c = 0; c < D; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      std::swap(located, next);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const Problem& p, const BackwardArgs& args) {
  const auto* grad_output = static_cast<const scalar_t*>(args.grad_output);
  const auto* value = static_cast<const scalar_t*>(args.value);
  const auto* locations = static_cast<const acc_t*>(args.sampling_locations);
  const auto* attention = static_cast<const acc_t*>(args.attention_weights);
  auto* grad_value = static_cast<acc_t*>(args.grad_value);
  auto* grad_locations = static_cast<acc_t*>(args.grad_sampling_locations);
  auto* grad_attention = static_cast<acc_t*>(args.grad_attention_weights);
  const auto levels = read_levels(p, args.spatial_shapes, args.level_start_index);
  const int64_t D = p.channels, L = p.levels, P = p.points;

  const int64_t pairs = p.batch * p.heads;
  const int64_t groups = std::min<int64_t>(L, (at::get_num_threads() + pairs - 1) / pairs);
  at::parallel_for(0, pairs * groups, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zero_row(D, scalar_t(0));
    // Off-map corners scatter into these rows (with weight zero) instead of branching;
    // one row per corner so the four destinations never alias.
    std::vector<acc_t> discard_rows(4 * D);
    std::vector<acc_t> grad_out_row(std::is_same<scalar_t, acc_t>::value ? 0 : D);
    std::vector<Sample<acc_t>> located(L * P), next(L * P);
    // A thread walks its run of tasks (task = (n * groups + group) * M + m) query by
    // query with the heads innermost, as the forward does: one query's heads sit side
    // by side in locations, weights and grad_output.
    for (int64_t run = begin; run < end;) {
      const int64_t n = run / (groups * p.heads), group = (run / p.heads) % groups;
      const int64_t run_end = std::min(end, (run / p.heads + 1) * p.heads);
      const int64_t m_begin = run % p.heads, m_count = run_end - run;
      const int64_t level_begin = group * L / groups, level_end = (group + 1) * L / groups;
      const int64_t first_row = n * p.queries * p.heads + m_begin, rows = p.queries * m_count;
      const auto row_of = [&](int64_t i) {  // the run's i-th row: (q, m) = (i / m_count, m_begin + i % m_count)
        return first_row + (i / m_count) * p.heads + i % m_count;
      };
      const auto locate = [&](int64_t i, std::vector<Sample<acc_t>>& samples) {
        locate_row(p, levels, locations, row_of(i), level_begin, level_end, samples.data(), value, grad_value);
      };
      locate(0, located);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = row_of(i);
        if (i + 1 < rows) locate(i + 1, next);
        const int64_t offset = head_offset(p, row);
        const acc_t* go;
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          go = grad_output + row * D;
        } else {  // half types: widen the row once, it is reused by every sample
          for (int64_t c = 0; c < D; ++c) grad_out_row[c] = static_cast<acc_t>(grad_output[row * D + c]);
          go = grad_out_row.data();
        }
        for (int64_t s = level_begin * P; s < level_end * P; ++s) {
          const int64_t index = row * L * P + s;  // into attention_weights; x2 into locations
          const Sample<acc_t>& sample = located[s];
          if (!sample.on_map) {
            grad_locations[2 * index] = grad_locations[2 * index + 1] = grad_attention[index] = 0;
            continue;
          }
          const acc_t attn = attention[index];
          const scalar_t* corner[4];
          acc_t* grad_corner[4];
          acc_t weight[4];
          for (int k = 0; k < 4; ++k) {
            const bool inside = sample.row_offset[k] >= 0;
            corner[k] = inside ? value + offset + sample.row_offset[k] : zero_row.data();
            grad_corner[k] = inside ? grad_value + offset + sample.row_offset[k] : discard_rows.data() + k * D;
            weight[k] = sample.b.weight[k] * attn;
          }
          acc_t dot[4];
          backprop_sample(go, corner, grad_corner, weight, D, dot);
          const Level& level = levels[s / P];
          sample_gradients(sample.b, dot, attn, level.height, level.width, grad_locations[2 * index],
                           grad_locations[2 * index + 1], grad_attention[index]);
        }
        std::swap(located, next);
      }
      run = run_end;
    }
  });
}

}  // namespace

void forward_cpu(ValueType type, const Problem& problem, const ForwardArgs& args) {
  switch (type) {
    case ValueType::kFloat32: return forward_kernel<float, float>(problem, args);
    case ValueType::kFloat64: return forward_kernel<double, double>(problem, args);
    case ValueType::kFloat16: return forward_kernel<c10::Half, float>(problem, args);
    case ValueType::kBFloat16: return forward_kernel<c10::BFloat16, float>(problem, args);
  }
}

void backward_cpu(ValueType type, const Problem& problem, const BackwardArgs& args) {
  switch (type) {
    case ValueType::kFloat32: return backward_kernel<float, float>(problem, args);
    case ValueType::kFloat64: return backward_kernel<double, double>(problem, args);
    case ValueType::kFloat16: return backward_kernel<c10::Half, float>(problem, args);
    case ValueType::kBFloat16: return backward_kernel<c10::BFloat16, float>(problem, args);
  }
}

}  // namespace msda
