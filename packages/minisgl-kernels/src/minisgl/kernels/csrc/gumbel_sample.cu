// One draw per row from softmax(logits / temperature), reading the logits once: the exponential race
// (Gumbel-max) token = argmax_i(logit_i * inv_temperature - log(E_i)), E_i = -log(u_i), with u_i a
// counter-based hash of (seed, row, i), so no noise tensor is written. A row whose inv_temperature is
// <= 0 takes its plain argmax (greedy). Ties go to the lowest id.
//
// Why hand-written: FlashInfer's sampling_from_logits takes no temperature, and dividing the logits first
// (a float32 copy of the whole batch) cost more than the draw itself (H200, Qwen3-0.6B decode at batch
// 128: 87 us of division plus 57 us of sampling a step). `reference.gumbel_sample` is the same function in
// torch, hash for hash.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include "row_copy.cuh"

namespace {

using tvm::ffi::TensorView;

constexpr int kSampleThreads = 256;
constexpr int kChunk = 4096;  // vocab entries per block: about 40 blocks per row of a 152k vocabulary

// A 32-bit integer hash with low bias (the "lowbias32" constants); reference.gumbel_sample mirrors it.
__device__ __forceinline__ uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Floats as unsigned ints in the same order, so that one 64-bit atomicMax keeps (score, -id).
__device__ __forceinline__ uint32_t Orderable(float f) {
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000U) ? ~bits : (bits | 0x80000000U);
}

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

template <typename T>
__global__ void __launch_bounds__(kSampleThreads)
    GumbelSampleKernel(const T* __restrict__ logits, int64_t row_stride, int64_t vocab,
                       const float* __restrict__ inv_temperature, const int64_t* __restrict__ seed,
                       unsigned long long* __restrict__ best) {
  const int64_t row = blockIdx.x;
  const float inv_t = inv_temperature[row];
  const uint64_t s = static_cast<uint64_t>(seed[0]);
  const uint32_t key_a = Mix32(static_cast<uint32_t>(s) ^ Mix32(static_cast<uint32_t>(row)));
  const uint32_t key_b = Mix32(static_cast<uint32_t>(s >> 32) ^ key_a);
  const T* row_logits = logits + row * row_stride;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t end = min(begin + kChunk, vocab);
  unsigned long long mine = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kSampleThreads) {
    float score = ToFloat(row_logits[i]);
    if (inv_t > 0.0f) {
      const uint32_t h = Mix32(Mix32(static_cast<uint32_t>(i) ^ key_a) + key_b);
      // 23 bits, centred: u in [2^-24, 1 - 2^-24], exact in float32 (24 bits would round the top one to 1).
      const float u = (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
      score = score * inv_t - logf(-logf(u));
    }
    const unsigned long long packed =
        (static_cast<unsigned long long>(Orderable(score)) << 32) | (0xFFFFFFFFU - static_cast<uint32_t>(i));
    mine = packed > mine ? packed : mine;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xFFFFFFFFU, mine, offset);
    mine = other > mine ? other : mine;
  }
  if ((threadIdx.x & 31) == 0) atomicMax(best + row, mine);
}

__global__ void UnpackTokensKernel(const unsigned long long* __restrict__ best, int64_t* __restrict__ out,
                                   int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < rows) out[row] = static_cast<int64_t>(0xFFFFFFFFU - static_cast<uint32_t>(best[row] & 0xFFFFFFFFULL));
}

bool IsFloatDtype(DLDataType dtype) {
  return (dtype.code == kDLFloat && (dtype.bits == 32 || dtype.bits == 16)) ||
         (dtype.code == kDLBfloat && dtype.bits == 16);
}

// logits: (rows, vocab), float32 / bfloat16 / float16, last dim dense. inv_temperature: float32 (rows,).
// seed: int64 (1,) on the device (drawn there, so no host sync). workspace: int64 (rows,), any contents.
// out: int64 (rows,), the sampled ids.
void gumbel_sample(TensorView logits, TensorView inv_temperature, TensorView seed, TensorView workspace,
                   TensorView out) {
  MINISGL_CHECK(logits.device().device_type == kDLCUDA, ValueError) << "logits must be a CUDA tensor";
  MINISGL_CHECK(logits.ndim() == 2 && logits.stride(1) == 1, ValueError)
      << "logits must be (rows, vocab) with a dense last dim";
  MINISGL_CHECK(IsFloatDtype(logits.dtype()), TypeError) << "logits must be float32, bfloat16 or float16";
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  MINISGL_CHECK(vocab <= int64_t{65535} * kChunk, ValueError) << "vocab too large: " << vocab;
  MINISGL_CHECK(rows < (int64_t{1} << 31), ValueError) << "too many rows: " << rows;
  for (const TensorView* t : {&inv_temperature, &seed, &workspace, &out}) {
    MINISGL_CHECK(t->device().device_type == kDLCUDA && t->device().device_id == logits.device().device_id,
                  ValueError)
        << "every tensor must be on the GPU of logits";
    MINISGL_CHECK(t->IsContiguous(), ValueError) << "inv_temperature, seed, workspace and out must be contiguous";
  }
  MINISGL_CHECK(inv_temperature.dtype().code == kDLFloat && inv_temperature.dtype().bits == 32 &&
                    inv_temperature.numel() == rows,
                ValueError)
      << "inv_temperature must be float32 with one value per row";
  MINISGL_CHECK(seed.dtype().code == kDLInt && seed.dtype().bits == 64 && seed.numel() == 1, ValueError)
      << "seed must be one int64";
  for (const TensorView* t : {&workspace, &out}) {
    MINISGL_CHECK(t->dtype().code == kDLInt && t->dtype().bits == 64 && t->numel() == rows, ValueError)
        << "workspace and out must be int64 with one value per row";
  }
  if (rows == 0) return;
  MINISGL_CHECK(vocab > 0, ValueError) << "logits must have at least one column";
  cudaStream_t stream = minisgl::CurrentStream(logits.device());
  auto* best = reinterpret_cast<unsigned long long*>(minisgl::DataBytes(workspace));
  cudaMemsetAsync(best, 0, rows * sizeof(unsigned long long), stream);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((vocab + kChunk - 1) / kChunk));
  const auto* inv_t = reinterpret_cast<const float*>(minisgl::DataBytes(inv_temperature));
  const auto* seed_ptr = reinterpret_cast<const int64_t*>(minisgl::DataBytes(seed));
  const int64_t stride = logits.stride(0);
  const void* data = minisgl::DataBytes(logits);
  if (logits.dtype().code == kDLBfloat) {
    GumbelSampleKernel<__nv_bfloat16><<<grid, kSampleThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(data), stride, vocab, inv_t, seed_ptr, best);
  } else if (logits.dtype().bits == 16) {
    GumbelSampleKernel<__half><<<grid, kSampleThreads, 0, stream>>>(static_cast<const __half*>(data), stride,
                                                                   vocab, inv_t, seed_ptr, best);
  } else {
    GumbelSampleKernel<float><<<grid, kSampleThreads, 0, stream>>>(static_cast<const float*>(data), stride, vocab,
                                                                  inv_t, seed_ptr, best);
  }
  minisgl::CheckLaunch("gumbel_sample");
  UnpackTokensKernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(
      best, reinterpret_cast<int64_t*>(minisgl::DataBytes(out)), rows);
  minisgl::CheckLaunch("gumbel_sample (unpack)");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(gumbel_sample, gumbel_sample);
