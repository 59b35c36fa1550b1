// Row gather, the embedding lookup of one vocab shard: out[j] = table[ids[j] - vocab_start] for ids in
// [vocab_start, vocab_end), zeros for the others (summing the shards over TP ranks gives the full lookup).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include "row_copy.cuh"

namespace {

using minisgl::Vec;
using tvm::ffi::TensorView;

struct GatherArgs {
  const char* table;
  char* out;
  int64_t table_stride;  // bytes between table rows
  int64_t out_stride;    // bytes between output rows
  int64_t row_vecs;
  int64_t num_ids;
  int64_t vocab_start;
  int64_t vocab_end;
};

template <int kBytes, typename Index>
__global__ void __launch_bounds__(minisgl::kThreadsPerBlock)
    GatherRowsKernel(const GatherArgs args, const Index* __restrict__ ids, int lane_shift) {
  const int group = 1 << lane_shift;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = thread >> lane_shift;
  const int lane = static_cast<int>(thread & (group - 1));
  if (j >= args.num_ids) return;
  const int64_t id = static_cast<int64_t>(ids[j]);
  const bool in_range = args.vocab_start <= id && id < args.vocab_end;
  const Vec<kBytes>* const src[1] = {
      in_range ? reinterpret_cast<const Vec<kBytes>*>(args.table + (id - args.vocab_start) * args.table_stride)
               : nullptr};
  Vec<kBytes>* const dst[1] = {reinterpret_cast<Vec<kBytes>*>(args.out + j * args.out_stride)};
  minisgl::CopyRows<kBytes, 1>(src, dst, args.row_vecs, lane, group);
}

// ids: any shape of int32/int64, contiguous; out: contiguous, ids.shape + (hidden,).
// lanes_per_row: 0 picks it from the row length; a power of two up to 256 forces it (benchmarks).
void gather_rows(TensorView table, TensorView ids, TensorView out, int64_t vocab_start, int64_t vocab_end,
                 int64_t lanes_per_row) {
  MINISGL_CHECK(table.device().device_type == kDLCUDA, ValueError) << "table must be a CUDA tensor";
  MINISGL_CHECK(table.ndim() == 2, ValueError) << "table must be 2-D (rows, hidden)";
  MINISGL_CHECK(minisgl::IsIndexDtype(ids.dtype()), TypeError) << "ids must be int32 or int64";
  MINISGL_CHECK(ids.device().device_type == kDLCUDA && ids.device().device_id == table.device().device_id,
                ValueError)
      << "ids must be on the GPU of table";
  MINISGL_CHECK(ids.IsContiguous(), ValueError) << "ids must be contiguous";
  MINISGL_CHECK(out.device().device_type == kDLCUDA && out.device().device_id == table.device().device_id,
                ValueError)
      << "out must be on the GPU of table";
  MINISGL_CHECK(out.dtype() == table.dtype(), TypeError) << "out must have the table's dtype";
  bool out_shape_ok = out.ndim() == ids.ndim() + 1 && out.size(out.ndim() - 1) == table.size(1);
  for (int d = 0; out_shape_ok && d < ids.ndim(); ++d) out_shape_ok = out.size(d) == ids.size(d);
  MINISGL_CHECK(out_shape_ok, ValueError) << "out must have shape ids.shape + (hidden,)";
  MINISGL_CHECK(out.IsContiguous(), ValueError) << "out must be contiguous";
  MINISGL_CHECK(minisgl::RowsAreDense(table), ValueError) << "table needs dense rows (only dim 0 may be strided)";
  MINISGL_CHECK(0 <= vocab_end - vocab_start && vocab_end - vocab_start <= table.size(0), ValueError)
      << "vocab range [" << vocab_start << ", " << vocab_end << ") does not fit a table of " << table.size(0)
      << " rows";
  const int64_t num_ids = ids.numel();
  const int64_t row_bytes = minisgl::RowBytes(table);
  if (num_ids == 0 || row_bytes == 0) return;
  const int64_t elem = minisgl::ElementBytes(table);
  GatherArgs args{minisgl::DataBytes(table),
                  minisgl::DataBytes(out),
                  table.stride(0) * elem,
                  row_bytes,  // out is contiguous
                  0,
                  num_ids,
                  vocab_start,
                  vocab_end};
  const int vec_bytes =
      minisgl::VecBytesFor({row_bytes, args.table_stride, args.out_stride, reinterpret_cast<int64_t>(args.table),
                            reinterpret_cast<int64_t>(args.out)});
  args.row_vecs = row_bytes / vec_bytes;
  const int lanes = minisgl::LanesPerRow(args.row_vecs, lanes_per_row);
  const int lane_shift = __builtin_ctz(lanes);
  const int64_t blocks = (num_ids * lanes + minisgl::kThreadsPerBlock - 1) / minisgl::kThreadsPerBlock;
  MINISGL_CHECK(blocks < (int64_t{1} << 31), ValueError) << "too many ids: " << num_ids;
  cudaStream_t stream = minisgl::CurrentStream(table.device());
  const void* id_data = minisgl::DataBytes(ids);
  const bool wide_index = ids.dtype().bits == 64;
  MINISGL_DISPATCH_VEC_BYTES(vec_bytes, {
    if (wide_index) {
      GatherRowsKernel<kBytes, int64_t><<<blocks, minisgl::kThreadsPerBlock, 0, stream>>>(
          args, static_cast<const int64_t*>(id_data), lane_shift);
    } else {
      GatherRowsKernel<kBytes, int32_t><<<blocks, minisgl::kThreadsPerBlock, 0, stream>>>(
          args, static_cast<const int32_t*>(id_data), lane_shift);
    }
  });
  minisgl::CheckLaunch("gather_rows");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(gather_rows, gather_rows);
