// vlfast native: MAE random masking (He et al. 2021) without argsort/gather
// chains. CPU kernels in masking_cpu.cpp; bound in bindings.cpp.
//
// Like ema.h this header is free of torch / pybind11 / CUDA includes. Dtype
// codes are those of ema.h (0=float32, 1=float16, 2=bfloat16, 3=float64);
// index tensors are contiguous int64. Strides are in elements.
//
// Every entry point validates all of its arguments (and every index value)
// before writing anything: std::invalid_argument (-> ValueError) for bad
// shapes / dtypes / null addresses, std::out_of_range (-> IndexError) for
// index values outside their range. Nothing is thrown from inside an OpenMP
// region.
#pragma once

#include <cstdint>

// Per row b of keys (contiguous (B, L), dtype keys_dtype): rank[j] = position
// of j in the stable ascending order of keys[b, :] (NaN after every number,
// ties by index), i.e. torch.argsort(keys, dim=1, stable=True) inverted.
//   ids_restore (int64 (B, L)):        ids_restore[b, j] = rank of j
//   ids_keep    (int64 (B, len_keep)): ids_keep[b, r] = j with rank r
//   mask        ((B, L), mask_dtype):  0 where rank < len_keep else 1
void vlfast_mask_rank_cpu(const void* keys, int keys_dtype, int64_t B, int64_t L,
                          int64_t len_keep, int64_t* ids_restore, int64_t* ids_keep,
                          void* mask, int mask_dtype);

// out (contiguous (B, K, D), dtype of src):
//   out[b, r, :] = src[b, idx[b, r], :] (+ pos[idx[b, r], :] when pos != nullptr)
// The add is computed in float32 (float64 for float64) and rounded once.
void vlfast_gather_rows_cpu(const void* src, int dtype, int64_t B, int64_t L, int64_t D,
                            int64_t s_b, int64_t s_l, int64_t s_d, const int64_t* idx,
                            int64_t K, const void* pos, int64_t pos_s_l, int64_t pos_s_d,
                            void* out);

// out (contiguous (B, L, D), dtype of src): with r = ids_restore[b, j],
//   out[b, j, :] = src[b, r, :] if r < K else fill[:] (zeros when fill == nullptr)
void vlfast_unshuffle_rows_cpu(const void* src, int dtype, int64_t B, int64_t K, int64_t D,
                               int64_t s_b, int64_t s_k, int64_t s_d,
                               const int64_t* ids_restore, int64_t L, const void* fill,
                               int64_t fill_s_d, void* out);
