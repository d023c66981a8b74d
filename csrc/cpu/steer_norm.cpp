// Fused steer+norm, CPU backend: one pass per row, rows split across threads.
//
// Design: the row is converted once into a float32 scratch buffer that stays in L1/L2;
// the slot's edits run on it in order (each one a dot product and an axpy over the
// buffer), the edited row is rounded to the model dtype and stored back into h (rows
// that are not edited are never written), and the norm is computed from the rounded
// values and written into `out`. Memory traffic is one read of h, at most one write of
// h and one write of out, plus the few bank vectors the slot uses (shared across rows,
// so they stay in cache). Reductions use `omp simd` (compiled with -fopenmp-simd: no
// OpenMP runtime) so they vectorise without -ffast-math; -ffp-contract=off keeps
// a*b+c as two roundings, like PyTorch's reference.
// A run of JOINT feature edits (one multi-feature FeatureEdit) reads a copy of the row
// taken where the run starts, so every feature sees the same h.
// With an addend (fasteer.ops.add_steer_norm_) the row first becomes round(h + addend),
// the model's residual add, and is stored back whether or not an edit applies.
// Limit: the scratch rows are 2*D floats per thread; rows are independent, so very small
// batches of very wide rows do not use more than one core.
#include "steer_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "../common/edit_math.h"
#include "../common/layout.h"
#include "../common/norm_math.h"
#include "thread_pool.h"

// Portable build, wide code at run time: the module is compiled for a baseline ISA
// (setup.py: -march=x86-64-v2 unless FASTEER_CPU_ARCH says otherwise) so it loads on any
// x86-64 machine, and the row loop is compiled three times -- baseline, AVX2 and AVX-512,
// through function target attributes -- with the widest one the CPU supports chosen once
// at load (FASTEER_CPU_ISA=baseline|avx2|avx512 caps it). Everything the row loop calls on
// its hot path is force-inlined, so it is compiled for the caller's ISA; any function that
// is not inlined keeps the baseline ISA, so no wide instruction can run on a CPU without it.
#define FASTEER_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTEER_X86_DISPATCH 1
#define FASTEER_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTEER_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace fasteer {
namespace {

FASTEER_INLINE float dot(const float* a, const float* b, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

FASTEER_INLINE float sumsq(const float* a, int64_t d) { return dot(a, a, d); }

FASTEER_INLINE float sum(const float* a, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i];
  return s;
}

// Table values are validated in Python before they reach a kernel (fasteer.ops
// validate_tables); these guards make sure that no table value whatsoever can make the
// kernel read outside the bank: an edit with an unknown kind or a bank index out of
// range is skipped (treated as NONE).
inline bool bank_row_ok(const SteerNormArgs& a, int64_t r) { return r >= 0 && r < a.v; }

inline bool edit_ok(const SteerNormArgs& a, const int32_t* m, int32_t kind) {
  if (kind < 0 || kind > kLastKind) return false;
  if (edit_reads_u(kind) && !bank_row_ok(a, m[kMetaU])) return false;
  if (kind == kFeature && !bank_row_ok(a, m[kMetaW])) return false;
  return true;
}

// Edit the float32 row x in place; returns whether any edit applied. `read_copy` holds
// the row a run of JOINT edits reads (copied only when such a run starts).
FASTEER_INLINE bool apply_slot_edits(const SteerNormArgs& a, int64_t slot, float* x,
                      std::vector<uint8_t>& passes, float* read_copy) {
  const int64_t d = a.d;
  const int32_t* meta = a.meta + slot * a.e * kMetaWidth;
  const float* params = a.params + slot * a.e * kParamWidth;

  // Conditions read the row as it entered the site.
  passes.assign(size_t(a.e), 1);
  float norm_in = -1.0f;
  for (int64_t e = 0; e < a.e; ++e) {
    const int32_t code = meta[e * kMetaWidth + kMetaCode];
    const int32_t cond = code_condition(code);
    if (code_kind(code) == kNone || cond == kCondNone) continue;
    const int64_t ci = meta[e * kMetaWidth + kMetaC];
    if ((cond != kCondCosine && cond != kCondProj) || !bank_row_ok(a, ci)) {
      passes[size_t(e)] = 0;  // invalid condition (validation rejects it): skip the edit
      continue;
    }
    const float* c = a.bank + ci * d;
    const float dc = dot(x, c, d);
    float norms = 0.0f;
    if (cond == kCondCosine) {
      if (norm_in < 0.0f) norm_in = std::sqrt(sumsq(x, d));
      norms = norm_in * std::sqrt(sumsq(c, d));
    }
    const float* p = params + e * kParamWidth;
    passes[size_t(e)] = condition_holds(cond, dc, norms, p[kParamCondThresh], p[kParamCondBias]);
  }

  bool edited = false;
  const float* read = x;  // the row edit e reads (layout.py: JOINT keeps the previous one's)
  for (int64_t e = 0; e < a.e; ++e) {
    const int32_t* m = meta + e * kMetaWidth;
    const int32_t code = m[kMetaCode];
    if (e == 0 || !code_joint(code)) {  // r_0 is the incoming row, JOINT or not
      read = x;
      // a JOINT edit follows: it must read x as it is now, before this edit changes it
      if (e + 1 < a.e && code_joint(meta[(e + 1) * kMetaWidth + kMetaCode])) {
        std::copy(x, x + d, read_copy);
        read = read_copy;
      }
    }
    const int32_t kind = code_kind(code);
    if (kind == kNone || !passes[size_t(e)] || !edit_ok(a, m, kind)) continue;
    const float* u = edit_reads_u(kind) ? a.bank + int64_t(m[kMetaU]) * d : nullptr;
    const float* w = kind == kFeature ? a.bank + int64_t(m[kMetaW]) * d : nullptr;
    const float dot_u = edit_needs_dot_u(kind) ? dot(read, u, d) : 0.0f;
    const AffineEdit ed = edit_coefficients(code, dot_u, params + e * kParamWidth);
    const bool preserve = code_preserve_norm(code);
    const float before = preserve ? sumsq(x, d) : 0.0f;
    if (edit_scales_only(kind)) {  // SCALE, DYN_SCALE (its factor read the dot with u)
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) x[i] = ed.scale_h * x[i];
    } else if (w != nullptr) {
      const float cw = ed.coef_w;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) x[i] = x[i] + cw * w[i];
    } else {
      const float cu = ed.coef_u;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) x[i] = x[i] + cu * u[i];
    }
    if (preserve) {
      const float f = preserve_norm_factor(before, sumsq(x, d));
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) x[i] = x[i] * f;
    }
    edited = true;
  }
  return edited;
}

