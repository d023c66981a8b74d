// Per-element norm outputs, written as Hugging Face's modules compute them, so that a
// fused carrier reproduces the model's own numerics (see fasteer/ops/layout.py).
#pragma once
#include <cmath>

#include "dtype.h"
#include "macros.h"

namespace fasteer {

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.
FASTEER_HD float rms_inv(float sumsq, int64_t d, float eps) {
  return 1.0f / sqrtf(sumsq / float(d) + eps);
}

// RMSNorm output element. cast_before_weight (Llama, Qwen, Mistral): the normalised value
// is rounded to the model dtype before the weight multiplies it; otherwise (Gemma,
// OLMo-2) the product is formed in float32 and rounded once.
template <typename T>
FASTEER_HD T rms_out(float x, float inv, bool has_weight, float w, float offset,
                     bool cast_before_weight) {
  float r = x * inv;
  if (!has_weight) return from_float<T>(r);
  if (cast_before_weight) r = round_to<T>(r);
  return from_float<T>(r * (w + offset));
}

// LayerNorm output element: (x - mean) * rstd * w + b, in float32, rounded once.
template <typename T>
FASTEER_HD T layer_out(float x, float mean, float rstd, bool has_weight, float w, bool has_bias,
                       float b) {
  float y = (x - mean) * rstd;
  if (has_weight) y = y * w;
  if (has_bias) y = y + b;
  return from_float<T>(y);
}

}  // namespace fasteer
