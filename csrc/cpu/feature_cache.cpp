// CPU loops of the feature cache kernels. pool_store: OpenMP over rows; each row pooled into a
// per-thread fp32 buffer, then converted (int8: scaled by the row's max) and written in one go.
// gather: rows in chunks claimed by the caller and the pool's helpers (claim_pool.h).
#include <algorithm>
#include <cmath>
#include <thread>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "claim_pool.h"
#include "fasttl/dispatch.h"
#include "fasttl/feature_cache.h"
#include "fasttl/kernels.h"

namespace fasttl {
namespace {

template <typename S, typename D>
FASTTL_CPU_CLONES void pool_store_rows(const PoolStoreArgs& a) {
  const storage_t<S>* src = static_cast<const storage_t<S>*>(a.src);
  const int64_t c = a.channels, hw = a.hw;
  const float inv_hw = 1.0f / static_cast<float>(hw);
#pragma omp parallel
  {
    std::vector<float> pooled(c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t r = a.rows[i];
      if (r < 0) continue;  // a bad row, replaced by the sync-free range check: nothing is written
      const storage_t<S>* row = src + i * a.image_stride;
      if (hw == 1) {
        for (int64_t ch = 0; ch < c; ++ch) pooled[ch] = load<S>(row[ch * a.channel_stride]);
      } else if (a.channel_stride == 1) {
        // channels_last: a pixel's channels are adjacent, so add whole pixels into the row's sums
        // (vectorized over channels, the same order of adds as channel_sum).
        std::fill(pooled.begin(), pooled.end(), 0.0f);
        float* __restrict acc = pooled.data();
        for (int64_t k = 0; k < hw; ++k) {
          const storage_t<S>* __restrict pixel = row + k * a.hw_stride;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += load<S>(pixel[ch]);
        }
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) acc[ch] *= inv_hw;
      } else {
        for (int64_t ch = 0; ch < c; ++ch) {
          pooled[ch] = channel_sum<S>(row + ch * a.channel_stride, hw, a.hw_stride) * inv_hw;
        }
      }
      if constexpr (std::is_same_v<D, int8_t>) {
        float absmax = 0.0f;
#pragma omp simd reduction(max : absmax)
        for (int64_t ch = 0; ch < c; ++ch) absmax = std::max(absmax, std::fabs(pooled[ch]));
        const float scale = int8_scale(absmax);
        const float inv_scale = 1.0f / scale;
        int8_t* out = static_cast<int8_t*>(a.cache) + r * c;
        for (int64_t ch = 0; ch < c; ++ch) out[ch] = quantize_int8(pooled[ch], inv_scale);
        a.scales[r] = scale;
      } else {
        storage_t<D>* out = static_cast<storage_t<D>*>(a.cache) + r * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) out[ch] = store<D>(pooled[ch]);
      }
    }
  }
}

// Where row `r` of the cache starts: in the one tensor, or in its shard (one pointer per shard:
// no concatenated copy of the cache); `scales` set to the row's scales array.
inline const void* locate_row(const GatherArgs& a, int64_t& r, const float*& scales) {
  if (a.shard_caches == nullptr) {
    scales = a.scales;
    return a.cache;
  }
  const int64_t shard = r / a.shard_rows;
  r -= shard * a.shard_rows;
  scales = a.shard_scales != nullptr ? a.shard_scales[shard] : nullptr;
  return a.shard_caches[shard];
}

// Rows are read in random order, which the hardware prefetchers cannot follow: each thread asks
// for the row kPrefetchAhead positions ahead while it converts this one, so several rows' misses
// are in flight at once (1.4x: 3.6 -> 2.6 ms per batch of 8192 random 1 KB rows of a 2 GB cache, 2-core EPYC).
constexpr int64_t kPrefetchAhead = 8;
// Rows a gather thread claims at a time (claim_parallel): about 128 KiB of the cache, so a helper
// parked mid-chunk holds up little, while claims stay rare (128 rows of 512 fp16 features).
constexpr int64_t kChunkBytes = 128 << 10;

// A prefetch that survives target_clones: GCC 12's clone pass drops __builtin_prefetch from the
// clones (-fdump-ipa-targetclone: present before, gone after), which halved the gather's rate.
inline void prefetch_line(const char* line) {
#if defined(FASTTL_HAS_CPU_CLONES)
  asm volatile("prefetchnta %0" : : "m"(*line));
#else
  __builtin_prefetch(line, 0, 0);
#endif
}

inline void prefetch_row(const GatherArgs& a, int64_t i, int64_t row_bytes) {
  int64_t r = a.indices[i];
  const float* scales;
  const char* row = static_cast<const char*>(locate_row(a, r, scales)) + r * row_bytes;
  for (int64_t line = 0; line < row_bytes; line += 64) prefetch_line(row + line);
}

// Rows [begin, end) of the batch.
template <typename D, typename O>
FASTTL_CPU_CLONES void gather_range(const GatherArgs& a, int64_t begin, int64_t end) {
  const int64_t c = a.channels;
  const int64_t row_bytes = c * static_cast<int64_t>(sizeof(storage_t<D>));
  storage_t<O>* out = static_cast<storage_t<O>*>(a.out);
  for (int64_t i = begin; i < std::min(begin + kPrefetchAhead, end); ++i) prefetch_row(a, i, row_bytes);
  for (int64_t i = begin; i < end; ++i) {
    if (i + kPrefetchAhead < end) prefetch_row(a, i + kPrefetchAhead, row_bytes);
    int64_t r = a.indices[i];
    const float* scales;
    const void* cache = locate_row(a, r, scales);
    storage_t<O>* dst = out + i * c;
    if constexpr (std::is_same_v<D, int8_t>) {
      const int8_t* row = static_cast<const int8_t*>(cache) + r * c;
      const float scale = scales[r];
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = store<O>(dequantize_int8(row[ch], scale));
    } else {
      const storage_t<D>* row = static_cast<const storage_t<D>*>(cache) + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = store<O>(load<D>(row[ch]));
    }
  }
}

template <typename D, typename O>
void gather_rows(const GatherArgs& a) {
  const int64_t row_bytes = std::max<int64_t>(a.channels * static_cast<int64_t>(sizeof(storage_t<D>)), 1);
  // OpenMP's default follows torch.set_num_threads (3000 is allowed): each thread past the first is
  // a helper for the process's life, so at most as many as fasttl.cache.gather_threads.MOST_THREADS.
  const int most = std::max(256, static_cast<int>(std::thread::hardware_concurrency()));
  const int threads = std::min(a.threads > 0 ? a.threads : omp_get_max_threads(), most);
  claim_parallel(a.n, std::max<int64_t>(kChunkBytes / row_bytes, 16), threads,
                 [&a](int64_t begin, int64_t end) { gather_range<D, O>(a, begin, end); });
}

}  // namespace

void pool_store_cpu(const PoolStoreArgs& a) {
  dispatch_float(a.src_dtype, "pool_store_cpu", [&](auto s) {
    dispatch_cache(a.cache_dtype, "pool_store_cpu", [&](auto d) { pool_store_rows<decltype(s), decltype(d)>(a); });
  });
}

void gather_cpu(const GatherArgs& a) {
  dispatch_cache(a.cache_dtype, "gather_cpu", [&](auto d) {
    if (a.out_dtype == kFloat32) {
      gather_rows<decltype(d), float>(a);
    } else if (a.out_dtype == kBFloat16) {
      gather_rows<decltype(d), bf16_t>(a);
    } else {
      throw std::invalid_argument("gather_cpu: out dtype must be float32 or bfloat16");
    }
  });
}

}  // namespace fasttl
