// Bilinear sampling math of multi-scale deformable attention, shared by the CPU kernels
// (msda_cpu.cpp) and the CUDA kernels (msda_cuda.cu). No torch and no CUDA headers here,
// so that `nvcc -c msda_cuda.cu` and the CPU build include exactly the same arithmetic.
//
// Convention (official Deformable DETR, grid_sample with align_corners=False and zero
// padding): a normalised location (x, y) in 0..1 maps to pixel coordinates
// (x * W - 0.5, y * H - 0.5), pixel centres sit at integers, and corners outside the
// map read as zero.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

MSDA_HOST_DEVICE float floor_of(float v) { return floorf(v); }
MSDA_HOST_DEVICE double floor_of(double v) { return floor(v); }

// The four corners around one sampling location, in the order
// (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct Bilinear {
  int32_t offset[4];  // pixel index y * W + x inside the level (meaningful where inside[k])
  bool inside[4];     // corner lies on the map; outside corners read as zero
  acc_t weight[4];    // bilinear weight, zero where the corner is outside
  acc_t ly, lx;       // fractional position between the corners, for gradients
};

// Fills `b` for the location (x, y) in 0..1 on an H x W map. Returns false when every
// corner is outside the map: the sample is zero and so is every gradient through it
// (the official kernel's early-out; it also keeps floor() of huge or NaN locations away
// from the int conversion). The branch is almost always taken the same way, which
// costs less than a branch-free version on the CPU.
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_corners(acc_t x, acc_t y, int32_t H, int32_t W, Bilinear<acc_t>& b) {
  const acc_t h_im = y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  if (!(h_im > -1 && w_im > -1 && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const acc_t y0f = floor_of(h_im);
  const acc_t x0f = floor_of(w_im);
  const int32_t y0 = static_cast<int32_t>(y0f);
  const int32_t x0 = static_cast<int32_t>(x0f);
  b.ly = h_im - y0f;
  b.lx = w_im - x0f;
  const acc_t hy = 1 - b.ly, hx = 1 - b.lx;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 <= H - 1;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 <= W - 1;
  b.inside[0] = y0_in && x0_in;
  b.inside[1] = y0_in && x1_in;
  b.inside[2] = y1_in && x0_in;
  b.inside[3] = y1_in && x1_in;
  b.offset[0] = y0 * W + x0;
  b.offset[1] = b.offset[0] + 1;
  b.offset[2] = b.offset[0] + W;
  b.offset[3] = b.offset[2] + 1;
  b.weight[0] = b.inside[0] ? hy * hx : acc_t(0);
  b.weight[1] = b.inside[1] ? hy * b.lx : acc_t(0);
  b.weight[2] = b.inside[2] ? b.ly * hx : acc_t(0);
  b.weight[3] = b.inside[3] ? b.ly * b.lx : acc_t(0);
  return true;
}

// Gradients of one sample, given dot[k] = <grad_output, value at corner k> over the
// channels this caller handled (zero for outside corners). Linear in `dot`, so callers
// that split the channels may apply it to partial dots and sum the results.
//   sample = sum_k weight[k] * value_k,   output += attention * sample
//   d out / d attention = sum_k weight[k] * dot[k]
//   d out / d x = attention * W * sum_k (d weight[k] / d w_im) * dot[k]   (same for y, H)
template <typename acc_t>
MSDA_HOST_DEVICE void sample_gradients(const Bilinear<acc_t>& b, const acc_t dot[4], acc_t attention,
                                       int32_t H, int32_t W, acc_t& grad_x, acc_t& grad_y,
                                       acc_t& grad_attention) {
  const acc_t hy = 1 - b.ly, hx = 1 - b.lx;
  grad_attention = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] +
                   b.weight[3] * dot[3];
  const acc_t d_w_im = hy * (dot[1] - dot[0]) + b.ly * (dot[3] - dot[2]);
  const acc_t d_h_im = hx * (dot[2] - dot[0]) + b.lx * (dot[3] - dot[1]);
  grad_x = attention * static_cast<acc_t>(W) * d_w_im;
  grad_y = attention * static_cast<acc_t>(H) * d_h_im;
}

}  // namespace msda
