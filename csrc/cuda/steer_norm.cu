// Fused steer+norm, CUDA backend: the decode-path kernel (fasteer/ops/layout.py has the
// math; csrc/cpu/steer_norm.cpp computes the same thing on the CPU).
//
// Why it is written this way
// --------------------------
// * Decode work is a few rows per carrier, so the cost is launch latency plus a chain of
//   dependent reductions (every clamp / ablate / feature / condition / preserve-norm is a
//   dot product over the row). The row is therefore loaded once into registers (float32)
//   and every reduction is a register pass + warp shuffles + one shared-memory exchange
//   (one __syncthreads per reduction, double-buffered), never a trip to global memory.
// * Each thread holds NV chunks of 16 bytes of the row (4 fp32 or 8 bf16/fp16 values):
//   chunk c = lane + k * group (k < NV), so a warp reads contiguous 512-byte spans. When
//   every pointer is 16-byte aligned and D and the row strides are multiples of a chunk
//   (decided on the host), chunks move with 16-byte vector loads and stores; otherwise
//   the same mapping is loaded element by element (any offset, any D).
// * Rows of at most 32 chunks (D <= 128 fp32 / 256 bf16) take one warp each, four rows
//   per block, and reduce with shuffles only. Wider rows take one block each, with
//   NV and the block size picked so a row fits (up to 16384 elements in registers).
//   Wider still (any D) a loop kernel re-reads the row from global memory / L2 and
//   rebuilds the edited values element by element by replaying the row's applied edits
//   (kept in shared memory) with the register kernel's per-element operations; only the
//   order in which the reductions add up differs.
// * The edit list is data (read from the slot tables at run time), so changing alpha,
//   vectors, kinds or slots never changes the launch, and a captured CUDA graph stays
//   valid. Conditions read the incoming row: from registers while nothing has been
//   applied yet, else re-read from h (not written until the end of the row).
// * JOINT edits (a multi-feature FeatureEdit: every z_k from the same h) take their dot
//   product on the row the run's first edit read, while their changes add up on the
//   current row. The register kernel keeps that read row in dynamic shared memory, one
//   column per thread (no barrier, no bank conflicts), copied from x only where a JOINT
//   edit follows. Not in registers: next to x it does not fit the 64 registers of a
//   1024-thread block without spilling. It takes threads * NV * V floats: up to 64 KB at
//   16 floats per thread (rows of more than 11776 elements), above the 48 KB default, so
//   those launches opt in (cudaFuncSetAttribute). The loop kernel needs no copy: the
//   read row is the replay of the first read_count records.
// * Per-element math comes from csrc/common (edit_coefficients, condition_holds,
//   preserve_norm_factor, rms_inv / rms_out / layer_out, dtype.h conversions), shared
//   with the CPU kernel. The edit updates (x + c*u, s*x, x*f) use __fmul_rn/__fadd_rn so
//   nvcc cannot contract them into FMAs: two roundings, as the CPU (-ffp-contract=off)
//   and PyTorch's reference compute them. (Dot products may use FMAs; norm_math.h's
//   LayerNorm `y * w + b` may be contracted by nvcc: at most one float32 rounding apart.)
// * Rows that are not edited (gate 0, slot -1 or >= S, every edit skipped) are never
//   written. Edited rows are rounded to h's dtype and the norm reads the rounded values.
// * An optional addend (fasteer.ops.add_steer_norm_: the model's residual add, fused) is a
//   prologue: as a row is loaded, round(h + addend) is formed and stored back into h (every
//   row: it is the model's own add), and from there on the kernels run unchanged, h holding
//   the incoming row wherever they re-read it. Storing the sum first, rather than keeping
//   the addend's pointer live for the re-reads, leaves the edit loop's registers as they
//   were (no spills); an edited row is then written twice, the second time from registers
//   into lines the first store brought into L2. A runtime pointer, not a template flag:
//   the same instantiations serve both ops.
// * No allocation, no host synchronisation; launched on the caller's stream.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/edit_math.h"
#include "../common/layout.h"
#include "../common/norm_math.h"
#include "launch.h"

