// Matmul y[n, m] = x[n, k] . W[m, k]^T (+ bias) for every weight dtype.
//
// Small n (decode, small token trees): warp-per-row GEMV. A warp owns R consecutive weight rows
// and streams them once per pass of up to 8 tokens (8, then 4, 2, 1 for the rest), so a
// row is read from DRAM once and re-read from L1/L2 only for n > 8. Each token's sum is
// accumulated in the same order whatever the pass size or R, so a token's result does
// not depend on the rest of the batch while n stays on the GEMV.
// From kTensorCoreMinN tokens F16 / BF16 / Q8_0 / Q4_0 run on tensor cores
// (tensor_core.cu); F32 weights use the GEMV up to kGemvMaxN tokens, then 64x64 output
// tiles over k-steps of 32 in shared memory.
//
// Quantized weights (Q8_0, Q4_0) use the CPU's integer math: activations quantized per
// block of 32 (d = amax / 127, q = round(x / d)), then d_w * d_x * sum(q_w * q_x) via
// dp4a, so both libraries agree to float rounding.
#include "matmul.cuh"

static const int kGemvMaxN = 32;  // above this many tokens the tiled matmul wins

// Reduces and stores R rows x T tokens; after the xor-reduction every lane holds the
// sums, and lane t stores token t.
template <int R, int T>
__device__ __forceinline__ void gemv_store(const MM &a, float (&acc)[R][T], long long r0, int t0, int lane) {
#pragma unroll
  for (int rr = 0; rr < R; rr++) {
#pragma unroll
    for (int t = 0; t < T; t++) acc[rr][t] = warp_sum(acc[rr][t]);
    const long long r = r0 + rr;
    if (r < a.m) {
      const float b = a.bias ? a.bias[r] : 0.f;
#pragma unroll
      for (int t = 0; t < T; t++)
        if (lane == t) a.y[(size_t)(t0 + t) * a.m + r] = acc[rr][t] + b;
    }
  }
}

