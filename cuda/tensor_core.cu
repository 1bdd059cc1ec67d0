// Multi-token matmul on tensor cores (mma.sync, sm_80 and later) for n >= kTensorCoreMinN.
//
// A block computes 32 weight rows x 64 tokens with 4 warps; warp w owns rows 16 (w & 1)
// .. +16 and tokens 32 (w >> 1) .. +32 as four m16n8 tiles, with the weights as the mma's
// A operand (16 rows) and the tokens as B (8 columns). Weights are staged in shared
// memory as stored (F16 / BF16 halves, Q8_0 / Q4_0 blocks), 128 or 256 values of each
// row at a time, with 16-byte loads of the aligned words that cover the row's bytes
// (rows of a quantized matrix start anywhere on 2 bytes); the next stage's loads are in
// flight in registers while this stage's mma run.
//
// - F16 / BF16: weights widen exactly to TF32 (f32 with at most 10 mantissa bits). An f32
//   activation is split into a TF32 head and a TF32 rest (x = head + rest to about
//   2^-22 relative) and both are multiplied, so the result has f32-like accuracy,
//   which half-precision activations would not give.
// - Q8_0 / Q4_0: the CPU's integer math. Each weight block (32 values) is one m16n8k32
//   int8 mma, the exact block dot of each (row, token); then acc += dot * (d_w * d_x) in
//   block order. Q4_0 nibbles become int8 (q - 8) as the fragments are read.
//
// Fragment layouts are PTX's for mma.m16n8k8 (tf32) and mma.m16n8k32 (s8): lane = 4g + t;
// A rows g and g + 8; B column g; C elements (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
#include "matmul.cuh"

#define TC_ROWS 32
#define TC_THREADS 128
// A staged row: up to 272 bytes of weights plus the misalignment of their first byte (at
// most 14), in whole 16-byte words. 304 bytes = 76 words, so 8 rows x 4 lanes hit 32 banks.
#define TC_ROW_BYTES 304

// One stage of a row per weight dtype: `values` weights stored in `bytes` bytes.
template <int DT>
struct StageShape {
  static const int values = 256;  // Q8_0: 8 blocks of 34 bytes
  static const int bytes = 272;
};
template <>
struct StageShape<SI_Q4_0> {
  static const int values = 256;  // 8 blocks of 18 bytes
  static const int bytes = 144;
};
template <>
struct StageShape<SI_F16> {
  static const int values = 128;
  static const int bytes = 256;
};
template <>
struct StageShape<SI_BF16> {
  static const int values = 128;
  static const int bytes = 256;
};

static __device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

