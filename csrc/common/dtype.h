// Conversions between float32 and the 16-bit storage types, bit-exact with PyTorch
// (round to nearest even; NaN stays NaN). Host and device share these so the CPU tests
// exercise the formulas the CUDA kernels use. The host build uses the compiler's
// _Float16 for half (F16C instructions where the target has them).
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace fasteer {

FASTEER_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FASTEER_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FASTEER_HD float to_float(float x) { return x; }
FASTEER_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

FASTEER_HD bf16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

#if !defined(__CUDACC__) && defined(__FLT16_MANT_DIG__)
#define FASTEER_HOST_FLOAT16 1
#endif

FASTEER_HD float to_float(f16_t x) {
#if defined(FASTEER_HOST_FLOAT16)
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return float(h);
#else
  // IEEE binary16 -> binary32, exact.
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

FASTEER_HD f16_t float_to_f16(float f) {
#if defined(FASTEER_HOST_FLOAT16)
  _Float16 h = static_cast<_Float16>(f);
  f16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
#else
  // binary32 -> binary16, round to nearest even (same as __float2half_rn).
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};           // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};          // overflow -> inf
  if (a < 0x38800000u) {                                                 // subnormal or zero
    // value / 2^-24 rounded to nearest even, via float arithmetic (exact here)
    const float v = bits_to_float(a) * 16777216.0f;                      // * 2^24
    uint32_t m = uint32_t(v);
    const float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return f16_t{uint16_t(sign | m)};
  }
  uint32_t r = a - 0x38000000u;                                          // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return f16_t{uint16_t(sign | (r >> 13))};
#endif
}

template <typename T> FASTEER_HD T from_float(float f);
template <> FASTEER_HD float from_float<float>(float f) { return f; }
template <> FASTEER_HD bf16_t from_float<bf16_t>(float f) { return float_to_bf16(f); }
template <> FASTEER_HD f16_t from_float<f16_t>(float f) { return float_to_f16(f); }

// x rounded to the storage type T and back: what the model sees after a store.
template <typename T> FASTEER_HD float round_to(float f) { return to_float(from_float<T>(f)); }

}  // namespace fasteer
