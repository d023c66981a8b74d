// Fused steer+norm on the CPU: arguments as raw pointers, shapes and strides.
#pragma once
#include <cstdint>

namespace fasteer {

struct SteerNormArgs {
  void* h;                 // [n, d] rows of `dtype`, row stride h_stride (elements)
  void* out;               // [n, d] rows, row stride out_stride; nullptr for kNormNone
  int64_t n, d, h_stride, out_stride;
  int32_t dtype;           // kFloat32, kBFloat16, kFloat16
  const int32_t* slot;     // [n]
  const uint8_t* gate;     // [n]
  const int32_t* meta;     // [s, e, 4]
  const float* params;     // [s, e, 8]
  const float* bank;       // [v, d]
  int64_t s, e, v;
  const void* weight;      // [d] of `dtype` or nullptr
  const void* bias;        // [d] of `dtype` or nullptr
  int32_t norm_kind;
  float eps, weight_offset;
  bool cast_before_weight;
  int num_threads;
  // Optional residual add first (fasteer.ops.add_steer_norm_): when not nullptr, each row
  // of h becomes round(h + addend) before its edits, and every row of h is stored (the
  // model's own add). [n, d] rows of `dtype`, row stride addend_stride (elements).
  const void* addend = nullptr;
  int64_t addend_stride = 0;
};

// The instruction set the row loop runs with: the widest of baseline / AVX2 / AVX-512
// the CPU supports, capped by the environment variable FASTEER_CPU_ISA (read once).
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
Isa active_isa();
const char* isa_name(Isa isa);

// Throws std::invalid_argument on an unknown dtype or norm kind.
void steer_norm_cpu(const SteerNormArgs& args);

}  // namespace fasteer
