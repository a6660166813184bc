// CUDA multi-tensor EMA update (see ema.h).
//
// Multi-tensor apply in the spirit of NVIDIA apex's multi_tensor_apply: pairs
// are grouped by (ema dtype, param dtype); for each group the tensor
// addresses, sizes and a block -> (tensor, chunk) map are packed into a
// by-value kernel argument (< 4 KB) and a kernel is launched every time that
// table fills up. Blocks grid-stride over the table entries; each entry is a
// chunk of kChunk elements processed with 16-byte vector loads when both
// pointers are suitably aligned, scalar loads otherwise.
//
// Stand-alone: nvcc -std=c++17 -arch=sm_90 -c csrc/ema_cuda.cu
#include <cuda_runtime.h>

#include <cstdint>

#include "ema.h"

namespace {

using vlfast::bf16_t;
using vlfast::half_t;

constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per table entry

struct EmaTable {
  void* ema[kMaxTensors];
  const void* param[kMaxTensors];
  int64_t sizes[kMaxTensors];
  int block_to_chunk[kMaxBlocks];
  unsigned char block_to_tensor[kMaxBlocks];
  int nblocks;
};
static_assert(sizeof(EmaTable) <= 4096, "kernel argument table must stay under 4 KB");
static_assert(kMaxTensors <= 256, "block_to_tensor is a byte");

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

template <typename E, typename P>
struct VecWidth {
  static constexpr int kMaxSize = sizeof(E) > sizeof(P) ? sizeof(E) : sizeof(P);
  static constexpr int value = 16 / kMaxSize;  // 16-byte loads of the wider type
};

template <typename E, typename P>
__global__ void __launch_bounds__(kThreads)
    ema_mta_kernel(EmaTable tab, double decay_d, double omd_d) {
  using C = typename vlfast::ComputeType<E, P>::type;
  constexpr int V = VecWidth<E, P>::value;
  using EV = VecT<E, V>;
  using PV = VecT<P, V>;
  const C decay = static_cast<C>(decay_d);
  const C omd = static_cast<C>(omd_d);

  for (int b = blockIdx.x; b < tab.nblocks; b += gridDim.x) {
    const int t = tab.block_to_tensor[b];
    const int64_t start = static_cast<int64_t>(tab.block_to_chunk[b]) * kChunk;
    const int64_t n = tab.sizes[t];
    const int64_t rem = n - start;
    const int64_t len = rem < kChunk ? rem : kChunk;
    E* __restrict__ e = static_cast<E*>(tab.ema[t]) + start;
    const P* __restrict__ p = static_cast<const P*>(tab.param[t]) + start;

    const bool aligned = (reinterpret_cast<uintptr_t>(e) % sizeof(EV) == 0) &&
                         (reinterpret_cast<uintptr_t>(p) % sizeof(PV) == 0);
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = len / V;
      EV* ev = reinterpret_cast<EV*>(e);
      const PV* pv = reinterpret_cast<const PV*>(p);
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
        EV a = ev[i];
        const PV q = pv[i];
#pragma unroll
        for (int k = 0; k < V; ++k) a.v[k] = vlfast::ema_elem<E, P>(a.v[k], q.v[k], decay, omd);
        ev[i] = a;
      }
      done = nvec * V;
    }
    for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
      e[i] = vlfast::ema_elem<E, P>(e[i], p[i], decay, omd);
    }
  }
}

template <typename E, typename P>
cudaError_t launch_table(const EmaTable& tab, double decay, double omd, cudaStream_t stream) {
  ema_mta_kernel<E, P><<<tab.nblocks, kThreads, 0, stream>>>(tab, decay, omd);
  return cudaGetLastError();
}

using LaunchFn = cudaError_t (*)(const EmaTable&, double, double, cudaStream_t);

template <typename E>
LaunchFn pick_param(int pcode) {
  switch (pcode) {
    case vlfast::kFloat32: return &launch_table<E, float>;
    case vlfast::kFloat16: return &launch_table<E, half_t>;
    case vlfast::kBFloat16: return &launch_table<E, bf16_t>;
    case vlfast::kFloat64: return &launch_table<E, double>;
    default: return nullptr;
  }
}

LaunchFn pick_launcher(int ecode, int pcode) {
  switch (ecode) {
    case vlfast::kFloat32: return pick_param<float>(pcode);
    case vlfast::kFloat16: return pick_param<half_t>(pcode);
    case vlfast::kBFloat16: return pick_param<bf16_t>(pcode);
    case vlfast::kFloat64: return pick_param<double>(pcode);
    default: return nullptr;
  }
}

}  // namespace

extern "C" const char* vlfast_ema_update_cuda(void* const* ema_ptrs, const int* ema_dtypes,
                                              const void* const* param_ptrs,
                                              const int* param_dtypes, const int64_t* numels,
                                              int64_t n, double decay, cudaStream_t stream) {
  if (n < 0) return "vlfast_ema_update_cuda: negative list length";
  for (int64_t i = 0; i < n; ++i) {
    if (!vlfast::valid_dtype(ema_dtypes[i]) || !vlfast::valid_dtype(param_dtypes[i]))
      return "vlfast_ema_update_cuda: invalid dtype code";
    if (numels[i] < 0) return "vlfast_ema_update_cuda: negative numel";
    if (numels[i] > 0 && (ema_ptrs[i] == nullptr || param_ptrs[i] == nullptr))
      return "vlfast_ema_update_cuda: null pointer";
    if ((numels[i] + kChunk - 1) / kChunk > INT32_MAX)
      return "vlfast_ema_update_cuda: tensor too large";
  }
  const double omd = 1.0 - decay;

  EmaTable tab;
  for (int ec = 0; ec < vlfast::kNumDtypes; ++ec) {
    for (int pc = 0; pc < vlfast::kNumDtypes; ++pc) {
      const LaunchFn launch = pick_launcher(ec, pc);
      int ntensors = 0;
      tab.nblocks = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (ema_dtypes[i] != ec || param_dtypes[i] != pc || numels[i] == 0) continue;
        tab.ema[ntensors] = ema_ptrs[i];
        tab.param[ntensors] = param_ptrs[i];
        tab.sizes[ntensors] = numels[i];
        ++ntensors;
        const int64_t nchunks = (numels[i] + kChunk - 1) / kChunk;
        for (int64_t c = 0; c < nchunks; ++c) {
          tab.block_to_tensor[tab.nblocks] = static_cast<unsigned char>(ntensors - 1);
          tab.block_to_chunk[tab.nblocks] = static_cast<int>(c);
          ++tab.nblocks;
          const bool last_chunk = c == nchunks - 1;
          const bool tensors_full = ntensors == kMaxTensors && last_chunk;
          const bool blocks_full = tab.nblocks == kMaxBlocks;
          if (tensors_full || blocks_full) {
            const cudaError_t err = launch(tab, decay, omd, stream);
            if (err != cudaSuccess) return cudaGetErrorString(err);
            tab.nblocks = 0;
            if (last_chunk) {
              ntensors = 0;
            } else {  // the current tensor continues in the next table, slot 0
              tab.ema[0] = tab.ema[ntensors - 1];
              tab.param[0] = tab.param[ntensors - 1];
              tab.sizes[0] = tab.sizes[ntensors - 1];
              ntensors = 1;
            }
          }
        }
      }
      if (tab.nblocks > 0) {
        const cudaError_t err = launch(tab, decay, omd, stream);
        if (err != cudaSuccess) return cudaGetErrorString(err);
      }
    }
  }
  return nullptr;
}

extern "C" int vlfast_cuda_runtime_version_compiled() { return CUDART_VERSION; }
