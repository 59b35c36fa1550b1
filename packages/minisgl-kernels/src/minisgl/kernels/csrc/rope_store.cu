// Attention input preparation in one launch: from a fused qkv projection, optionally RMS-normalize each
// query and key head (Qwen3's q/k norm), rotate both with rotary embeddings (the rotate-half form), write
// the queries to a dense output, and store the keys and values into the paged KV pool at their slots.
//
// One warp per (token, head) over the query heads and then the KV heads; the warp of KV head h also
// copies value head h. Each lane holds head_dim / 32 consecutive elements; the rotate-half partner of
// lane l's elements (i <-> i + head_dim / 2) lives in lane l ^ 16. Arithmetic is in float32, rounded
// once to the storage dtype at the end.
//
// The KV pool has qkv's dtype, or is FP8 E4M3 (the opt-in quantized cache): then K and V are stored
// multiplied by the layer's inverse k/v scales, rounded to nearest and saturated to +-448.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <type_traits>

#include "row_copy.cuh"

namespace {

using tvm::ffi::TensorView;

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ float ToFloat(T x);
template <>
__device__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ float ToFloat(__half x) { return __half2float(x); }
template <>
__device__ float ToFloat(float x) { return x; }

template <typename T>
__device__ T FromFloat(float x);
template <>
__device__ __nv_bfloat16 FromFloat(float x) { return __float2bfloat16(x); }
template <>
__device__ __half FromFloat(float x) { return __float2half(x); }
template <>
__device__ float FromFloat(float x) { return x; }
template <>
__device__ __nv_fp8_e4m3 FromFloat(float x) { return __nv_fp8_e4m3(x); }  // saturates to finite

struct RopeStoreArgs {
  const char* qkv;      // (tokens, (q_heads + 2 kv_heads) * head_dim), rows dense
  const int64_t* positions;
  const int64_t* slots;
  const float* cos_sin;  // (max_positions, head_dim): cos of the head_dim / 2 frequencies, then their sin
  const char* q_weight;  // (head_dim,) or unused
  const char* k_weight;
  char* q_out;    // (tokens, q_heads, head_dim), dense
  char* k_cache;  // (slots, kv_heads, head_dim), rows dense
  char* v_cache;
  int64_t qkv_stride;  // elements between tokens
  int64_t k_cache_stride;
  int64_t v_cache_stride;
  int64_t num_tokens;
  int q_heads;
  int kv_heads;
  float eps;
  bool use_norm;
  float k_inv_scale;  // FP8 caches only: stored = value * inv_scale
  float v_inv_scale;
};

// T: qkv's dtype; C: the cache's (T itself, or __nv_fp8_e4m3).
template <typename T, typename C, int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) RopeStoreKernel(const RopeStoreArgs args) {
  constexpr bool kQuantized = !std::is_same_v<T, C>;
  constexpr int kHeadDim = kPerLane * 32;
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int heads = args.q_heads + args.kv_heads;
  const int64_t token = item / heads;
  const int head = static_cast<int>(item % heads);
  if (token >= args.num_tokens) return;
  const bool is_query = head < args.q_heads;
  const T* row = reinterpret_cast<const T*>(args.qkv) + token * args.qkv_stride;
  const T* src = row + static_cast<int64_t>(head) * kHeadDim;  // K heads follow the Q heads
  float x[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) x[e] = ToFloat(src[lane * kPerLane + e]);

  if (args.use_norm) {
    float squares = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) squares += x[e] * x[e];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffff, squares, offset);
    const float scale = rsqrtf(squares / kHeadDim + args.eps);
    const T* weight = reinterpret_cast<const T*>(is_query ? args.q_weight : args.k_weight);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) x[e] = x[e] * scale * ToFloat(weight[lane * kPerLane + e]);
  }

  const float* cos = args.cos_sin + args.positions[token] * kHeadDim;
  const float* sin = cos + kHeadDim / 2;
  const bool first_half = lane < 16;
  float out[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const float partner = __shfl_xor_sync(0xffffffff, x[e], 16);
    const int freq = (lane & 15) * kPerLane + e;
    out[e] = first_half ? x[e] * cos[freq] - partner * sin[freq] : x[e] * cos[freq] + partner * sin[freq];
  }

  if (is_query) {
    T* dst = reinterpret_cast<T*>(args.q_out) + (token * args.q_heads + head) * kHeadDim;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dst[lane * kPerLane + e] = FromFloat<T>(out[e]);
    return;
  }
  const int kv_head = head - args.q_heads;
  const int64_t slot = args.slots[token];
  C* k_dst = reinterpret_cast<C*>(args.k_cache) + slot * args.k_cache_stride + kv_head * kHeadDim;
  const T* v_src = row + static_cast<int64_t>(args.q_heads + args.kv_heads + kv_head) * kHeadDim;
  C* v_dst = reinterpret_cast<C*>(args.v_cache) + slot * args.v_cache_stride + kv_head * kHeadDim;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    if constexpr (kQuantized) {
      k_dst[lane * kPerLane + e] = FromFloat<C>(out[e] * args.k_inv_scale);
      v_dst[lane * kPerLane + e] = FromFloat<C>(ToFloat(v_src[lane * kPerLane + e]) * args.v_inv_scale);
    } else {
      k_dst[lane * kPerLane + e] = FromFloat<T>(out[e]);
      v_dst[lane * kPerLane + e] = v_src[lane * kPerLane + e];
    }
  }
}

