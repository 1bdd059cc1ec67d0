// Per-row and elementwise kernels: rmsnorm, rope, swiglu, add, layernorm, activations,
// clamp, and the logits helpers argmax and softmax.
#include "device.cuh"

// ---- rmsnorm, rope, swiglu, add ------------------------------------------------------------

__global__ void rmsnorm_kernel(const float *x, const float *w, int dim, float eps, float *y) {
  __shared__ float red[32];
  const float *xr = x + (size_t)blockIdx.x * dim;
  float *yr = y + (size_t)blockIdx.x * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = block_sum(ss, red);
  const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
  // y may equal x: each thread rewrites only the elements it read itself.
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

extern "C" int32_t si_rmsnorm(si_ctx *c, const float *x, const float *weight, int32_t n, int32_t dim, float eps,
                              float *y) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_rmsnorm";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "dim", dim);
  if (rc || n == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "weight", weight);
  if (!rc) rc = need(c, op, "y", y);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "weight", weight, 4);
  if (!rc) rc = aligned(c, op, "y", y, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), P(weight), I(n), I(dim), F(eps), P(y));
  const int threads = dim >= 4096 ? 1024 : (dim >= 1024 ? 512 : 256);
  rmsnorm_kernel<<<n, threads, 0, c->stream>>>(x, weight, dim, eps, y);
  return launched(c, op);
}

// One thread per (token, pair): the angle once (f32 product as HF computes it, cos/sin in
// f64 like the CPU), then every head.
__global__ void rope_kernel(float *x, int n, int nh, int hd, int half, const int *pos, const float *inv,
                            int interleaved) {
  const long long total = (long long)n * half;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long i = idx / half;
    const int j = (int)(idx % half);
    const float p = (float)pos[i];
    const float angf = p * inv[j];
    double sd, cd;
    sincos((double)angf, &sd, &cd);
    const float cs = (float)cd, sn = (float)sd;
    const int ia = interleaved ? 2 * j : j;
    const int ib = interleaved ? 2 * j + 1 : j + half;
    float *xi = x + (size_t)i * nh * hd;
    for (int h = 0; h < nh; h++) {
      float *xh = xi + (size_t)h * hd;
      const float a = xh[ia], b = xh[ib];
      xh[ia] = a * cs - b * sn;
      xh[ib] = a * sn + b * cs;
    }
  }
}

extern "C" int32_t si_rope(si_ctx *c, float *x, int32_t n, int32_t n_heads, int32_t head_dim, int32_t rot_dim,
                           const int32_t *positions, const float *inv_freq, int32_t layout) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_rope";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "n_heads", n_heads);
  if (!rc) rc = positive(c, op, "head_dim", head_dim);
  if (!rc) rc = non_negative(c, op, "rot_dim", rot_dim);
  if (rc) return rc;
  if (rot_dim % 2 != 0 || rot_dim > head_dim)
    return fail(c, SI_ERR_ARG, "%s: rot_dim=%d must be even and <= head_dim=%d", op, rot_dim, head_dim);
  if (head_dim > kMaxHeadDim) return fail(c, SI_ERR_ARG, "%s: head_dim=%d exceeds %d", op, head_dim, kMaxHeadDim);
  if (layout != 0 && layout != 1)
    return fail(c, SI_ERR_ARG, "%s: unknown layout %d (0 = rotate-half, 1 = interleaved)", op, layout);
  if (n == 0 || rot_dim == 0) return SI_OK;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "positions", positions);
  if (!rc) rc = need(c, op, "inv_freq", inv_freq);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "positions", positions, 4);
  if (!rc) rc = aligned(c, op, "inv_freq", inv_freq, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(n), I(n_heads), I(head_dim), I(rot_dim), P(positions), P(inv_freq), I(layout));
  const int half = rot_dim / 2;
  rope_kernel<<<grid_for(c, (long long)n * half, 128), 128, 0, c->stream>>>(x, n, n_heads, head_dim, half, positions,
                                                                            inv_freq, layout);
  return launched(c, op);
}

__global__ void swiglu_kernel(const float *gate, const float *up, long long count, float *out) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void add_kernel(float *x, const float *y, long long count) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x)
    x[i] += y[i];
}

extern "C" int32_t si_swiglu(si_ctx *c, const float *gate, const float *up, int64_t count, float *out) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_swiglu";
  int rc = non_negative(c, op, "count", count);
  if (rc || count == 0) return rc;
  rc = need(c, op, "gate", gate);
  if (!rc) rc = need(c, op, "up", up);
  if (!rc) rc = need(c, op, "out", out);
  if (!rc) rc = aligned(c, op, "gate", gate, 4);
  if (!rc) rc = aligned(c, op, "up", up, 4);
  if (!rc) rc = aligned(c, op, "out", out, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(gate), P(up), I(count), P(out));
  swiglu_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(gate, up, count, out);
  return launched(c, op);
}

extern "C" int32_t si_add(si_ctx *c, float *x, const float *y, int64_t count) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_add";
  int rc = non_negative(c, op, "count", count);
  if (rc || count == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "y", y);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "y", y, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), P(y), I(count));
  add_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(x, y, count);
  return launched(c, op);
}

// ---- layernorm, activations, clamp ----------------------------------------------------------

