// Per-row math of the fused distillation loss, shared by the CPU loop and the CUDA kernel.
//
//   loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
//   dloss/ds_j = alpha * T * (q_j - p_j) + (1 - alpha) * (softmax(s)_j - [j == y])
//
// All sums are in fp32 and every exp is taken relative to a (running) row max, so no
// intermediate overflows. The CPU keeps the sums pass's exps in a per-thread scratch row for the
// gradient pass (and, for T a small integer, takes exp(s - m) as exp((s - m)/T)^T); the GPU, with
// bandwidth to spare, takes them again. grad_scale (a known upstream gradient, such as the 1/B of a
// mean) is folded into the gradient coefficients, so backward need not pass over the gradient.
#pragma once

#include <cmath>

#include "fasttl/numeric.h"

namespace fasttl {

struct DistillParams {
  float inv_temperature;
  float temperature;
  float alpha;   // weight of the soft term; 1 when there is no target
  bool hard;     // whether the row has a counted hard target
  float grad_scale;  // the gradient written is grad_scale * dloss/ds (a known upstream gradient,
                     // e.g. 1/rows of a mean, folded in so that backward has nothing to do)
};

// The four sums a row needs, each one exp per element relative to the row max.
struct DistillTerms {
  float soft_student;   // sum exp((s - ms) / T)
  float soft_teacher;   // sum exp((t - mt) / T)
  float teacher_gap;    // sum exp((t - mt) / T) * (t - s)
  float hard_student;   // sum exp(s - ms)
};

// A class the teacher rules out (t = -inf, p = 0) adds nothing to the KL: 0 log 0 = 0, as in
// PyTorch's kl_div (xlogy). Without the select, 0 * (t - s) would be 0 * -inf = NaN; the same
// holds where the student rules the class out too (s = -inf).
FASTTL_HD float teacher_gap_term(float et, float s, float t) {
  return et == 0.0f ? 0.0f : et * (t - s);  // a NaN still propagates
}

FASTTL_HD DistillTerms distill_terms(float s, float t, float ms, float mt, float inv_t) {
  const float et = fast_exp((t - mt) * inv_t);
  return DistillTerms{fast_exp((s - ms) * inv_t), et, teacher_gap_term(et, s, t), fast_exp(s - ms)};
}

// A running max that is still -inf (nothing finite seen yet) is taken as 0 for the exps, so an
// all -inf stretch (masked classes) contributes exp(-inf) = 0 rather than NaN.
FASTTL_HD float finite_ref(float running_max) { return running_max == -INFINITY ? 0.0f : running_max; }

// Factor that moves sums taken relative to max `from` onto max `to` (to >= from), for a row
// summed in stretches with a growing max. Sums from before any finite value are 0 (factor 0).
FASTTL_HD float rescale(float from, float to, float scale) {
  return from == -INFINITY ? 0.0f : fast_exp((from - to) * scale);
}

// Coefficients of the gradient, fixed once the sums are known.
struct DistillGradCoef {
  float soft_scale;      // alpha * T * grad_scale
  float inv_z_student;   // 1 / sum exp((s - ms) / T)
  float inv_z_teacher;   // 1 / sum exp((t - mt) / T)
  float hard_scale;      // (1 - alpha) * grad_scale (0 when the row has no hard target)
  float inv_z_hard;      // 1 / sum exp(s - ms)
};

// Loss of one row from its sums; fills the gradient coefficients. s_target is the student logit
// at the target class (ignored when !p.hard).
FASTTL_HD float distill_row_loss(const DistillTerms& sums, float ms, float mt, float s_target,
                                 const DistillParams& p, DistillGradCoef* coef) {
  const float log_zs = fast_log(sums.soft_student);
  const float log_zt = fast_log(sums.soft_teacher);
  // KL = sum p (log p - log q) = gap / (T Zt) + (ms - mt) / T - log Zt + log Zs
  const float kl = sums.teacher_gap * p.inv_temperature / sums.soft_teacher +
                   (ms - mt) * p.inv_temperature - log_zt + log_zs;
  const float alpha = p.hard ? p.alpha : 1.0f;
  float loss = alpha * p.temperature * p.temperature * kl;
  coef->soft_scale = alpha * p.temperature * p.grad_scale;
  coef->inv_z_student = 1.0f / sums.soft_student;
  coef->inv_z_teacher = 1.0f / sums.soft_teacher;
  coef->hard_scale = 0.0f;
  coef->inv_z_hard = 1.0f / sums.hard_student;
  if (p.hard) {
    const float ce = fast_log(sums.hard_student) + ms - s_target;
    loss += (1.0f - alpha) * ce;
    coef->hard_scale = (1.0f - alpha) * p.grad_scale;
  }
  return loss;
}

// Gradient of one element from its terms (the exps of distill_terms), so a caller that kept
// them from the sums pass need not take them again.
FASTTL_HD float distill_grad_from_terms(float soft_student, float soft_teacher, float hard_student,
                                        const DistillGradCoef& c, bool is_target) {
  const float q = soft_student * c.inv_z_student;
  const float pt = soft_teacher * c.inv_z_teacher;
  const float soft = hard_student * c.inv_z_hard - (is_target ? 1.0f : 0.0f);
  return c.soft_scale * (q - pt) + c.hard_scale * soft;
}

FASTTL_HD float distill_grad(float s, float t, float ms, float mt, float inv_t,
                             const DistillGradCoef& c, bool is_target) {
  const DistillTerms e = distill_terms(s, t, ms, mt, inv_t);
  return distill_grad_from_terms(e.soft_student, e.soft_teacher, e.hard_student, c, is_target);
}

}  // namespace fasttl
