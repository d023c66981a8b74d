// h[r, :] += alpha * v: a small kernel that proves the CUDA build plumbing (archs, static
// cudart, stream passing, error reporting) end to end. The fused decode-path kernels
// live beside it and follow the same pattern: a __global__ kernel, a launcher taking
// raw pointers and the caller's stream, no allocation, no synchronisation.
#include <cuda_runtime.h>

#include "../common/dtype.h"
#include "../common/layout.h"
#include "launch.h"

namespace fasteer {
namespace cuda {
namespace {

template <typename T>
__global__ void add_rows_kernel(T* h, int64_t d, int64_t h_stride, const float* v, float alpha) {
  T* row = h + int64_t(blockIdx.x) * h_stride;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    row[i] = from_float<T>(to_float(row[i]) + alpha * v[i]);
}

template <typename T>
int launch(void* h, int64_t n, int64_t d, int64_t h_stride, const float* v, float alpha,
           cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  add_rows_kernel<T><<<unsigned(n), 256, 0, stream>>>(static_cast<T*>(h), d, h_stride, v, alpha);
  return int(cudaGetLastError());
}

}  // namespace

int launch_add_rows(void* h, int64_t n, int64_t d, int64_t h_stride, int32_t dtype,
                    const float* v, float alpha, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch<float>(h, n, d, h_stride, v, alpha, s);
    case kBFloat16: return launch<bf16_t>(h, n, d, h_stride, v, alpha, s);
    case kFloat16: return launch<f16_t>(h, n, d, h_stride, v, alpha, s);
    default: return int(cudaErrorInvalidValue);
  }
}

int device_count(int* count) { return int(cudaGetDeviceCount(count)); }

const char* error_string(int err) { return cudaGetErrorString(cudaError_t(err)); }

}  // namespace cuda
}  // namespace fasteer
