// Per-row edit formulas of the steer+norm op (fasteer/ops/layout.py has the table).
// Every backend written in C++ (cpu, cuda) calls these; the reductions that feed them
// (dot products, norms) are the backend's own business.
#pragma once
#include <cmath>

#include "layout.h"
#include "macros.h"

namespace fasteer {

// SAE activation of a pre-activation (ReLU, JumpReLU with threshold theta, linear).
FASTEER_HD float feature_activation(int32_t act, float pre, float theta) {
  if (act == kActJumpRelu) return pre > theta ? pre : 0.0f;
  if (act == kActRelu) return pre > 0.0f ? pre : 0.0f;
  return pre;
}

// The latent after the edit op: add value, set value, scale by value, clamp to [value, hi].
FASTEER_HD float feature_edit(int32_t op, float z, float value, float hi) {
  switch (op) {
    case kFeatAdd: return z + value;
    case kFeatSet: return value;
    case kFeatScale: return z * value;
    default: return fminf(fmaxf(z, value), hi);
  }
}

// Does an edit's condition hold for the incoming row? dot = h_in . c,
// norms = |h_in| * |c| (only for cosine).
FASTEER_HD bool condition_holds(int32_t cond, float dot, float norms, float thresh, float bias) {
  if (cond == kCondCosine) return (norms > 0.0f ? dot / norms : 0.0f) >= thresh;
  if (cond == kCondProj) return dot + bias >= thresh;
  return true;
}

// a + b * c with two roundings, as the CPU build (-ffp-contract=off) and PyTorch's reference
// compute it: nvcc would otherwise contract it into an FMA.
FASTEER_HD float add_mul_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, __fmul_rn(b, c));
#else
  return a + b * c;
#endif
}

// The edit as h <- scale_h * h + coef_u * u + coef_w * w, given the row's dot with u.
// Keeping the edit in this affine form lets a backend apply it in one pass over the row.
struct AffineEdit {
  float scale_h, coef_u, coef_w;
};

FASTEER_HD AffineEdit edit_coefficients(int32_t code, float dot_u, const float* p) {
  const int32_t kind = code_kind(code);
  switch (kind) {
    case kAdd: return {1.0f, p[kParamA], 0.0f};
    case kClamp: return {1.0f, p[kParamA] - dot_u, 0.0f};
    case kAblate: return {1.0f, -dot_u, 0.0f};
    case kScale: return {p[kParamA], 0.0f, 0.0f};
    case kDynScale: return {add_mul_rn(p[kParamA], p[kParamB], dot_u), 0.0f, 0.0f};
    case kFeature: {
      const float z = feature_activation(code_activation(code), dot_u + p[kParamA], p[kParamB]);
      const float z_new = feature_edit(code_feature_op(code), z, p[kParamC], p[kParamD]);
      return {1.0f, 0.0f, z_new - z};
    }
    default: return {1.0f, 0.0f, 0.0f};
  }
}

FASTEER_HD bool edit_reads_u(int32_t kind) {
  return kind == kAdd || kind == kClamp || kind == kAblate || kind == kFeature ||
         kind == kDynScale;
}
FASTEER_HD bool edit_needs_dot_u(int32_t kind) {
  return kind == kClamp || kind == kAblate || kind == kFeature || kind == kDynScale;
}
// Does the edit only scale the row (h <- scale_h * h, no vector added)?
FASTEER_HD bool edit_scales_only(int32_t kind) { return kind == kScale || kind == kDynScale; }

// Rescale factor for PRESERVE_NORM: |before| / |after| (1 when |after| is 0).
FASTEER_HD float preserve_norm_factor(float sumsq_before, float sumsq_after) {
  return sumsq_after > 0.0f ? sqrtf(sumsq_before) / sqrtf(sumsq_after) : 1.0f;
}

}  // namespace fasteer
