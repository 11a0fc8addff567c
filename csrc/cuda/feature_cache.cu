// CUDA kernels of the feature cache, around fasttl/feature_cache.h: pool_store (one block per
// image, threads across channels, each summing its channel over H*W: with channels_last input
// neighbouring threads read neighbouring addresses) and gather (threads across a row's channels,
// rows across blocks: no division per element).
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
    const int64_t r = a.rows[i];
    // A bad row, replaced by the sync-free range check: nothing is written. The same for every
    // thread of the block, so no barrier below is skipped by some threads only.
    if (r < 0) continue;
    const storage_t<S>* row = src + i * a.image_stride;
    float absmax = 0.0f;
    for (int64_t ch = threadIdx.x; ch < a.channels; ch += kThreads) {
      const float v = channel_sum<S>(row + ch * a.channel_stride, a.hw, a.hw_stride) * inv_hw;
      pooled[ch] = v;
      absmax = fmaxf(absmax, fabsf(v));
    }
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

// blockDim.x threads across a row's channels (a power of two, 32 to kThreads), blockDim.y rows per
// block; a grid-stride loop over rows. No barriers, so no thread waits on another.
template <typename D, typename O>
__global__ void __launch_bounds__(kThreads) gather_kernel(GatherArgs a) {
  storage_t<O>* out = static_cast<storage_t<O>*>(a.out);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < a.n; i += row_step) {
    const int64_t r = a.indices[i];
    storage_t<O>* dst = out + i * a.channels;
    if constexpr (std::is_same_v<D, int8_t>) {
      const int8_t* row = static_cast<const int8_t*>(a.cache) + r * a.channels;
      const float scale = a.scales[r];
      for (int64_t ch = threadIdx.x; ch < a.channels; ch += blockDim.x) {
        dst[ch] = store<O>(dequantize_int8(row[ch], scale));
      }
    } else {
      const storage_t<D>* row = static_cast<const storage_t<D>*>(a.cache) + r * a.channels;
      for (int64_t ch = threadIdx.x; ch < a.channels; ch += blockDim.x) dst[ch] = store<O>(load<D>(row[ch]));
    }
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
  // A row's width in threads: the channels rounded up to a power of two within [32, kThreads], so
  // narrow rows share a block instead of leaving most of its threads idle.
  int width = 32;
  while (width < kThreads && width < a.channels) width *= 2;
  const dim3 block(static_cast<unsigned>(width), static_cast<unsigned>(kThreads / width));
  const int64_t blocks_needed = (a.n + block.y - 1) / block.y;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(cuda_sm_count()) * 16));
  dispatch_cache(a.cache_dtype, "gather_cuda", [&](auto d) {
    if (a.out_dtype == kFloat32) {
      gather_kernel<decltype(d), float><<<blocks, block, 0, stream>>>(a);
    } else if (a.out_dtype == kBFloat16) {
      gather_kernel<decltype(d), bf16_t><<<blocks, block, 0, stream>>>(a);
    } else {
      throw std::invalid_argument("gather_cuda: out dtype must be float32 or bfloat16");
    }
    check_cuda(cudaGetLastError(), "gather_kernel launch");
  });
}

}  // namespace fasttl
