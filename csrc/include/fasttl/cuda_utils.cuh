// Small CUDA helpers: error checks and reductions over the threads that share one row.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fasttl {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

inline int cuda_sm_count() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces `value` over the kThreads threads of one row (kThreads a power of two, the row's
// threads contiguous in threadIdx.x). `scratch` holds kThreads / 32 floats per row when
// kThreads > 32. Every thread of the row gets the result. V: float or double.
template <int kThreads, typename V, typename Op>
__device__ __forceinline__ V row_reduce(V value, Op op, V* scratch) {
  constexpr int kWarp = kThreads < 32 ? kThreads : 32;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset, kWarp));
  }
  if constexpr (kThreads > 32) {
    constexpr int kWarps = kThreads / 32;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    __syncthreads();  // scratch may still be read from a previous reduction
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    value = scratch[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) value = op(value, scratch[w]);
  }
  return value;
}

}  // namespace fasttl