namespace fasteer {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpRowsPerBlock = 4;                 // warp-per-row kernels: rows per block
constexpr int kWarpRowsThreads = kWarp * kWarpRowsPerBlock;
constexpr int kMaxThreads = 1024;
constexpr int kPreferredThreads = 512;               // fewer warps -> cheaper block reductions
constexpr int kMaxReduce = 3;                        // values reduced together at most
static_assert(kMaxRegisterRow == kMaxThreads * 16, "NV * chunk <= 16 floats per thread");
constexpr size_t kReduceSmem = 2 * kMaxReduce * kWarp * sizeof(float);  // static: `red`
constexpr size_t kDefaultSmem = 48 * 1024;  // static + dynamic; more needs an opt-in
// the register kernel's JOINT read row (kMaxRegisterRow floats at most) + `red` fit one
// block's shared memory on every target (the least: sm_86 / sm_89, 99 KB)
static_assert(kMaxRegisterRow * sizeof(float) + kReduceSmem <= 99 * 1024,
              "the JOINT read row must fit in shared memory");

// Everything a launch needs, passed by value (kernel parameter space).
struct KernelArgs {
  void* h;
  void* out;
  const int32_t* slot;
  const uint8_t* gate;
  const int32_t* meta;
  const float* params;
  const float* bank;
  const void* weight;
  const void* bias;
  int64_t n, d, h_stride, out_stride, s, e;
  int32_t norm_kind;
  float eps, weight_offset;
  bool cast_before_weight;
  const void* addend;     // nullptr, or [n, d] of T added to h first (row stride below)
  int64_t addend_stride;
};

// One applied edit in the form both kernels execute it:
//   scale-only:  x <- coef * x               (SCALE; DYN_SCALE: coef after its dot with u)
//   otherwise:   x <- x + coef * bank[vec]    (ADD / CLAMP / ABLATE: u; FEATURE: w)
//   then, with PRESERVE_NORM:  x <- x * factor
struct EditRecord {
  int32_t vec_row;   // bank row, -1 for scale-only
  uint32_t flags;    // kRecScale | kRecPreserve
  float coef;
  float factor;
};
constexpr uint32_t kRecScale = 1u, kRecPreserve = 2u;
// the loop kernel's records + the reduction scratch fit the default 48 KB of shared memory
static_assert(kMaxLoopEdits * sizeof(EditRecord) + 2 * kMaxReduce * kWarp * sizeof(float) <=
                  48 * 1024,
              "kMaxLoopEdits edit records must fit in shared memory");

__device__ __forceinline__ EditRecord make_record(int32_t code, const int32_t* m,
                                                  const AffineEdit& ed) {
  const int32_t kind = code_kind(code);
  EditRecord r;
  if (edit_scales_only(kind)) {
    r.vec_row = -1;
    r.flags = kRecScale;
    r.coef = ed.scale_h;
  } else if (kind == kFeature) {
    r.vec_row = m[kMetaW];
    r.flags = 0;
    r.coef = ed.coef_w;
  } else {
    r.vec_row = m[kMetaU];
    r.flags = 0;
    r.coef = ed.coef_u;
  }
  r.factor = 1.0f;
  return r;
}

// The affine part of an edit on one element (v = the bank value, unused for scale-only).
__device__ __forceinline__ float apply_affine(bool scale_only, float coef, float x, float v) {
  return scale_only ? __fmul_rn(coef, x) : __fadd_rn(x, __fmul_rn(coef, v));
}

// ----------------------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: every lane ends with the same bits (a + b == b + a in IEEE)
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum K values over the threads that share a row: a warp (WARP_ROWS) or the block. All
// threads get identical results (same summation order), so branches on them stay
// uniform. Block case: one __syncthreads, partials double-buffered by `parity` (reduction
// r + 2 reuses r's buffer only after every thread passed reduction r + 1's barrier).
template <bool WARP_ROWS, int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float (*red)[kMaxReduce][kWarp],
                                        int& parity) {
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = warp_sum(v[i]);
  if (WARP_ROWS) return;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n_warps = blockDim.x / kWarp;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) red[parity][i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float s = 0.0f;
    for (int w = 0; w < n_warps; ++w) s += red[parity][i][w];
    v[i] = s;
  }
  parity ^= 1;
}

