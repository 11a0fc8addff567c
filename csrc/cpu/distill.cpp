// CPU loop of the fused distillation loss: OpenMP over rows, vectorized over classes.
//
// Each row is read from memory once: it is taken in stretches of kChunk classes, each stretch's
// max and then its exps computed while it sits in L1, with the running sums moved onto the
// growing row max as it goes (online softmax). The exps are kept in a per-thread scratch row and
// the gradient pass rescales them, so each element costs three exps in all, or two when T is a
// small integer k: then exp(s - m) = exp((s - m) / T)^k, k - 1 multiplies instead of an exp
// (exp is what bounds this loop on a 2-core AVX2 CPU, not memory), and that third exp is not kept
// but taken again from the first in the gradient pass.
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

// A thread's scratch for one row: the exps of each element and, per stretch, the running maxima
// they were taken against.
struct RowScratch {
  float* es;     // exp((s - ref_s) / T)
  float* et;     // exp((t - ref_t) / T)
  float* eh;     // exp(s - ref_s)
  float* ref_s;  // the running student max each stretch was taken against
  float* ref_t;
};

// x^k for the integer temperatures (kPow = k); kPow = 0 means T is no small integer.
template <int kPow>
FASTTL_HD float int_pow(float x) {
  static_assert(kPow >= 1 && kPow <= 4, "int_pow: k in 1..4");
  if (kPow == 1) return x;
  if (kPow == 2) return x * x;
  if (kPow == 3) return x * x * x;
  const float x2 = x * x;
  return x2 * x2;
}

// exp(s - ref_s) of element j in pass 1.
template <int kPow>
FASTTL_HD float hard_exp(float s, float rs, float soft_student) {
  if constexpr (kPow == 0) {
    return fast_exp(s - rs);
  } else {
    return int_pow<kPow>(soft_student);
  }
}

// exp(s - ref_s) of element j in pass 2: kept in the scratch, or taken again from exp((s - ref_s) / T).
template <int kPow>
FASTTL_HD float kept_hard(const RowScratch& w, int64_t j) {
  if constexpr (kPow == 0) {
    return w.eh[j];
  } else {
    return int_pow<kPow>(w.es[j]);
  }
}

// Pass 1 over one row: online-softmax sums over stretches of kChunk classes, each stretch's sums
// moved onto the growing maxima as it goes; the exps stay in the scratch for pass 2.
template <typename S, typename T, int kPow>
FASTTL_HD DistillTerms row_sums(const storage_t<S>* s, const storage_t<T>* t, int64_t classes, float inv_t,
                                const RowScratch& w, float* ms_out, float* mt_out) {
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  float ms = -std::numeric_limits<float>::infinity(), mt = ms;
  DistillTerms sums{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kChunk;
    const int64_t stop = std::min(classes, start + kChunk);
    float cms = ms, cmt = mt;
#pragma omp simd reduction(max : cms, cmt)
    for (int64_t j = start; j < stop; ++j) {
      cms = std::max(cms, load<S>(s[j]));
      cmt = std::max(cmt, load<T>(t[j]));
    }
    if (cms != ms || cmt != mt) move_terms(sums, ms, mt, cms, cmt, inv_t, static_cast<float>(start));
    ms = cms;
    mt = cmt;
    const float rs = finite_ref(ms), rt = finite_ref(mt);
    const float ref_gap = rt - rs, abs_ref_gap = abs_value(ref_gap);
    w.ref_s[c] = ms;
    w.ref_t[c] = mt;
    float zs = 0.0f, zt = 0.0f, gap = 0.0f, bound = 0.0f, zh = 0.0f, sum_b = 0.0f;
#pragma omp simd reduction(+ : zs, zt, gap, bound, zh, sum_b)
    for (int64_t j = start; j < stop; ++j) {
      const float sj = load<S>(s[j]), tj = load<T>(t[j]);
      const float b = sj - rs, gap_j = tj - sj;
      const float es = fast_exp(b * inv_t);
      const float et = fast_exp((tj - rt) * inv_t);
      const float eh = hard_exp<kPow>(sj, rs, es);
      w.es[j] = es;
      w.et[j] = et;
      if (kPow == 0) w.eh[j] = eh;
      zs += es;
      zt += et;
      // 0 log 0 = 0 where the teacher rules a class out (distill_terms)
      gap += et == 0.0f ? 0.0f : et * (gap_j - ref_gap);
      bound += et == 0.0f ? 0.0f : et * (abs_value(gap_j) + abs_ref_gap);
      zh += eh;
      sum_b += b;
    }
    add_terms(sums, DistillTerms{zs, zt, gap, bound, zh, sum_b});
  }
  *ms_out = ms;
  *mt_out = mt;
  return sums;
}

// Pass 2 over one row: the gradient from the kept exps, each stretch's move onto the final maxima
// folded into the coefficients.
template <typename S, int kPow>
FASTTL_HD void row_grad(storage_t<S>* g, int64_t classes, int64_t y, bool hard, float inv_t, float ms, float mt,
                        const DistillGradCoef& coef, const RowScratch& w) {
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kChunk;
    const int64_t stop = std::min(classes, start + kChunk);
    DistillGradCoef k = coef;
    k.inv_z_student *= rescale(w.ref_s[c], ms, inv_t);
    // With kPow the kept es were taken against ref_s, so es^k is relative to it as well.
    k.inv_z_hard *= rescale(w.ref_s[c], ms, 1.0f);
    k.inv_z_teacher *= rescale(w.ref_t[c], mt, inv_t);
#pragma omp simd
    for (int64_t j = start; j < stop; ++j) {
      const float eh = kept_hard<kPow>(w, j);
      g[j] = store<S>(distill_grad_from_terms(w.es[j], w.et[j], eh, k, false));
    }
    // The target column is redone apart so that the loop above has no per-element test.
    if (hard && y >= start && y < stop) {
      const float eh = kept_hard<kPow>(w, y);
      g[y] = store<S>(distill_grad_from_terms(w.es[y], w.et[y], eh, k, true));
    }
  }
}

