// si_sample and si_tree_accept on the GPU: the rules of ffi/kernels/sampling.zig (and of
// src/speculation/sampling.ts, the oracle), one block per logits row. Elementwise passes
// and sums run on the whole block; the ranking for top-k / top-p (a size-k heap, as on
// the CPU) runs on the block's first thread. Only token ids leave the GPU.
//
// The per-row parameters and token lists are a few bytes per row: they are copied to
// the host and checked there with the CPU library's messages before any kernel runs.
#include <stdlib.h>

#include "device.cuh"

namespace {

const int kFields = 9;  // si_sampling_field
const int kThreads = 256;

// ---- the draw: uniformAt of src/speculation/rng.ts -------------------------------------------

__device__ unsigned splitmix32(unsigned state) {
  unsigned t = state + 0x9e3779b9u;
  t = (t ^ (t >> 16)) * 0x21f0aaadu;
  t = (t ^ (t >> 15)) * 0x735a2d97u;
  return t ^ (t >> 15);
}

__device__ unsigned rotl32(unsigned x, int k) { return (x << k) | (x >> (32 - k)); }

__device__ unsigned xoshiro_next(unsigned *st) {
  const unsigned result = rotl32(st[1] * 5u, 7) * 9u;
  const unsigned t = st[1] << 9;
  st[2] ^= st[0];
  st[3] ^= st[1];
  st[1] ^= st[2];
  st[0] ^= st[3];
  st[2] ^= t;
  st[3] = rotl32(st[3], 11);
  return result;
}

__device__ double uniform_at(long long seed, long long position) {
  const unsigned long long su = (unsigned long long)seed, pu = (unsigned long long)position;
  const unsigned base = splitmix32((unsigned)su ^ splitmix32((unsigned)(su >> 32)));
  const unsigned p = splitmix32(base ^ splitmix32((unsigned)pu ^ 0x632be5abu));
  const unsigned q = splitmix32(p ^ splitmix32((unsigned)(pu >> 32) ^ 0x9e3779b9u));
  const unsigned long long rs = (unsigned long long)p * 2097152ull + (q >> 11);
  unsigned mix = splitmix32((unsigned)rs ^ splitmix32((unsigned)(rs >> 32)));
  unsigned st[4];
  st[0] = mix = splitmix32(mix);
  st[1] = mix = splitmix32(mix);
  st[2] = mix = splitmix32(mix);
  st[3] = splitmix32(mix) | 1u;
  const double high = (double)(xoshiro_next(st) >> 5);
  const double low = (double)(xoshiro_next(st) >> 6);
  return (high * 67108864.0 + low) / 9007199254740992.0;
}

// ---- block helpers ----------------------------------------------------------------------------

__device__ double block_sum_d(double v, double *red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  double t = 0;
  for (int i = 0; i < nw; i++) t += red[i];  // same order on every thread
  return t;
}

// Argmax (lowest index on ties) of y[0..n), on every thread.
__device__ int block_argmax(const float *y, int n, float *sv, int *si) {
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = y[i];
    if (v > bv || (v == bv && i < bi)) {
      bv = v;
      bi = i;
    }
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
    const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[w] = bv;
    si[w] = bi;
  }
  __syncthreads();
  bv = sv[0];
  bi = si[0];
  for (int k = 1; k < nw; k++)
    if (sv[k] > bv || (sv[k] == bv && si[k] < bi)) {
      bv = sv[k];
      bi = si[k];
    }
  return bi == 0x7fffffff ? 0 : bi;  // all -inf: index 0, as the CPU
}

// ---- ranking (first thread only) --------------------------------------------------------------

__device__ bool above(const float *key, int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); }

__device__ void sift_down(const float *key, int *heap, int size, int at) {
  for (;;) {
    const int left = 2 * at + 1;
    if (left >= size) return;
    const int right = left + 1;
    const int child = right < size && above(key, heap[left], heap[right]) ? right : left;
    if (!above(key, heap[at], heap[child])) return;
    const int t = heap[at];
    heap[at] = heap[child];
    heap[child] = t;
    at = child;
  }
}

