// vlfast native: multi-tensor EMA update
//     ema[i] <- ema[i] * decay + param[i] * (1 - decay)
//
// Shared between the CPU kernel (ema_cpu.cpp, g++), the CUDA kernel
// (ema_cuda.cu, nvcc) and the pybind11 bindings. This header must stay free of
// torch, pybind11 and CUDA runtime includes so that each translation unit
// compiles stand-alone.
//
// Dtype codes (shared with vlfast/_native.py):
//     0 = float32, 1 = float16, 2 = bfloat16, 3 = float64
//
// Arithmetic is done in float32, or float64 when either tensor of a pair is
// float64. The result is stored in the EMA's dtype with round-to-nearest-even.
// float64 -> float16/bfloat16 goes through a round-to-odd float32 step, which
// makes the two-step conversion equal to a single correctly rounded one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VLFAST_HD __host__ __device__ __forceinline__
#else
#define VLFAST_HD inline __attribute__((always_inline))
#endif

// Same declaration as the CUDA runtime's driver_types.h (an identical typedef
// may be repeated in C++), so this header needs no CUDA include.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace vlfast {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
constexpr int kNumDtypes = 4;

inline bool valid_dtype(int code) { return code >= 0 && code < kNumDtypes; }
inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "invalid";
  }
}

// Storage types for the 16-bit formats (raw bits).
struct half_t { uint16_t x; };
struct bf16_t { uint16_t x; };

// ---------------------------------------------------------------- bit casts
VLFAST_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
VLFAST_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
VLFAST_HD uint64_t d2u(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u; std::memcpy(&u, &d, 8); return u;
#endif
}
VLFAST_HD double u2d(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d; std::memcpy(&d, &u, 8); return d;
#endif
}

// Branch-free select: c ? a : b (as masks, so loops if-convert/vectorize).
VLFAST_HD uint32_t sel(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// ---------------------------------------------------------------- bfloat16
VLFAST_HD float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

// Round-to-nearest-even on the upper 16 bits; NaN stays NaN (quieted, sign
// and upper payload kept); overflow rounds to inf as IEEE requires.
VLFAST_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x0040u;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(sel(is_nan, nan, rounded));
}

// ---------------------------------------------------------------- float16
// Branch-free (select-only) conversions so that loops over them vectorize.
VLFAST_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu);
  // normal: rebias exponent (112 = 127 - 15)
  const uint32_t normal = (em << 13) + (112u << 23);
  // inf / nan: exponent all ones
  const uint32_t infnan = (em << 13) | 0x7F800000u;
  // subnormal / zero: value = mantissa * 2^-24 (exact in float)
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f;
  const uint32_t subu = f2u(sub);
  uint32_t r = sel(em >= 0x7C00u, infnan, normal);
  r = sel(em < 0x0400u, subu, r);
  return u2f(r | sign);
}

// Round-to-nearest-even float -> float16; NaN -> quiet NaN (sign kept),
// overflow -> inf, subnormals rounded correctly.
VLFAST_HD uint16_t float_to_half(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // >= 65520 (0x477FF000) rounds to inf; NaN stays NaN.
  const uint32_t big = sel(a > 0x7F800000u, 0x7E00u, 0x7C00u);
  // normal range: a >= 2^-14 (0x38800000)
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t normal = (a + 0xC8000FFFu + mant_odd) >> 13;  // 0xC8000000 = (15-127)<<23
  // subnormal range: add 0.5 (2^-1); the FPU rounds to the 2^-24 grid (RNE)
  const float magic = 0.5f;
  const uint32_t sub = f2u(u2f(a) + magic) - f2u(magic);
  uint32_t r = sel(a >= 0x477FF000u, big, normal);
  r = sel(a < 0x38800000u, sub, r);
  return static_cast<uint16_t>(r | sign);
}

// ---------------------------------------------------------------- double -> narrow
// float64 -> float32 with round-to-odd (sticky), used before the final
// rounding to a 16-bit format to avoid double rounding.
VLFAST_HD float double_to_float_odd(double d) {
  const float f = static_cast<float>(d);
  const uint32_t fu = f2u(f);
  const double back = static_cast<double>(f);
  // NaN compares unequal but is never "inexact": (back != d) & (d == d)
  const bool inexact = (back != d) & (d == d);
  const bool even = (fu & 1u) == 0u;
  // move one ulp toward d (compare magnitudes: |f| > |d| -> down, else up)
  const uint64_t abs_mask = 0x7FFFFFFFFFFFFFFFull;
  const bool f_bigger = (d2u(back) & abs_mask) > (d2u(d) & abs_mask);
  const uint32_t adj = sel(f_bigger, fu - 1u, fu + 1u);
  return u2f(sel(inexact & even, adj, fu));
}