// A row whose fp32 loss is not known to be within the tolerance, in float64 (distill.h): its loss
// and its gradient, two more passes over the row (rare: see kExactRowTolerance).
template <typename S, typename T>
float exact_row(const storage_t<S>* s, const storage_t<T>* t, storage_t<S>* g, int64_t classes, int64_t y,
                float rs, float rt, const DistillParams& p) {
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  ExactSums sums{0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t j = 0; j < classes; ++j) exact_add(sums, load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t);
  ExactCoef coef;
  const double loss = exact_row_loss(sums, rs, p.hard ? load<S>(s[y]) : 0.0f, p, &coef);
  for (int64_t j = 0; j < classes; ++j) {
    g[j] = store<S>(exact_grad(load<S>(s[j]), load<T>(t[j]), rs, rt, inv_t, coef, p.hard && j == y));
  }
  return static_cast<float>(loss);
}

template <typename S, typename T, int kPow>
FASTTL_CPU_CLONES void distill_rows_loop(const DistillArgs& a) {
  const storage_t<S>* student = static_cast<const storage_t<S>*>(a.student);
  const storage_t<T>* teacher = static_cast<const storage_t<T>*>(a.teacher);
  storage_t<S>* grad = static_cast<storage_t<S>*>(a.grad);
  const int64_t classes = a.classes;
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  const float inv_t = 1.0f / a.temperature;

#pragma omp parallel
  {
    // One vector per thread for the whole call (not per row).
    std::vector<float> scratch(3 * classes + 2 * chunks);
    float* base = scratch.data();
    const RowScratch w{base, base + classes, base + 2 * classes, base + 3 * classes, base + 3 * classes + chunks};

#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      storage_t<S>* g = grad + i * classes;
      const int64_t y = a.target ? a.target[i] : -1;
      if (a.target && y == a.ignore_index) {
        a.loss_rows[i] = 0.0f;
        for (int64_t j = 0; j < classes; ++j) g[j] = store<S>(0.0f);
        continue;
      }
      const storage_t<S>* s = student + i * a.student_row_stride;
      const storage_t<T>* t = teacher + i * a.teacher_row_stride;
      const DistillParams p{inv_t, a.temperature, a.alpha, a.target != nullptr, a.grad_scale, a.label_smoothing,
                            1.0f / static_cast<float>(classes)};
      float ms, mt;
      const DistillTerms sums = row_sums<S, T, kPow>(s, t, classes, inv_t, w, &ms, &mt);
      DistillGradCoef coef;
      float error_bound;
      const float rs = finite_ref(ms);
      const float loss = distill_row_loss(sums, rs, p.hard ? load<S>(s[y]) : 0.0f, p, &coef, &error_bound);
      if (needs_exact_row(loss, error_bound, ms, mt)) {
        a.loss_rows[i] = exact_row<S, T>(s, t, g, classes, y, rs, finite_ref(mt), p);
        continue;
      }
      a.loss_rows[i] = loss;
      row_grad<S, kPow>(g, classes, y, p.hard, inv_t, ms, mt, coef, w);
    }
  }
}

// k when the temperature is an integer k in 1..4 (the usual choices), else 0.
int integer_temperature(float temperature) {
  for (int k = 1; k <= 4; ++k) {
    if (temperature == static_cast<float>(k)) return k;
  }
  return 0;
}

}  // namespace

namespace {
// Overloads by target are dispatched by the same resolver, with the same priorities, as the
// target_clones of the kernels, so the name returned is that of the clone the kernels run. (Only
// a call from this file is dispatched: another file would link to the default version.)
#if defined(FASTTL_HAS_CPU_CLONES)
__attribute__((target("arch=x86-64-v4"))) const char* clone_name() { return "x86-64-v4 (AVX-512)"; }
__attribute__((target("arch=x86-64-v3"))) const char* clone_name() { return "x86-64-v3 (AVX2+FMA)"; }
__attribute__((target("default"))) const char* clone_name() { return "default (x86-64, SSE2)"; }
#else
const char* clone_name() { return "single build (no clones)"; }
#endif
}  // namespace

const char* cpu_kernel_clone() { return clone_name(); }

void distill_rows_cpu(const DistillArgs& a) {
  dispatch_float2(a.student_dtype, a.teacher_dtype, "distill_rows_cpu", [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    switch (integer_temperature(a.temperature)) {
      case 1: distill_rows_loop<S, T, 1>(a); break;
      case 2: distill_rows_loop<S, T, 2>(a); break;
      case 3: distill_rows_loop<S, T, 3>(a); break;
      case 4: distill_rows_loop<S, T, 4>(a); break;
      default: distill_rows_loop<S, T, 0>(a); break;
    }
  });
}

}  // namespace fasttl