template <typename T>
FASTEER_INLINE void run_rows_body(const SteerNormArgs& a, int64_t begin, int64_t end) {
  thread_local std::vector<float> scratch;
  thread_local std::vector<uint8_t> passes;
  const int64_t d = a.d;
  if (int64_t(scratch.size()) < 2 * d) scratch.resize(size_t(2 * d));
  float* x = scratch.data();
  float* read_copy = x + d;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);

  for (int64_t row = begin; row < end; ++row) {
    T* h = static_cast<T*>(a.h) + row * a.h_stride;
    const int64_t slot = a.slot[row];
    const bool active = a.gate[row] != 0 && slot >= 0 && slot < a.s && a.e > 0;
    if (!active && a.norm_kind == kNormNone && a.addend == nullptr) continue;

    if (a.addend != nullptr) {
      // the model's residual add, rounded as its own add would be; the edits (and their
      // conditions) then read this row
      const T* add = static_cast<const T*>(a.addend) + row * a.addend_stride;
      for (int64_t i = 0; i < d; ++i) x[i] = round_to<T>(to_float(h[i]) + to_float(add[i]));
    } else {
      for (int64_t i = 0; i < d; ++i) x[i] = to_float(h[i]);
    }
    if (active && apply_slot_edits(a, slot, x, passes, read_copy)) {
      for (int64_t i = 0; i < d; ++i) {
        const T v = from_float<T>(x[i]);
        h[i] = v;
        x[i] = to_float(v);  // the norm reads what the model will see
      }
    } else if (a.addend != nullptr) {
      // not edited: still the sum (x holds values of T already, the conversion is exact)
      for (int64_t i = 0; i < d; ++i) h[i] = from_float<T>(x[i]);
    }
    if (a.norm_kind == kNormNone) continue;

    T* out = static_cast<T*>(a.out) + row * a.out_stride;
    if (a.norm_kind == kNormRms) {
      const float inv = rms_inv(sumsq(x, d), d, a.eps);
      for (int64_t i = 0; i < d; ++i)
        out[i] = rms_out<T>(x[i], inv, weight != nullptr, weight ? to_float(weight[i]) : 0.0f,
                            a.weight_offset, a.cast_before_weight);
    } else {
      const float mean = sum(x, d) / float(d);
      float var = 0.0f;
#pragma omp simd reduction(+ : var)
      for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
      const float rstd = 1.0f / std::sqrt(var / float(d) + a.eps);
      for (int64_t i = 0; i < d; ++i)
        out[i] = layer_out<T>(x[i], mean, rstd, weight != nullptr,
                              weight ? to_float(weight[i]) : 0.0f, bias != nullptr,
                              bias ? to_float(bias[i]) : 0.0f);
    }
  }
}

