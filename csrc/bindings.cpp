// Python bindings of fasteer._C (CPU kernels). Pointers arrive as integers from
// `tensor.data_ptr()`: the module never sees a torch type, so it does not link torch
// and one build serves any torch version. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common/layout.h"
#include "cpu/steer_norm.h"

namespace py = pybind11;
using namespace fasteer;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

std::string build_info() {
  std::string s = "C++";
#if defined(__clang__)
  s += " clang " __clang_version__;
#elif defined(__GNUC__)
  s += " gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#endif
#if defined(FASTEER_CPU_ARCH_NAME)
  s += std::string(", built for -march=") + FASTEER_CPU_ARCH_NAME;
#endif
  s += std::string(", runs the ") + isa_name(active_isa()) + " path";
#if defined(FASTEER_HOST_FLOAT16)
  s += ", _Float16";
#endif
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fasteer CPU kernels (raw pointers; see fasteer/ops/cpu)";
  m.def(
      "steer_norm",
      [](uintptr_t h, uintptr_t out, int64_t n, int64_t d, int64_t h_stride, int64_t out_stride,
         int32_t dtype, uintptr_t slot, uintptr_t gate, uintptr_t meta, uintptr_t params,
         uintptr_t bank, int64_t s, int64_t e, int64_t v, uintptr_t weight, uintptr_t bias,
         int32_t norm_kind, double eps, double weight_offset, bool cast_before_weight,
         uintptr_t addend, int64_t addend_stride, int num_threads) {
        SteerNormArgs a{ptr<void>(h), ptr<void>(out), n, d, h_stride, out_stride, dtype,
                        ptr<const int32_t>(slot), ptr<const uint8_t>(gate),
                        ptr<const int32_t>(meta), ptr<const float>(params),
                        ptr<const float>(bank), s, e, v, ptr<const void>(weight),
                        ptr<const void>(bias), norm_kind, float(eps), float(weight_offset),
                        cast_before_weight, num_threads, ptr<const void>(addend),
                        addend_stride};
        steer_norm_cpu(a);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused steer+norm over n rows (see fasteer/ops/layout.py for the tables). A nonzero "
      "`addend` (rows of h's dtype, row stride `addend_stride`) is added to h first, every "
      "row (fasteer.ops.add_steer_norm_).");
  m.def("build_info", &build_info);
  m.def("isa", [] { return std::string(isa_name(active_isa())); },
        "The ISA path the CPU kernels run: baseline, avx2 or avx512 (FASTEER_CPU_ISA caps it).");
  m.def("layout_constants", [] {
    return std::map<std::string, int64_t>{
        {"NONE", kNone}, {"ADD", kAdd}, {"CLAMP", kClamp}, {"ABLATE", kAblate},
        {"SCALE", kScale}, {"FEATURE", kFeature}, {"DYN_SCALE", kDynScale}, {"FEAT_ADD", kFeatAdd},
        {"FEAT_SET", kFeatSet}, {"FEAT_SCALE", kFeatScale}, {"FEAT_CLAMP", kFeatClamp},
        {"ACT_RELU", kActRelu}, {"ACT_JUMPRELU", kActJumpRelu}, {"ACT_LINEAR", kActLinear},
        {"COND_NONE", kCondNone}, {"COND_COSINE", kCondCosine}, {"COND_PROJ", kCondProj},
        {"PRESERVE_NORM", kPreserveNorm}, {"JOINT", kJoint}, {"NORM_NONE", kNormNone},
        {"NORM_RMS", kNormRms}, {"NORM_LAYER", kNormLayer}, {"META_WIDTH", kMetaWidth},
        {"PARAM_WIDTH", kParamWidth}};
  });
}
