// What the CPU and CUDA Adam launchers share: the hyperparameters out of AdamArgs, and the
// dispatch from runtime dtypes and flags to one compiled variant.
#pragma once

#include "fasttl/adam.h"
#include "fasttl/dispatch.h"
#include "fasttl/kernels.h"

namespace fasttl {

inline AdamHyper adam_hyper(const AdamArgs& a) {
  return AdamHyper{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled_weight_decay, a.amsgrad, a.maximize};
}

// f(param tag, grad tag, has_master constant, amsgrad constant).
template <typename F>
void dispatch_adam(const AdamArgs& a, const char* what, F&& f) {
  dispatch_float2(a.param_dtype, a.grad_dtype, what, [&](auto p_tag, auto g_tag) {
    dispatch_flags(a.has_master, a.amsgrad, [&](auto master, auto amsgrad) { f(p_tag, g_tag, master, amsgrad); });
  });
}

}  // namespace fasttl
