// Per-row math of the fused distillation loss, shared by the CPU loop and the CUDA kernel.
//
//   loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE_eps(s, y)
//   dloss/ds_j = alpha * T * (q_j - p_j) + (1 - alpha) * (softmax(s)_j - (1 - eps) [j == y] - eps / C)
// (CE_eps: cross-entropy with label smoothing eps, as torch's cross_entropy).
//
// All sums are in fp32 and every exp is taken relative to a (running) row max, so no
// intermediate overflows. The CPU keeps the sums pass's exps in a per-thread scratch row for the
// gradient pass (and, for T a small integer, takes exp(s - m) as exp((s - m)/T)^T); the GPU, with
// bandwidth to spare, takes them again. grad_scale (a known upstream gradient, such as the 1/B of
// a mean) is folded into the gradient coefficients, so backward need not pass over the gradient.
// A row whose fp32 loss may be off by more than kExactRowTolerance (by a bound computed beside
// it) is redone in float64 (exact_*): rare in training, and what keeps extreme temperatures and
// logits within 1e-3 of the float64 formula.
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
  float label_smoothing;  // eps of the hard term: the target is (1 - eps) one-hot + eps / C
  float inv_classes;      // 1 / C
};

// The sums a row needs, taken relative to reference values rs, rt (the row maxima, or 0 while
// nothing finite was seen): with a = t - rt and b = s - rs per element,
struct DistillTerms {
  float soft_student;   // Zs = sum exp(b / T)
  float soft_teacher;   // Zt = sum exp(a / T)
  float teacher_gap;    // G  = sum exp(a / T) * (a - b): the KL's linear part, with a - b taken as
                        //      (t - s) - (rt - rs), so that neither large logits nor a student close
                        //      to its teacher leave it the difference of two large numbers
  float gap_bound;      // sum exp(a / T) * (|t - s| + |rt - rs|): what the rounding of G scales with
  float hard_student;   // Zh = sum exp(b)
  float student_sum;    // sum b (the label-smoothing term)
};

FASTTL_HD float abs_value(float x) { return x < 0.0f ? -x : x; }

// One element's terms. A class the teacher rules out (t = -inf, exp(a / T) = 0) adds nothing to
// the KL: 0 log 0 = 0, as in PyTorch's kl_div (xlogy); without the select 0 * inf would be NaN.
// A NaN still propagates.
FASTTL_HD DistillTerms distill_terms(float s, float t, float rs, float rt, float inv_t) {
  const float b = s - rs, gap = t - s, ref_gap = rt - rs;
  const float et = fast_exp((t - rt) * inv_t);
  return DistillTerms{fast_exp(b * inv_t), et, et == 0.0f ? 0.0f : et * (gap - ref_gap),
                      et == 0.0f ? 0.0f : et * (abs_value(gap) + abs_value(ref_gap)), fast_exp(b), b};
}

FASTTL_HD void add_terms(DistillTerms& sums, const DistillTerms& e) {
  sums.soft_student += e.soft_student;
  sums.soft_teacher += e.soft_teacher;
  sums.teacher_gap += e.teacher_gap;
  sums.gap_bound += e.gap_bound;
  sums.hard_student += e.hard_student;
  sums.student_sum += e.student_sum;
}

// A running max that is still -inf (nothing finite seen yet) is taken as 0 for the exps, so an
// all -inf stretch (masked classes) contributes exp(-inf) = 0 rather than NaN.
FASTTL_HD float finite_ref(float running_max) { return running_max == -INFINITY ? 0.0f : running_max; }

// Factor that moves sums taken relative to max `from` onto max `to` (to >= from), for a row
// summed in stretches with a growing max. Sums from before any finite value are 0 (factor 0).
FASTTL_HD float rescale(float from, float to, float scale) {
  return from == -INFINITY ? 0.0f : fast_exp((from - to) * scale);
}

