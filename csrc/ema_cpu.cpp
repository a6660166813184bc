// CPU multi-tensor EMA update (see ema.h).
//
// The concatenated element range of all pairs is cut into fixed-size chunks
// (kVlfastCpuChunk elements); OpenMP threads take chunks dynamically, so one
// huge tensor and thousands of tiny ones balance the same way. Each chunk is a
// single streaming pass: read ema + param, write ema.
//
// The inner loops are vectorized (`#pragma omp simd`, branch-free conversions)
// and, with GCC/Clang on x86-64 Linux, compiled for several ISAs with
// function multiversioning (target_clones) and picked at load time.
#include "ema.h"

#include <algorithm>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cpu_macros.h"

namespace {

using vlfast::bf16_t;
using vlfast::half_t;

using RangeFn = void (*)(void*, const void*, int64_t, double, double);

template <typename E, typename P>
inline __attribute__((always_inline)) void ema_range_impl(void* ep, const void* pp, int64_t n,
                                                          double decay, double omd) {
  using C = typename vlfast::ComputeType<E, P>::type;
  E* __restrict e = static_cast<E*>(ep);
  const P* __restrict p = static_cast<const P*>(pp);
  const C d = static_cast<C>(decay);
  const C o = static_cast<C>(omd);
  VLFAST_SIMD
  for (int64_t i = 0; i < n; ++i) {
    e[i] = vlfast::ema_elem<E, P>(e[i], p[i], d, o);
  }
}

#define VLFAST_DEF_RANGE(EN, ET, PN, PT)                                               \
  VLFAST_CLONES void ema_range_##EN##_##PN(void* e, const void* p, int64_t n, double d, \
                                           double o) {                                 \
    ema_range_impl<ET, PT>(e, p, n, d, o);                                             \
  }

#define VLFAST_DEF_ROW(EN, ET)                \
  VLFAST_DEF_RANGE(EN, ET, f32, float)        \
  VLFAST_DEF_RANGE(EN, ET, f16, half_t)       \
  VLFAST_DEF_RANGE(EN, ET, bf16, bf16_t)      \
  VLFAST_DEF_RANGE(EN, ET, f64, double)

VLFAST_DEF_ROW(f32, float)
VLFAST_DEF_ROW(f16, half_t)
VLFAST_DEF_ROW(bf16, bf16_t)
VLFAST_DEF_ROW(f64, double)

#undef VLFAST_DEF_ROW
#undef VLFAST_DEF_RANGE

// Indexed [ema dtype code][param dtype code].
const RangeFn kRangeFns[4][4] = {
    {ema_range_f32_f32, ema_range_f32_f16, ema_range_f32_bf16, ema_range_f32_f64},
    {ema_range_f16_f32, ema_range_f16_f16, ema_range_f16_bf16, ema_range_f16_f64},
    {ema_range_bf16_f32, ema_range_bf16_f16, ema_range_bf16_bf16, ema_range_bf16_f64},
    {ema_range_f64_f32, ema_range_f64_f16, ema_range_f64_bf16, ema_range_f64_f64},
};

constexpr int64_t kElemSize[4] = {4, 2, 2, 8};

}  // namespace

void vlfast_ema_update_cpu(void* const* ema_ptrs, const int* ema_dtypes,
                           const void* const* param_ptrs, const int* param_dtypes,
                           const int64_t* numels, int64_t n, double decay) {
  if (n <= 0) return;
  const double omd = 1.0 - decay;

  // Prefix offsets of the concatenated range, plus per-pair kernel/sizes.
  std::vector<int64_t> offs(static_cast<size_t>(n) + 1);
  std::vector<RangeFn> fns(static_cast<size_t>(n));
  offs[0] = 0;
  for (int64_t t = 0; t < n; ++t) {
    offs[t + 1] = offs[t] + numels[t];
    fns[t] = kRangeFns[ema_dtypes[t]][param_dtypes[t]];
  }
  const int64_t total = offs[n];
  if (total == 0) return;
  const int64_t nchunks = (total + kVlfastCpuChunk - 1) / kVlfastCpuChunk;
  const int64_t* off = offs.data();
  const RangeFn* fn = fns.data();

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (nchunks > 1)
#endif
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t begin = c * kVlfastCpuChunk;
    const int64_t end = std::min(begin + kVlfastCpuChunk, total);
    // last pair whose start <= begin (skips empty pairs automatically)
    int64_t t = (std::upper_bound(off, off + n + 1, begin) - off) - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, off[t + 1]);
      const int64_t cnt = stop - begin;
      if (cnt > 0) {
        const int64_t lo = begin - off[t];
        char* e = static_cast<char*>(ema_ptrs[t]) + lo * kElemSize[ema_dtypes[t]];
        const char* p =
            static_cast<const char*>(param_ptrs[t]) + lo * kElemSize[param_dtypes[t]];
        fn[t](e, p, cnt, decay, omd);
        begin = stop;
      }
      ++t;
    }
  }
}

bool vlfast_cpu_has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

int vlfast_cpu_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool vlfast_cpu_has_target_clones() { return VLFAST_HAVE_CLONES != 0; }
