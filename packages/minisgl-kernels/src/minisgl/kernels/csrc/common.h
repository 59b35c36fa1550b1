// Helpers shared by minisgl's C++ and CUDA sources: argument checks with readable errors.
#pragma once

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include <cstdint>

// Throws a Python exception of `Kind` (ValueError, TypeError, RuntimeError) when `cond` fails; the
// message streams after the macro:  MINISGL_CHECK(x > 0, ValueError) << "x must be positive";
#define MINISGL_CHECK(cond, Kind) \
  if (!(cond)) TVM_FFI_THROW(Kind)

namespace minisgl {

// Bytes of one element of `t` (vector dtypes count every lane).
inline int64_t ElementBytes(const tvm::ffi::TensorView& t) {
  return (static_cast<int64_t>(t.dtype().bits) * t.dtype().lanes + 7) / 8;
}

// The first byte of `t`'s data (DLPack keeps a separate byte offset).
inline char* DataBytes(const tvm::ffi::TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// Whether every dim after the first is laid out densely, so that each index of dim 0 names one
// contiguous run of bytes (a "row"); dim 0's stride is free (strided views of a fused qkv, KV pools).
inline bool RowsAreDense(const tvm::ffi::TensorView& t) {
  int64_t expected = 1;
  for (int d = t.ndim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Bytes in one row: the product of the dims after the first, times the element size.
inline int64_t RowBytes(const tvm::ffi::TensorView& t) {
  int64_t n = ElementBytes(t);
  for (int d = 1; d < t.ndim(); ++d) n *= t.size(d);
  return n;
}

inline bool IsIndexDtype(DLDataType dtype) {
  return dtype.code == kDLInt && (dtype.bits == 32 || dtype.bits == 64) && dtype.lanes == 1;
}

}  // namespace minisgl