// Moves sums of `count` elements from the maxima (ms, mt) onto larger ones (ms2, mt2): the exps
// by their factors, G and its bound by the shift of a - b, the student sum by the shift of b.
FASTTL_HD void move_terms(DistillTerms& sums, float ms, float mt, float ms2, float mt2, float inv_t, float count) {
  const float shift_s = finite_ref(ms) - finite_ref(ms2);  // b moves by this
  // a - b moves by the change of rt - rs
  const float shift_gap = (finite_ref(mt) - finite_ref(ms)) - (finite_ref(mt2) - finite_ref(ms2));
  const float ft = rescale(mt, mt2, inv_t);
  sums.teacher_gap = ft * (sums.teacher_gap + sums.soft_teacher * shift_gap);
  sums.gap_bound = ft * (sums.gap_bound + sums.soft_teacher * abs_value(shift_gap));
  sums.soft_teacher *= ft;
  sums.soft_student *= rescale(ms, ms2, inv_t);
  sums.hard_student *= rescale(ms, ms2, 1.0f);
  sums.student_sum += count * shift_s;
}

// Coefficients of the gradient, fixed once the sums are known.
struct DistillGradCoef {
  float soft_scale;      // alpha * T * grad_scale
  float inv_z_student;   // 1 / sum exp((s - ms) / T)
  float inv_z_teacher;   // 1 / sum exp((t - mt) / T)
  float hard_scale;      // (1 - alpha) * grad_scale (0 when the row has no hard target)
  float inv_z_hard;      // 1 / sum exp(s - ms)
  float target_weight;   // 1 - label_smoothing: the target's share of the hard target
  float smoothing_share; // label_smoothing / C: every class's share
};

// Relative error a row's fp32 loss may have before the row is redone in float64: the public
// promise is 1e-3 of the float64 formula, and the bound below overestimates the error.
constexpr float kExactRowTolerance = 1e-3f;

// Loss of one row from its sums (taken relative to rs = finite_ref(ms)); fills the gradient
// coefficients and a bound on the loss's rounding error. s_target: the student logit at the
// target class (ignored when !p.hard).
//   KL = sum p (log p - log q) = G / (T Zt) + log(Zs / Zt)
//   CE = log Zh - (1 - eps) (s_y - ms) - eps mean(s - ms)
FASTTL_HD float distill_row_loss(const DistillTerms& sums, float rs, float s_target, const DistillParams& p,
                                 DistillGradCoef* coef, float* error_bound) {
  const float log_ratio = fast_log(sums.soft_student / sums.soft_teacher);
  const float linear = sums.teacher_gap * p.inv_temperature / sums.soft_teacher;
  const float alpha = p.hard ? p.alpha : 1.0f;
  const float soft_weight = alpha * p.temperature * p.temperature;
  // A term of weight 0 is left out, not multiplied: a class one side rules out (logit -inf) makes
  // it inf, and 0 * inf would turn alpha = 0 (cross-entropy alone) into NaN.
  float loss = soft_weight == 0.0f ? 0.0f : soft_weight * (linear + log_ratio);
  // Each of G, Zs, Zt, Zh is a sum of terms with a few ulps of error each (fast_exp, the sums).
  float magnitude = soft_weight == 0.0f ? 0.0f :
      soft_weight * (sums.gap_bound * p.inv_temperature / sums.soft_teacher + abs_value(log_ratio) + 1.0f);
  coef->soft_scale = alpha * p.temperature * p.grad_scale;
  coef->inv_z_student = 1.0f / sums.soft_student;
  coef->inv_z_teacher = 1.0f / sums.soft_teacher;
  coef->hard_scale = 0.0f;
  coef->inv_z_hard = 1.0f / sums.hard_student;
  coef->target_weight = 1.0f - p.label_smoothing;
  coef->smoothing_share = p.label_smoothing * p.inv_classes;
  if (p.hard && alpha != 1.0f) {
    const float log_zh = fast_log(sums.hard_student);
    const float target_gap = s_target - rs;
    // Only with smoothing: the sum is -inf where a logit is, and 0 * -inf would be NaN.
    const float smooth = p.label_smoothing > 0.0f ? p.label_smoothing * sums.student_sum * p.inv_classes : 0.0f;
    const float ce = log_zh - coef->target_weight * target_gap - smooth;
    loss += (1.0f - alpha) * ce;
    magnitude += (1.0f - alpha) * (abs_value(log_zh) + abs_value(target_gap) + abs_value(smooth) + 1.0f);
    coef->hard_scale = (1.0f - alpha) * p.grad_scale;
  }
  // A few ulps of each term's size: fast_exp's 2 ulps, the sums', the logs'. An estimate, not a
  // proof: tests/test_distill_parity.py checks it against a 50-digit evaluation at the edges.
  *error_bound = 4.0f * 1.1920929e-7f * magnitude;
  return loss;
}

