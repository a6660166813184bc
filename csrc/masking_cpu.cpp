// CPU kernels for MAE random masking (see masking.h).
//
// random_masking_rank:      per row, sort (key, index) pairs -> ranks, kept ids, mask.
// random_masking_gather:    out[b, r] = src[b, idx[b, r]] (+ pos[idx[b, r]]).
// unshuffle_tokens: out[b, j] = src[b, ids_restore[b, j]] or a fill row.
//
// All arguments (including every index value) are checked before any output
// is written; errors are thrown on the calling thread, never inside an OpenMP
// region. Rows are distributed over OpenMP threads with a static schedule
// (every row costs the same).
#include "masking.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "ema.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cpu_macros.h"

namespace {

using vlfast::bf16_t;
using vlfast::half_t;

// Below this many output elements a kernel runs on the calling thread only.
constexpr int64_t kParallelMinElems = 16384;

[[noreturn]] void fail(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

void check_dtype(const char* fn, const char* what, int code) {
  if (!vlfast::valid_dtype(code)) {
    fail(fn, std::string("invalid ") + what + " dtype code " + std::to_string(code) +
                 "; expected 0=float32, 1=float16, 2=bfloat16, 3=float64");
  }
}

void check_nonneg(const char* fn, const char* what, int64_t v) {
  if (v < 0) fail(fn, std::string(what) + " must be >= 0, got " + std::to_string(v));
}

// a * b, or invalid_argument when it overflows int64 (operands >= 0).
int64_t checked_mul(const char* fn, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(fn, "size overflows int64");
  return r;
}

void check_ptr(const char* fn, const char* what, const void* p, bool needed) {
  if (needed && p == nullptr) fail(fn, std::string("null address for ") + what);
}

// std::out_of_range (-> IndexError) when any of the n values is outside [0, hi).
void check_indices(const char* fn, const char* what, const int64_t* v, int64_t n, int64_t hi) {
  uint64_t bad = 0;
  const uint64_t uhi = static_cast<uint64_t>(hi);
#if defined(_OPENMP)
#pragma omp simd reduction(| : bad)
#endif
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(static_cast<uint64_t>(v[i]) >= uhi);
  if (bad == 0) return;
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] < 0 || v[i] >= hi) {
      throw std::out_of_range(std::string(fn) + ": " + what + " value " + std::to_string(v[i]) +
                              " at flat position " + std::to_string(i) +
                              " is out of range [0, " + std::to_string(hi) + ")");
    }
  }
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_num() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// ------------------------------------------------------------------ random_masking_rank
// Order-preserving integer image of a key: NaN (any sign/payload) -> max,
// -0.0 == +0.0, otherwise monotone in the value. Sorting (key, index) pairs
// lexicographically is then exactly a stable argsort with NaNs last.
inline uint64_t order_key(double d) {
  if (std::isnan(d)) return std::numeric_limits<uint64_t>::max();
  if (d == 0.0) d = 0.0;
  const uint64_t u = vlfast::d2u(d);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

struct Entry {
  uint64_t key;
  int64_t idx;
};

template <typename K, typename M>
void mask_rank_impl(const void* keys_p, int64_t B, int64_t L, int64_t len_keep,
                    int64_t* ids_restore, int64_t* ids_keep, void* mask_p) {
  const K* keys = static_cast<const K*>(keys_p);
  M* mask = static_cast<M*>(mask_p);
  const M zero = vlfast::Io<M>::from_f(0.0f);
  const M one = vlfast::Io<M>::from_f(1.0f);
  const bool par = B > 1 && B * L >= 2048;
  const int nt = par ? max_threads() : 1;
  std::vector<Entry> scratch(static_cast<size_t>(nt) * static_cast<size_t>(L));
  Entry* const scratch_p = scratch.data();

#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
#endif
  for (int64_t b = 0; b < B; ++b) {
    Entry* e = scratch_p + static_cast<size_t>(thread_num()) * static_cast<size_t>(L);
    const K* kr = keys + b * L;
    for (int64_t j = 0; j < L; ++j) e[j] = Entry{order_key(vlfast::Io<K>::to_d(kr[j])), j};
    std::sort(e, e + L, [](const Entry& a, const Entry& c) {
      return a.key < c.key || (a.key == c.key && a.idx < c.idx);
    });
    int64_t* restore = ids_restore + b * L;
    int64_t* keep = ids_keep + b * len_keep;
    M* mrow = mask + b * L;
    for (int64_t r = 0; r < L; ++r) {
      const int64_t j = e[r].idx;
      restore[j] = r;
      mrow[j] = r < len_keep ? zero : one;
    }
    for (int64_t r = 0; r < len_keep; ++r) keep[r] = e[r].idx;
  }
}

template <typename K>
void mask_rank_dispatch_mask(int mask_dtype, const void* keys, int64_t B, int64_t L,
                             int64_t len_keep, int64_t* ids_restore, int64_t* ids_keep,
                             void* mask) {
  switch (mask_dtype) {
    case vlfast::kFloat32: return mask_rank_impl<K, float>(keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kFloat16: return mask_rank_impl<K, half_t>(keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kBFloat16: return mask_rank_impl<K, bf16_t>(keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kFloat64: return mask_rank_impl<K, double>(keys, B, L, len_keep, ids_restore, ids_keep, mask);
  }
}

// ------------------------------------------------------------------ row kernels
// o[d] = round(s[d] + p[d]) for contiguous rows (computed in float32, float64
// for float64). Multiversioned: the 16-bit conversions vectorize well on AVX2+.
template <typename T>
inline __attribute__((always_inline)) void add_row_impl(void* op, const void* sp, const void* pp,
                                                        int64_t n) {
  using C = typename vlfast::ComputeType<T, T>::type;
  T* __restrict o = static_cast<T*>(op);
  const T* __restrict s = static_cast<const T*>(sp);
  const T* __restrict p = static_cast<const T*>(pp);
  VLFAST_SIMD
  for (int64_t d = 0; d < n; ++d) {
    const C v = vlfast::Load<C>::get(s[d]) + vlfast::Load<C>::get(p[d]);
    o[d] = vlfast::Load<C>::template put<T>(v);
  }
}

using AddRowFn = void (*)(void*, const void*, const void*, int64_t);

VLFAST_CLONES void add_row_f32(void* o, const void* s, const void* p, int64_t n) { add_row_impl<float>(o, s, p, n); }
VLFAST_CLONES void add_row_f16(void* o, const void* s, const void* p, int64_t n) { add_row_impl<half_t>(o, s, p, n); }
VLFAST_CLONES void add_row_bf16(void* o, const void* s, const void* p, int64_t n) { add_row_impl<bf16_t>(o, s, p, n); }
VLFAST_CLONES void add_row_f64(void* o, const void* s, const void* p, int64_t n) { add_row_impl<double>(o, s, p, n); }

const AddRowFn kAddRow[4] = {add_row_f32, add_row_f16, add_row_bf16, add_row_f64};

template <typename T>
void add_row_strided(T* o, const T* s, int64_t s_d, const T* p, int64_t p_d, int64_t n) {
  using C = typename vlfast::ComputeType<T, T>::type;
  for (int64_t d = 0; d < n; ++d) {
    const C v = vlfast::Load<C>::get(s[d * s_d]) + vlfast::Load<C>::get(p[d * p_d]);
    o[d] = vlfast::Load<C>::template put<T>(v);
  }
}

// Bit-exact row copy (contiguous destination).
template <typename T>
inline void copy_row(T* o, const T* s, int64_t s_d, int64_t n) {
  if (s_d == 1) {
    std::memcpy(o, s, static_cast<size_t>(n) * sizeof(T));
  } else {
    for (int64_t d = 0; d < n; ++d) o[d] = s[d * s_d];
  }
}

template <typename T>
void gather_impl(const void* src_p, int64_t B, int64_t D, int64_t s_b, int64_t s_l, int64_t s_d,
                 const int64_t* idx, int64_t K, const void* pos_p, int64_t pos_s_l,
                 int64_t pos_s_d, void* out_p, AddRowFn add_contig) {
  const T* src = static_cast<const T*>(src_p);
  const T* pos = static_cast<const T*>(pos_p);
  T* out = static_cast<T*>(out_p);
  const int64_t rows = B * K;
  const bool par = rows > 1 && rows * D >= kParallelMinElems;
  const bool contig = s_d == 1 && pos_s_d == 1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (par)
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = i / K;
    const int64_t j = idx[i];
    const T* s = src + b * s_b + j * s_l;
    T* o = out + i * D;
    if (pos == nullptr) {
      copy_row(o, s, s_d, D);
    } else if (contig) {
      add_contig(o, s, pos + j * pos_s_l, D);
    } else {
      add_row_strided(o, s, s_d, pos + j * pos_s_l, pos_s_d, D);
    }
  }
}

template <typename T>
void unshuffle_impl(const void* src_p, int64_t B, int64_t K, int64_t D, int64_t s_b, int64_t s_k,
                    int64_t s_d, const int64_t* ids_restore, int64_t L, const void* fill_p,
                    int64_t fill_s_d, void* out_p) {
  const T* src = static_cast<const T*>(src_p);
  const T* fill = static_cast<const T*>(fill_p);
  T* out = static_cast<T*>(out_p);
  const int64_t rows = B * L;
  const bool par = rows > 1 && rows * D >= kParallelMinElems;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (par)
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = i / L;
    const int64_t r = ids_restore[i];
    T* o = out + i * D;
    if (r < K) {
      copy_row(o, src + b * s_b + r * s_k, s_d, D);
    } else if (fill != nullptr) {
      copy_row(o, fill, fill_s_d, D);
    } else {
      std::memset(static_cast<void*>(o), 0, static_cast<size_t>(D) * sizeof(T));  // +0.0
    }
  }
}

}  // namespace

void vlfast_mask_rank_cpu(const void* keys, int keys_dtype, int64_t B, int64_t L,
                          int64_t len_keep, int64_t* ids_restore, int64_t* ids_keep,
                          void* mask, int mask_dtype) {
  static const char* fn = "random_masking_rank_cpu";
  check_dtype(fn, "keys", keys_dtype);
  check_dtype(fn, "mask", mask_dtype);
  check_nonneg(fn, "B", B);
  check_nonneg(fn, "L", L);
  if (len_keep < 0 || len_keep > L) {
    fail(fn, "len_keep must satisfy 0 <= len_keep <= L (L=" + std::to_string(L) + "), got " +
                 std::to_string(len_keep));
  }
  const int64_t n = checked_mul(fn, B, L);
  check_ptr(fn, "keys", keys, n > 0);
  check_ptr(fn, "ids_restore", ids_restore, n > 0);
  check_ptr(fn, "mask", mask, n > 0);
  check_ptr(fn, "ids_keep", ids_keep, B > 0 && len_keep > 0);
  if (n == 0) return;
  switch (keys_dtype) {
    case vlfast::kFloat32: return mask_rank_dispatch_mask<float>(mask_dtype, keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kFloat16: return mask_rank_dispatch_mask<half_t>(mask_dtype, keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kBFloat16: return mask_rank_dispatch_mask<bf16_t>(mask_dtype, keys, B, L, len_keep, ids_restore, ids_keep, mask);
    case vlfast::kFloat64: return mask_rank_dispatch_mask<double>(mask_dtype, keys, B, L, len_keep, ids_restore, ids_keep, mask);
  }
}

void vlfast_gather_rows_cpu(const void* src, int dtype, int64_t B, int64_t L, int64_t D,
                            int64_t s_b, int64_t s_l, int64_t s_d, const int64_t* idx,
                            int64_t K, const void* pos, int64_t pos_s_l, int64_t pos_s_d,
                            void* out) {
  static const char* fn = "random_masking_gather_cpu";
  check_dtype(fn, "src", dtype);
  check_nonneg(fn, "B", B);
  check_nonneg(fn, "L", L);
  check_nonneg(fn, "D", D);
  check_nonneg(fn, "K", K);
  check_nonneg(fn, "s_b", s_b);
  check_nonneg(fn, "s_l", s_l);
  check_nonneg(fn, "s_d", s_d);
  check_nonneg(fn, "pos_s_l", pos_s_l);
  check_nonneg(fn, "pos_s_d", pos_s_d);
  const int64_t rows = checked_mul(fn, B, K);
  const int64_t numel = checked_mul(fn, rows, D);
  check_ptr(fn, "idx", idx, rows > 0);
  check_ptr(fn, "out", out, numel > 0);
  check_ptr(fn, "src", src, numel > 0);
  if (rows == 0) return;
  check_indices(fn, "idx", idx, rows, L);
  if (numel == 0) return;
  switch (dtype) {
    case vlfast::kFloat32: return gather_impl<float>(src, B, D, s_b, s_l, s_d, idx, K, pos, pos_s_l, pos_s_d, out, kAddRow[0]);
    case vlfast::kFloat16: return gather_impl<half_t>(src, B, D, s_b, s_l, s_d, idx, K, pos, pos_s_l, pos_s_d, out, kAddRow[1]);
    case vlfast::kBFloat16: return gather_impl<bf16_t>(src, B, D, s_b, s_l, s_d, idx, K, pos, pos_s_l, pos_s_d, out, kAddRow[2]);
    case vlfast::kFloat64: return gather_impl<double>(src, B, D, s_b, s_l, s_d, idx, K, pos, pos_s_l, pos_s_d, out, kAddRow[3]);
  }
}

void vlfast_unshuffle_rows_cpu(const void* src, int dtype, int64_t B, int64_t K, int64_t D,
                               int64_t s_b, int64_t s_k, int64_t s_d,
                               const int64_t* ids_restore, int64_t L, const void* fill,
                               int64_t fill_s_d, void* out) {
  static const char* fn = "unshuffle_tokens_cpu";
  check_dtype(fn, "src", dtype);
  check_nonneg(fn, "B", B);
  check_nonneg(fn, "K", K);
  check_nonneg(fn, "D", D);
  check_nonneg(fn, "L", L);
  check_nonneg(fn, "s_b", s_b);
  check_nonneg(fn, "s_k", s_k);
  check_nonneg(fn, "s_d", s_d);
  check_nonneg(fn, "fill_s_d", fill_s_d);
  const int64_t rows = checked_mul(fn, B, L);
  const int64_t numel = checked_mul(fn, rows, D);
  checked_mul(fn, checked_mul(fn, B, K), D);
  check_ptr(fn, "ids_restore", ids_restore, rows > 0);
  check_ptr(fn, "out", out, numel > 0);
  check_ptr(fn, "src", src, numel > 0 && K > 0);
  if (rows == 0) return;
  check_indices(fn, "ids_restore", ids_restore, rows, L);
  if (numel == 0) return;
  switch (dtype) {
    case vlfast::kFloat32: return unshuffle_impl<float>(src, B, K, D, s_b, s_k, s_d, ids_restore, L, fill, fill_s_d, out);
    case vlfast::kFloat16: return unshuffle_impl<half_t>(src, B, K, D, s_b, s_k, s_d, ids_restore, L, fill, fill_s_d, out);
    case vlfast::kBFloat16: return unshuffle_impl<bf16_t>(src, B, K, D, s_b, s_k, s_d, ids_restore, L, fill, fill_s_d, out);
    case vlfast::kFloat64: return unshuffle_impl<double>(src, B, K, D, s_b, s_k, s_d, ids_restore, L, fill, fill_s_d, out);
  }
}
