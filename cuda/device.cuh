// Device helpers shared by the kernel files: the device error record, loads of 16-bit
// and quantized elements, warp and block reductions. Everything here is static (each
// object file gets its own copy): the objects are linked without relocatable device
// code, so no device function crosses a file.
#pragma once

#include <math.h>

#include "checks.cuh"

#define FULL_MASK 0xffffffffu

// Records the first device-side argument error (context.cuh); later ones are dropped.
static __device__ __noinline__ void report(DevErr *e, int kind, long long a, long long b, long long c, long long d) {
  if (atomicCAS(&e->code, 0, 1) == 0) {
    e->kind = kind;
    e->a = a;
    e->b = b;
    e->c = c;
    e->d = d;
    __threadfence();
  }
}

// Quantized blocks (18 / 34 bytes) are only 2-byte aligned: scales and quants are read
// as 16-bit words.
static __device__ __forceinline__ float ld_f16(const unsigned char *p) {
  return __half2float(__ushort_as_half(*(const unsigned short *)p));
}
static __device__ __forceinline__ float ld_bf16(const unsigned char *p) {
  return __uint_as_float(((unsigned)*(const unsigned short *)p) << 16);
}
static __device__ __forceinline__ int ld_i32_a2(const unsigned char *p) {
  const unsigned short *s = (const unsigned short *)p;
  return (int)((unsigned)s[0] | ((unsigned)s[1] << 16));
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024); all threads get it.
static __device__ float block_sum(float v, float *red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read from a previous call
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}
static __device__ float block_max(float v, float *red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  return warp_max(t);
}

// One element of a row of any dtype (k % 32 == 0 for the quantized ones).
static __device__ __forceinline__ float load_elem(int dt, const unsigned char *row, long long i) {
  switch (dt) {
    case SI_F32: return ((const float *)row)[i];
    case SI_F16: return ld_f16(row + 2 * i);
    case SI_BF16: return ld_bf16(row + 2 * i);
    case SI_Q8_0: {
      const unsigned char *blk = row + (i >> 5) * 34;
      return (float)(signed char)blk[2 + (i & 31)] * ld_f16(blk);
    }
    default: {  // SI_Q4_0
      const unsigned char *blk = row + (i >> 5) * 18;
      const int j = (int)(i & 31);
      const int b = blk[2 + (j & 15)];
      const int q = (j < 16 ? (b & 15) : (b >> 4)) - 8;
      return (float)q * ld_f16(blk);
    }
  }
}

