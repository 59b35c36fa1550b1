// First mismatch of two token arrays on the CPU: the radix cache's match length.
//
// The radix cache compares a request's token ids with each node's key on the scheduler's hot path; a
// torch comparison allocates and syncs, while this loop stops at the first differing token.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>

namespace {

using tvm::ffi::TensorView;

void CheckTokens(const char* name, const TensorView& t) {
  TVM_FFI_CHECK(t.device().device_type == kDLCPU, ValueError)
      << name << " must be a CPU tensor (device type " << t.device().device_type << ")";
  TVM_FFI_CHECK(t.ndim() == 1, ValueError) << name << " must be 1-D, got " << t.ndim() << " dims";
  const DLDataType dtype = t.dtype();
  TVM_FFI_CHECK((dtype.code == kDLInt || dtype.code == kDLUInt) && (dtype.bits == 32 || dtype.bits == 64) &&
                    dtype.lanes == 1,
                TypeError)
      << name << " must hold 32- or 64-bit integers";
}

template <typename T>
int64_t Mismatch(const TensorView& a, const TensorView& b, int64_t n) {
  const T* pa = reinterpret_cast<const T*>(static_cast<const char*>(a.data_ptr()) + a.byte_offset());
  const T* pb = reinterpret_cast<const T*>(static_cast<const char*>(b.data_ptr()) + b.byte_offset());
  const int64_t sa = a.stride(0);
  const int64_t sb = b.stride(0);
  if (sa == 1 && sb == 1) {
    return std::mismatch(pa, pa + n, pb).first - pa;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (pa[i * sa] != pb[i * sb]) return i;
  }
  return n;
}

int64_t first_mismatch(TensorView a, TensorView b) {
  CheckTokens("a", a);
  CheckTokens("b", b);
  TVM_FFI_CHECK(a.dtype() == b.dtype(), TypeError) << "a and b must have the same dtype";
  const int64_t n = std::min(a.size(0), b.size(0));
  return a.dtype().bits == 32 ? Mismatch<int32_t>(a, b, n) : Mismatch<int64_t>(a, b, n);
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(first_mismatch, first_mismatch);