// ----------------------------------------------------------------------------- chunk I/O

template <typename T>
struct Chunk {
  static constexpr int kVec = 16 / int(sizeof(T));
  union Raw {
    uint4 bits;
    T e[kVec];
  };
};

// Chunk of h / weight / bias (type T) starting at element `base` (< d), as float32.
// ALIGNED: the chunk is whole and 16-byte aligned. Else: element by element, zeros past d.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void load_chunk(const T* p, int64_t base, int64_t d,
                                           float (&v)[Chunk<T>::kVec]) {
  constexpr int V = Chunk<T>::kVec;
  if (ALIGNED) {
    typename Chunk<T>::Raw raw;
    raw.bits = *reinterpret_cast<const uint4*>(p + base);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_float(raw.e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = base + j < d ? to_float(p[base + j]) : 0.0f;
  }
}

template <typename T, bool ALIGNED>
__device__ __forceinline__ void store_chunk(T* p, int64_t base, int64_t d,
                                            const typename Chunk<T>::Raw& raw) {
  constexpr int V = Chunk<T>::kVec;
  if (ALIGNED) {
    *reinterpret_cast<uint4*>(p + base) = raw.bits;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (base + j < d) p[base + j] = raw.e[j];
  }
}

// The addend's prologue on one loaded chunk `v` of h: v <- round(v + addend) and that sum
// stored back into h (elements past d: v stays 0, nothing is stored).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void add_chunk(T* h, const T* add, int64_t base, int64_t d,
                                          float (&v)[Chunk<T>::kVec]) {
  constexpr int V = Chunk<T>::kVec;
  float av[V];
  load_chunk<T, ALIGNED>(add, base, d, av);
  typename Chunk<T>::Raw raw;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    raw.e[j] = from_float<T>(__fadd_rn(v[j], av[j]));
    v[j] = to_float(raw.e[j]);
  }
  store_chunk<T, ALIGNED>(h, base, d, raw);
}

// V float32 bank values at `base` (bank rows are read-only for the kernel's lifetime).
template <int V, bool ALIGNED>
__device__ __forceinline__ void load_bank_chunk(const float* p, int64_t base, int64_t d,
                                                float (&v)[V]) {
  if (ALIGNED) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p + base) + q);
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = base + j < d ? __ldg(p + base + j) : 0.0f;
  }
}

// ----------------------------------------------------------------------------- register kernel

