// Python bindings of fasteer._cuda. Compiled by the host compiler: only launch.h, no
// CUDA headers. Importing this module does not initialise CUDA; the first launch does.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"

namespace py = pybind11;

#ifndef FASTEER_CUDA_ARCHS
#define FASTEER_CUDA_ARCHS ""
#endif

namespace {

void check(int err, const char* what) {
  if (err != 0) {
    throw std::runtime_error(std::string(what) + " failed: " + fasteer::cuda::error_string(err));
  }
}

std::vector<std::string> archs() {
  std::vector<std::string> out;
  std::stringstream ss(FASTEER_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fasteer CUDA kernels (raw pointers and streams; see fasteer/ops/cuda)";
  m.def("archs", &archs, "SM architectures this module was compiled for, e.g. ['80', '90'].");
  m.def("device_count", [] {
    int n = 0;
    check(fasteer::cuda::device_count(&n), "cudaGetDeviceCount");
    return n;
  });
  m.def(
      "add_rows",
      [](uintptr_t h, int64_t n, int64_t d, int64_t h_stride, int32_t dtype, uintptr_t v,
         double alpha, uintptr_t stream) {
        check(fasteer::cuda::launch_add_rows(reinterpret_cast<void*>(h), n, d, h_stride, dtype,
                                             reinterpret_cast<const float*>(v), float(alpha),
                                             stream),
              "add_rows launch");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "steer_norm",
      [](uintptr_t h, uintptr_t out, int64_t n, int64_t d, int64_t h_stride, int64_t out_stride,
         int32_t dtype, uintptr_t slot, uintptr_t gate, uintptr_t meta, uintptr_t params,
         uintptr_t bank, int64_t s, int64_t e, int64_t v, uintptr_t weight, uintptr_t bias,
         int32_t norm_kind, double eps, double weight_offset, bool cast_before_weight,
         uintptr_t addend, int64_t addend_stride, uintptr_t stream) {
        check(fasteer::cuda::launch_steer_norm(
                  reinterpret_cast<void*>(h), reinterpret_cast<void*>(out), n, d, h_stride,
                  out_stride, dtype, reinterpret_cast<const int32_t*>(slot),
                  reinterpret_cast<const uint8_t*>(gate), reinterpret_cast<const int32_t*>(meta),
                  reinterpret_cast<const float*>(params), reinterpret_cast<const float*>(bank), s,
                  e, v, reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias),
                  norm_kind, float(eps), float(weight_offset), cast_before_weight,
                  reinterpret_cast<const void*>(addend), addend_stride, stream),
              "steer_norm launch");
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused steer+norm over n rows on `stream` (a cudaStream_t as an integer). Arguments as "
      "fasteer._C.steer_norm (a nonzero `addend` is added to h first), with the stream in "
      "place of num_threads.");
  m.def("limits", [] {
    return std::map<std::string, int64_t>{{"max_register_row", fasteer::cuda::kMaxRegisterRow},
                                          {"max_loop_edits", fasteer::cuda::kMaxLoopEdits}};
  }, "Sizes past which the steer_norm kernel changes strategy or refuses (see launch.h).");
}
