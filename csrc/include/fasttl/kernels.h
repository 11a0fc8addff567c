// Entry points of every native kernel. Each takes raw pointers, sizes, dtype codes and, for the
// CUDA variants, the stream to launch on; Python has validated all of them before the call.
#pragma once

#include <cstdint>

namespace fasttl {

// ---- fused distillation loss --------------------------------------------------------------
struct DistillArgs {
  const void* student;         // (rows, classes), unit column stride
  int64_t student_row_stride;  // in elements
  int student_dtype;
  const void* teacher;
  int64_t teacher_row_stride;
  int teacher_dtype;
  const int64_t* target;       // (rows,) or nullptr for the soft term alone
  int64_t ignore_index;
  float temperature;
  float alpha;
  float* loss_rows;            // (rows,) fp32
  void* grad;                  // (rows, classes) contiguous, student dtype
  int64_t rows;
  int64_t classes;
  float grad_scale;            // the gradient written is grad_scale * dloss_i/ds (1: the plain gradient)
  float label_smoothing;       // eps of the hard term (0: plain cross-entropy)
};

void distill_rows_cpu(const DistillArgs& args);
void distill_rows_cuda(const DistillArgs& args, void* stream);
// The clone of the multiversioned CPU kernels (FASTTL_CPU_CLONES) that this CPU runs.
const char* cpu_kernel_clone();

// ---- fused Adam / AdamW with fp32 master weights -------------------------------------------
// One tensor of a multi-tensor step. `param` is in the param dtype; `grad` in the grad dtype;
// `master` (fp32 copy of param, or nullptr: param is its own master), `exp_avg`, `exp_avg_sq`
// and `max_exp_avg_sq` (amsgrad only, else nullptr) are fp32.
struct AdamTensor {
  void* param;
  const void* grad;
  float* master;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
  int64_t numel;
  const float* step;  // this tensor's step count, already incremented for this step
};

struct AdamArgs {
  const AdamTensor* tensors;   // host array
  int64_t num_tensors;
  int param_dtype;
  int grad_dtype;
  bool has_master;
  float lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad, maximize;
  const float* grad_scale;     // grads are divided by *grad_scale; nullptr for none
  const float* found_inf;      // step skipped when *found_inf != 0; nullptr for none
  const float* lr_tensor;      // when set, lr is read here at run time (a tensor lr: no host read,
                               // so a CUDA step stays sync-free and graph-capturable); else `lr`
};

// On the CPU every pointer, steps and grad_scale/found_inf included, is host memory; on CUDA all
// of them are device memory (the AdamTensor array itself stays on the host).
void adam_step_cpu(const AdamArgs& args);
void adam_step_cuda(const AdamArgs& args, void* stream);

// ---- feature cache ------------------------------------------------------------------------
// pool_store: rows of `src` (N, C, HW) (HW = 1 for pooled features) are averaged over HW,
// converted to the cache dtype and written to cache rows rows[i] (row stride C). For int8 caches
// `scales` (fp32, one per cache row) receives each row's scale. Element (i, ch, k) of src sits at
// i * image_stride + ch * channel_stride + k * hw_stride: NCHW is (C*HW, HW, 1), channels_last
// (NHWC) is (HW*C, 1, C), read as they are. A negative rows[i] skips row i: the sync-free CUDA
// range check puts -1 in place of a bad row (fasttl/_ops.py), so that nothing is overwritten.
struct PoolStoreArgs {
  const void* src;
  int src_dtype;
  int64_t n, channels, hw;
  int64_t image_stride, channel_stride, hw_stride;
  void* cache;
  int cache_dtype;   // kFloat32, kFloat16, kBFloat16 or kInt8
  float* scales;     // int8 only
  const int64_t* rows;
};

// gather: out[i, :] = dequantized cache[indices[i], :], out contiguous (n, channels) in fp32 or bf16.
struct GatherArgs {
  const void* cache;
  int cache_dtype;
  const float* scales;  // int8 only
  const int64_t* indices;
  int64_t n, channels;
  void* out;
  int out_dtype;        // kFloat32 or kBFloat16
  // A cache stored as shards (CPU only: memory-mapped shard files): row r lives in shard
  // r / shard_rows at row r % shard_rows; `cache` and `scales` are then unused.
  const void* const* shard_caches = nullptr;
  const float* const* shard_scales = nullptr;  // int8 only
  int64_t shard_rows = 0;
  int threads = 0;  // CPU: threads for this call (claim_parallel); 0: OpenMP's current default
};

void pool_store_cpu(const PoolStoreArgs& args);
void gather_cpu(const GatherArgs& args);
void pool_store_cuda(const PoolStoreArgs& args, void* stream);
void gather_cuda(const GatherArgs& args, void* stream);

}  // namespace fasttl
