// Host-side entry points of the CUDA kernels, in plain C++ types, so that the pybind11
// bindings compile with the host compiler and never include CUDA headers. Each launcher
// returns a cudaError_t value as int (0 = success); `error_string` turns it into text.
#pragma once
#include <cstdint>

namespace fasteer {
namespace cuda {

// h[r, :] += alpha * v for r in [0, n): the build-plumbing kernel (fp32/bf16/fp16 rows,
// float32 v). Launched on `stream` (a cudaStream_t passed as an integer).
int launch_add_rows(void* h, int64_t n, int64_t d, int64_t h_stride, int32_t dtype,
                    const float* v, float alpha, uintptr_t stream);

int device_count(int* count);
const char* error_string(int err);

}  // namespace cuda
}  // namespace fasteer
