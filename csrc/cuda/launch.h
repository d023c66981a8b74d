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

// Fused steer+norm over n rows (fasteer/ops/layout.py has the tables and the math; the
// same argument meaning as fasteer._C.steer_norm). Rows of up to kMaxRegisterRow elements
// are held in registers; wider rows use a loop kernel that supports at most
// kMaxLoopEdits edits per slot (cudaErrorInvalidValue beyond). Launched on `stream`; no
// allocation, no synchronisation. Returns the launch's cudaError_t as int. A non-null
// `addend` ([n, d] of h's dtype, row stride addend_stride) is added to every row of h first
// (fasteer.ops.add_steer_norm_: the model's residual add, fused), and every row is stored.
constexpr int64_t kMaxRegisterRow = 16384;
constexpr int64_t kMaxLoopEdits = 2048;
int launch_steer_norm(void* h, void* out, int64_t n, int64_t d, int64_t h_stride,
                      int64_t out_stride, int32_t dtype, const int32_t* slot, const uint8_t* gate,
                      const int32_t* meta, const float* params, const float* bank, int64_t s,
                      int64_t e, int64_t v, const void* weight, const void* bias,
                      int32_t norm_kind, float eps, float weight_offset, bool cast_before_weight,
                      const void* addend, int64_t addend_stride, uintptr_t stream);

int device_count(int* count);
const char* error_string(int err);

}  // namespace cuda
}  // namespace fasteer