// One row per warp (WARP_ROWS) or per block; the row lives in x[NV][V] (float32).
template <typename T, int NV, bool ALIGNED, bool WARP_ROWS>
__global__ void __launch_bounds__(WARP_ROWS ? kWarpRowsThreads : kMaxThreads)
    steer_norm_reg_kernel(const KernelArgs a) {
  constexpr int V = Chunk<T>::kVec;
  __shared__ float red[2][kMaxReduce][kWarp];
  static_assert(sizeof(red) == kReduceSmem, "launch_reg counts it");
  int parity = 0;

  int64_t row;
  int lane, group;
  if (WARP_ROWS) {
    row = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    lane = threadIdx.x % kWarp;
    group = kWarp;
    if (row >= a.n) return;  // the whole warp: no barrier is used in this mode
  } else {
    row = blockIdx.x;
    lane = threadIdx.x;
    group = blockDim.x;
  }
  const int64_t d = a.d;
  const int32_t slot = a.slot[row];
  const bool active = a.gate[row] != 0 && slot >= 0 && slot < a.s && a.e > 0;
  // uniform over the row's threads
  if (!active && a.norm_kind == kNormNone && a.addend == nullptr) return;

  T* h = static_cast<T*>(a.h) + row * a.h_stride;
  int64_t base[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) base[k] = int64_t(lane + k * group) * V;

  float x[NV][V];
  // The row JOINT edits read (layout.py: r_e), set where a JOINT edit follows: value j of
  // chunk k of this thread at xr_s[(k * V + j) * blockDim.x + threadIdx.x].
  extern __shared__ float xr_s[];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (base[k] < d) {
      load_chunk<T, ALIGNED>(h, base[k], d, x[k]);
      // the add prologue: each thread re-reads only its own chunks of h, no barrier
      if (a.addend != nullptr)
        add_chunk<T, ALIGNED>(h, static_cast<const T*>(a.addend) + row * a.addend_stride,
                              base[k], d, x[k]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[k][j] = 0.0f;
    }
  }

  if (active) {
    const int32_t* meta = a.meta + int64_t(slot) * a.e * kMetaWidth;
    const float* params = a.params + int64_t(slot) * a.e * kParamWidth;
    bool modified = false;      // x != the incoming row
    float sumsq_in = -1.0f;     // |h_in|^2, computed on first use by a cosine condition
    for (int64_t e = 0; e < a.e; ++e) {
      const int32_t* m = meta + e * kMetaWidth;
      const float* p = params + e * kParamWidth;
      const int32_t code = __ldg(m + kMetaCode);
      // The row this edit reads: xr_s for JOINT, else x as it is now (at e = 0 both are
      // h_in). Saved before the skips below: a skipped edit still starts a run.
      const bool joint = e > 0 && code_joint(code);
      if (!joint && e + 1 < a.e && code_joint(__ldg(m + kMetaWidth + kMetaCode))) {
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) xr_s[(k * V + j) * blockDim.x + threadIdx.x] = x[k][j];
      }
      const int32_t kind = code_kind(code);
      if (kind == kNone) continue;
      const int32_t cond = code_condition(code);
      if (cond != kCondNone) {
        // dot(h_in, c), |h_in|^2 (cosine, once), |c|^2 (cosine)
        const float* c = a.bank + int64_t(__ldg(m + kMetaC)) * d;
        const bool cosine = cond == kCondCosine;
        const bool need_in = cosine && sumsq_in < 0.0f;
        float acc[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          if (base[k] >= d) continue;
          float xin[V], cv[V];
          if (modified) {
            load_chunk<T, ALIGNED>(h, base[k], d, xin);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) xin[j] = x[k][j];
          }
          load_bank_chunk<V, ALIGNED>(c, base[k], d, cv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc[0] += xin[j] * cv[j];
            acc[1] += xin[j] * xin[j];
            acc[2] += cv[j] * cv[j];
          }
        }
        if (!cosine) acc[1] = acc[2] = 0.0f;
        row_sum<WARP_ROWS, 3>(acc, red, parity);
        if (need_in) sumsq_in = acc[1];
        const float norms = cosine ? sqrtf(sumsq_in) * sqrtf(acc[2]) : 0.0f;
        if (!condition_holds(cond, acc[0], norms, __ldg(p + kParamCondThresh),
                             __ldg(p + kParamCondBias)))
          continue;
      }

      const bool reads_u = edit_reads_u(kind);
      const bool need_dot = edit_needs_dot_u(kind);
      const bool preserve = code_preserve_norm(code);
      const float* u = reads_u ? a.bank + int64_t(__ldg(m + kMetaU)) * d : nullptr;
      float dot_u = 0.0f, before = 0.0f;
      if (need_dot || preserve) {
        float acc[2] = {0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          if (base[k] >= d) continue;
          float uv[V], rv[V];  // u, the row the dot reads
          if (need_dot) {
            load_bank_chunk<V, ALIGNED>(u, base[k], d, uv);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) uv[j] = 0.0f;
          }
#pragma unroll
          for (int j = 0; j < V; ++j)
            rv[j] = joint ? xr_s[(k * V + j) * blockDim.x + threadIdx.x] : x[k][j];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc[0] += rv[j] * uv[j];
            acc[1] += x[k][j] * x[k][j];  // |before|: the current row
          }
        }
        row_sum<WARP_ROWS, 2>(acc, red, parity);
        dot_u = acc[0];
        before = acc[1];
      }
      float pv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[i] = __ldg(p + i);
      const AffineEdit ed = edit_coefficients(code, dot_u, pv);
      const EditRecord r = make_record(code, m, ed);
      const bool scale_only = (r.flags & kRecScale) != 0;
      const float* vec = scale_only ? nullptr : a.bank + int64_t(r.vec_row) * d;
      float after = 0.0f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (base[k] >= d) continue;
        float vv[V];
        if (!scale_only) {
          load_bank_chunk<V, ALIGNED>(vec, base[k], d, vv);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) vv[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          // elements past d stay 0 (their bank values load as 0)
          x[k][j] = apply_affine(scale_only, r.coef, x[k][j], vv[j]);
          after += x[k][j] * x[k][j];
        }
      }
      if (preserve) {
        float acc[1] = {after};
        row_sum<WARP_ROWS, 1>(acc, red, parity);
        const float f = preserve_norm_factor(before, acc[0]);
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) x[k][j] = __fmul_rn(x[k][j], f);
      }
      modified = true;
    }

    if (modified) {
      // store the row rounded to T; the norm reads what the model will see
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (base[k] >= d) continue;
        typename Chunk<T>::Raw raw;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          raw.e[j] = from_float<T>(x[k][j]);
          x[k][j] = base[k] + j < d ? to_float(raw.e[j]) : 0.0f;
        }
        store_chunk<T, ALIGNED>(h, base[k], d, raw);
      }
    }
  }

  if (a.norm_kind == kNormNone) return;
  T* out = static_cast<T*>(a.out) + row * a.out_stride;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const bool has_w = weight != nullptr;

  if (a.norm_kind == kNormRms) {
    float acc[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[0] += x[k][j] * x[k][j];  // zeros past d
    row_sum<WARP_ROWS, 1>(acc, red, parity);
    const float inv = rms_inv(acc[0], d, a.eps);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (base[k] >= d) continue;
      float wv[V];
      if (has_w) {
        load_chunk<T, ALIGNED>(weight, base[k], d, wv);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) wv[j] = 0.0f;
      }
      typename Chunk<T>::Raw raw;
#pragma unroll
      for (int j = 0; j < V; ++j)
        raw.e[j] = rms_out<T>(x[k][j], inv, has_w, wv[j], a.weight_offset, a.cast_before_weight);
      store_chunk<T, ALIGNED>(out, base[k], d, raw);
    }
  } else {
    float acc[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[0] += x[k][j];
    row_sum<WARP_ROWS, 1>(acc, red, parity);
    const float mean = acc[0] / float(d);
    acc[0] = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float c = x[k][j] - mean;
        if (base[k] + j < d) acc[0] += c * c;
      }
    row_sum<WARP_ROWS, 1>(acc, red, parity);
    const float rstd = 1.0f / sqrtf(acc[0] / float(d) + a.eps);
    const bool has_b = bias != nullptr;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (base[k] >= d) continue;
      float wv[V], bv[V];
      if (has_w) {
        load_chunk<T, ALIGNED>(weight, base[k], d, wv);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) wv[j] = 0.0f;
      }
      if (has_b) {
        load_chunk<T, ALIGNED>(bias, base[k], d, bv);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) bv[j] = 0.0f;
      }
      typename Chunk<T>::Raw raw;
