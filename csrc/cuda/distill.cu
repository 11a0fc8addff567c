// CUDA launch of the fused distillation loss: one row per group of threads, the per-element
// and per-row math from fasttl/distill.h.
#include <limits>

#include "fasttl/cuda_utils.cuh"
#include "fasttl/dispatch.h"
#include "fasttl/distill.h"
#include "fasttl/kernels.h"

namespace fasttl {
namespace {

// kThreads threads per row; small class counts use one warp per row (blockDim.y rows per
// block), large ones a whole block per row.
template <typename S, typename T, int kThreads>
__global__ void distill_rows_kernel(DistillArgs a) {
  __shared__ float scratch[4][kThreads > 32 ? kThreads / 32 : 1];
  const storage_t<S>* student_base = static_cast<const storage_t<S>*>(a.student);
  const storage_t<T>* teacher_base = static_cast<const storage_t<T>*>(a.teacher);
  storage_t<S>* grad_base = static_cast<storage_t<S>*>(a.grad);
  const float inv_t = 1.0f / a.temperature;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < a.rows; i += row_step) {
    const storage_t<S>* s = student_base + i * a.student_row_stride;
    const storage_t<T>* t = teacher_base + i * a.teacher_row_stride;
    storage_t<S>* g = grad_base + i * a.classes;
    const int64_t y = a.target ? a.target[i] : -1;
    if (a.target && y == a.ignore_index) {
      for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) g[j] = store<S>(0.0f);
      if (threadIdx.x == 0) a.loss_rows[i] = 0.0f;
      continue;  // uniform across the row's threads, so no reduction is left waiting
    }
    const DistillParams p{inv_t, a.temperature, a.alpha, a.target != nullptr};

    float ms = -INFINITY, mt = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      ms = fmaxf(ms, load<S>(s[j]));
      mt = fmaxf(mt, load<T>(t[j]));
    }
    ms = row_reduce<kThreads>(ms, MaxOp{}, scratch[0]);
    mt = row_reduce<kThreads>(mt, MaxOp{}, scratch[1]);

    DistillTerms sums{0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      const DistillTerms e = distill_terms(load<S>(s[j]), load<T>(t[j]), ms, mt, inv_t);
      sums.soft_student += e.soft_student;
      sums.soft_teacher += e.soft_teacher;
      sums.teacher_gap += e.teacher_gap;
      sums.hard_student += e.hard_student;
    }
    sums.soft_student = row_reduce<kThreads>(sums.soft_student, SumOp{}, scratch[0]);
    sums.soft_teacher = row_reduce<kThreads>(sums.soft_teacher, SumOp{}, scratch[1]);
    sums.teacher_gap = row_reduce<kThreads>(sums.teacher_gap, SumOp{}, scratch[2]);
    sums.hard_student = row_reduce<kThreads>(sums.hard_student, SumOp{}, scratch[3]);

    DistillGradCoef coef;
    const float s_target = p.hard ? load<S>(s[y]) : 0.0f;
    const float loss = distill_row_loss(sums, ms, mt, s_target, p, &coef);
    if (threadIdx.x == 0) a.loss_rows[i] = loss;
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      g[j] = store<S>(distill_grad(load<S>(s[j]), load<T>(t[j]), ms, mt, inv_t, coef, j == y));
    }
  }
}

template <typename S, typename T, int kThreads, int kRowsPerBlock>
void launch(const DistillArgs& a, cudaStream_t stream) {
  // row_reduce's block-wide barriers and per-warp scratch hold for one row per block only; rows of
  // at most a warp reduce with shuffles alone and may share a block.
  static_assert(kThreads <= 32 || kRowsPerBlock == 1, "rows wider than a warp need one block per row");
  const int64_t blocks_needed = (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t max_blocks = static_cast<int64_t>(cuda_sm_count()) * 32;
  const int blocks = static_cast<int>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
  distill_rows_kernel<S, T, kThreads><<<blocks, dim3(kThreads, kRowsPerBlock), 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "distill_rows_kernel launch");
}

}  // namespace

void distill_rows_cuda(const DistillArgs& a, void* stream_ptr) {
  if (a.rows == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float2(a.student_dtype, a.teacher_dtype, "distill_rows_cuda", [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    if (a.classes <= 1024) {
      launch<S, T, 32, 8>(a, stream);
    } else {
      launch<S, T, 256, 1>(a, stream);
    }
  });
}

}  // namespace fasttl
