// CUDA launch of the fused Adam / AdamW step: multi-tensor apply in the manner of apex and
// PyTorch. Tensors are cut into chunks of kChunk elements; each launch carries, as a kernel
// argument, a table of tensors and of (tensor, chunk) pairs, one block per chunk. Where every
// buffer of a tensor is aligned for it, a thread moves kVec elements per load and store.
#include <cstdint>

#include "fasttl/adam.h"
#include "fasttl/adam_dispatch.h"
#include "fasttl/cuda_utils.cuh"

namespace fasttl {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
// 16 passes of kThreads * kVec elements per block. A multiple of kVec, so every chunk of an
// aligned tensor starts aligned too.
constexpr int64_t kChunk = 16384;
static_assert(kChunk % kVec == 0, "chunks must start on a vector boundary");

// The launch table, passed by value as the kernel argument. The classic limit on kernel
// arguments is 4 KiB; CUDA 12.1+ with a 12.1+ driver allows 32,764 bytes, which lets one launch
// cover 96 tensors and 3072 chunks (50M elements) instead of 24 and 224.
template <int kMaxTensors, int kMaxBlocks>
struct AdamLaunch {
  static constexpr int max_tensors = kMaxTensors;
  static constexpr int max_blocks = kMaxBlocks;
  AdamTensor tensors[kMaxTensors];
  int tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];  // the block's first element is chunk * kChunk
};
using NarrowLaunch = AdamLaunch<24, 224>;
using WideLaunch = AdamLaunch<96, 3072>;
// Room for the other arguments (AdamHyper and three pointers: under 64 bytes).
static_assert(sizeof(NarrowLaunch) <= 4096 - 64, "narrow launch table exceeds the 4 KiB argument limit");
static_assert(sizeof(WideLaunch) <= 32764 - 64, "wide launch table exceeds the 32,764-byte argument limit");

// kN elements of one buffer, loaded or stored as one aligned access.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

template <typename T>
__device__ __forceinline__ bool aligned_for_pack(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

template <typename P, typename G, bool kMaster, bool kAmsgrad>
__device__ __forceinline__ void adam_one(const AdamTensor& t, int64_t j, float inv_scale, const AdamCoefficients& c,
                                         const AdamStepFactors& f) {
  storage_t<P>* param = static_cast<storage_t<P>*>(t.param);
  const storage_t<G>* grad = static_cast<const storage_t<G>*>(t.grad);
  AdamElement e{kMaster ? master_or_param<P>(t.master[j], param[j]) : load<P>(param[j]), t.exp_avg[j],
                t.exp_avg_sq[j], kAmsgrad ? t.max_exp_avg_sq[j] : 0.0f};
  e = adam_update<kAmsgrad>(e, load<G>(grad[j]) * inv_scale, c, f);
  if (kMaster) t.master[j] = e.w;
  param[j] = store<P>(e.w);
  t.exp_avg[j] = e.m;
  t.exp_avg_sq[j] = e.v;
  if (kAmsgrad) t.max_exp_avg_sq[j] = e.v_max;
}

template <typename P, typename G, bool kMaster, bool kAmsgrad, typename Launch>
__global__ void __launch_bounds__(kThreads) adam_kernel(Launch launch, AdamHyper h, const float* lr_tensor,
                                                        const float* grad_scale, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;  // skipped on the device: no host sync
  if (lr_tensor) h.lr = *lr_tensor;             // a tensor lr is read here, never on the host
  const AdamTensor& t = launch.tensors[launch.tensor_of_block[blockIdx.x]];
  const AdamStepFactors f = adam_step_factors(h, *t.step);
  const AdamCoefficients c = adam_coefficients(h);
  const float inv_scale = grad_scale ? 1.0f / *grad_scale : 1.0f;
  const int64_t begin = static_cast<int64_t>(launch.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;

  using PS = storage_t<P>;
  using GS = storage_t<G>;
  PS* param = static_cast<PS*>(t.param);
  const GS* grad = static_cast<const GS*>(t.grad);
  // The same for every thread of the block (one tensor per block), so the branch is uniform.
  const bool vectorized = aligned_for_pack(param) && aligned_for_pack(grad) && aligned_for_pack(t.exp_avg) &&
                          aligned_for_pack(t.exp_avg_sq) && (!kMaster || aligned_for_pack(t.master)) &&
                          (!kAmsgrad || aligned_for_pack(t.max_exp_avg_sq));
  int64_t scalar_begin = begin;
  if (vectorized) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * kVec; j < vec_end;
         j += static_cast<int64_t>(kThreads) * kVec) {
      const Pack<GS, kVec> g = *reinterpret_cast<const Pack<GS, kVec>*>(grad + j);
      Pack<float, kVec> m = *reinterpret_cast<const Pack<float, kVec>*>(t.exp_avg + j);
      Pack<float, kVec> v = *reinterpret_cast<const Pack<float, kVec>*>(t.exp_avg_sq + j);
      Pack<float, kVec> vmax{};
      if (kAmsgrad) vmax = *reinterpret_cast<const Pack<float, kVec>*>(t.max_exp_avg_sq + j);
      Pack<float, kVec> w;
      Pack<PS, kVec> p = *reinterpret_cast<const Pack<PS, kVec>*>(param + j);
      if (kMaster) {
        w = *reinterpret_cast<const Pack<float, kVec>*>(t.master + j);
#pragma unroll
        for (int k = 0; k < kVec; ++k) w.v[k] = master_or_param<P>(w.v[k], p.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) w.v[k] = load<P>(p.v[k]);
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        AdamElement e{w.v[k], m.v[k], v.v[k], vmax.v[k]};
        e = adam_update<kAmsgrad>(e, load<G>(g.v[k]) * inv_scale, c, f);
        w.v[k] = e.w;
        m.v[k] = e.m;
        v.v[k] = e.v;
        vmax.v[k] = e.v_max;
        p.v[k] = store<P>(e.w);
      }
      if (kMaster) *reinterpret_cast<Pack<float, kVec>*>(t.master + j) = w;
      *reinterpret_cast<Pack<PS, kVec>*>(param + j) = p;
      *reinterpret_cast<Pack<float, kVec>*>(t.exp_avg + j) = m;
      *reinterpret_cast<Pack<float, kVec>*>(t.exp_avg_sq + j) = v;
      if (kAmsgrad) *reinterpret_cast<Pack<float, kVec>*>(t.max_exp_avg_sq + j) = vmax;
    }
    scalar_begin = vec_end;  // the last chunk's tail of fewer than kVec elements
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < end; j += kThreads) {
    adam_one<P, G, kMaster, kAmsgrad>(t, j, inv_scale, c, f);
  }
}