#pragma unroll
      for (int j = 0; j < V; ++j)
        raw.e[j] = layer_out<T>(x[k][j], mean, rstd, has_w, wv[j], has_b, bv[j]);
      store_chunk<T, ALIGNED>(out, base[k], d, raw);
    }
  }
}

// ----------------------------------------------------------------------------- loop kernel

// Any D: one block per row, element i handled by thread i % blockDim (coalesced). The
// edited row is never materialised: every pass rebuilds x[i] from h_in[i] by replaying
// the applied edits (records in dynamic shared memory), with the register kernel's exact
// operations, so the results are the same; h is written once, at the end (with an addend,
// also once at the start: the sum, the row every replay starts from).
template <typename T>
__device__ __forceinline__ float replay(const T* h, const float* bank, int64_t d, int64_t i,
                                        const EditRecord* recs, int count) {
  float x = to_float(h[i]);
  for (int r = 0; r < count; ++r) {
    const EditRecord rec = recs[r];
    const bool scale_only = (rec.flags & kRecScale) != 0;
    const float v = scale_only ? 0.0f : __ldg(bank + int64_t(rec.vec_row) * d + i);
    x = apply_affine(scale_only, rec.coef, x, v);
    if (rec.flags & kRecPreserve) x = __fmul_rn(x, rec.factor);
  }
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) steer_norm_loop_kernel(const KernelArgs a) {
  extern __shared__ EditRecord recs[];  // a.e entries
  __shared__ float red[2][kMaxReduce][kWarp];
  int parity = 0;
  const int64_t row = blockIdx.x;
  const int64_t d = a.d;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int32_t slot = a.slot[row];
  const bool active = a.gate[row] != 0 && slot >= 0 && slot < a.s && a.e > 0;
  if (!active && a.norm_kind == kNormNone && a.addend == nullptr) return;
  T* h = static_cast<T*>(a.h) + row * a.h_stride;
  if (a.addend != nullptr) {
    // the add prologue: h <- round(h + addend), the incoming row every pass below replays
    // from (each thread re-reads only the elements it writes here: no barrier needed)
    const T* add = static_cast<const T*>(a.addend) + row * a.addend_stride;
    for (int64_t i = tid; i < d; i += nt)
      h[i] = from_float<T>(__fadd_rn(to_float(h[i]), to_float(add[i])));
  }
  int count = 0;       // applied edits so far
  int read_count = 0;  // applied edits in the row JOINT edits read (layout.py: r_e)

  if (active) {
    const int32_t* meta = a.meta + int64_t(slot) * a.e * kMetaWidth;
    const float* params = a.params + int64_t(slot) * a.e * kParamWidth;
    float sumsq_in = -1.0f;
    for (int64_t e = 0; e < a.e; ++e) {
      const int32_t* m = meta + e * kMetaWidth;
      const float* p = params + e * kParamWidth;
      const int32_t code = __ldg(m + kMetaCode);
      // a non-JOINT edit reads x as it is now (even when skipped below); JOINT keeps r_{e-1}
      const bool joint = code_joint(code);
      if (!joint) read_count = count;
      const int32_t kind = code_kind(code);
      if (kind == kNone) continue;
      const int32_t cond = code_condition(code);
      if (cond != kCondNone) {
        const float* c = a.bank + int64_t(__ldg(m + kMetaC)) * d;
        const bool cosine = cond == kCondCosine;
        const bool need_in = cosine && sumsq_in < 0.0f;
        float acc[3] = {0.0f, 0.0f, 0.0f};
        for (int64_t i = tid; i < d; i += nt) {
          const float xin = to_float(h[i]);  // h is unmodified until the end
          const float cv = __ldg(c + i);
          acc[0] += xin * cv;
          acc[1] += xin * xin;
          acc[2] += cv * cv;
        }
        if (!cosine) acc[1] = acc[2] = 0.0f;
        row_sum<false, 3>(acc, red, parity);
        if (need_in) sumsq_in = acc[1];
        const float norms = cosine ? sqrtf(sumsq_in) * sqrtf(acc[2]) : 0.0f;
        if (!condition_holds(cond, acc[0], norms, __ldg(p + kParamCondThresh),
                             __ldg(p + kParamCondBias)))
          continue;
      }
      const bool reads_u = edit_reads_u(kind);
      const bool need_dot = edit_needs_dot_u(kind);
      const bool preserve = code_preserve_norm(code);
      const float* u = reads_u ? a.bank + int64_t(__ldg(m + kMetaU)) * d : nullptr;
      float dot_u = 0.0f, before = 0.0f;
      if (need_dot || preserve) {
        // the dot reads r_e (read_count records for JOINT), |before| the current row
        const int dot_count = joint ? read_count : count;
        float acc[2] = {0.0f, 0.0f};
        for (int64_t i = tid; i < d; i += nt) {
          const float rv = replay(h, a.bank, d, i, recs, dot_count);
          if (need_dot) acc[0] += rv * __ldg(u + i);
          if (preserve) {
            const float xv = dot_count == count ? rv : replay(h, a.bank, d, i, recs, count);
            acc[1] += xv * xv;
          }
        }
        row_sum<false, 2>(acc, red, parity);
        dot_u = acc[0];
        before = acc[1];
      }
      float pv[4];
      for (int i = 0; i < 4; ++i) pv[i] = __ldg(p + i);
      const AffineEdit ed = edit_coefficients(code, dot_u, pv);
      if (tid == 0) recs[count] = make_record(code, m, ed);  // no preserve flag yet
      __syncthreads();
      if (preserve) {
        float acc[1] = {0.0f};
        for (int64_t i = tid; i < d; i += nt) {
          const float xv = replay(h, a.bank, d, i, recs, count + 1);
          acc[0] += xv * xv;
        }
        row_sum<false, 1>(acc, red, parity);  // its barrier: every thread is done reading recs
        if (tid == 0) {
          recs[count].factor = preserve_norm_factor(before, acc[0]);
          recs[count].flags |= kRecPreserve;
        }
        __syncthreads();
      }
      ++count;
    }
    if (count > 0) {
      // each thread later re-reads only the elements it writes here: no barrier needed
      for (int64_t i = tid; i < d; i += nt)
        h[i] = from_float<T>(replay(h, a.bank, d, i, recs, count));
    }
  }

  if (a.norm_kind == kNormNone) return;
  T* out = static_cast<T*>(a.out) + row * a.out_stride;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const bool has_w = weight != nullptr;
  if (a.norm_kind == kNormRms) {
    float acc[1] = {0.0f};
    for (int64_t i = tid; i < d; i += nt) {
      const float xv = to_float(h[i]);
      acc[0] += xv * xv;
    }
    row_sum<false, 1>(acc, red, parity);
    const float inv = rms_inv(acc[0], d, a.eps);
    for (int64_t i = tid; i < d; i += nt)
      out[i] = rms_out<T>(to_float(h[i]), inv, has_w, has_w ? to_float(weight[i]) : 0.0f,
                          a.weight_offset, a.cast_before_weight);
  } else {
    float acc[1] = {0.0f};
    for (int64_t i = tid; i < d; i += nt) acc[0] += to_float(h[i]);
    row_sum<false, 1>(acc, red, parity);
    const float mean = acc[0] / float(d);
    acc[0] = 0.0f;
    for (int64_t i = tid; i < d; i += nt) {
      const float c = to_float(h[i]) - mean;
      acc[0] += c * c;
    }
    row_sum<false, 1>(acc, red, parity);
    const float rstd = 1.0f / sqrtf(acc[0] / float(d) + a.eps);
    const bool has_b = bias != nullptr;
    for (int64_t i = tid; i < d; i += nt)
      out[i] = layer_out<T>(to_float(h[i]), mean, rstd, has_w, has_w ? to_float(weight[i]) : 0.0f,
                            has_b, has_b ? to_float(bias[i]) : 0.0f);
  }
}