// Whether the fp32 loss may miss the float64 formula by more than the tolerance. A loss or bound
// that is not finite is redone too: finite logits near float32's limit overflow s / T or t - s in
// fp32 but not in float64. Not where a row max (ms, mt) is +inf: an infinite input's NaN or inf is
// the answer either way, and the fp32 path gives the reference's.
FASTTL_HD bool needs_exact_row(float loss, float error_bound, float ms, float mt) {
  const float size = abs_value(loss);
  if (size <= 3.40282347e38f && error_bound <= kExactRowTolerance * size) return false;
  return ms <= 3.40282347e38f && mt <= 3.40282347e38f;
}

// Gradient of one element from its terms (the exps of distill_terms), so a caller that kept
// them from the sums pass need not take them again.
FASTTL_HD float distill_grad_from_terms(float soft_student, float soft_teacher, float hard_student,
                                        const DistillGradCoef& c, bool is_target) {
  const float q = soft_student * c.inv_z_student;
  const float pt = soft_teacher * c.inv_z_teacher;
  const float soft = hard_student * c.inv_z_hard - (is_target ? c.target_weight : 0.0f) - c.smoothing_share;
  return c.soft_scale * (q - pt) + c.hard_scale * soft;
}

FASTTL_HD float distill_grad(float s, float t, float rs, float rt, float inv_t, const DistillGradCoef& c,
                             bool is_target) {
  const float b = s - rs;
  return distill_grad_from_terms(fast_exp(b * inv_t), fast_exp((t - rt) * inv_t), fast_exp(b), c, is_target);
}

// ---- the exact row: float64, for the rows whose fp32 error bound is too wide ------------------
// With d = (a - b) / T per element, p = softmax(t / T), q = softmax(s / T):
//   KL = sum p d + log(sum p e^-d) = sum p phi(d) - psi(u),   u = sum p expm1(-d),
//   phi(d) = e^-d - 1 + d >= 0,   psi(u) = u - log1p(u) >= 0,
// each taken by its Taylor series near 0, so that a KL of 1e-12 (a high temperature, a student
// close to its teacher) is not the difference of two numbers near 1. The maxima (rs, rt) are the
// fp32 path's: a max is exact in any precision.
FASTTL_HD double exact_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

FASTTL_HD double exact_log1p(double x) {
#if defined(__CUDA_ARCH__)
  return ::log1p(x);
#else
  return std::log1p(x);
#endif
}

FASTTL_HD double exact_phi(double d) {
  if (d < 1e-2 && d > -1e-2) {
    return d * d * (0.5 - d * (1.0 / 6 - d * (1.0 / 24 - d * (1.0 / 120 - d * (1.0 / 720)))));
  }
#if defined(__CUDA_ARCH__)
  return ::expm1(-d) + d;
#else
  return std::expm1(-d) + d;
#endif
}

FASTTL_HD double exact_expm1(double x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  return std::expm1(x);
#endif
}

FASTTL_HD double exact_psi(double u) {
  if (u < 1e-2 && u > -1e-2) {
    return u * u * (0.5 - u * (1.0 / 3 - u * (0.25 - u * (0.2 - u * (1.0 / 6)))));
  }
#if defined(__CUDA_ARCH__)
  return u - ::log1p(u);
#else
  return u - std::log1p(u);
#endif
}

