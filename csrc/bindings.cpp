// pybind11 bindings for vlfast._C (no torch headers: tensors arrive as raw
// addresses + dtype codes, see vlfast/_native.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ema.h"
#include "masking.h"

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

// ---------------------------------------------------------------- MAE masking
// Addresses arrive as Python ints; 0 means "absent" for the optional ones.
template <typename T>
T* as_ptr(std::uintptr_t a) { return reinterpret_cast<T*>(a); }

void random_masking_rank_cpu(std::uintptr_t keys_addr, int keys_dtype, int64_t B, int64_t L,
                   int64_t len_keep, std::uintptr_t ids_restore_addr, std::uintptr_t ids_keep_addr,
                   std::uintptr_t mask_addr, int mask_dtype) {
  vlfast_mask_rank_cpu(as_ptr<const void>(keys_addr), keys_dtype, B, L, len_keep,
                       as_ptr<int64_t>(ids_restore_addr), as_ptr<int64_t>(ids_keep_addr),
                       as_ptr<void>(mask_addr), mask_dtype);
}

void random_masking_gather_cpu(std::uintptr_t src_addr, int dtype, int64_t B, int64_t L, int64_t D,
                     int64_t s_b, int64_t s_l, int64_t s_d, std::uintptr_t idx_addr, int64_t K,
                     std::uintptr_t pos_addr, int64_t pos_s_l, int64_t pos_s_d,
                     std::uintptr_t out_addr) {
  vlfast_gather_rows_cpu(as_ptr<const void>(src_addr), dtype, B, L, D, s_b, s_l, s_d,
                         as_ptr<const int64_t>(idx_addr), K, as_ptr<const void>(pos_addr),
                         pos_s_l, pos_s_d, as_ptr<void>(out_addr));
}

void unshuffle_tokens_cpu(std::uintptr_t src_addr, int dtype, int64_t B, int64_t K, int64_t D,
                        int64_t s_b, int64_t s_k, int64_t s_d, std::uintptr_t ids_restore_addr,
                        int64_t L, std::uintptr_t fill_addr, int64_t fill_s_d,
                        std::uintptr_t out_addr) {
  vlfast_unshuffle_rows_cpu(as_ptr<const void>(src_addr), dtype, B, K, D, s_b, s_k, s_d,
                            as_ptr<const int64_t>(ids_restore_addr), L,
                            as_ptr<const void>(fill_addr), fill_s_d, as_ptr<void>(out_addr));
}

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
  m.doc() = "vlfast native kernels (multi-tensor EMA update, MAE random masking)";

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
  m.def("random_masking_rank_cpu", &random_masking_rank_cpu, py::arg("keys_addr"), py::arg("keys_dtype"),
        py::arg("B"), py::arg("L"), py::arg("len_keep"), py::arg("ids_restore_addr"),
        py::arg("ids_keep_addr"), py::arg("mask_addr"), py::arg("mask_dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "MAE random-masking ranks from noise keys (contiguous (B, L), dtype code keys_dtype). "
        "Per row, rank = position in the stable ascending order of the keys (NaN last, ties by "
        "index), equal to torch.argsort(keys, 1, stable=True) inverted. Writes ids_restore "
        "(int64 (B, L), the ranks), ids_keep (int64 (B, len_keep), positions of ranks "
        "< len_keep in rank order) and mask ((B, L), dtype code mask_dtype; 0 = kept, 1 = "
        "masked). ValueError unless 0 <= len_keep <= L.");
  m.def("random_masking_gather_cpu", &random_masking_gather_cpu, py::arg("src_addr"), py::arg("dtype"), py::arg("B"),
        py::arg("L"), py::arg("D"), py::arg("s_b"), py::arg("s_l"), py::arg("s_d"),
        py::arg("idx_addr"), py::arg("K"), py::arg("pos_addr"), py::arg("pos_s_l"),
        py::arg("pos_s_d"), py::arg("out_addr"), py::call_guard<py::gil_scoped_release>(),
        "out[b, r, :] = src[b, idx[b, r], :] (+ pos[idx[b, r], :] when pos_addr != 0). src is "
        "(B, L, D) with element strides (s_b, s_l, s_d); pos is (L, D) of src's dtype with "
        "strides (pos_s_l, pos_s_d); idx is contiguous int64 (B, K); out is contiguous "
        "(B, K, D). The add is computed in float32 (float64 for float64) and rounded once; "
        "without pos the copy is bit-exact. IndexError for idx outside [0, L) (checked before "
        "writing).");
  m.def("unshuffle_tokens_cpu", &unshuffle_tokens_cpu, py::arg("src_addr"), py::arg("dtype"),
        py::arg("B"), py::arg("K"), py::arg("D"), py::arg("s_b"), py::arg("s_k"), py::arg("s_d"),
        py::arg("ids_restore_addr"), py::arg("L"), py::arg("fill_addr"), py::arg("fill_s_d"),
        py::arg("out_addr"), py::call_guard<py::gil_scoped_release>(),
        "out[b, j, :] = src[b, r, :] if r < K else fill[:] (zeros when fill_addr == 0), with "
        "r = ids_restore[b, j] (contiguous int64 (B, L)). src is (B, K, D) with element "
        "strides (s_b, s_k, s_d); fill is (D,) of src's dtype with stride fill_s_d; out is "
        "contiguous (B, L, D). Bit-exact copies (MAE decoder unshuffle / backward of "
        "random_masking_gather_cpu). IndexError for ids_restore outside [0, L) (checked before writing).");
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