// The (up to) k best indices by (key desc, index asc), best first; `positive`: keys > 0 only.
__device__ int select_top(const float *key, int n, int k, bool positive, int *out) {
  int size = 0;
  for (int i = 0; i < n; i++) {
    if (positive && !(key[i] > 0)) continue;
    if (size < k) {
      out[size] = i;
      int at = size++;
      while (at > 0) {
        const int up = (at - 1) / 2;
        if (!above(key, out[up], out[at])) break;
        const int t = out[up];
        out[up] = out[at];
        out[at] = t;
        at = up;
      }
    } else if (above(key, i, out[0])) {
      out[0] = i;
      sift_down(key, out, size, 0);
    }
  }
  for (int end = size - 1; end > 0; end--) {
    const int t = out[0];
    out[0] = out[end];
    out[end] = t;
    sift_down(key, out, end, 0);
  }
  return size;
}

struct Params {
  double temperature, top_p, min_p, repetition, presence, frequency;
  int top_k;
  long long seed, position;
};

__device__ Params params_at(const double *p) {
  Params r;
  r.temperature = p[0];
  r.top_k = (int)p[1];
  r.top_p = p[2];
  r.min_p = p[3];
  r.repetition = p[4];
  r.presence = p[5];
  r.frequency = p[6];
  r.seed = (long long)p[7];
  r.position = (long long)p[8];
  return r;
}

// The first thread's ranked path (top-k over the logits in y, its own total; or top-p over
// the f32 weights in y, whose sum is `total`): the kept tokens go to order[0..kept) and
// their probabilities to values[0..kept). Returns kept, or -1 when no token has mass.
__device__ int rank_and_keep(float *y, int n, const Params &p, double max, double inv_t, double total, int *order,
                             float *values) {
  const bool limit_k = p.top_k > 0 && p.top_k < n;
  if (limit_k) {
    // Ranked by logit, f64 weights; `total` is theirs.
    const int got = select_top(y, n, p.top_k, false, order);
    total = 0;
    for (int j = 0; j < got; j++) total += exp(((double)y[order[j]] - max) * inv_t);
    const double nucleus = p.top_p * total;
    int kept = 0;
    double covered = 0;
    for (; kept < got; kept++) {
      const double w = exp(((double)y[order[kept]] - max) * inv_t);
      if (!((kept == 0 || covered < nucleus) && w >= p.min_p)) break;
      covered += w;
    }
    for (int j = 0; j < kept; j++) values[j] = (float)(exp(((double)y[order[j]] - max) * inv_t) / covered);
    return kept;
  }
  const double mass = p.top_p * total;
  int taken = 0;
  for (int k = n < 64 ? n : 64;; k = k * 4 < n ? k * 4 : n) {
    const int got = select_top(y, n, k, true, order);
    double covered = 0;
    taken = 0;
    while (taken < got && (taken == 0 || covered < mass)) covered += y[order[taken++]];
    if (taken < got || got < k || k == n) break;
  }
  if (taken == 0) return -1;
  const double floor = p.min_p * (double)y[order[0]];
  int kept = 0;
  double covered = 0;
  for (; kept < taken; kept++) {
    const double w = y[order[kept]];
    if (!((kept == 0 || covered < mass) && w >= floor)) break;
    covered += w;
  }
  for (int j = 0; j < kept; j++) values[j] = (float)((double)y[order[j]] / covered);
  return kept;
}

