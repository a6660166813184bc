// Code-generation macros shared by the CPU kernels (ema_cpu.cpp, masking_cpu.cpp).
#pragma once

// Function multiversioning: one clone per ISA, picked at load time (no -march=native).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(VLFAST_NO_TARGET_CLONES)
#define VLFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define VLFAST_HAVE_CLONES 1
#else
#define VLFAST_CLONES
#define VLFAST_HAVE_CLONES 0
#endif

// Vectorize a loop when OpenMP is on.
#if defined(_OPENMP)
#define VLFAST_SIMD _Pragma("omp simd")
#else
#define VLFAST_SIMD
#endif
