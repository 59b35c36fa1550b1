// KV store: k[i] -> k_cache[slots[i]] and v[i] -> v_cache[slots[i]] in one launch.
//
// k and v may be strided views (the K and V columns of a fused qkv projection): only each token's
// (kv_heads, head_dim) block must be dense. The caches are (num_slots, kv_heads, head_dim) views of the
// paged pool. The copy is dtype-blind (bf16, fp16, fp32 alike): k and v already have the cache dtype.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include "row_copy.cuh"

namespace {

using minisgl::Vec;
using tvm::ffi::TensorView;

struct StoreKVArgs {
  const char* k;
  const char* v;
  char* k_cache;
  char* v_cache;
  int64_t k_stride;  // bytes between tokens
  int64_t v_stride;
  int64_t k_cache_stride;  // bytes between slots
  int64_t v_cache_stride;
  int64_t row_vecs;  // vectors per token row
  int64_t num_tokens;
};

template <int kBytes, typename Index>
__global__ void __launch_bounds__(minisgl::kThreadsPerBlock)
    StoreKVKernel(const StoreKVArgs args, const Index* __restrict__ slots, int lane_shift) {
  const int group = 1 << lane_shift;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t token = thread >> lane_shift;
  const int lane = static_cast<int>(thread & (group - 1));
  if (token >= args.num_tokens) return;
  const int64_t slot = static_cast<int64_t>(slots[token]);
  const Vec<kBytes>* const src[2] = {reinterpret_cast<const Vec<kBytes>*>(args.k + token * args.k_stride),
                                     reinterpret_cast<const Vec<kBytes>*>(args.v + token * args.v_stride)};
  Vec<kBytes>* const dst[2] = {reinterpret_cast<Vec<kBytes>*>(args.k_cache + slot * args.k_cache_stride),
                               reinterpret_cast<Vec<kBytes>*>(args.v_cache + slot * args.v_cache_stride)};
  minisgl::CopyRows<kBytes, 2>(src, dst, args.row_vecs, lane, group);
}

void CheckSameLayout(const char* name, const TensorView& t, const TensorView& cache, const TensorView& slots) {
  MINISGL_CHECK(t.device().device_type == kDLCUDA, ValueError) << name << " must be a CUDA tensor";
  MINISGL_CHECK(t.device().device_id == cache.device().device_id, ValueError)
      << name << " and its cache are on different GPUs";
  MINISGL_CHECK(t.dtype() == cache.dtype(), TypeError) << name << " must have its cache's dtype";
  MINISGL_CHECK(t.ndim() == cache.ndim() && t.ndim() >= 1, ValueError)
      << name << " must have as many dims as its cache";
  MINISGL_CHECK(t.size(0) == slots.size(0), ValueError)
      << name << " has " << t.size(0) << " rows but there are " << slots.size(0) << " slots";
  for (int d = 1; d < t.ndim(); ++d) {
    MINISGL_CHECK(t.size(d) == cache.size(d), ValueError)
        << name << " dim " << d << " is " << t.size(d) << ", its cache's is " << cache.size(d);
  }
  MINISGL_CHECK(minisgl::RowsAreDense(t) && minisgl::RowsAreDense(cache), ValueError)
      << name << " and its cache need dense rows (only dim 0 may be strided)";
}

// lanes_per_row: 0 picks it from the row length; a power of two up to 256 forces it (benchmarks).
void store_kv(TensorView k_cache, TensorView v_cache, TensorView k, TensorView v, TensorView slots,
              int64_t lanes_per_row) {
  minisgl::CheckIndices("slots", slots, k);
  CheckSameLayout("k", k, k_cache, slots);
  CheckSameLayout("v", v, v_cache, slots);
  const int64_t num_tokens = slots.size(0);
  if (num_tokens == 0) return;
  const int64_t elem = minisgl::ElementBytes(k);
  StoreKVArgs args{minisgl::DataBytes(k),
                   minisgl::DataBytes(v),
                   minisgl::DataBytes(k_cache),
                   minisgl::DataBytes(v_cache),
                   k.stride(0) * elem,
                   v.stride(0) * elem,
                   k_cache.stride(0) * elem,
                   v_cache.stride(0) * elem,
                   0,
                   num_tokens};
  const int64_t row_bytes = minisgl::RowBytes(k);
  if (row_bytes == 0) return;
  const int vec_bytes = minisgl::VecBytesFor(
      {row_bytes, args.k_stride, args.v_stride, args.k_cache_stride, args.v_cache_stride,
       reinterpret_cast<int64_t>(args.k), reinterpret_cast<int64_t>(args.v),
       reinterpret_cast<int64_t>(args.k_cache), reinterpret_cast<int64_t>(args.v_cache)});
  args.row_vecs = row_bytes / vec_bytes;
  const int lanes = minisgl::LanesPerRow(args.row_vecs, lanes_per_row);
  const int lane_shift = __builtin_ctz(lanes);
  const int64_t blocks = (num_tokens * lanes + minisgl::kThreadsPerBlock - 1) / minisgl::kThreadsPerBlock;
  MINISGL_CHECK(blocks < (int64_t{1} << 31), ValueError) << "too many tokens: " << num_tokens;
  cudaStream_t stream = minisgl::CurrentStream(k.device());
  const void* slot_data = minisgl::DataBytes(slots);
  const bool wide_index = slots.dtype().bits == 64;
  MINISGL_DISPATCH_VEC_BYTES(vec_bytes, {
    if (wide_index) {
      StoreKVKernel<kBytes, int64_t><<<blocks, minisgl::kThreadsPerBlock, 0, stream>>>(
          args, static_cast<const int64_t*>(slot_data), lane_shift);
    } else {
      StoreKVKernel<kBytes, int32_t><<<blocks, minisgl::kThreadsPerBlock, 0, stream>>>(
          args, static_cast<const int32_t*>(slot_data), lane_shift);
    }
  });
  minisgl::CheckLaunch("store_kv");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(store_kv, store_kv);