__global__ void sample_kernel(const float *logits, int n, const double *params, const int *starts, const int *ltok,
                              const int *lcnt, const double *lbias, float *probs, int *out, int *scratch) {
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ double red[32];
  __shared__ int s_kept;
  const int r = blockIdx.x;
  const float *x = logits + (size_t)r * n;
  float *y = probs + (size_t)r * n;
  const Params p = params_at(params + (size_t)r * kFields);
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = isnan(x[i]) ? -INFINITY : x[i];
  __syncthreads();
  // Listed tokens are unique within a row: one thread each.
  for (int e = starts[r] + threadIdx.x; e < starts[r + 1]; e += blockDim.x) {
    const int t = ltok[e];
    float v = y[t];
    if (lcnt[e] > 0) {
      const double w = v;
      v = (float)(w > 0 ? w / p.repetition : w * p.repetition);
      v = (float)((double)v - (p.presence + p.frequency * (double)lcnt[e]));
    }
    y[t] = (float)((double)v + lbias[e]);
  }
  __syncthreads();
  const int best = block_argmax(y, n, sv, si);
  if (p.temperature == 0) {
    if (threadIdx.x == 0) out[r] = best;
    return;
  }
  const double inv_t = 1.0 / p.temperature;
  const double max = y[best];
  if (max == -INFINITY) {
    if (threadIdx.x == 0) out[r] = -1;
    return;
  }
  const bool limit_k = p.top_k > 0 && p.top_k < n;
  const bool limit_p = p.top_p < 1;
  __syncthreads();  // everyone has read y[best]
  if (!limit_k && !limit_p) {
    double part = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const double w = exp(((double)y[i] - max) * inv_t);
      y[i] = w >= p.min_p ? (float)w : 0.f;
      part += y[i];
    }
    const double total = block_sum_d(part, red);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = (float)((double)y[i] / total);
  } else {
    int *order = scratch + (size_t)r * 2 * n;
    float *values = (float *)(order + n);
    double total = 0;
    if (limit_k) {
      if (threadIdx.x == 0) s_kept = rank_and_keep(y, n, p, max, inv_t, 0, order, values);
    } else {
      double part = 0;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        y[i] = (float)exp(((double)y[i] - max) * inv_t);
        part += y[i];
      }
      total = block_sum_d(part, red);
      __syncthreads();
      if (threadIdx.x == 0) s_kept = rank_and_keep(y, n, p, max, inv_t, total, order, values);
    }
    __syncthreads();
    const int kept = s_kept;
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = 0.f;
    __syncthreads();
    for (int j = threadIdx.x; j < kept; j += blockDim.x) y[order[j]] = values[j];
    if (kept < 0) {
      if (threadIdx.x == 0) out[r] = -1;
      return;
    }
  }
  __syncthreads();
  // Inverse CDF: each thread sums a contiguous chunk; the first thread finds the chunk
  // holding u * total and walks it.
  const int chunk = (n + blockDim.x - 1) / blockDim.x;
  const int lo = threadIdx.x * chunk < n ? threadIdx.x * chunk : n;
  const int hi = lo + chunk < n ? lo + chunk : n;
  double mine = 0;
  for (int i = lo; i < hi; i++) mine += y[i];
  __shared__ double sums[kThreads];
  sums[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0;
  for (int k = 0; k < (int)blockDim.x; k++) total += sums[k];
  if (!(total > 0)) {
    out[r] = -1;
    return;
  }
  const double target = uniform_at(p.seed, p.position) * total;
  double cumulative = 0;
  for (int k = 0; k < (int)blockDim.x; k++) {
    if (!(target < cumulative + sums[k])) {
      cumulative += sums[k];
      continue;
    }
    const int a = k * chunk, b = a + chunk < n ? a + chunk : n;
    for (int i = a; i < b; i++) {
      if (!(y[i] > 0)) continue;
      cumulative += y[i];
      if (target < cumulative) {
        out[r] = i;
        return;
      }
    }
  }
  // Rounding left the target just past the end: the last token with mass.
  int last = n - 1;
  while (last > 0 && !(y[last] > 0)) last--;
  out[r] = last;
}

__global__ void tree_accept_kernel(int n_trees, const int *starts, const int *parents, const int *tokens,
                                   const int *picked, int *accepted, int *counts, int *bonus) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n_trees) return;
  const int base = starts[t], size = starts[t + 1] - base;
  int at = 0, count = 0;
  for (;;) {
    const int want = picked[base + at];
    int next = -1;
    if (want >= 0)
      for (int r = at + 1; r < size; r++)
        if (parents[base + r] == at && tokens[base + r] == want) {
          next = r;
          break;
        }
    if (next < 0) {
      counts[t] = count;
      bonus[t] = want;
      return;
    }
    accepted[base + count++] = next;
    at = next;
  }
}

