// Slot-table layout of the fused steer+norm op. Mirrors fasteer/ops/layout.py, which
// documents the math; tests/test_cpu_layout.py checks the two agree.
#pragma once
#include <cstdint>

namespace fasteer {

enum EditKind : int32_t {
  kNone = 0,
  kAdd = 1,
  kClamp = 2,
  kAblate = 3,
  kScale = 4,
  kFeature = 5,
  kDynScale = 6,  // h <- (p0 + p1 * h.u) * h (DynScalar)
  kLastKind = kDynScale
};
enum FeatureOp : int32_t { kFeatAdd = 0, kFeatSet = 1, kFeatScale = 2, kFeatClamp = 3 };
enum Activation : int32_t { kActRelu = 0, kActJumpRelu = 1, kActLinear = 2 };
enum Condition : int32_t { kCondNone = 0, kCondCosine = 1, kCondProj = 2 };
enum NormKind : int32_t { kNormNone = 0, kNormRms = 1, kNormLayer = 2 };

constexpr int32_t kPreserveNorm = 1 << 24;
constexpr int32_t kJoint = 1 << 25;  // FEATURE only: reads the row the previous edit read
constexpr int kMetaWidth = 4;   // code, u, w, c
constexpr int kParamWidth = 8;  // p0..p3, cond threshold, cond bias, spare, spare
constexpr int kMetaCode = 0, kMetaU = 1, kMetaW = 2, kMetaC = 3;
constexpr int kParamA = 0, kParamB = 1, kParamC = 2, kParamD = 3, kParamCondThresh = 4,
              kParamCondBias = 5;

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline constexpr int32_t code_kind(int32_t code) { return code & 0xFF; }
inline constexpr int32_t code_feature_op(int32_t code) { return (code >> 8) & 0xF; }
inline constexpr int32_t code_activation(int32_t code) { return (code >> 12) & 0xF; }
inline constexpr int32_t code_condition(int32_t code) { return (code >> 16) & 0xF; }
inline constexpr bool code_preserve_norm(int32_t code) { return (code & kPreserveNorm) != 0; }
inline constexpr bool code_joint(int32_t code) { return (code & kJoint) != 0; }

}  // namespace fasteer