// ----------------------------------------------------------------------------- launch

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Let `kernel` take `bytes` of dynamic shared memory on the current device: once per
// device (the attribute is per device; setting it may wait for copies in flight, so not
// on every launch). Devices past 63: on every launch.
template <typename Kernel>
cudaError_t opt_in_dynamic_smem(Kernel* kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

template <typename T, int NV, bool ALIGNED, bool WARP_ROWS>
cudaError_t launch_reg(const KernelArgs& a, cudaStream_t stream) {
  int64_t threads, blocks;
  if (WARP_ROWS) {
    const int64_t rows_per_block = a.n < kWarpRowsPerBlock ? a.n : kWarpRowsPerBlock;
    threads = rows_per_block * kWarp;
    blocks = (a.n + rows_per_block - 1) / rows_per_block;
  } else {
    const int64_t chunks = (a.d + Chunk<T>::kVec - 1) / Chunk<T>::kVec;
    threads = round_up((chunks + NV - 1) / NV, kWarp);
    blocks = a.n;
  }
  // the JOINT read row (with `red`, beyond the default 48 KB the kernel must opt in)
  const size_t smem = size_t(threads) * NV * Chunk<T>::kVec * sizeof(float);
  if (smem + kReduceSmem > kDefaultSmem) {
    static std::atomic<uint64_t> opted_in{0};  // bit i: done on device i
    const cudaError_t err =
        opt_in_dynamic_smem(steer_norm_reg_kernel<T, NV, ALIGNED, WARP_ROWS>,
                            size_t(kMaxThreads) * NV * Chunk<T>::kVec * sizeof(float), opted_in);
    if (err != cudaSuccess) return err;
  }
  steer_norm_reg_kernel<T, NV, ALIGNED, WARP_ROWS>
      <<<unsigned(blocks), unsigned(threads), smem, stream>>>(a);
  return cudaGetLastError();
}

// Rows of at most 32 chunks take a warp each. Wider rows take a block, with the smallest
// NV that keeps it at kPreferredThreads, else at 1024 threads (NV up to 16 floats of row
// per thread). Wider still: the loop kernel.
template <typename T, bool ALIGNED>
cudaError_t launch_typed(const KernelArgs& a, cudaStream_t stream) {
  constexpr int V = Chunk<T>::kVec;
  const int64_t chunks = (a.d + V - 1) / V;
  if (chunks <= kWarp) return launch_reg<T, 1, ALIGNED, true>(a, stream);
  for (const int64_t limit : {int64_t(kPreferredThreads), int64_t(kMaxThreads)}) {
    if (round_up(chunks, kWarp) <= limit) return launch_reg<T, 1, ALIGNED, false>(a, stream);
    if (round_up((chunks + 1) / 2, kWarp) <= limit)
      return launch_reg<T, 2, ALIGNED, false>(a, stream);
    if constexpr (V == 4) {  // float32: 4 chunks of 4
      if (round_up((chunks + 3) / 4, kWarp) <= limit)
        return launch_reg<T, 4, ALIGNED, false>(a, stream);
    }
  }
  if (a.e > kMaxLoopEdits) return cudaErrorInvalidValue;  // records must fit in shared memory
  const size_t smem = size_t(a.e) * sizeof(EditRecord);
  steer_norm_loop_kernel<T><<<unsigned(a.n), kMaxThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const KernelArgs& a, cudaStream_t stream) {
  constexpr int V = Chunk<T>::kVec;
  const bool aligned = a.d % V == 0 && a.h_stride % V == 0 && aligned16(a.h) &&
                       (a.out == nullptr || (a.out_stride % V == 0 && aligned16(a.out))) &&
                       (a.addend == nullptr ||
                        (a.addend_stride % V == 0 && aligned16(a.addend))) &&
                       (a.weight == nullptr || aligned16(a.weight)) &&
                       (a.bias == nullptr || aligned16(a.bias)) &&
                       (a.bank == nullptr || aligned16(a.bank));
  return aligned ? launch_typed<T, true>(a, stream) : launch_typed<T, false>(a, stream);
}

}  // namespace

