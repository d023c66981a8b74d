// Shared by the CPU (g++) and CUDA (nvcc) builds: one definition of every per-element
// formula, marked __host__ __device__ under nvcc and plain inline elsewhere.
#pragma once

#if defined(__CUDACC__)
#define FASTEER_HD __host__ __device__ __forceinline__
#else
#define FASTEER_HD inline
#endif
