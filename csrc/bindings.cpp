// pybind11 bindings for vlfast._C (no torch headers: tensors arrive as raw
// addresses + dtype codes, see vlfast/_native.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ema.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

#ifndef VLFAST_COMPILER
#define VLFAST_COMPILER "unknown"
#endif
#ifndef VLFAST_CXX_FLAGS
#define VLFAST_CXX_FLAGS ""
#endif
#ifndef VLFAST_BUILD_TYPE
#define VLFAST_BUILD_TYPE ""
#endif

namespace {

struct Lists {
  std::vector<void*> ema;
  std::vector<const void*> param;
};

// Validates the argument lists; throws std::invalid_argument (-> ValueError).
Lists validate(const char* fn, const std::vector<std::uintptr_t>& ema_addrs,
               const std::vector<int>& ema_dtypes, const std::vector<std::uintptr_t>& param_addrs,
               const std::vector<int>& param_dtypes, const std::vector<int64_t>& numels) {
  const size_t n = ema_addrs.size();
  if (ema_dtypes.size() != n || param_addrs.size() != n || param_dtypes.size() != n ||
      numels.size() != n) {
    throw std::invalid_argument(
        std::string(fn) + ": list lengths differ (ema_addrs=" + std::to_string(n) +
        ", ema_dtypes=" + std::to_string(ema_dtypes.size()) +
        ", param_addrs=" + std::to_string(param_addrs.size()) +
        ", param_dtypes=" + std::to_string(param_dtypes.size()) +
        ", numels=" + std::to_string(numels.size()) + ")");
  }
  Lists out;
  out.ema.resize(n);
  out.param.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (!vlfast::valid_dtype(ema_dtypes[i]) || !vlfast::valid_dtype(param_dtypes[i])) {
      throw std::invalid_argument(std::string(fn) + ": invalid dtype code at index " +
                                  std::to_string(i) + " (ema=" + std::to_string(ema_dtypes[i]) +
                                  ", param=" + std::to_string(param_dtypes[i]) +
                                  "); expected 0=float32, 1=float16, 2=bfloat16, 3=float64");
    }
    if (numels[i] < 0) {
      throw std::invalid_argument(std::string(fn) + ": negative numel at index " +
                                  std::to_string(i));
    }
    if (numels[i] > 0 && (ema_addrs[i] == 0 || param_addrs[i] == 0)) {
      throw std::invalid_argument(std::string(fn) + ": null address at index " +
                                  std::to_string(i));
    }
    out.ema[i] = reinterpret_cast<void*>(ema_addrs[i]);
    out.param[i] = reinterpret_cast<const void*>(param_addrs[i]);
  }
  return out;
}

void ema_update_cpu(const std::vector<std::uintptr_t>& ema_addrs, const std::vector<int>& ema_dtypes,
                    const std::vector<std::uintptr_t>& param_addrs,
                    const std::vector<int>& param_dtypes, const std::vector<int64_t>& numels,
                    double decay) {
  Lists l = validate("ema_update_cpu", ema_addrs, ema_dtypes, param_addrs, param_dtypes, numels);
  vlfast_ema_update_cpu(l.ema.data(), ema_dtypes.data(), l.param.data(), param_dtypes.data(),
                        numels.data(), static_cast<int64_t>(numels.size()), decay);
}

#if defined(VLFAST_WITH_CUDA)
void ema_update_cuda(const std::vector<std::uintptr_t>& ema_addrs,
                     const std::vector<int>& ema_dtypes,
                     const std::vector<std::uintptr_t>& param_addrs,
                     const std::vector<int>& param_dtypes, const std::vector<int64_t>& numels,
                     double decay, std::uintptr_t stream) {
  Lists l = validate("ema_update_cuda", ema_addrs, ema_dtypes, param_addrs, param_dtypes, numels);
  const char* err = vlfast_ema_update_cuda(
      l.ema.data(), ema_dtypes.data(), l.param.data(), param_dtypes.data(), numels.data(),
      static_cast<int64_t>(numels.size()), decay, reinterpret_cast<cudaStream_t>(stream));
  if (err != nullptr) throw std::runtime_error(std::string("ema_update_cuda: ") + err);
}
#endif

py::dict build_info() {
  py::dict d;
  d["compiler"] = VLFAST_COMPILER;
  d["flags"] = VLFAST_CXX_FLAGS;
  d["build_type"] = VLFAST_BUILD_TYPE;
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["openmp"] = vlfast_cpu_has_openmp();
#if defined(_OPENMP)
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp_version"] = py::none();
#endif
  d["target_clones"] = vlfast_cpu_has_target_clones();
  d["cpu_chunk"] = kVlfastCpuChunk;
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                          std::to_string(PYBIND11_VERSION_MINOR) + "." +
                          std::to_string(PYBIND11_VERSION_PATCH);
#if defined(VLFAST_WITH_CUDA)
  d["cuda"] = true;
  const int v = vlfast_cuda_runtime_version_compiled();
  d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#if defined(VLFAST_CUDA_COMPILER_VERSION)
  d["nvcc_version"] = VLFAST_CUDA_COMPILER_VERSION;
#endif
#if defined(VLFAST_CUDA_ARCHS)
  d["cuda_archs"] = VLFAST_CUDA_ARCHS;
#endif
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlfast native kernels (multi-tensor EMA update)";

  m.def("ema_update_cpu", &ema_update_cpu, py::arg("ema_addrs"), py::arg("ema_dtypes"),
        py::arg("param_addrs"), py::arg("param_dtypes"), py::arg("numels"), py::arg("decay"),
        py::call_guard<py::gil_scoped_release>(),
        "ema[i] <- ema[i]*decay + param[i]*(1-decay) for contiguous CPU buffers at raw "
        "addresses. Dtype codes: 0=float32, 1=float16, 2=bfloat16, 3=float64.");
#if defined(VLFAST_WITH_CUDA)
  m.def("ema_update_cuda", &ema_update_cuda, py::arg("ema_addrs"), py::arg("ema_dtypes"),
        py::arg("param_addrs"), py::arg("param_dtypes"), py::arg("numels"), py::arg("decay"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "CUDA multi-tensor EMA update on the given cudaStream_t (as int; 0 = legacy default "
        "stream). Asynchronous with respect to the host.");
#endif
  m.def("has_cuda", []() {
#if defined(VLFAST_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
  m.def("has_openmp", []() { return vlfast_cpu_has_openmp(); });
  m.def("num_threads", []() { return vlfast_cpu_num_threads(); });
  m.def("build_info", &build_info);
}
