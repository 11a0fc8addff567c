// Per-element math of Adam / AdamW with fp32 master weights and moments, shared by the CPU
// loop and the CUDA multi-tensor kernel. Same arithmetic as torch's fused Adam:
//
//   g = grad / grad_scale  (negated when maximizing)
//   AdamW: w -= lr * weight_decay * w          Adam: g += weight_decay * w
//   m = beta1 * m + (1 - beta1) * g            v = beta2 * v + (1 - beta2) * g * g
//   v_hat = amsgrad ? (v_max = max(v_max, v)) : v
//   w -= (lr / (1 - beta1^step)) * m / (sqrt(v_hat) / sqrt(1 - beta2^step) + eps)
// (the division by sqrt(1 - beta2^step) taken as a multiply by its reciprocal: within fp32
// rounding of torch's result, and one divide per element fewer)
#pragma once

#include <cmath>

#include "fasttl/numeric.h"

namespace fasttl {

struct AdamHyper {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool amsgrad;
  bool maximize;
};

// The per-tensor factors that depend on the step count.
struct AdamStepFactors {
  float step_size;                  // lr / (1 - beta1^step)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step): a multiply per element, not a divide
};

FASTTL_HD AdamStepFactors adam_step_factors(const AdamHyper& h, float step) {
#if defined(__CUDA_ARCH__)
  const float bc1 = 1.0f - powf(h.beta1, step);
  const float bc2 = 1.0f - powf(h.beta2, step);
  return AdamStepFactors{h.lr / bc1, 1.0f / sqrtf(bc2)};
#else
  const float bc1 = 1.0f - std::pow(h.beta1, step);
  const float bc2 = 1.0f - std::pow(h.beta2, step);
  return AdamStepFactors{h.lr / bc1, 1.0f / std::sqrt(bc2)};
#endif
}

struct AdamElement {
  float w;      // weight (the fp32 master where there is one)
  float m;      // exp_avg
  float v;      // exp_avg_sq
  float v_max;  // max_exp_avg_sq (amsgrad only)
};

// The hyperparameters folded into the factors the element update uses, so that it has no
// branch but the amsgrad one (a template parameter): branches on the flags kept GCC from
// vectorizing the bf16 loops.
struct AdamCoefficients {
  float grad_sign;     // -1 when maximizing
  float decay_factor;  // AdamW: 1 - lr * weight_decay, else 1
  float l2_decay;      // Adam: weight_decay, else 0
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

FASTTL_HD AdamCoefficients adam_coefficients(const AdamHyper& h) {
  const bool decoupled = h.decoupled_weight_decay;
  return AdamCoefficients{h.maximize ? -1.0f : 1.0f,
                          decoupled ? 1.0f - h.lr * h.weight_decay : 1.0f,
                          decoupled ? 0.0f : h.weight_decay,
                          h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, h.eps};
}

// The weight a step starts from. A low-precision param holds the rounding of its fp32 master
// after every step; when it holds anything else, code outside the optimizer changed it
// (load_state_dict, an in-place init, a clamp, an EMA swap), and that edit wins, as it does in
// torch.optim, which has no hidden copy: the param's value becomes the master. The test is on
// the stored bits (exact, no tolerance), written as a select so that loops around it vectorize.
template <typename P>
FASTTL_HD float master_or_param(float master, storage_t<P> param) {
  return store<P>(master) == param ? master : load<P>(param);
}

// bf16, the common case: the rounding without store<bf16_t>'s NaN branch, whose select cost the
// step about 5% (benchmarks/ab_builds.py). It differs only for a NaN master: a diverged master
// stays NaN here (unless the param holds the rounding of its bits, as a NaN with its payload in
// the low 16 bits would round to inf: such a master stays NaN too, where the param could win).
template <>
FASTTL_HD float master_or_param<bf16_t>(float master, uint16_t param) {
  const uint32_t u = float_to_bits(master);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return rounded == param ? master : bf16_bits_to_float(param);
}

// One element, by value in and out so that loops around it vectorize. `grad` is unscaled.
template <bool kAmsgrad>
FASTTL_HD AdamElement adam_update(AdamElement e, float grad, const AdamCoefficients& c, const AdamStepFactors& f) {
  e.w *= c.decay_factor;
  const float g = c.grad_sign * grad + c.l2_decay * e.w;
  e.m = c.beta1 * e.m + c.one_minus_beta1 * g;
  e.v = c.beta2 * e.v + c.one_minus_beta2 * g * g;
  float v_hat = e.v;
  if (kAmsgrad) {
    e.v_max = e.v_max > e.v ? e.v_max : e.v;
    v_hat = e.v_max;
  }
#if defined(__CUDA_ARCH__)
  const float denom = sqrtf(v_hat) * f.inv_bias_correction2_sqrt + c.eps;
#else
  const float denom = std::sqrt(v_hat) * f.inv_bias_correction2_sqrt + c.eps;
#endif
  e.w -= f.step_size * e.m / denom;
  return e;
}

}  // namespace fasttl
