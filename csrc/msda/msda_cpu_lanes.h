// One SIMD register of accumulators for the CPU channel loops, written with GCC/Clang
// vector extensions instead of intrinsics: 32 bytes where the compile target has AVX
// (AVX-512 included), else 16, so a Lanes value is always a single register. (64-byte
// lanes measured ~4% slower than 32-byte ones on an AVX-512 machine: the loops wait on
// memory, not on arithmetic; and split into two AVX2 registers they made the backward
// 2.5x slower.) The auto-vectoriser is not relied on: it gives up on the dot-product
// reductions and the four scatter streams of the backward loop.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

namespace msda {

#if defined(__AVX__)
constexpr int kLaneBytes = 32;
#else
constexpr int kLaneBytes = 16;
#endif

template <typename acc_t>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLaneBytes)));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLaneBytes)));
};
template <typename acc_t>
using Lanes = typename LanesOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLaneCount = kLaneBytes / sizeof(acc_t);

// Load kLaneCount consecutive elements, widened to the accumulation type.
inline Lanes<float> load_lanes(const float* p) {
  Lanes<float> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Lanes<double> load_lanes(const double* p) {
  Lanes<double> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Lanes<float> load_lanes(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen the bits and shift them into place.
  typedef uint16_t Bits16 __attribute__((vector_size(kLaneBytes / 2)));
  typedef uint32_t Bits32 __attribute__((vector_size(kLaneBytes)));
  Bits16 narrow;
  std::memcpy(&narrow, p, sizeof narrow);
  const Bits32 wide = __builtin_convertvector(narrow, Bits32) << 16;
  Lanes<float> v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

inline Lanes<float> load_lanes(const c10::Half* p) {
#if defined(__FLT16_MAX__)
  // c10::Half is IEEE binary16, the layout of _Float16 (converted by F16C where present).
  typedef _Float16 Halves __attribute__((vector_size(kLaneBytes / 2)));
  Halves h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, Lanes<float>);
#else  // compilers without _Float16 (GCC < 12 on x86): one lane at a time
  Lanes<float> v;
  for (int64_t i = 0; i < kLaneCount<float>; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

template <typename acc_t>
inline void store_lanes(acc_t* p, Lanes<acc_t> v) {
  std::memcpy(p, &v, sizeof v);
}

#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
// Lanes [offset, offset + count) of v, as a vector of `count` lanes.
template <size_t offset, typename V, size_t... lane>
inline auto pick_lanes(V v, std::index_sequence<lane...>) {
  return __builtin_shufflevector(v, v, (offset + lane)...);
}

// Sum of the lanes, adding halves until one pair is left (a tree: short dependency
// chain, no trip through memory).
template <typename V>
inline auto sum_lanes(V v) {
  constexpr size_t count = sizeof(V) / sizeof(v[0]);
  if constexpr (count == 2) {
    return v[0] + v[1];
  } else {
    constexpr auto half = std::make_index_sequence<count / 2>{};
    return sum_lanes(pick_lanes<0>(v, half) + pick_lanes<count / 2>(v, half));
  }
}
#else  // compilers without __builtin_shufflevector (GCC < 12)
template <typename V>
inline auto sum_lanes(V v) {
  auto sum = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(v[0]); ++i) sum += v[i];
  return sum;
}
#endif

}  // namespace msda