template <typename T>
void run_rows_baseline(const SteerNormArgs& a, int64_t begin, int64_t end) {
  run_rows_body<T>(a, begin, end);
}
#if defined(FASTEER_X86_DISPATCH)
template <typename T>
FASTEER_TARGET_AVX2 void run_rows_avx2(const SteerNormArgs& a, int64_t begin, int64_t end) {
  run_rows_body<T>(a, begin, end);
}
template <typename T>
FASTEER_TARGET_AVX512 void run_rows_avx512(const SteerNormArgs& a, int64_t begin, int64_t end) {
  run_rows_body<T>(a, begin, end);
}
#endif

// The widest ISA this CPU runs (capped by FASTEER_CPU_ISA), decided once.
Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if defined(FASTEER_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("FASTEER_CPU_ISA");
  if (cap != nullptr && *cap != '\0') {
    Isa want = best;
    if (std::strcmp(cap, "baseline") == 0) want = Isa::kBaseline;
    else if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) want = Isa::kAvx512;
    if (int(want) < int(best)) best = want;
  }
  return best;
}

template <typename T>
using RowFn = void (*)(const SteerNormArgs&, int64_t, int64_t);

template <typename T>
RowFn<T> row_fn() {
#if defined(FASTEER_X86_DISPATCH)
  switch (active_isa()) {
    case Isa::kAvx512: return &run_rows_avx512<T>;
    case Isa::kAvx2: return &run_rows_avx2<T>;
    default: break;
  }
#endif
  return &run_rows_baseline<T>;
}

template <typename T>
void dispatch_rows(const SteerNormArgs& a) {
  static const RowFn<T> run_rows = row_fn<T>();
  // Split only when there is enough work to pay for waking threads (~16k elements each).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(a.d, 1));
  ThreadPool::instance().parallel_for(a.n, grain, a.num_threads,
                                      [&](int64_t b, int64_t e) { run_rows(a, b, e); });
}

}  // namespace

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

void steer_norm_cpu(const SteerNormArgs& a) {
  if (a.norm_kind != kNormNone && a.norm_kind != kNormRms && a.norm_kind != kNormLayer)
    throw std::invalid_argument("norm_kind: expected 0 (none), 1 (rms) or 2 (layer)");
  if (a.n == 0 || a.d == 0) return;
  if (a.norm_kind != kNormNone && a.out == nullptr)
    throw std::invalid_argument("out: required when norm_kind is not none");
  switch (a.dtype) {
    case kFloat32: return dispatch_rows<float>(a);
    case kBFloat16: return dispatch_rows<bf16_t>(a);
    case kFloat16: return dispatch_rows<f16_t>(a);
    default: throw std::invalid_argument("dtype: expected float32, bfloat16 or float16");
  }
}

}  // namespace fasteer