void CheckCuda(const char* name, const TensorView& t, const TensorView& like) {
  MINISGL_CHECK(t.device().device_type == kDLCUDA, ValueError) << name << " must be a CUDA tensor";
  MINISGL_CHECK(t.device().device_id == like.device().device_id, ValueError)
      << name << " is on another GPU than qkv";
}

bool IsFp8E4m3(DLDataType dtype) { return dtype.code == kDLFloat8_e4m3fn && dtype.bits == 8; }

template <typename T, int kPerLane>
void LaunchFor(const RopeStoreArgs& args, bool fp8_cache, int64_t blocks, cudaStream_t stream) {
  if (fp8_cache) {
    RopeStoreKernel<T, __nv_fp8_e4m3, kPerLane><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(args);
  } else {
    RopeStoreKernel<T, T, kPerLane><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(args);
  }
}

template <int kPerLane>
void Launch(const RopeStoreArgs& args, DLDataType dtype, bool fp8_cache, cudaStream_t stream) {
  const int64_t items = args.num_tokens * (args.q_heads + args.kv_heads);
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  MINISGL_CHECK(blocks < (int64_t{1} << 31), ValueError) << "too many tokens: " << args.num_tokens;
  if (dtype.code == kDLBfloat) {
    LaunchFor<__nv_bfloat16, kPerLane>(args, fp8_cache, blocks, stream);
  } else if (dtype.code == kDLFloat && dtype.bits == 16) {
    LaunchFor<__half, kPerLane>(args, fp8_cache, blocks, stream);
  } else {
    LaunchFor<float, kPerLane>(args, fp8_cache, blocks, stream);
  }
}

