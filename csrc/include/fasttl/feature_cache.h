// Per-element math of the feature cache kernels, shared by the CPU loops and the CUDA kernels:
// global average pooling in fp32, conversion to the cache dtype, and int8 with a per-row scale.
//
// int8 rows store q = round(v / s) in [-127, 127] with s = max|v| / 127 (s = 1 for an all-zero
// row), so a dequantized value q * s is within s / 2 = max|v| / 254 of v.
#pragma once

#include <cmath>

#include "fasttl/numeric.h"

namespace fasttl {

// Sum of one channel's H*W values, `stride` apart (1 in NCHW, C in channels_last), accumulated
// in fp32 in pixel order; the caller multiplies by 1 / (H*W). The CPU's NHWC loop adds in the same
// order, so both layouts give the same bits.
template <typename T>
FASTTL_HD float channel_sum(const storage_t<T>* first, int64_t hw, int64_t stride) {
  float sum = 0.0f;
  for (int64_t k = 0; k < hw; ++k) sum += load<T>(first[k * stride]);
  return sum;
}

FASTTL_HD float int8_scale(float absmax) { return absmax > 0.0f ? absmax / 127.0f : 1.0f; }

FASTTL_HD int8_t quantize_int8(float v, float inv_scale) {
  float q = v * inv_scale;
  q = q > 127.0f ? 127.0f : q;
  q = q < -127.0f ? -127.0f : q;
#if defined(__CUDA_ARCH__)
  return static_cast<int8_t>(__float2int_rn(q));
#else
  return static_cast<int8_t>(std::nearbyint(q));  // round half to even, as the CUDA path
#endif
}

FASTTL_HD float dequantize_int8(int8_t q, float scale) { return static_cast<float>(q) * scale; }

}  // namespace fasttl
