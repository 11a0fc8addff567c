// CUDA launch of the fused distillation loss: one row per group of threads, the per-element
// and per-row math from fasttl/distill.h. Each row is read twice: once for the maxima and sums
// together (online), once for the gradient.
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
    const DistillParams p{inv_t, a.temperature, a.alpha, a.target != nullptr, a.grad_scale};

    // Pass 1: each thread keeps its own running maxima and its sums relative to them, moving the
    // sums onto a new maximum when one appears (online softmax, as the CPU loop does per stretch).
    float ms = -INFINITY, mt = -INFINITY;
    DistillTerms part{0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      const float sj = load<S>(s[j]), tj = load<T>(t[j]);
      if (sj > ms) {  // false for NaN, as fmaxf ignores it; the NaN still reaches the sums below
        part.soft_student *= rescale(ms, sj, inv_t);
        part.hard_student *= rescale(ms, sj, 1.0f);
        ms = sj;
      }
      if (tj > mt) {
        const float f = rescale(mt, tj, inv_t);
        part.soft_teacher *= f;
        part.teacher_gap *= f;
        mt = tj;
      }
      const DistillTerms e = distill_terms(sj, tj, finite_ref(ms), finite_ref(mt), inv_t);
      part.soft_student += e.soft_student;
      part.soft_teacher += e.soft_teacher;
      part.teacher_gap += e.teacher_gap;
      part.hard_student += e.hard_student;
    }
    // The row maxima, then every thread's sums moved onto them and added up.
    const float row_ms = row_reduce<kThreads>(ms, MaxOp{}, scratch[0]);
    const float row_mt = row_reduce<kThreads>(mt, MaxOp{}, scratch[1]);
    const float fs = rescale(ms, row_ms, inv_t), fh = rescale(ms, row_ms, 1.0f), ft = rescale(mt, row_mt, inv_t);
    DistillTerms sums;
    sums.soft_student = row_reduce<kThreads>(part.soft_student * fs, SumOp{}, scratch[0]);
    sums.soft_teacher = row_reduce<kThreads>(part.soft_teacher * ft, SumOp{}, scratch[1]);
    sums.teacher_gap = row_reduce<kThreads>(part.teacher_gap * ft, SumOp{}, scratch[2]);
    sums.hard_student = row_reduce<kThreads>(part.hard_student * fh, SumOp{}, scratch[3]);
    ms = row_ms;
    mt = row_mt;

    DistillGradCoef coef;
    const float s_target = p.hard ? load<S>(s[y]) : 0.0f;
    const float loss = distill_row_loss(sums, ms, mt, s_target, p, &coef);
    if (threadIdx.x == 0) a.loss_rows[i] = loss;
    // Pass 2: the gradient, with the exps taken against the same references as the sums.
    const float rs = finite_ref(ms), rt = finite_ref(mt);
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      g[j] = store<S>(distill_grad(load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t, coef, j == y));
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
