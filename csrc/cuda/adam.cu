// CUDA launch of the fused Adam / AdamW step: multi-tensor apply in the manner of apex and
// PyTorch. Tensors are cut into chunks; each launch carries, as a kernel argument, up to
// kMaxTensors tensors and kMaxBlocks (tensor, chunk) pairs, one block per chunk.
#include <algorithm>
#include <vector>

#include "fasttl/adam.h"
#include "fasttl/adam_dispatch.h"
#include "fasttl/cuda_utils.cuh"

namespace fasttl {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 160;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

// Kernel-argument payload: 24 * 64 + 160 * 8 + 160 * 4 = 3456 bytes, under the classic 4 KiB
// limit on kernel arguments.
struct AdamLaunch {
  AdamTensor tensors[kMaxTensors];
  int64_t chunk_begin[kMaxBlocks];
  int tensor_of_block[kMaxBlocks];
};

template <typename P, typename G, bool kMaster, bool kAmsgrad>
__global__ void __launch_bounds__(kThreads) adam_kernel(AdamLaunch launch, AdamHyper h, const float* grad_scale,
                                                        const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;  // skipped on the device: no host sync
  const AdamTensor& t = launch.tensors[launch.tensor_of_block[blockIdx.x]];
  const AdamStepFactors f = adam_step_factors(h, *t.step);
  const AdamCoefficients c = adam_coefficients(h);
  const float inv_scale = grad_scale ? 1.0f / *grad_scale : 1.0f;
  const int64_t begin = launch.chunk_begin[blockIdx.x];
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  storage_t<P>* param = static_cast<storage_t<P>*>(t.param);
  const storage_t<G>* grad = static_cast<const storage_t<G>*>(t.grad);
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    AdamElement e{kMaster ? t.master[j] : load<P>(param[j]), t.exp_avg[j], t.exp_avg_sq[j],
                  kAmsgrad ? t.max_exp_avg_sq[j] : 0.0f};
    e = adam_update<kAmsgrad>(e, load<G>(grad[j]) * inv_scale, c, f);
    if (kMaster) t.master[j] = e.w;
    param[j] = store<P>(e.w);
    t.exp_avg[j] = e.m;
    t.exp_avg_sq[j] = e.v;
    if (kAmsgrad) t.max_exp_avg_sq[j] = e.v_max;
  }
}

template <typename P, typename G, bool kMaster, bool kAmsgrad>
void adam_launch_all(const AdamArgs& a, const AdamHyper& h, cudaStream_t stream) {
  AdamLaunch launch;
  int tensors = 0, blocks = 0;
  auto flush = [&]() {
    if (blocks > 0) {
      adam_kernel<P, G, kMaster, kAmsgrad><<<blocks, kThreads, 0, stream>>>(launch, h, a.grad_scale, a.found_inf);
      check_cuda(cudaGetLastError(), "adam_kernel launch");
    }
    tensors = 0;
    blocks = 0;
  };
  for (int64_t i = 0; i < a.num_tensors; ++i) {
    if (a.tensors[i].numel == 0) continue;
    if (tensors == kMaxTensors) flush();
    launch.tensors[tensors] = a.tensors[i];
    for (int64_t b = 0; b < a.tensors[i].numel; b += kChunk) {
      if (blocks == kMaxBlocks) {
        // Keep the tensor in hand: it continues as the first tensor of the next launch.
        flush();
        launch.tensors[0] = a.tensors[i];
      }
      launch.chunk_begin[blocks] = b;
      launch.tensor_of_block[blocks] = tensors;
      ++blocks;
    }
    ++tensors;
  }
  flush();
}

}  // namespace

void adam_step_cuda(const AdamArgs& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_adam(a, "adam_step_cuda", [&](auto p_tag, auto g_tag, auto master, auto amsgrad) {
    adam_launch_all<decltype(p_tag), decltype(g_tag), decltype(master)::value, decltype(amsgrad)::value>(
        a, adam_hyper(a), stream);
  });
}

}  // namespace fasttl
