// Small helpers shared by the kernel files (CUDA headers only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace minilm_cuda {

// Conversions spelled out: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ double to_f(double x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
struct FromF {
  template <typename A>
  static __device__ __forceinline__ T cvt(A x) { return static_cast<T>(x); }
};
template <>
struct FromF<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 cvt(float x) { return __float2bfloat16(x); }
};
template <>
struct FromF<__half> {
  static __device__ __forceinline__ __half cvt(float x) { return __float2half(x); }
};

// The accumulation type: fp64 for fp64 data, fp32 for everything else.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// An attribute of the current device (the launchers' limits: shared memory, SMs, L2), or `fallback` where it
// cannot be read.
inline int current_device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) return fallback;
  return v;
}

}  // namespace minilm_cuda
