// MINILM_HOST_DEVICE: a function that CUDA kernels call and that host C++ (the CPU kernels, the tests'
// small programs) compiles as well, so that one definition serves both.
#pragma once

#if defined(__CUDACC__)
#define MINILM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MINILM_HOST_DEVICE inline
#endif
