// A tvm-ffi object around one NCCL communicator.
//
// libnccl.so.2 is opened at run time (the path comes from Python: the nvidia-nccl wheel that torch
// installs, or the system's), so building needs neither NCCL's headers nor its library, and the few
// declarations below follow NCCL's stable C ABI. Collectives run on the caller's current CUDA stream,
// which tvm-ffi takes from torch for each call, and neither allocate nor synchronize: they can be
// captured into a CUDA graph.
#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/object.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstring>
#include <mutex>
#include <string>

#include "common.h"

namespace {

using tvm::ffi::Bytes;
using tvm::ffi::String;
using tvm::ffi::TensorView;

// NCCL's C ABI (nccl.h): an opaque communicator, a 128-byte unique id passed by value, int enums.
using NcclComm = struct NcclCommOpaque*;
using NcclResult = int;
constexpr int kUniqueIdBytes = 128;
struct NcclUniqueId {
  char internal[kUniqueIdBytes];
};
enum NcclRedOp : int { kSum = 0, kProd = 1, kMax = 2, kMin = 3, kAvg = 4 };

struct NcclApi {
  NcclResult (*GetVersion)(int*);
  NcclResult (*GetUniqueId)(NcclUniqueId*);
  NcclResult (*CommInitRank)(NcclComm*, int, NcclUniqueId, int);
  NcclResult (*CommDestroy)(NcclComm);
  NcclResult (*AllReduce)(const void*, void*, size_t, int, int, NcclComm, void*);
  NcclResult (*AllGather)(const void*, void*, size_t, int, NcclComm, void*);
  const char* (*GetErrorString)(NcclResult);
  const char* (*GetLastError)(NcclComm);
};

template <typename Fn>
void Resolve(void* lib, const char* name, Fn* out) {
  void* symbol = dlsym(lib, name);
  MINISGL_CHECK(symbol != nullptr, RuntimeError) << "libnccl has no symbol " << name << " (NCCL too old?)";
  *out = reinterpret_cast<Fn>(symbol);
}

// Opens libnccl once per process; later calls return the same table whatever path they pass.
const NcclApi& Api(const std::string& path) {
  static std::mutex mutex;
  static NcclApi api{};
  static bool loaded = false;
  std::lock_guard<std::mutex> guard(mutex);
  if (loaded) return api;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  MINISGL_CHECK(lib != nullptr, RuntimeError) << "cannot load NCCL from '" << path << "': " << dlerror();
  Resolve(lib, "ncclGetVersion", &api.GetVersion);
  Resolve(lib, "ncclGetUniqueId", &api.GetUniqueId);
  Resolve(lib, "ncclCommInitRank", &api.CommInitRank);
  Resolve(lib, "ncclCommDestroy", &api.CommDestroy);
  Resolve(lib, "ncclAllReduce", &api.AllReduce);
  Resolve(lib, "ncclAllGather", &api.AllGather);
  Resolve(lib, "ncclGetErrorString", &api.GetErrorString);
  Resolve(lib, "ncclGetLastError", &api.GetLastError);
  loaded = true;
  return api;
}

void Check(const NcclApi& api, NcclResult result, const char* what, NcclComm comm = nullptr) {
  if (result == 0) return;
  const char* detail = api.GetLastError(comm);
  TVM_FFI_THROW(RuntimeError) << what << " failed: " << api.GetErrorString(result)
                              << (detail != nullptr && *detail != '\0' ? std::string(" (") + detail + ")" : "");
}

int NcclDtype(DLDataType dtype) {
  MINISGL_CHECK(dtype.lanes == 1, TypeError) << "NCCL needs scalar dtypes";
  if (dtype.code == kDLInt && dtype.bits == 8) return 0;
  if ((dtype.code == kDLUInt || dtype.code == kDLBool) && dtype.bits == 8) return 1;
  if (dtype.code == kDLInt && dtype.bits == 32) return 2;
  if (dtype.code == kDLUInt && dtype.bits == 32) return 3;
  if (dtype.code == kDLInt && dtype.bits == 64) return 4;
  if (dtype.code == kDLUInt && dtype.bits == 64) return 5;
  if (dtype.code == kDLFloat && dtype.bits == 16) return 6;
  if (dtype.code == kDLFloat && dtype.bits == 32) return 7;
  if (dtype.code == kDLFloat && dtype.bits == 64) return 8;
  if (dtype.code == kDLBfloat && dtype.bits == 16) return 9;
  TVM_FFI_THROW(TypeError) << "NCCL has no dtype for DLPack code " << static_cast<int>(dtype.code) << " with "
                           << static_cast<int>(dtype.bits) << " bits";
}

void CheckCollectiveTensor(const char* name, const TensorView& t) {
  MINISGL_CHECK(t.device().device_type == kDLCUDA, ValueError) << name << " must be a CUDA tensor";
  MINISGL_CHECK(t.IsContiguous(), ValueError) << name << " must be contiguous";
}

void* CurrentStream(const TensorView& t) {
  return TVMFFIEnvGetStream(t.device().device_type, t.device().device_id);
}

// The communicator object; destroying it (the last Python reference going away) destroys the NCCL comm.
class NcclCommunicatorObj : public tvm::ffi::Object {
 public:
  int64_t rank = 0;
  int64_t world_size = 1;
  NcclComm comm = nullptr;
  const NcclApi* api = nullptr;

