// Indexed row copies: the building block of the KV store and the row gather.
//
// A "row" is the contiguous run of bytes at one index of a tensor's first dim. Both kernels move whole
// rows between an indexed side and a dense side, so they are written once over raw bytes with the widest
// vector (16 down to 1 byte) that every pointer, stride and row length allows; dtypes only matter for
// that alignment. A power-of-two group of lanes (up to a block) copies one row, each lane holding up to
// kVecsInFlight vectors in flight before its first store: enough bytes in flight to saturate HBM on
// Hopper, and a single memory round trip per row for the small batches of decode.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <cstdint>

#include "common.h"

namespace minisgl {

constexpr int kThreadsPerBlock = 256;
constexpr int kVecsInFlight = 4;  // per lane and per row copied

// The CUDA type of one kBytes-wide vector: the widths __ldg has an overload for.
template <int kBytes>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = unsigned int;
};
template <>
struct VecOf<2> {
  using type = unsigned short;
};
template <>
struct VecOf<1> {
  using type = unsigned char;
};
template <int kBytes>
using Vec = typename VecOf<kBytes>::type;

// One group of `group` lanes copies row r of `src` to row r of `dst` for each of the kRows pairs, all
// vectors of all pairs loaded before the first store (a null `src[r]` writes zeros). With the group
// sized by LanesPerRow, a row takes a single trip to memory.
template <int kBytes, int kRows>
__device__ __forceinline__ void CopyRows(const Vec<kBytes>* const (&src)[kRows], Vec<kBytes>* const (&dst)[kRows],
                                         int64_t row_vecs, int lane, int group) {
  for (int64_t base = lane; base < row_vecs; base += static_cast<int64_t>(group) * kVecsInFlight) {
    Vec<kBytes> buffer[kRows][kVecsInFlight];
#pragma unroll
    for (int u = 0; u < kVecsInFlight; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * group;
      if (i < row_vecs) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) buffer[r][u] = src[r] != nullptr ? __ldg(src[r] + i) : Vec<kBytes>{};
      }
    }
#pragma unroll
    for (int u = 0; u < kVecsInFlight; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * group;
      if (i < row_vecs) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) dst[r][i] = buffer[r][u];
      }
    }
  }
}

// The widest vector in bytes (16, 8, 4, 2 or 1) that divides every value given.
inline int VecBytesFor(std::initializer_list<int64_t> values) {
  for (int bytes = 16; bytes > 1; bytes /= 2) {
    bool fits = true;
    for (int64_t v : values) fits = fits && (v % bytes == 0);
    if (fits) return bytes;
  }
  return 1;
}

// Lanes per row: the fewest (a power of two, at most a block) that leave each lane at most
// kVecsInFlight vectors, so short and long rows alike need one round trip; `requested` > 0 overrides
// (the benchmark's --lanes sweep).
inline int LanesPerRow(int64_t row_vecs, int64_t requested) {
  if (requested > 0) {
    MINISGL_CHECK(requested <= kThreadsPerBlock && (requested & (requested - 1)) == 0, ValueError)
        << "lanes_per_row must be a power of two up to " << kThreadsPerBlock << ", got " << requested;
    return static_cast<int>(requested);
  }
  int lanes = 1;
  while (lanes < kThreadsPerBlock && static_cast<int64_t>(lanes) * kVecsInFlight < row_vecs) lanes *= 2;
  return lanes;
}

inline cudaStream_t CurrentStream(DLDevice device) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(device.device_type, device.device_id));
}

inline void CheckLaunch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  MINISGL_CHECK(error == cudaSuccess, RuntimeError)
      << kernel << " failed to launch: " << cudaGetErrorString(error);
}

// Runs the statements after it with `constexpr int kBytes` set to the run-time vector width.
#define MINISGL_DISPATCH_VEC_BYTES(vec_bytes, ...)   \
  switch (vec_bytes) {                               \
    case 16: {                                       \
      constexpr int kBytes = 16;                     \
      __VA_ARGS__;                                   \
    } break;                                         \
    case 8: {                                        \
      constexpr int kBytes = 8;                      \
      __VA_ARGS__;                                   \
    } break;                                         \
    case 4: {                                        \
      constexpr int kBytes = 4;                      \
      __VA_ARGS__;                                   \
    } break;                                         \
    case 2: {                                        \
      constexpr int kBytes = 2;                      \
      __VA_ARGS__;                                   \
    } break;                                         \
    default: {                                       \
      constexpr int kBytes = 1;                      \
      __VA_ARGS__;                                   \
    } break;                                         \
  }

// Checks a 1-D int32/int64 index tensor on the GPU of `like`, densely laid out.
inline void CheckIndices(const char* name, const tvm::ffi::TensorView& index, const tvm::ffi::TensorView& like) {
  MINISGL_CHECK(index.ndim() == 1 && IsIndexDtype(index.dtype()), TypeError)
      << name << " must be a 1-D int32 or int64 tensor";
  MINISGL_CHECK(index.device().device_type == kDLCUDA && index.device().device_id == like.device().device_id,
                ValueError)
      << name << " must be on the same GPU as the data";
  MINISGL_CHECK(index.size(0) <= 1 || index.stride(0) == 1, ValueError) << name << " must be contiguous";
}

}  // namespace minisgl
