// Macros that let one header of math compile for the host (g++) and the device (nvcc).
#pragma once

#if defined(__CUDACC__)
#define FASTTL_HD __host__ __device__ __forceinline__
#else
#define FASTTL_HD inline __attribute__((always_inline))
#endif

// Clones a hot CPU loop for AVX-512, AVX2+FMA and baseline x86-64, picked at load time, so one
// wheel runs everywhere and still vectorizes wide where the CPU allows.
#if defined(__x86_64__) && !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#define FASTTL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTTL_HAS_CPU_CLONES 1
#else
#define FASTTL_CPU_CLONES
#endif