// Copies `count` device elements to fresh host memory (freed by the caller).
void *host_copy(si_ctx *c, const void *dev, size_t bytes) {
  void *h = malloc(bytes ? bytes : 1);
  if (!h) return NULL;
  if (bytes && cudaMemcpyAsync(h, dev, bytes, cudaMemcpyDeviceToHost, c->stream) != cudaSuccess) {
    free(h);
    return NULL;
  }
  if (cudaStreamSynchronize(c->stream) != cudaSuccess) {
    free(h);
    return NULL;
  }
  return h;
}

// The CPU library's check of one row's parameters (ffi/kernels/sampling.zig paramsProblem).
const char *params_problem(const double *p) {
  const double safe = 9007199254740992.0;
  if (!(p[0] >= 0) || isinf(p[0])) return "temperature must be finite and >= 0";
  if (!(p[1] >= 0 && p[1] < 2147483648.0) || floor(p[1]) != p[1]) return "top_k must be an integer >= 0";
  if (!(p[2] > 0 && p[2] <= 1)) return "top_p must be in (0, 1]";
  if (!(p[3] >= 0 && p[3] <= 1)) return "min_p must be in [0, 1]";
  if (!(p[4] > 0) || isinf(p[4])) return "repetition penalty must be finite and > 0";
  if (!isfinite(p[5]) || !isfinite(p[6])) return "presence and frequency penalties must be finite";
  if (!(fabs(p[7]) < safe) || floor(p[7]) != p[7]) return "seed must be an integer below 2^53";
  if (!(p[8] >= 0 && p[8] < safe) || floor(p[8]) != p[8]) return "position must be an integer >= 0";
  return NULL;
}

// Host checks of si_sample's small arrays; 0 when fine.
int check_sample_lists(si_ctx *c, const char *op, int rows, int vocab, const double *hp, const int *hs,
                       const int *ltok, const int *lcnt, const double *lbias) {
  for (int r = 0; r < rows; r++) {
    const char *why = params_problem(hp + (size_t)r * kFields);
    if (why) return fail(c, SI_ERR_ARG, "%s: row %d: %s", op, r, why);
  }
  if (hs[0] != 0) return fail(c, SI_ERR_ARG, "%s: list_start[0]=%d must be 0", op, hs[0]);
  for (int r = 0; r < rows; r++)
    if (hs[r + 1] < hs[r]) return fail(c, SI_ERR_ARG, "%s: list_start decreases at row %d", op, r);
  const int entries = hs[rows];
  if (entries == 0) return SI_OK;
  int rc = need(c, op, "list_token", ltok);
  if (!rc) rc = need(c, op, "list_count", lcnt);
  if (!rc) rc = need(c, op, "list_bias", lbias);
  if (rc) return rc;
  int *ht = (int *)host_copy(c, ltok, (size_t)entries * 4);
  int *hc = (int *)host_copy(c, lcnt, (size_t)entries * 4);
  double *hb = (double *)host_copy(c, lbias, (size_t)entries * 8);
  rc = (!ht || !hc || !hb) ? fail(c, SI_ERR_DEVICE, "%s: cannot read the token lists back", op) : SI_OK;
  for (int e = 0; !rc && e < entries; e++) {
    if (ht[e] < 0 || ht[e] >= vocab)
      rc = fail(c, SI_ERR_ARG, "%s: list token %d at entry %d is outside [0, %d)", op, ht[e], e, vocab);
    else if (hc[e] < 0)
      rc = fail(c, SI_ERR_ARG, "%s: list count %d at entry %d is negative", op, hc[e], e);
    else if (!isfinite(hb[e]))
      rc = fail(c, SI_ERR_ARG, "%s: list bias at entry %d is not finite", op, e);
  }
  free(ht);
  free(hc);
  free(hb);
  return rc;
}

}  // namespace

