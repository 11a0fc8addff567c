// CUDA kernels of the feature cache: pool_store (one block per row, a thread per channel plane)
// and gather (a grid-stride copy with dequantization), around fasttl/feature_cache.h.
#include <algorithm>
#include <type_traits>

#include "fasttl/cuda_utils.cuh"
#include "fasttl/dispatch.h"
#include "fasttl/feature_cache.h"
#include "fasttl/kernels.h"

namespace fasttl {
namespace {

constexpr int kThreads = 256;

template <typename S, typename D>
__global__ void pool_store_kernel(PoolStoreArgs a) {
  extern __shared__ float pooled[];  // one row's pooled values
  __shared__ float scratch[kThreads / 32];
  const storage_t<S>* src = static_cast<const storage_t<S>*>(a.src);
  const float inv_hw = 1.0f / static_cast<float>(a.hw);
  for (int64_t i = blockIdx.x; i < a.n; i += gridDim.x) {
    const storage_t<S>* row = src + i * a.channels * a.hw;
    float absmax = 0.0f;
    for (int64_t ch = threadIdx.x; ch < a.channels; ch += kThreads) {
      const float v = plane_sum<S>(row + ch * a.hw, a.hw) * inv_hw;
      pooled[ch] = v;
      absmax = fmaxf(absmax, fabsf(v));
    }
    const int64_t r = a.rows[i];
    if constexpr (std::is_same_v<D, int8_t>) {
      absmax = row_reduce<kThreads>(absmax, MaxOp{}, scratch);  // also orders the pooled[] writes
      const float scale = int8_scale(absmax);
      const float inv_scale = 1.0f / scale;
      int8_t* out = static_cast<int8_t*>(a.cache) + r * a.channels;
      for (int64_t ch = threadIdx.x; ch < a.channels; ch += kThreads) out[ch] = quantize_int8(pooled[ch], inv_scale);
      if (threadIdx.x == 0) a.scales[r] = scale;
    } else {
      storage_t<D>* out = static_cast<storage_t<D>*>(a.cache) + r * a.channels;
      for (int64_t ch = threadIdx.x; ch < a.channels; ch += kThreads) out[ch] = store<D>(pooled[ch]);
    }
    __syncthreads();  // pooled[] is reused by the next row
  }
}

template <typename D, typename O>
__global__ void gather_kernel(GatherArgs a) {
  storage_t<O>* out = static_cast<storage_t<O>*>(a.out);
  const int64_t total = a.n * a.channels;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / a.channels, ch = k - i * a.channels;
    const int64_t r = a.indices[i];
    float v;
    if constexpr (std::is_same_v<D, int8_t>) {
      v = dequantize_int8(static_cast<const int8_t*>(a.cache)[r * a.channels + ch], a.scales[r]);
    } else {
      v = load<D>(static_cast<const storage_t<D>*>(a.cache)[r * a.channels + ch]);
    }
    out[k] = store<O>(v);
  }
}

}  // namespace

void pool_store_cuda(const PoolStoreArgs& a, void* stream_ptr) {
  if (a.n == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int blocks = static_cast<int>(a.n < 65535 ? a.n : 65535);
  const size_t shared = static_cast<size_t>(a.channels) * sizeof(float);
  dispatch_float(a.src_dtype, "pool_store_cuda", [&](auto s) {
    dispatch_cache(a.cache_dtype, "pool_store_cuda", [&](auto d) {
      auto kernel = pool_store_kernel<decltype(s), decltype(d)>;
      if (shared > 48 * 1024) {
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
                   "pool_store_kernel shared memory");
      }
      kernel<<<blocks, kThreads, shared, stream>>>(a);
      check_cuda(cudaGetLastError(), "pool_store_kernel launch");
    });
  });
}

void gather_cuda(const GatherArgs& a, void* stream_ptr) {
  if (a.n == 0 || a.channels == 0) return;  // an empty (n, 0) result: a <<<0, ...>>> launch is invalid
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t total = a.n * a.channels;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, cuda_sm_count() * 16));
  dispatch_cache(a.cache_dtype, "gather_cuda", [&](auto d) {
    if (a.out_dtype == kFloat32) {
      gather_kernel<decltype(d), float><<<blocks, kThreads, 0, stream>>>(a);
    } else if (a.out_dtype == kBFloat16) {
      gather_kernel<decltype(d), bf16_t><<<blocks, kThreads, 0, stream>>>(a);
    } else {
      throw std::invalid_argument("gather_cuda: out dtype must be float32 or bfloat16");
    }
    check_cuda(cudaGetLastError(), "gather_kernel launch");
  });
}

}  // namespace fasttl