static __device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void mma_s8(int (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- staging ----------------------------------------------------------------------------------

// Stage s of rows r0 .. r0 + 31: bytes [s * bytes, (s + 1) * bytes) of each row (fewer in
// the last stage), loaded as the aligned 16-byte words that cover them (a word that holds
// one of a row's bytes is inside the allocation) and stored as loaded: row rr's first
// byte lands at raw[rr][shift(rr)]. Words past the row's bytes, and rows past m, are zero.
template <int DT>
struct Stager {
  static const int kBytes = StageShape<DT>::bytes;
  static const int kWords = kBytes / 16 + 1;  // a misaligned range spans one word more
  static const int kPerThread = (TC_ROWS * kWords + TC_THREADS - 1) / TC_THREADS;
  uint4 pre[kPerThread];

  // Address of stage s of row r, and how many of its bytes exist.
  static __device__ __forceinline__ uintptr_t start(const MM &a, long long r, int s) {
    return (uintptr_t)a.w + (size_t)r * a.rb + (size_t)s * kBytes;
  }
  static __device__ __forceinline__ size_t valid(const MM &a, int s) {
    const size_t left = a.rb - (size_t)s * kBytes;
    return left < (size_t)kBytes ? left : (size_t)kBytes;
  }
  // Where row r's stage s begins in its staged row.
  static __device__ __forceinline__ int shift(const MM &a, long long r, int s) { return (int)(start(a, r, s) & 15); }

  __device__ __forceinline__ void prefetch(const MM &a, long long r0, int s) {
#pragma unroll
    for (int i = 0; i < kPerThread; i++) {
      const int idx = threadIdx.x + TC_THREADS * i;
      const int rr = idx / kWords, wd = idx % kWords;
      const long long r = r0 + rr;
      pre[i] = make_uint4(0, 0, 0, 0);
      if (rr >= TC_ROWS || r >= a.m) continue;
      const uintptr_t from = start(a, r, s);
      const uintptr_t word = (from & ~(uintptr_t)15) + (uintptr_t)wd * 16;
      if (word < from + valid(a, s)) pre[i] = __ldg((const uint4 *)word);
    }
  }

  __device__ __forceinline__ void store(unsigned char (*raw)[TC_ROW_BYTES]) const {
#pragma unroll
    for (int i = 0; i < kPerThread; i++) {
      const int idx = threadIdx.x + TC_THREADS * i;
      const int rr = idx / kWords, wd = idx % kWords;
      if (rr < TC_ROWS) *(uint4 *)(raw[rr] + wd * 16) = pre[i];
    }
  }
};

// The warp's place in its block's tile.
struct TcWarp {
  int g, t;      // lane = 4g + t
  int row0;      // first of the warp's 16 rows within the block's 32
  int tok0;      // first of the warp's 32 tokens
  long long r0;  // the block's first weight row
  bool active;   // the warp has tokens (uniform across the warp)
};

static __device__ __forceinline__ TcWarp tc_warp(const MM &a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  TcWarp w;
  w.g = lane >> 2;
  w.t = lane & 3;
  w.row0 = (warp & 1) * 16;
  w.tok0 = blockIdx.y * kTensorCoreTokens + (warp >> 1) * 32;
  w.r0 = (long long)blockIdx.x * TC_ROWS;
  w.active = w.tok0 < a.n;
  return w;
}

// acc[j][q] is (row g + 8 (q >> 1), token 8j + 2t + (q & 1)) of the warp's tile.
static __device__ __forceinline__ void tc_store(const MM &a, const TcWarp &w, const float (&acc)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const long long r = w.r0 + w.row0 + w.g + (q >> 1) * 8;
      const int tok = w.tok0 + 8 * j + 2 * w.t + (q & 1);
      if (r < a.m && tok < a.n) a.y[(size_t)tok * a.m + r] = acc[j][q] + (a.bias ? a.bias[r] : 0.f);
    }
}

// ---- F16 / BF16 ------------------------------------------------------------------------------

// Staged half i of a row as f32 (exactly a TF32 value); 0 from n_valid on.
template <int DT>
static __device__ __forceinline__ unsigned staged_tf32(const unsigned char *row, int i, int n_valid) {
  if (i >= n_valid) return 0;
  const unsigned short h = ((const unsigned short *)row)[i];
  return DT == SI_F16 ? __float_as_uint(__half2float(__ushort_as_half(h))) : (unsigned)h << 16;
}

// Activation x[tok][kk] (0 outside the matrix) split into a TF32 head and rest.
static __device__ __forceinline__ void split_tf32(const MM &a, int tok, int kk, unsigned &head, unsigned &rest) {
  const float x = tok < a.n && kk < a.k ? a.x[(size_t)tok * a.k + kk] : 0.f;
  head = to_tf32(x);
  const float r = x - __uint_as_float(head);
  rest = to_tf32(isfinite(r) ? r : 0.f);  // an infinite x has no rest
}

template <int DT>
__global__ void __launch_bounds__(TC_THREADS) tc_float_kernel(MM a) {
  __shared__ __align__(16) unsigned char raw[TC_ROWS][TC_ROW_BYTES];
  const int V = StageShape<DT>::values;
  const TcWarp w = tc_warp(a);
  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int q = 0; q < 4; q++) acc[j][q] = 0.f;

  Stager<DT> stager;
  const int stages = (a.k + V - 1) / V;
  stager.prefetch(a, w.r0, 0);
  for (int s = 0; s < stages; s++) {
    stager.store(raw);
    __syncthreads();
    if (s + 1 < stages) stager.prefetch(a, w.r0, s + 1);  // in flight during the mma below
    if (w.active) {
      const long long r_top = w.r0 + w.row0 + w.g;
      const unsigned char *top = raw[w.row0 + w.g] + Stager<DT>::shift(a, r_top, s);
      const unsigned char *bottom = raw[w.row0 + w.g + 8] + Stager<DT>::shift(a, r_top + 8, s);
      const int k0 = s * V;
      const int n_valid = a.k - k0 < V ? a.k - k0 : V;  // staged bytes past these are another row's
      for (int kk = 0; kk < n_valid; kk += 8) {
        const unsigned af[4] = {staged_tf32<DT>(top, kk + w.t, n_valid), staged_tf32<DT>(bottom, kk + w.t, n_valid),
                                staged_tf32<DT>(top, kk + w.t + 4, n_valid),
                                staged_tf32<DT>(bottom, kk + w.t + 4, n_valid)};
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const int tok = w.tok0 + 8 * j + w.g;
          unsigned h0, rest0, h1, rest1;
          split_tf32(a, tok, k0 + kk + w.t, h0, rest0);
          split_tf32(a, tok, k0 + kk + w.t + 4, h1, rest1);
          mma_tf32(acc[j], af, rest0, rest1);  // the small part first
          mma_tf32(acc[j], af, h0, h1);
        }
      }
    }
    __syncthreads();
  }
  if (w.active) tc_store(a, w, acc);
}

// ---- Q8_0 / Q4_0 -------------------------------------------------------------------------------