// qkv: (tokens, (q_heads + 2 kv_heads) * head_dim); positions, slots: (tokens,) int64; cos_sin:
// (max_positions, head_dim) float32; q_weight, k_weight: (head_dim,) in qkv's dtype (read only when
// use_norm); q_out: (tokens, q_heads, head_dim) dense; k_cache, v_cache: (slots, kv_heads, head_dim), in
// qkv's dtype or both float8_e4m3fn; k_inv_scale, v_inv_scale: 1 / the layer's scales (FP8 caches only).
void rope_store(TensorView qkv, TensorView positions, TensorView slots, TensorView cos_sin, TensorView q_weight,
                TensorView k_weight, TensorView q_out, TensorView k_cache, TensorView v_cache, int64_t q_heads,
                int64_t kv_heads, double eps, int64_t use_norm, double k_inv_scale, double v_inv_scale) {
  CheckCuda("qkv", qkv, qkv);
  CheckCuda("positions", positions, qkv);
  CheckCuda("slots", slots, qkv);
  CheckCuda("cos_sin", cos_sin, qkv);
  CheckCuda("q_out", q_out, qkv);
  CheckCuda("k_cache", k_cache, qkv);
  CheckCuda("v_cache", v_cache, qkv);
  MINISGL_CHECK(qkv.ndim() == 2 && qkv.stride(1) == 1, ValueError) << "qkv must be 2-D with dense rows";
  const int64_t head_dim = q_out.size(2);
  MINISGL_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256, ValueError)
      << "head_dim must be 64, 128 or 256, got " << head_dim;
  MINISGL_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * head_dim, ValueError)
      << "qkv has " << qkv.size(1) << " columns, expected (q_heads + 2 kv_heads) * head_dim";
  MINISGL_CHECK(positions.dtype().code == kDLInt && positions.dtype().bits == 64 &&
                    slots.dtype().code == kDLInt && slots.dtype().bits == 64,
                TypeError)
      << "positions and slots must be int64";
  MINISGL_CHECK(positions.size(0) == qkv.size(0) && slots.size(0) == qkv.size(0), ValueError)
      << "positions and slots need one entry per token";
  MINISGL_CHECK(cos_sin.dtype().code == kDLFloat && cos_sin.dtype().bits == 32 && cos_sin.size(1) == head_dim &&
                    minisgl::RowsAreDense(cos_sin) && cos_sin.stride(0) == head_dim,
                ValueError)
      << "cos_sin must be a dense float32 (max_positions, head_dim) table";
  for (const TensorView* t : {&q_out, &q_weight, &k_weight}) {
    MINISGL_CHECK(t->dtype() == qkv.dtype(), TypeError) << "q_out and the weights need qkv's dtype";
  }
  const bool fp8_cache = IsFp8E4m3(k_cache.dtype());
  MINISGL_CHECK(k_cache.dtype() == v_cache.dtype() && (fp8_cache || k_cache.dtype() == qkv.dtype()), TypeError)
      << "the caches need qkv's dtype, or both float8_e4m3fn";
  MINISGL_CHECK(fp8_cache || (k_inv_scale == 1.0 && v_inv_scale == 1.0), ValueError)
      << "k/v scales apply to float8_e4m3fn caches only";
  MINISGL_CHECK(minisgl::RowsAreDense(q_out) && q_out.stride(0) == q_heads * head_dim, ValueError)
      << "q_out must be dense";
  MINISGL_CHECK(minisgl::RowsAreDense(k_cache) && minisgl::RowsAreDense(v_cache) && k_cache.size(1) == kv_heads &&
                    v_cache.size(1) == kv_heads && k_cache.size(2) == head_dim && v_cache.size(2) == head_dim,
                ValueError)
      << "k_cache and v_cache must be dense (slots, kv_heads, head_dim) views";
  const int64_t num_tokens = qkv.size(0);
  if (num_tokens == 0) return;
  RopeStoreArgs args{minisgl::DataBytes(qkv),
                     static_cast<const int64_t*>(static_cast<void*>(minisgl::DataBytes(positions))),
                     static_cast<const int64_t*>(static_cast<void*>(minisgl::DataBytes(slots))),
                     static_cast<const float*>(static_cast<void*>(minisgl::DataBytes(cos_sin))),
                     minisgl::DataBytes(q_weight),
                     minisgl::DataBytes(k_weight),
                     minisgl::DataBytes(q_out),
                     minisgl::DataBytes(k_cache),
                     minisgl::DataBytes(v_cache),
                     qkv.stride(0),
                     k_cache.stride(0),
                     v_cache.stride(0),
                     num_tokens,
                     static_cast<int>(q_heads),
                     static_cast<int>(kv_heads),
                     static_cast<float>(eps),
                     use_norm != 0,
                     static_cast<float>(k_inv_scale),
                     static_cast<float>(v_inv_scale)};
  cudaStream_t stream = minisgl::CurrentStream(qkv.device());
  if (head_dim == 64) {
    Launch<2>(args, qkv.dtype(), fp8_cache, stream);
  } else if (head_dim == 128) {
    Launch<4>(args, qkv.dtype(), fp8_cache, stream);
  } else {
    Launch<8>(args, qkv.dtype(), fp8_cache, stream);
  }
  minisgl::CheckLaunch("rope_store");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(rope_store, rope_store);