template <typename P, typename G, bool kMaster, bool kAmsgrad, typename Launch>
void adam_launch_all(const AdamArgs& a, const AdamHyper& h, cudaStream_t stream) {
  Launch launch;
  int tensors = 0, blocks = 0;
  auto flush = [&]() {
    if (blocks > 0) {
      adam_kernel<P, G, kMaster, kAmsgrad, Launch>
          <<<blocks, kThreads, 0, stream>>>(launch, h, a.lr_tensor, a.grad_scale, a.found_inf);
      check_cuda(cudaGetLastError(), "adam_kernel launch");
    }
    tensors = 0;
    blocks = 0;
  };
  for (int64_t i = 0; i < a.num_tensors; ++i) {
    if (a.tensors[i].numel == 0) continue;
    if (tensors == Launch::max_tensors) flush();
    launch.tensors[tensors] = a.tensors[i];
    const int64_t chunks = (a.tensors[i].numel + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (blocks == Launch::max_blocks) {
        // Keep the tensor in hand: it continues as the first tensor of the next launch.
        flush();
        launch.tensors[0] = a.tensors[i];
        tensors = 0;
      }
      launch.chunk_of_block[blocks] = static_cast<int>(chunk);  // < 2^31: tensors under 3.5e13 elements
      launch.tensor_of_block[blocks] = tensors;
      ++blocks;
    }
    ++tensors;
  }
  flush();
}

// Whether this process may pass the wide table: built with CUDA 12.1+ and run on a driver that
// supports 12.1+ (an older driver, allowed by CUDA's minor-version compatibility, refuses it).
bool wide_launch_supported() {
#if CUDART_VERSION >= 12010
  static const bool supported = [] {
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010;
  }();
  return supported;
#else
  return false;
#endif
}

}  // namespace

void adam_step_cuda(const AdamArgs& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_adam(a, "adam_step_cuda", [&](auto p_tag, auto g_tag, auto master, auto amsgrad) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    constexpr bool kMaster = decltype(master)::value;
    constexpr bool kAmsgrad = decltype(amsgrad)::value;
#if CUDART_VERSION >= 12010
    if (wide_launch_supported()) {
      adam_launch_all<P, G, kMaster, kAmsgrad, WideLaunch>(a, adam_hyper(a), stream);
      return;
    }
#endif
    adam_launch_all<P, G, kMaster, kAmsgrad, NarrowLaunch>(a, adam_hyper(a), stream);
  });
}

}  // namespace fasttl
