// What the matmul files share: the argument block, the float-family weight loaders and
// the tensor-core launchers (tensor_core.cu).
#pragma once

#include "device.cuh"

template <int DT>
struct WF;  // float-family weight loaders
template <>
struct WF<SI_F32> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return __ldg((const float *)row + i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const float4 *p = (const float4 *)(row + (size_t)i * 4);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  }
};
template <>
struct WF<SI_F16> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return ld_f16(row + 2 * (size_t)i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const uint4 u = __ldg((const uint4 *)(row + (size_t)i * 2));
    const unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      w[2 * j] = __half2float(__ushort_as_half((unsigned short)(v[j] & 0xffffu)));
      w[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(v[j] >> 16)));
    }
  }
};
template <>
struct WF<SI_BF16> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return ld_bf16(row + 2 * (size_t)i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const uint4 u = __ldg((const uint4 *)(row + (size_t)i * 2));
    const unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      w[2 * j] = __uint_as_float(v[j] << 16);
      w[2 * j + 1] = __uint_as_float(v[j] & 0xffff0000u);
    }
  }
};

struct MM {
  const float *x;
  const signed char *xq;  // quantized x [n][k] (quantized dtypes)
  const float *xd;        // its block scales [n][k / 32]
  int n, k, m;
  const unsigned char *w;
  size_t rb;  // weight row bytes
  const float *bias;
  float *y;
};

// From this many tokens up, F16 / BF16 / Q8_0 / Q4_0 matmuls run on tensor cores.
static const int kTensorCoreMinN = 16;
// Tokens per tensor-core block (a grid column): n above 65535 * this is refused.
static const int kTensorCoreTokens = 64;

// y = x . W^T on tensor cores (tensor_core.cu): F16 / BF16 weights with TF32 mma over
// a.x, Q8_0 / Q4_0 weights with int8 mma over the quantized a.xq / a.xd.
SI_HIDDEN void launch_tensor_core_matmul(si_ctx *c, const MM &a, int dtype);
