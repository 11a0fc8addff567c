// Maps the dtype codes Python passes to the C++ storage types of a templated kernel.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "fasttl/numeric.h"

namespace fasttl {

template <typename F>
void dispatch_float(int dtype, const char* what, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); return;
    case kFloat16: f(half_t{}); return;
    case kBFloat16: f(bf16_t{}); return;
    default:
      throw std::invalid_argument(std::string(what) + ": unsupported dtype code " +
                                  std::to_string(dtype));
  }
}

template <typename F>
void dispatch_float2(int dtype_a, int dtype_b, const char* what, F&& f) {
  dispatch_float(dtype_a, what, [&](auto a) {
    dispatch_float(dtype_b, what, [&](auto b) { f(a, b); });
  });
}

// Two runtime flags as compile-time constants: f(std::bool_constant<a>{}, std::bool_constant<b>{}).
template <typename F>
void dispatch_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

// Feature-cache dtypes: the float types plus int8.
template <typename F>
void dispatch_cache(int dtype, const char* what, F&& f) {
  if (dtype == kInt8) {
    f(int8_t{});
  } else {
    dispatch_float(dtype, what, f);
  }
}

}  // namespace fasttl