int launch_steer_norm(void* h, void* out, int64_t n, int64_t d, int64_t h_stride,
                      int64_t out_stride, int32_t dtype, const int32_t* slot, const uint8_t* gate,
                      const int32_t* meta, const float* params, const float* bank, int64_t s,
                      int64_t e, int64_t v, const void* weight, const void* bias,
                      int32_t norm_kind, float eps, float weight_offset, bool cast_before_weight,
                      const void* addend, int64_t addend_stride, uintptr_t stream) {
  (void)v;  // bank rows: validated on the Python side
  if (norm_kind != kNormNone && norm_kind != kNormRms && norm_kind != kNormLayer)
    return int(cudaErrorInvalidValue);
  if (norm_kind != kNormNone && out == nullptr) return int(cudaErrorInvalidValue);
  if (n < 0 || d < 0 || n > int64_t(INT32_MAX)) return int(cudaErrorInvalidValue);
  if (n == 0 || d == 0) return int(cudaSuccess);
  if (s <= 0 || e <= 0) {  // no tables: every row untouched, tables never read
    s = e = 0;
    meta = nullptr;
    params = nullptr;
    bank = nullptr;
  }
  KernelArgs a{h, norm_kind == kNormNone ? nullptr : out, slot, gate, meta, params, bank,
               norm_kind == kNormNone ? nullptr : weight,
               norm_kind == kNormLayer ? bias : nullptr,
               n, d, h_stride, out_stride, s, e, norm_kind, eps, weight_offset,
               cast_before_weight, addend, addend == nullptr ? 0 : addend_stride};
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return int(launch_dtype<float>(a, st));
    case kBFloat16: return int(launch_dtype<bf16_t>(a, st));
    case kFloat16: return int(launch_dtype<f16_t>(a, st));
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace fasteer