// Two block reductions: the mean, then the centered sum of squares (as the CPU does).
__global__ void layernorm_kernel(const float *x, const float *w, const float *b, int dim, float eps, float *y) {
  __shared__ float red[32];
  const float *xr = x + (size_t)blockIdx.x * dim;
  float *yr = y + (size_t)blockIdx.x * dim;
  float sum = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i];
  const float mean = block_sum(sum, red) / (float)dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = xr[i] - mean;
    ss = fmaf(d, d, ss);
  }
  const float inv = 1.0f / sqrtf(block_sum(ss, red) / (float)dim + eps);
  // y may equal x: each thread rewrites only the elements it read itself.
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = (xr[i] - mean) * inv * w[i];
    yr[i] = b ? v + b[i] : v;
  }
}

extern "C" int32_t si_layernorm(si_ctx *c, const float *x, const float *weight, const float *bias, int32_t n,
                                int32_t dim, float eps, float *y) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_layernorm";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "dim", dim);
  if (rc || n == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "weight", weight);
  if (!rc) rc = need(c, op, "y", y);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "weight", weight, 4);
  if (!rc) rc = aligned(c, op, "bias", bias, 4);
  if (!rc) rc = aligned(c, op, "y", y, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), P(weight), P(bias), I(n), I(dim), F(eps), P(y));
  const int threads = dim >= 4096 ? 1024 : (dim >= 1024 ? 512 : 256);
  layernorm_kernel<<<n, threads, 0, c->stream>>>(x, weight, bias, dim, eps, y);
  return launched(c, op);
}

__global__ void activation_kernel(const float *x, long long count, int kind, float *out) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = x[i];
    float r;
    if (kind == SI_ACT_RELU) r = fmaxf(v, 0.f);
    else if (kind == SI_ACT_GELU) r = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    else r = 0.5f * v * (1.f + tanhf(0.7978845608028654f * fmaf(0.044715f * v * v, v, v)));
    out[i] = r;
  }
}

extern "C" int32_t si_activation(si_ctx *c, const float *x, int64_t count, int32_t kind, float *out) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_activation";
  if (kind < SI_ACT_RELU || kind > SI_ACT_GELU_TANH)
    return fail(c, SI_ERR_ARG, "%s: unknown kind %d (0 = relu, 1 = gelu, 2 = gelu_tanh)", op, kind);
  int rc = non_negative(c, op, "count", count);
  if (rc || count == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "out", out);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "out", out, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(count), I(kind), P(out));
  activation_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(x, count, kind, out);
  return launched(c, op);
}

__global__ void clamp_kernel(float *x, long long count, float limit) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x)
    x[i] = fminf(fmaxf(x[i], -limit), limit);
}

extern "C" int32_t si_clamp(si_ctx *c, float *x, int64_t count, float limit) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_clamp";
  if (!(limit > 0.f)) return fail(c, SI_ERR_ARG, "%s: limit=%g must be positive", op, (double)limit);
  int rc = non_negative(c, op, "count", count);
  if (rc || count == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(count), F(limit));
  clamp_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(x, count, limit);
  return launched(c, op);
}


// ---- logits helpers --------------------------------------------------------------------------

// Lowest index of the maximum; NaNs never win; an all-NaN row gives 0 (as on the CPU).
__global__ void argmax_kernel(const float *x, int n, int *out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const float *xr = x + (size_t)blockIdx.x * n;
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i];
    if (v > bv || (v == bv && i < bi)) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
    const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sv[w] = bv;
    si[w] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int ww = 1; ww < nw; ww++)
      if (sv[ww] > bv || (sv[ww] == bv && si[ww] < bi)) {
        bv = sv[ww];
        bi = si[ww];
      }
    out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
  }
}

extern "C" int32_t si_argmax(si_ctx *c, const float *x, int32_t rows, int32_t n, int32_t *out) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_argmax";
  int rc = non_negative(c, op, "rows", rows);
  if (!rc) rc = positive(c, op, "n", n);
  if (rc || rows == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "out", out);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "out", out, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(rows), I(n), P(out));
  const int threads = n >= 8192 ? 1024 : 256;
  argmax_kernel<<<rows, threads, 0, c->stream>>>(x, n, out);
  return launched(c, op);
}

__global__ void softmax_kernel(float *x, int n, float inv_t) {
  __shared__ float red[32];
  float *xr = x + (size_t)blockIdx.x * n;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, xr[i] * inv_t);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = expf(xr[i] * inv_t - mx);
    xr[i] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  const float inv = 1.0f / sum;
  for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= inv;  // each thread rescales its own elements
}

extern "C" int32_t si_softmax(si_ctx *c, float *x, int32_t rows, int32_t n, float temperature) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_softmax";
  int rc = non_negative(c, op, "rows", rows);
  if (!rc) rc = positive(c, op, "n", n);
  if (rc) return rc;
  if (!(temperature > 0) || isinf(temperature))
    return fail(c, SI_ERR_ARG, "%s: temperature=%g must be finite and > 0", op, (double)temperature);
  if (rows == 0) return SI_OK;
  rc = need(c, op, "x", x);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), I(rows), I(n), F(temperature));
  const int threads = n >= 8192 ? 1024 : 256;
  softmax_kernel<<<rows, threads, 0, c->stream>>>(x, n, 1.0f / temperature);
  return launched(c, op);
}

