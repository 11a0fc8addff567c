// CPU loop of the fused distillation loss: OpenMP over rows, vectorized over classes.
//
// Each row is read from memory once: it is taken in stretches of kChunk classes, each stretch's
// max and then its exps computed while it sits in L1, with the running sums moved onto the
// growing row max as it goes (online softmax). The exps are kept in a per-thread scratch row and
// the gradient pass rescales them, so each element costs three exps in all.
#include <algorithm>
#include <limits>
#include <vector>

#include "fasttl/dispatch.h"
#include "fasttl/distill.h"
#include "fasttl/kernels.h"

namespace fasttl {
namespace {

// Also the length of the short sums that are added into the row totals: a single running sum
// over a 262,144-class row loses the small terms to rounding (errors near 1e-3 relative).
constexpr int64_t kChunk = 512;

template <typename S, typename T>
FASTTL_CPU_CLONES void distill_rows_loop(const DistillArgs& a) {
  const storage_t<S>* student = static_cast<const storage_t<S>*>(a.student);
  const storage_t<T>* teacher = static_cast<const storage_t<T>*>(a.teacher);
  storage_t<S>* grad = static_cast<storage_t<S>*>(a.grad);
  const int64_t classes = a.classes;
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  const float inv_t = 1.0f / a.temperature;
  const float neg_inf = -std::numeric_limits<float>::infinity();

#pragma omp parallel
  {
    std::vector<float> scratch(3 * classes + 2 * chunks);
    float* es = scratch.data();       // exp((s - ref_s) / T)
    float* et = es + classes;         // exp((t - ref_t) / T)
    float* eh = et + classes;         // exp(s - ref_s)
    float* ref_s = eh + classes;      // the running student max each stretch was taken against
    float* ref_t = ref_s + chunks;

#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      const storage_t<S>* s = student + i * a.student_row_stride;
      const storage_t<T>* t = teacher + i * a.teacher_row_stride;
      storage_t<S>* g = grad + i * classes;
      const int64_t y = a.target ? a.target[i] : -1;
      if (a.target && y == a.ignore_index) {
        a.loss_rows[i] = 0.0f;
        for (int64_t j = 0; j < classes; ++j) g[j] = store<S>(0.0f);
        continue;
      }
      const DistillParams p{inv_t, a.temperature, a.alpha, a.target != nullptr};

      float ms = neg_inf, mt = neg_inf;
      DistillTerms sums{0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * kChunk;
        const int64_t stop = std::min(classes, start + kChunk);
        float cms = ms, cmt = mt;
#pragma omp simd reduction(max : cms, cmt)
        for (int64_t j = start; j < stop; ++j) {
          cms = std::max(cms, load<S>(s[j]));
          cmt = std::max(cmt, load<T>(t[j]));
        }
        if (cms != ms) {
          const float f_soft = rescale(ms, cms, inv_t);
          sums.soft_student *= f_soft;
          sums.hard_student *= rescale(ms, cms, 1.0f);
        }
        if (cmt != mt) {
          const float f_teacher = rescale(mt, cmt, inv_t);
          sums.soft_teacher *= f_teacher;
          sums.teacher_gap *= f_teacher;
        }
        ms = cms;
        mt = cmt;
        const float rs = finite_ref(ms), rt = finite_ref(mt);
        ref_s[c] = ms;
        ref_t[c] = mt;
        float zs = 0.0f, zt = 0.0f, gap = 0.0f, zh = 0.0f;
#pragma omp simd reduction(+ : zs, zt, gap, zh)
        for (int64_t j = start; j < stop; ++j) {
          const DistillTerms e = distill_terms(load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t);
          es[j] = e.soft_student;
          et[j] = e.soft_teacher;
          eh[j] = e.hard_student;
          zs += e.soft_student;
          zt += e.soft_teacher;
          gap += e.teacher_gap;
          zh += e.hard_student;
        }
        sums.soft_student += zs;
        sums.soft_teacher += zt;
        sums.teacher_gap += gap;
        sums.hard_student += zh;
      }

      DistillGradCoef coef;
      const float s_target = p.hard ? load<S>(s[y]) : 0.0f;
      a.loss_rows[i] = distill_row_loss(sums, ms, mt, s_target, p, &coef);

      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * kChunk;
        const int64_t stop = std::min(classes, start + kChunk);
        // Fold each stretch's move onto the final maxima into the coefficients.
        DistillGradCoef k = coef;
        k.inv_z_student *= rescale(ref_s[c], ms, inv_t);
        k.inv_z_hard *= rescale(ref_s[c], ms, 1.0f);
        k.inv_z_teacher *= rescale(ref_t[c], mt, inv_t);
#pragma omp simd
        for (int64_t j = start; j < stop; ++j) {
          g[j] = store<S>(distill_grad_from_terms(es[j], et[j], eh[j], k, false));
        }
        // The target column is redone apart so that the loop above has no per-element test.
        if (p.hard && y >= start && y < stop) {
          g[y] = store<S>(distill_grad_from_terms(es[y], et[y], eh[y], k, true));
        }
      }
    }
  }
}

}  // namespace

void distill_rows_cpu(const DistillArgs& a) {
  dispatch_float2(a.student_dtype, a.teacher_dtype, "distill_rows_cpu", [&](auto s_tag, auto t_tag) {
    distill_rows_loop<decltype(s_tag), decltype(t_tag)>(a);
  });
}

}  // namespace fasttl
