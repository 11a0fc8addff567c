// Storage types and conversions shared by every kernel: fp32/fp16/bf16 loads and
// round-to-nearest-even stores, and an exp that vectorizes on the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fasttl/platform.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fasttl {

// Dtype codes passed from Python (fasttl/_native.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3 };

// 16-bit storage types; the bits are the IEEE half / bfloat16 patterns torch uses.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

FASTTL_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTTL_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Kernels are templated on the tag types (float, half_t, bf16_t) but read and write memory as
// Storage<T>::type (float or uint16_t): GCC does not vectorize loads and stores of the one-member
// structs, while it does of plain uint16_t.
template <typename T>
struct Storage { using type = T; };
template <>
struct Storage<half_t> { using type = uint16_t; };
template <>
struct Storage<bf16_t> { using type = uint16_t; };

template <typename T>
using storage_t = typename Storage<T>::type;

FASTTL_HD float half_bits_to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(bits));
#else
  // Exponent rebias with the denormal and Inf/NaN cases fixed up (F. Giesen's half_to_float).
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;
  } else if (exp == 0) {
    o += 1u << 23;
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  o |= (static_cast<uint32_t>(bits) & 0x8000u) << 16;
  return bits_to_float(o);
#endif
}

FASTTL_HD uint16_t float_to_half_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(x));
#else
  // Round to nearest even, with overflow to Inf and gradual underflow (Giesen's
  // float_to_half_fast3_rtne).
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t f = float_to_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= f16_max) {
    o = (f > f32_inf) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {
    o = float_to_bits(bits_to_float(f) + bits_to_float(denorm_magic)) - denorm_magic;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = f >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
#endif
}

FASTTL_HD float bf16_bits_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

FASTTL_HD uint16_t float_to_bf16_bits(float x) {
  // Round to nearest, ties to even, NaN kept quiet (as c10::BFloat16); written as a select so
  // that loops around it vectorize.
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// load<T>(stored value) -> float and store<T>(float) -> stored value, T a tag type.
template <typename T>
FASTTL_HD float load(storage_t<T> x);
template <>
FASTTL_HD float load<float>(float x) { return x; }
template <>
FASTTL_HD float load<half_t>(uint16_t x) { return half_bits_to_float(x); }
template <>
FASTTL_HD float load<bf16_t>(uint16_t x) { return bf16_bits_to_float(x); }

template <typename T>
FASTTL_HD storage_t<T> store(float x);
template <>
FASTTL_HD float store<float>(float x) { return x; }
template <>
FASTTL_HD uint16_t store<half_t>(float x) { return float_to_half_bits(x); }
template <>
FASTTL_HD uint16_t store<bf16_t>(float x) { return float_to_bf16_bits(x); }

// exp(x) in float. On the device the hardware exp; on the host a Cephes-style polynomial
// (about 2 ulp) written without branches so that loops around it vectorize. NaN stays NaN,
// and inputs below -88.37 give 0 exactly as far as every caller here is concerned.
FASTTL_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float hi = 88.3762626647949f;
  const float lo = -88.3762626647949f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n is in [-127, 128]; clamp the exponent so 2^n stays a valid (possibly zero) float.
  int e = static_cast<int>(n) + 127;
  e = e < 0 ? 0 : e;
  e = e > 254 ? 254 : e;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
#endif
}

FASTTL_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

}  // namespace fasttl