// The A fragment of staged block `blk` (byte offset in the row) for rows top / bottom:
// int8 words of values 4t.. and 16 + 4t.., and the rows' scales.
template <int DT>
static __device__ __forceinline__ void quant_fragment(const unsigned char *top, const unsigned char *bottom, int blk,
                                                      int t, unsigned (&af)[4], float &d_top, float &d_bottom) {
  d_top = ld_f16(top + blk);
  d_bottom = ld_f16(bottom + blk);
  if constexpr (DT == SI_Q8_0) {
    af[0] = (unsigned)ld_i32_a2(top + blk + 2 + 4 * t);
    af[1] = (unsigned)ld_i32_a2(bottom + blk + 2 + 4 * t);
    af[2] = (unsigned)ld_i32_a2(top + blk + 18 + 4 * t);
    af[3] = (unsigned)ld_i32_a2(bottom + blk + 18 + 4 * t);
  } else {  // bytes 4t..4t+3: values 4t.. in the low nibbles, 16 + 4t.. in the high ones
    const unsigned vt = (unsigned)ld_i32_a2(top + blk + 2 + 4 * t);
    const unsigned vb = (unsigned)ld_i32_a2(bottom + blk + 2 + 4 * t);
    af[0] = __vsub4(vt & 0x0f0f0f0fu, 0x08080808u);
    af[1] = __vsub4(vb & 0x0f0f0f0fu, 0x08080808u);
    af[2] = __vsub4((vt >> 4) & 0x0f0f0f0fu, 0x08080808u);
    af[3] = __vsub4((vb >> 4) & 0x0f0f0f0fu, 0x08080808u);
  }
}

template <int DT>
__global__ void __launch_bounds__(TC_THREADS) tc_quant_kernel(MM a) {
  __shared__ __align__(16) unsigned char raw[TC_ROWS][TC_ROW_BYTES];
  const int BS = DT == SI_Q8_0 ? 34 : 18;
  const int per_stage = StageShape<DT>::values / 32;  // blocks
  const TcWarp w = tc_warp(a);
  const int nb = a.k / 32;
  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int q = 0; q < 4; q++) acc[j][q] = 0.f;

  Stager<DT> stager;
  const int stages = (nb + per_stage - 1) / per_stage;
  stager.prefetch(a, w.r0, 0);
  for (int s = 0; s < stages; s++) {
    stager.store(raw);
    __syncthreads();
    if (s + 1 < stages) stager.prefetch(a, w.r0, s + 1);
    if (w.active) {
      const long long r_top = w.r0 + w.row0 + w.g;
      const unsigned char *top = raw[w.row0 + w.g] + Stager<DT>::shift(a, r_top, s);
      const unsigned char *bottom = raw[w.row0 + w.g + 8] + Stager<DT>::shift(a, r_top + 8, s);
      for (int i = 0; i < per_stage && s * per_stage + i < nb; i++) {
        const int b = s * per_stage + i;
        unsigned af[4];
        float d_top, d_bottom;
        quant_fragment<DT>(top, bottom, i * BS, w.t, af, d_top, d_bottom);
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const int tok = w.tok0 + 8 * j + w.g;  // this lane's B column
          unsigned b0 = 0, b1 = 0;
          if (tok < a.n) {
            const int *xw = (const int *)(a.xq + (size_t)tok * a.k + (size_t)b * 32);
            b0 = (unsigned)xw[w.t];
            b1 = (unsigned)xw[4 + w.t];
          }
          int dot[4] = {0, 0, 0, 0};
          mma_s8(dot, af, b0, b1);
          const int ta = w.tok0 + 8 * j + 2 * w.t;  // tokens of this lane's C elements: ta, ta + 1
          const float xa = ta < a.n ? a.xd[(size_t)ta * nb + b] : 0.f;
          const float xb = ta + 1 < a.n ? a.xd[(size_t)(ta + 1) * nb + b] : 0.f;
          acc[j][0] = fmaf((float)dot[0], d_top * xa, acc[j][0]);
          acc[j][1] = fmaf((float)dot[1], d_top * xb, acc[j][1]);
          acc[j][2] = fmaf((float)dot[2], d_bottom * xa, acc[j][2]);
          acc[j][3] = fmaf((float)dot[3], d_bottom * xb, acc[j][3]);
        }
      }
    }
    __syncthreads();
  }
  if (w.active) tc_store(a, w, acc);
}

void launch_tensor_core_matmul(si_ctx *c, const MM &a, int dtype) {
  const dim3 grid((unsigned)((a.m + TC_ROWS - 1) / TC_ROWS),
                  (unsigned)((a.n + kTensorCoreTokens - 1) / kTensorCoreTokens));
  switch (dtype) {
    case SI_F16: tc_float_kernel<SI_F16><<<grid, TC_THREADS, 0, c->stream>>>(a); break;
    case SI_BF16: tc_float_kernel<SI_BF16><<<grid, TC_THREADS, 0, c->stream>>>(a); break;
    case SI_Q8_0: tc_quant_kernel<SI_Q8_0><<<grid, TC_THREADS, 0, c->stream>>>(a); break;
    default: tc_quant_kernel<SI_Q4_0><<<grid, TC_THREADS, 0, c->stream>>>(a); break;
  }
}