// ---------------------------------------------------------------- type traits
template <typename T> struct Io;
template <> struct Io<float> {
  VLFAST_HD static float to_f(float v) { return v; }
  VLFAST_HD static double to_d(float v) { return v; }
  VLFAST_HD static float from_f(float v) { return v; }
  VLFAST_HD static float from_d(double v) { return static_cast<float>(v); }
};
template <> struct Io<double> {
  VLFAST_HD static float to_f(double v) { return static_cast<float>(v); }
  VLFAST_HD static double to_d(double v) { return v; }
  VLFAST_HD static double from_f(float v) { return v; }
  VLFAST_HD static double from_d(double v) { return v; }
};
template <> struct Io<half_t> {
  VLFAST_HD static float to_f(half_t v) { return half_to_float(v.x); }
  VLFAST_HD static double to_d(half_t v) { return half_to_float(v.x); }
  VLFAST_HD static half_t from_f(float v) { return half_t{float_to_half(v)}; }
  VLFAST_HD static half_t from_d(double v) { return half_t{float_to_half(double_to_float_odd(v))}; }
};
template <> struct Io<bf16_t> {
  VLFAST_HD static float to_f(bf16_t v) { return bf16_to_float(v.x); }
  VLFAST_HD static double to_d(bf16_t v) { return bf16_to_float(v.x); }
  VLFAST_HD static bf16_t from_f(float v) { return bf16_t{float_to_bf16(v)}; }
  VLFAST_HD static bf16_t from_d(double v) { return bf16_t{float_to_bf16(double_to_float_odd(v))}; }
};

// Compute in double iff either side is double.
template <typename E, typename P> struct ComputeType { using type = float; };
template <typename P> struct ComputeType<double, P> { using type = double; };
template <typename E> struct ComputeType<E, double> { using type = double; };
template <> struct ComputeType<double, double> { using type = double; };

template <typename C> struct Load;
template <> struct Load<float> {
  template <typename T> VLFAST_HD static float get(T v) { return Io<T>::to_f(v); }
  template <typename T> VLFAST_HD static T put(float v) { return Io<T>::from_f(v); }
};
template <> struct Load<double> {
  template <typename T> VLFAST_HD static double get(T v) { return Io<T>::to_d(v); }
  template <typename T> VLFAST_HD static T put(double v) { return Io<T>::from_d(v); }
};

// One element: e * decay + p * omd, with omd = (1 - decay) computed in double.
template <typename E, typename P>
VLFAST_HD E ema_elem(E e, P p, typename ComputeType<E, P>::type decay,
                     typename ComputeType<E, P>::type omd) {
  using C = typename ComputeType<E, P>::type;
  const C ev = Load<C>::get(e);
  const C pv = Load<C>::get(p);
  const C r = ev * decay + pv * omd;
  return Load<C>::template put<E>(r);
}

// Dispatch helper: calls f(E{}, P{}) with the storage types of the codes.
template <typename F>
inline bool dispatch_dtype_pair(int ecode, int pcode, F&& f) {
#define VLFAST_P_CASES(ET)                                  \
  switch (pcode) {                                          \
    case kFloat32: f(ET{}, float{}); return true;           \
    case kFloat16: f(ET{}, half_t{}); return true;          \
    case kBFloat16: f(ET{}, bf16_t{}); return true;         \
    case kFloat64: f(ET{}, double{}); return true;          \
    default: return false;                                  \
  }
  switch (ecode) {
    case kFloat32: VLFAST_P_CASES(float)
    case kFloat16: VLFAST_P_CASES(half_t)
    case kBFloat16: VLFAST_P_CASES(bf16_t)
    case kFloat64: VLFAST_P_CASES(double)
    default: return false;
  }
#undef VLFAST_P_CASES
}

}  // namespace vlfast

// ---------------------------------------------------------------- entry points
// CPU (ema_cpu.cpp). Arrays have n entries. Inputs must already be validated
// (equal lengths, valid dtype codes, numel >= 0, non-null pointers where
// numel > 0). Work is split into fixed-size chunks of the concatenated element
// range and parallelized with OpenMP when available.
void vlfast_ema_update_cpu(void* const* ema_ptrs, const int* ema_dtypes,
                           const void* const* param_ptrs, const int* param_dtypes,
                           const int64_t* numels, int64_t n, double decay);

// Elements per OpenMP work item of the CPU kernel.
constexpr int64_t kVlfastCpuChunk = 32768;

// Whether the CPU kernel was compiled with OpenMP / function multiversioning.
bool vlfast_cpu_has_openmp();
int vlfast_cpu_num_threads();
bool vlfast_cpu_has_target_clones();

// CUDA (ema_cuda.cu). Plain C-style launcher: host arrays of device pointers.
// Pairs are grouped by dtype pair and applied with a multi-tensor-apply kernel
// on `stream`. Returns nullptr on success, otherwise a static error message
// (argument error or cudaGetErrorString of the launch error).
extern "C" const char* vlfast_ema_update_cuda(void* const* ema_ptrs, const int* ema_dtypes,
                                              const void* const* param_ptrs,
                                              const int* param_dtypes, const int64_t* numels,
                                              int64_t n, double decay, cudaStream_t stream);

// CUDA runtime version the launcher was compiled against (CUDART_VERSION).
extern "C" int vlfast_cuda_runtime_version_compiled();
