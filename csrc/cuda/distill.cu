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

// The row sums of all kThreads threads, each thread's sums first moved onto the row maxima.
template <int kThreads>
__device__ DistillTerms reduce_terms(DistillTerms part, float ms, float mt, float row_ms, float row_mt, float inv_t,
                                     float count, float (*scratch)[kThreads > 32 ? kThreads / 32 : 1]) {
  move_terms(part, ms, mt, row_ms, row_mt, inv_t, count);
  DistillTerms sums;
  sums.soft_student = row_reduce<kThreads>(part.soft_student, SumOp{}, scratch[0]);
  sums.soft_teacher = row_reduce<kThreads>(part.soft_teacher, SumOp{}, scratch[1]);
  sums.teacher_gap = row_reduce<kThreads>(part.teacher_gap, SumOp{}, scratch[2]);
  sums.gap_bound = row_reduce<kThreads>(part.gap_bound, SumOp{}, scratch[3]);
  sums.hard_student = row_reduce<kThreads>(part.hard_student, SumOp{}, scratch[0]);
  sums.student_sum = row_reduce<kThreads>(part.student_sum, SumOp{}, scratch[1]);
  return sums;
}

// A row whose fp32 loss is not known to be within the tolerance, in float64 by all the row's
// threads (distill.h; rare): writes its gradient, returns its loss.
template <typename S, typename T, int kThreads>
__device__ float exact_row(const storage_t<S>* s, const storage_t<T>* t, storage_t<S>* g, int64_t classes,
                           int64_t y, float rs, float rt, const DistillParams& p,
                           double (*scratch)[kThreads > 32 ? kThreads / 32 : 1]) {
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  ExactSums part{0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) exact_add(part, load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t);
  ExactSums sums;
  sums.soft_student = row_reduce<kThreads>(part.soft_student, SumOp{}, scratch[0]);
  sums.soft_teacher = row_reduce<kThreads>(part.soft_teacher, SumOp{}, scratch[1]);
  sums.hard_rest = row_reduce<kThreads>(part.hard_rest, SumOp{}, scratch[2]);
  sums.hard_ties = row_reduce<kThreads>(part.hard_ties, SumOp{}, scratch[0]);
  sums.phi = row_reduce<kThreads>(part.phi, SumOp{}, scratch[1]);
  sums.u = row_reduce<kThreads>(part.u, SumOp{}, scratch[2]);
  sums.student = row_reduce<kThreads>(part.student, SumOp{}, scratch[0]);
  ExactCoef coef;
  const double loss = exact_row_loss(sums, rs, p.hard ? load<S>(s[y]) : 0.0f, p, &coef);
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
    g[j] = store<S>(exact_grad(load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t, coef, p.hard && j == y));
  }
  return static_cast<float>(loss);
}

// kThreads threads per row; small class counts use one warp per row (blockDim.y rows per
// block), large ones a whole block per row.
template <typename S, typename T, int kThreads>
__global__ void distill_rows_kernel(DistillArgs a) {
  __shared__ float scratch[4][kThreads > 32 ? kThreads / 32 : 1];
  __shared__ double exact_scratch[3][kThreads > 32 ? kThreads / 32 : 1];
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
    const DistillParams p{inv_t, a.temperature, a.alpha, a.target != nullptr, a.grad_scale, a.label_smoothing,
                          1.0f / static_cast<float>(a.classes)};

    // Pass 1: each thread keeps its own running maxima and its sums relative to them, moving the
    // sums onto a new maximum when one appears (online softmax, as the CPU loop does per stretch).
    float ms = -INFINITY, mt = -INFINITY, count = 0.0f;
    DistillTerms part{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < a.classes; j += kThreads) {
      const float sj = load<S>(s[j]), tj = load<T>(t[j]);
      // > is false for NaN, as fmaxf ignores it; the NaN still reaches the sums below
      const float ms2 = sj > ms ? sj : ms, mt2 = tj > mt ? tj : mt;
      if (ms2 != ms || mt2 != mt) move_terms(part, ms, mt, ms2, mt2, inv_t, count);
      ms = ms2;
      mt = mt2;
      add_terms(part, distill_terms(sj, tj, finite_ref(ms), finite_ref(mt), inv_t));
      count += 1.0f;
    }
    const float row_ms = row_reduce<kThreads>(ms, MaxOp{}, scratch[0]);
    const float row_mt = row_reduce<kThreads>(mt, MaxOp{}, scratch[1]);
    const DistillTerms sums = reduce_terms<kThreads>(part, ms, mt, row_ms, row_mt, inv_t, count, scratch);
    const float rs = finite_ref(row_ms), rt = finite_ref(row_mt);

    DistillGradCoef coef;
    float error_bound;
    const float loss = distill_row_loss(sums, rs, p.hard ? load<S>(s[y]) : 0.0f, p, &coef, &error_bound);
    if (needs_exact_row(loss, error_bound, row_ms, row_mt)) {  // the same for every thread of the row: uniform
      const float exact = exact_row<S, T, kThreads>(s, t, g, a.classes, y, rs, rt, p, exact_scratch);
      if (threadIdx.x == 0) a.loss_rows[i] = exact;
      continue;
    }
    if (threadIdx.x == 0) a.loss_rows[i] = loss;
    // Pass 2: the gradient, with the exps taken against the same references as the sums.
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