struct ExactSums {
  double soft_student, soft_teacher;  // Zs, Zt
  double hard_rest;  // Zh less the row maxima's terms: log Zh = log1p(hard_ties - 1 + hard_rest) keeps a
  double hard_ties;  // cross-entropy of 1e-18 (a confident, right student) that log(1 + 1e-18) would lose
  double phi;       // sum exp(a / T) phi(d)
  double u;         // sum exp(a / T) expm1(-d)
  double student;   // sum b
};

// Each element's share of phi and u: et phi(d) = es - et + et d and et expm1(-d) = es - et, taken
// by the series (et times them) where d is small and they would cancel, and as written where it is
// not. As written they also hold where et underflows to 0 (a confident teacher) while es does not:
// there the student's mass still counts in Zs / Zt, which et e^-d alone would drop.
FASTTL_HD void exact_add(ExactSums& sums, float s, float t, float rs, float rt, double inv_t) {
  const double a = static_cast<double>(t) - rt, b = static_cast<double>(s) - rs;
  const double et = exact_exp(a * inv_t), es = exact_exp(b * inv_t);
  sums.soft_student += es;
  sums.soft_teacher += et;
  sums.hard_rest += b == 0.0 ? 0.0 : exact_exp(b);
  sums.hard_ties += b == 0.0 ? 1.0 : 0.0;
  const double d = (a - b) * inv_t;
  if (et != 0.0 && d < 1e-2 && d > -1e-2) {
    sums.phi += et * exact_phi(d);
    sums.u += et * exact_expm1(-d);
  } else {
    sums.phi += es - et + (et == 0.0 ? 0.0 : et * d);  // 0 log 0 = 0 where the teacher rules a class out
    sums.u += es - et;
  }
  sums.student += b;
}

struct ExactCoef {
  double soft_scale, inv_z_student, inv_z_teacher, hard_scale, inv_z_hard, target_weight, smoothing_share;
};

FASTTL_HD double exact_row_loss(const ExactSums& sums, float rs, float s_target, const DistillParams& p,
                                ExactCoef* coef) {
  const double zt = sums.soft_teacher;
  double kl = sums.phi / zt - exact_psi(sums.u / zt);
  kl = kl < 0.0 ? 0.0 : kl;  // >= 0 in exact arithmetic; rounding may leave -1e-17 (a NaN stays NaN)
  const double alpha = p.hard ? p.alpha : 1.0;
  const double temperature = p.temperature;
  double loss = alpha == 0.0 ? 0.0 : alpha * temperature * temperature * kl;  // 0 * inf left out
  coef->soft_scale = alpha * temperature * p.grad_scale;
  coef->inv_z_student = 1.0 / sums.soft_student;
  coef->inv_z_teacher = 1.0 / zt;
  coef->hard_scale = 0.0;
  const double hard_excess = sums.hard_ties - 1.0 + sums.hard_rest;  // Zh - 1
  coef->inv_z_hard = 1.0 / (1.0 + hard_excess);
  coef->target_weight = 1.0 - static_cast<double>(p.label_smoothing);
  coef->smoothing_share = static_cast<double>(p.label_smoothing) * p.inv_classes;
  if (p.hard && alpha != 1.0) {
    const double smooth = p.label_smoothing > 0.0f ? p.label_smoothing * sums.student * p.inv_classes : 0.0;
    const double ce = exact_log1p(hard_excess) - coef->target_weight * (static_cast<double>(s_target) - rs) - smooth;
    loss += (1.0 - alpha) * ce;
    coef->hard_scale = (1.0 - alpha) * p.grad_scale;
  }
  return loss;
}

FASTTL_HD float exact_grad(float s, float t, float rs, float rt, double inv_t, const ExactCoef& c, bool is_target) {
  const double a = static_cast<double>(t) - rt, b = static_cast<double>(s) - rs;
  const double q = exact_exp(b * inv_t) * c.inv_z_student;
  const double pt = exact_exp(a * inv_t) * c.inv_z_teacher;
  const double hard = exact_exp(b) * c.inv_z_hard - (is_target ? c.target_weight : 0.0) - c.smoothing_share;
  return static_cast<float>(c.soft_scale * (q - pt) + c.hard_scale * hard);
}

}  // namespace fasttl