template <int DT, int R, int T, bool VEC>
__device__ __forceinline__ void gemv_f_pass(const MM &a, long long r0, int t0, int lane) {
  const unsigned char *rows[R];
#pragma unroll
  for (int rr = 0; rr < R; rr++) {
    const long long r = r0 + rr < a.m ? r0 + rr : a.m - 1;  // past-the-end rows: computed, not stored
    rows[rr] = a.w + (size_t)r * a.rb;
  }
  float acc[R][T];
#pragma unroll
  for (int rr = 0; rr < R; rr++)
#pragma unroll
    for (int t = 0; t < T; t++) acc[rr][t] = 0.f;
  const int k = a.k;
  if (VEC) {  // k % 8 == 0, w and x 16-byte aligned
    for (int i = lane * 8; i < k; i += 256) {
      float wv[R][8];
#pragma unroll
      for (int rr = 0; rr < R; rr++) WF<DT>::eight(rows[rr], i, wv[rr]);
#pragma unroll
      for (int t = 0; t < T; t++) {
        const float4 *xp = (const float4 *)(a.x + (size_t)(t0 + t) * k + i);
        const float4 p = __ldg(xp), q = __ldg(xp + 1);
        const float xv[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
#pragma unroll
        for (int rr = 0; rr < R; rr++)
#pragma unroll
          for (int e = 0; e < 8; e++) acc[rr][t] = fmaf(wv[rr][e], xv[e], acc[rr][t]);
      }
    }
  } else {
    for (int i = lane; i < k; i += 32) {
      float wv[R];
#pragma unroll
      for (int rr = 0; rr < R; rr++) wv[rr] = WF<DT>::one(rows[rr], i);
#pragma unroll
      for (int t = 0; t < T; t++) {
        const float xv = __ldg(a.x + (size_t)(t0 + t) * k + i);
#pragma unroll
        for (int rr = 0; rr < R; rr++) acc[rr][t] = fmaf(wv[rr], xv, acc[rr][t]);
      }
    }
  }
  gemv_store<R, T>(a, acc, r0, t0, lane);
}

template <int DT, int R, bool VEC>
__global__ void __launch_bounds__(128) gemv_f_kernel(MM a) {
  const int lane = threadIdx.x & 31;
  const long long r0 = ((long long)blockIdx.x * 4 + (threadIdx.x >> 5)) * R;
  if (r0 >= a.m) return;  // the whole warp leaves together
  int t0 = 0;
  for (; t0 + 8 <= a.n; t0 += 8) gemv_f_pass<DT, R, 8, VEC>(a, r0, t0, lane);
  if (a.n - t0 >= 4) { gemv_f_pass<DT, R, 4, VEC>(a, r0, t0, lane); t0 += 4; }
  if (a.n - t0 >= 2) { gemv_f_pass<DT, R, 2, VEC>(a, r0, t0, lane); t0 += 2; }
  if (a.n - t0 >= 1) gemv_f_pass<DT, R, 1, VEC>(a, r0, t0, lane);
}

// Quantized rows. Q8_0: 4 lanes per block, 8 quants (2 words) each, 8 blocks per warp
// step. Q4_0: 2 lanes per block, 8 nibble bytes (16 values, 4 words) each, 16 blocks per
// step. Q4 nibbles become signed bytes q - 8 once per weight word (__vsub4), shared by
// all tokens.
// Q8_0 rows are read with 16-byte loads: a step's 8 blocks of a row (272 bytes, starting
// anywhere on 2 bytes) are the 18 aligned 16-byte words that cover them, which the warp
// loads into its shared `stage`; each lane unpacks its block from there. (A word that holds
// one of the row's bytes is inside the allocation.) Q4_0 lanes read 16-bit words.
template <int DT, int R, int T>
__device__ __forceinline__ void gemv_q_pass(const MM &a, long long r0, int t0, int lane, uint4 *stage) {
  const bool q8 = DT == SI_Q8_0;
  const int BS = q8 ? 34 : 18;
  const int LPB = q8 ? 4 : 2;
  const int STEP = 32 / LPB;
  const int sub = lane % LPB;
  const int nb = a.k / 32;
  const unsigned char *rows[R];
#pragma unroll
  for (int rr = 0; rr < R; rr++) {
    const long long r = r0 + rr < a.m ? r0 + rr : a.m - 1;  // past-the-end rows: computed, not stored
    rows[rr] = a.w + (size_t)r * a.rb;
  }
  float acc[R][T];
#pragma unroll
  for (int rr = 0; rr < R; rr++)
#pragma unroll
    for (int t = 0; t < T; t++) acc[rr][t] = 0.f;
  for (int first = 0; first < nb; first += STEP) {  // uniform across the warp
    const int b = first + lane / LPB;                // this lane's block
    if (q8) {
      const size_t bytes = (size_t)((nb - first < STEP ? nb - first : STEP) * BS);
      for (int i = lane; i < R * 18; i += 32) {
        const long long r = r0 + i / 18 < a.m ? r0 + i / 18 : a.m - 1;  // rows[i / 18], without a local array
        const uintptr_t from = (uintptr_t)(a.w + (size_t)r * a.rb + (size_t)first * BS);
        const uintptr_t word = (from & ~(uintptr_t)15) + (uintptr_t)(i % 18) * 16;
        stage[i] = word < from + bytes ? __ldg((const uint4 *)word) : make_uint4(0, 0, 0, 0);
      }
      __syncwarp();
    }
    if (b < nb) {
      float dw[R];
      int wq[R][4];
#pragma unroll
      for (int rr = 0; rr < R; rr++) {
        const uintptr_t from = (uintptr_t)(rows[rr] + (size_t)first * BS);
        const unsigned char *blk = q8 ? (const unsigned char *)(stage + rr * 18) + (from & 15) + (lane / LPB) * BS
                                      : rows[rr] + (size_t)b * BS;
        dw[rr] = ld_f16(blk);
        const unsigned char *qs = blk + 2 + 8 * sub;
        if (q8) {
          wq[rr][0] = ld_i32_a2(qs);
          wq[rr][1] = ld_i32_a2(qs + 4);
          wq[rr][2] = 0;
          wq[rr][3] = 0;
        } else {
          // Bytes 8sub..8sub+7: low nibbles are values 8sub.., high nibbles 16+8sub..
          const unsigned v0 = (unsigned)ld_i32_a2(qs), v1 = (unsigned)ld_i32_a2(qs + 4);
          wq[rr][0] = (int)__vsub4(v0 & 0x0f0f0f0fu, 0x08080808u);
          wq[rr][1] = (int)__vsub4(v1 & 0x0f0f0f0fu, 0x08080808u);
          wq[rr][2] = (int)__vsub4((v0 >> 4) & 0x0f0f0f0fu, 0x08080808u);
          wq[rr][3] = (int)__vsub4((v1 >> 4) & 0x0f0f0f0fu, 0x08080808u);
        }
      }
#pragma unroll
      for (int t = 0; t < T; t++) {
        const signed char *xr = a.xq + (size_t)(t0 + t) * a.k + (size_t)b * 32;
        const float xs = a.xd[(size_t)(t0 + t) * nb + b];
        const int2 xl = *(const int2 *)(xr + 8 * sub);
        int2 xh = make_int2(0, 0);
        if (!q8) xh = *(const int2 *)(xr + 16 + 8 * sub);
#pragma unroll
        for (int rr = 0; rr < R; rr++) {
          int d = __dp4a(wq[rr][0], xl.x, 0);
          d = __dp4a(wq[rr][1], xl.y, d);
          if (!q8) {
            d = __dp4a(wq[rr][2], xh.x, d);
            d = __dp4a(wq[rr][3], xh.y, d);
          }
          acc[rr][t] = fmaf((float)d, dw[rr] * xs, acc[rr][t]);
        }
      }
    }
    if (q8) __syncwarp();  // the stage is read before the next step overwrites it
  }
  gemv_store<R, T>(a, acc, r0, t0, lane);
}

template <int DT, int R>
__global__ void __launch_bounds__(128) gemv_q_kernel(MM a) {
  __shared__ uint4 stages[4][DT == SI_Q8_0 ? R * 18 : 1];
  const int lane = threadIdx.x & 31;
  const long long r0 = ((long long)blockIdx.x * 4 + (threadIdx.x >> 5)) * R;
  if (r0 >= a.m) return;
  uint4 *stage = stages[threadIdx.x >> 5];
  int t0 = 0;
  for (; t0 + 8 <= a.n; t0 += 8) gemv_q_pass<DT, R, 8>(a, r0, t0, lane, stage);
  if (a.n - t0 >= 4) { gemv_q_pass<DT, R, 4>(a, r0, t0, lane, stage); t0 += 4; }
  if (a.n - t0 >= 2) { gemv_q_pass<DT, R, 2>(a, r0, t0, lane, stage); t0 += 2; }
  if (a.n - t0 >= 1) gemv_q_pass<DT, R, 1>(a, r0, t0, lane, stage);
}

// Activations -> blocks of 32 int8 with an f32 scale; the CPU's exact rule (IEEE
// division and roundf, half away from zero). One warp per (token, block); x is [n][k]
// with k = 32 * nb, so block index t * nb + b covers elements 32 * (t * nb + b)...
__global__ void quantize_kernel(const float *x, long long total_blocks, signed char *xq, float *xd) {
  const int lane = threadIdx.x & 31;
  const long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long blk = gw; blk < total_blocks; blk += nwarps) {  // uniform per warp
    const float v = x[blk * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = d != 0.f ? 1.0f / d : 0.f;
    int q = (int)roundf(v * id);
    q = q < -127 ? -127 : (q > 127 ? 127 : q);
    xq[blk * 32 + lane] = (signed char)q;
    if (lane == 0) xd[blk] = d;
  }
}

#define TILE 64
#define TK 32

// F32 weights, n > kGemvMaxN: y tile [64 tokens][64 rows]; thread (ty, tx) owns tokens
// ty + 16i and rows tx + 16j so shared reads are broadcast / conflict-free and y stores
// coalesce. (Other dtypes use tensor cores from kTensorCoreMinN tokens.)
__global__ void __launch_bounds__(256) gemm_f32_kernel(MM a) {
  __shared__ float xs[TK][TILE + 1];
  __shared__ float ws[TK][TILE + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const long long r0 = (long long)blockIdx.x * TILE;
  const int t0 = blockIdx.y * TILE;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < a.k; k0 += TK) {
#pragma unroll
    for (int p = 0; p < (TILE * TK) / 256; p++) {
      const int idx = tid + 256 * p, rr = idx / TK, kk = idx % TK;
      const int kg = k0 + kk;
      const int t = t0 + rr;
      xs[kk][rr] = (t < a.n && kg < a.k) ? a.x[(size_t)t * a.k + kg] : 0.f;
      const long long r = r0 + rr;
      ws[kk][rr] = (r < a.m && kg < a.k) ? WF<SI_F32>::one(a.w + (size_t)r * a.rb, kg) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < TK; kk++) {
      float xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) xv[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) wv[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int t = t0 + ty + 16 * i;
    if (t >= a.n) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const long long r = r0 + tx + 16 * j;
      if (r < a.m) a.y[(size_t)t * a.m + r] = acc[i][j] + (a.bias ? a.bias[r] : 0.f);
    }
  }
}

template <int DT>
static void launch_float_gemv(si_ctx *c, const MM &a, bool vec) {
  const int R = a.n >= 4 ? 4 : 1;  // more rows per warp amortize the x loads
  const unsigned blocks = (unsigned)((a.m + 4LL * R - 1) / (4LL * R));
  if (R == 4) {
    if (vec) gemv_f_kernel<DT, 4, true><<<blocks, 128, 0, c->stream>>>(a);
    else gemv_f_kernel<DT, 4, false><<<blocks, 128, 0, c->stream>>>(a);
  } else {
    if (vec) gemv_f_kernel<DT, 1, true><<<blocks, 128, 0, c->stream>>>(a);
    else gemv_f_kernel<DT, 1, false><<<blocks, 128, 0, c->stream>>>(a);
  }
}

template <int DT>
static void launch_quant_gemv(si_ctx *c, const MM &a) {
  const int R = a.n >= 4 ? 4 : 1;
  const unsigned blocks = (unsigned)((a.m + 4LL * R - 1) / (4LL * R));
  if (R == 4) gemv_q_kernel<DT, 4><<<blocks, 128, 0, c->stream>>>(a);
  else gemv_q_kernel<DT, 1><<<blocks, 128, 0, c->stream>>>(a);
}

extern "C" int32_t si_matmul(si_ctx *c, const float *x, int32_t n, int32_t k, const void *w, int32_t dtype,
                             int32_t m, const float *bias, float *y) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_matmul";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "k", k);
  if (!rc) rc = positive(c, op, "m", m);
  if (!rc) rc = check_dtype(c, op, dtype, k, "k");
  if (rc || n == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "w", w);
  if (!rc) rc = need(c, op, "y", y);
  if (rc) return rc;
  const uintptr_t xa = (uintptr_t)x, ya = (uintptr_t)y;
  if (xa < ya + (size_t)n * m * 4 && ya < xa + (size_t)n * k * 4) return fail(c, SI_ERR_ARG, "%s: x and y overlap", op);
  rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "w", w, elem_align(dtype));
  if (!rc) rc = aligned(c, op, "y", y, 4);
  if (!rc && bias) rc = aligned(c, op, "bias", bias, 4);
  if (rc) return rc;
  // The tiled kernels (F32 tiles, tensor cores) take 64 tokens per grid row.
  if ((n + TILE - 1) / TILE > 65535)
    return fail(c, SI_ERR_ARG, "%s: n=%d exceeds the CUDA grid limit (65535 tiles of %d)", op, n, TILE);
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(n), I(k), P(w), I(dtype), I(m), P(bias), P(y));

  MM a;
  a.x = x;
  a.xq = NULL;
  a.xd = NULL;
  a.n = n;
  a.k = k;
  a.m = m;
  a.w = (const unsigned char *)w;
  a.rb = row_bytes(dtype, (size_t)k);
  a.bias = bias;
  a.y = y;
  if (is_quant(dtype)) {
    const size_t nb = (size_t)k / 32;
    const size_t qbytes = align256((size_t)n * k);
    void *s = NULL;
    rc = scratch_for(c, op, qbytes + (size_t)n * nb * 4, &s);
    if (rc) return rc;
    a.xq = (const signed char *)s;
    a.xd = (const float *)((char *)s + qbytes);
    const long long total = (long long)n * (long long)nb;
    quantize_kernel<<<grid_for(c, total * 32, 256), 256, 0, c->stream>>>(x, total, (signed char *)s,
                                                                         (float *)((char *)s + qbytes));
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_fail(c, op, "activation quantization launch failed", e);
    if (n >= kTensorCoreMinN) launch_tensor_core_matmul(c, a, dtype);
    else if (dtype == SI_Q8_0) launch_quant_gemv<SI_Q8_0>(c, a);
    else launch_quant_gemv<SI_Q4_0>(c, a);
  } else if (dtype == SI_F32) {
    const bool vec = k % 8 == 0 && xa % 16 == 0 && (uintptr_t)w % 16 == 0;
    if (n <= kGemvMaxN) launch_float_gemv<SI_F32>(c, a, vec);
    else gemm_f32_kernel<<<dim3((unsigned)((m + TILE - 1) / TILE), (unsigned)((n + TILE - 1) / TILE)), 256, 0, c->stream>>>(a);
  } else if (n >= kTensorCoreMinN) {
    launch_tensor_core_matmul(c, a, dtype);
  } else {
    const bool vec = k % 8 == 0 && xa % 16 == 0 && (uintptr_t)w % 16 == 0;
    if (dtype == SI_F16) launch_float_gemv<SI_F16>(c, a, vec);
    else launch_float_gemv<SI_BF16>(c, a, vec);
  }
  return launched(c, op);
}