extern "C" int32_t si_sample(si_ctx *c, const float *logits, int32_t rows, int32_t vocab, const double *params,
                             const int32_t *list_start, const int32_t *list_token, const int32_t *list_count,
                             const double *list_bias, float *probs, int32_t *out) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_sample";
  int rc = non_negative(c, op, "rows", rows);
  if (!rc) rc = positive(c, op, "vocab", vocab);
  if (rc || rows == 0) return rc;
  rc = need(c, op, "logits", logits);
  if (!rc) rc = need(c, op, "params", params);
  if (!rc) rc = need(c, op, "list_start", list_start);
  if (!rc) rc = need(c, op, "probs", probs);
  if (!rc) rc = need(c, op, "out", out);
  if (!rc) rc = aligned(c, op, "logits", logits, 4);
  if (!rc) rc = aligned(c, op, "params", params, 8);
  if (!rc) rc = aligned(c, op, "probs", probs, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  if ((rc = graph_flush(c, op))) return rc;  // reads device memory on the host: queued work first
  double *hp = (double *)host_copy(c, params, (size_t)rows * kFields * 8);
  int *hs = (int *)host_copy(c, list_start, (size_t)(rows + 1) * 4);
  rc = (!hp || !hs) ? fail(c, SI_ERR_DEVICE, "%s: cannot read the parameters back", op)
                    : check_sample_lists(c, op, rows, vocab, hp, hs, list_token, list_count, list_bias);
  free(hp);
  free(hs);
  if (rc) return rc;
  void *scratch = NULL;
  rc = scratch_for(c, op, (size_t)rows * 2 * vocab * 4, &scratch);
  if (rc) return rc;
  sample_kernel<<<rows, kThreads, 0, c->stream>>>(logits, vocab, params, list_start, list_token, list_count,
                                                  list_bias, probs, out, (int *)scratch);
  return launched(c, op);
}

extern "C" int32_t si_tree_accept(si_ctx *c, int32_t n_trees, const int32_t *tree_start, const int32_t *parents,
                                  const int32_t *tokens, const int32_t *picked, int32_t *accepted, int32_t *counts,
                                  int32_t *bonus) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_tree_accept";
  int rc = non_negative(c, op, "n_trees", n_trees);
  if (rc || n_trees == 0) return rc;
  rc = need(c, op, "tree_start", tree_start);
  if (!rc) rc = need(c, op, "parents", parents);
  if (!rc) rc = need(c, op, "tokens", tokens);
  if (!rc) rc = need(c, op, "picked", picked);
  if (!rc) rc = need(c, op, "accepted", accepted);
  if (!rc) rc = need(c, op, "counts", counts);
  if (!rc) rc = need(c, op, "bonus", bonus);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  if ((rc = graph_flush(c, op))) return rc;  // reads device memory on the host: queued work first
  int *hs = (int *)host_copy(c, tree_start, (size_t)(n_trees + 1) * 4);
  if (!hs) return fail(c, SI_ERR_DEVICE, "%s: cannot read tree_start back", op);
  const int rows = hs[n_trees];
  int *hp = hs[0] == 0 && rows > 0 ? (int *)host_copy(c, parents, (size_t)rows * 4) : NULL;
  if (hs[0] != 0) rc = fail(c, SI_ERR_ARG, "%s: tree_start[0]=%d must be 0", op, hs[0]);
  for (int t = 0; !rc && t < n_trees; t++) {
    if (hs[t + 1] <= hs[t]) {
      rc = fail(c, SI_ERR_ARG, "%s: tree %d has no rows (each has its root)", op, t);
      break;
    }
    if (!hp) {
      rc = fail(c, SI_ERR_DEVICE, "%s: cannot read parents back", op);
      break;
    }
    for (int r = 1; r < hs[t + 1] - hs[t]; r++) {
      const int parent = hp[hs[t] + r];
      if (parent < 0 || parent >= r) {
        rc = fail(c, SI_ERR_ARG, "%s: tree %d row %d has parent %d; parents must come before children", op, t, r,
                  parent);
        break;
      }
    }
  }
  free(hs);
  free(hp);
  if (rc) return rc;
  tree_accept_kernel<<<(n_trees + 127) / 128, 128, 0, c->stream>>>(n_trees, tree_start, parents, tokens, picked,
                                                                      accepted, counts, bonus);
  return launched(c, op);
}