  NcclCommunicatorObj() = default;
  NcclCommunicatorObj(const NcclCommunicatorObj&) = delete;
  NcclCommunicatorObj& operator=(const NcclCommunicatorObj&) = delete;
  ~NcclCommunicatorObj() { Destroy(); }

  void Destroy() {
    if (comm != nullptr) api->CommDestroy(comm);
    comm = nullptr;
  }

  NcclComm Live() const {
    MINISGL_CHECK(comm != nullptr, RuntimeError) << "the NCCL communicator was destroyed";
    return comm;
  }

  static constexpr bool _type_mutable = true;
  TVM_FFI_DECLARE_OBJECT_INFO_FINAL("minisgl.NcclCommunicator", NcclCommunicatorObj, tvm::ffi::Object);
};

class NcclCommunicator : public tvm::ffi::ObjectRef {
 public:
  explicit NcclCommunicator(tvm::ffi::ObjectPtr<NcclCommunicatorObj> n) : ObjectRef(std::move(n)) {}
  TVM_FFI_DEFINE_OBJECT_REF_METHODS_NOTNULLABLE(NcclCommunicator, tvm::ffi::ObjectRef, NcclCommunicatorObj);
};

int64_t nccl_version(String library) {
  const NcclApi& api = Api(library);
  int version = 0;
  Check(api, api.GetVersion(&version), "ncclGetVersion");
  return version;
}

Bytes nccl_unique_id(String library) {
  const NcclApi& api = Api(library);
  NcclUniqueId id;
  Check(api, api.GetUniqueId(&id), "ncclGetUniqueId");
  return Bytes(id.internal, kUniqueIdBytes);
}

// Joins the communicator named by `unique_id`; the caller has made the rank's GPU the current device.
NcclCommunicator nccl_init_rank(String library, Bytes unique_id, int64_t world_size, int64_t rank) {
  const NcclApi& api = Api(library);
  MINISGL_CHECK(unique_id.size() == kUniqueIdBytes, ValueError)
      << "an NCCL unique id has " << kUniqueIdBytes << " bytes, got " << unique_id.size();
  MINISGL_CHECK(world_size >= 1 && 0 <= rank && rank < world_size, ValueError)
      << "rank " << rank << " is outside a world of size " << world_size;
  NcclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), kUniqueIdBytes);
  auto obj = tvm::ffi::make_object<NcclCommunicatorObj>();
  obj->api = &api;
  obj->rank = rank;
  obj->world_size = world_size;
  Check(api, api.CommInitRank(&obj->comm, static_cast<int>(world_size), id, static_cast<int>(rank)),
        "ncclCommInitRank");
  return NcclCommunicator(std::move(obj));
}

void nccl_destroy(NcclCommunicator comm) { comm->Destroy(); }

int64_t nccl_rank(NcclCommunicator comm) { return comm->rank; }

int64_t nccl_world_size(NcclCommunicator comm) { return comm->world_size; }

// In place: `tensor` on every rank becomes the reduction (op: 0 sum, 1 prod, 2 max, 3 min, 4 avg).
void nccl_all_reduce(NcclCommunicator comm, TensorView tensor, int64_t op) {
  CheckCollectiveTensor("tensor", tensor);
  MINISGL_CHECK(kSum <= op && op <= kAvg, ValueError) << "unknown reduction op " << op;
  void* data = minisgl::DataBytes(tensor);
  Check(*comm->api,
        comm->api->AllReduce(data, data, static_cast<size_t>(tensor.numel()), NcclDtype(tensor.dtype()),
                             static_cast<int>(op), comm->Live(), CurrentStream(tensor)),
        "ncclAllReduce", comm->comm);
}

// `output` (world_size * input.numel() elements) receives every rank's `input`, rank 0 first.
void nccl_all_gather(NcclCommunicator comm, TensorView output, TensorView input) {
  CheckCollectiveTensor("output", output);
  CheckCollectiveTensor("input", input);
  MINISGL_CHECK(output.dtype() == input.dtype(), TypeError) << "output and input dtypes differ";
  MINISGL_CHECK(output.numel() == input.numel() * comm->world_size, ValueError)
      << "output has " << output.numel() << " elements, expected world_size * " << input.numel();
  Check(*comm->api,
        comm->api->AllGather(minisgl::DataBytes(input), minisgl::DataBytes(output),
                             static_cast<size_t>(input.numel()), NcclDtype(input.dtype()), comm->Live(),
                             CurrentStream(input)),
        "ncclAllGather", comm->comm);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::ObjectDef<NcclCommunicatorObj>(refl::init(false))
      .def_ro("rank", &NcclCommunicatorObj::rank)
      .def_ro("world_size", &NcclCommunicatorObj::world_size);
}

TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_version, nccl_version);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_unique_id, nccl_unique_id);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_init_rank, nccl_init_rank);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_destroy, nccl_destroy);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_rank, nccl_rank);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_world_size, nccl_world_size);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_all_reduce, nccl_all_reduce);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nccl_all_gather, nccl_all_gather);
