// Paged KV cache: write, tree attention, commit move (semantics in ffi/specinfer.h).
#include "device.cuh"

// ---- paged KV cache -------------------------------------------------------------------------
//
// Planes hold float (SI_F32) or __half (SI_F16) elements; every KV kernel is a template
// over that element type T. Writes round to f16 to nearest even (__float2half_rn, as the
// CPU's conversion), reads widen to f32, all arithmetic stays f32.

static __device__ __forceinline__ float kv_load(const float *p, size_t i) { return p[i]; }
static __device__ __forceinline__ float kv_load(const __half *p, size_t i) { return __half2float(p[i]); }
static __device__ __forceinline__ void kv_store(float *p, size_t i, float x) { p[i] = x; }
static __device__ __forceinline__ void kv_store(__half *p, size_t i, float x) { p[i] = __float2half_rn(x); }

static __device__ __forceinline__ size_t slot_offset(const int *bt, int block_size, size_t row, int slot) {
  const int blk = bt[slot / block_size];
  return ((size_t)blk * block_size + (size_t)(slot % block_size)) * row;
}

template <typename T>
__global__ void kv_write_kernel(const float *k, const float *v, int row, const int *seq, const int *slot,
                                const int *block_tables, int max_blocks, int block_size, T *kp, T *vp,
                                DevErr *err) {
  __shared__ int s_ok;
  __shared__ size_t s_off;
  const int i = blockIdx.x;
  if (threadIdx.x == 0) {
    int ok = 0;
    const int sq = seq[i], sl = slot[i];
    const long long lim = (long long)max_blocks * block_size;
    if (sq < 0) {
      report(err, E_KVW_SEQ, i, sq, 0, 0);
    } else if (sl < 0 || sl >= lim) {
      report(err, E_KVW_SLOT, sl, i, lim, 0);
    } else {
      const int *bt = block_tables + (size_t)sq * max_blocks;
      const int b = bt[sl / block_size];
      if (b < 0) {
        report(err, E_KVW_BLOCK, sl, i, b, 0);
      } else {
        ok = 1;
        s_off = slot_offset(bt, block_size, (size_t)row, sl);
      }
    }
    s_ok = ok;
  }
  __syncthreads();
  if (!s_ok) return;
  const size_t off = s_off;
  const float *kr = k + (size_t)i * row;
  const float *vr = v + (size_t)i * row;
  for (int e = threadIdx.x; e < row; e += blockDim.x) {
    kv_store(kp, off + e, kr[e]);
    kv_store(vp, off + e, vr[e]);
  }
}

extern "C" int32_t si_kv_write(si_ctx *c, const float *k, const float *v, int32_t n, int32_t row, const int32_t *seq,
                               const int32_t *slot, const int32_t *block_tables, int32_t max_blocks,
                               int32_t block_size, void *k_plane, void *v_plane, int32_t kv_dtype) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_kv_write";
  int rc = check_kv_dtype(c, op, kv_dtype);
  if (!rc) rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "row", row);
  if (!rc) rc = positive(c, op, "max_blocks", max_blocks);
  if (!rc) rc = positive(c, op, "block_size", block_size);
  if (rc || n == 0) return rc;
  const void *ps[] = {k, v, seq, slot, block_tables, k_plane, v_plane};
  const char *names[] = {"k", "v", "seq", "slot", "block_tables", "k_plane", "v_plane"};
  for (int j = 0; j < 7; j++)
    if ((rc = need(c, op, names[j], ps[j]))) return rc;
  for (int j = 0; j < 7; j++)
    if ((rc = aligned(c, op, names[j], ps[j], j >= 5 ? kv_size(kv_dtype) : 4))) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(k), P(v), I(n), I(row), P(seq), P(slot),
       P(block_tables), I(max_blocks), I(block_size),
       P(k_plane), P(v_plane), I(kv_dtype));
  const int threads = row >= 256 ? 256 : ((row + 31) / 32) * 32;
  if (kv_dtype == SI_F16)
    kv_write_kernel<__half><<<n, threads, 0, c->stream>>>(k, v, row, seq, slot, block_tables, max_blocks, block_size,
                                                          (__half *)k_plane, (__half *)v_plane, c->derr);
  else
    kv_write_kernel<float><<<n, threads, 0, c->stream>>>(k, v, row, seq, slot, block_tables, max_blocks, block_size,
                                                         (float *)k_plane, (float *)v_plane, c->derr);
  return launched(c, op);
}

// Tree attention. One block per (token, head); its warps split the visible slots (the
// committed prefix, then the batch slots of the ancestor mask, compacted up to 1024 at a
// time into shared memory), each warp keeping an online softmax over groups of ATT_G
// slots (their K loads in flight together) with E head dims per lane; the warps' partial
// results are merged at the end. Scores are (q . k) * scale in f32, like the CPU.
struct AttnArgs {
  const float *q;
  int n, n_heads, n_kv_heads, head_dim;
  const void *k_plane, *v_plane;  // elements of the kernel's T
  const int *block_tables;
  int max_blocks, block_size;
  const int *seq, *committed;
  const unsigned *anc;
  int words;
  float scale;
  const float *alibi;  // per query head slopes, or NULL
  float *out;
  DevErr *err;
};

#define ATT_G 4
#define ATT_LIST 1024

template <int E, bool LIST, typename T>
static __device__ __forceinline__ void attn_group(const AttnArgs &a, const float (&q)[E], float (&acc)[E], float &m, float &s,
                                           const int *list, int base, int cnt, int lane, const int *bt, size_t row,
                                           size_t koff, float slope, int rank0, int last) {
  const int hd = a.head_dim;
  size_t off[ATT_G];
  float sc[ATT_G];
#pragma unroll
  for (int g = 0; g < ATT_G; g++) {
    const int gi = g < cnt ? g : cnt - 1;  // pad with a real slot; its score is masked below
    const int slot = LIST ? list[base + gi] : base + gi;
    off[g] = slot_offset(bt, a.block_size, row, slot) + koff;
    const T *kr = (const T *)a.k_plane + off[g];
    float p = 0.f;
#pragma unroll
    for (int j = 0; j < E; j++) {
      const int e = lane + 32 * j;
      if (e < hd) p = fmaf(q[j], kv_load(kr, e), p);
    }
    sc[g] = p;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int g = 0; g < ATT_G; g++) sc[g] += __shfl_xor_sync(FULL_MASK, sc[g], o);
  float tmax = -INFINITY;
#pragma unroll
  for (int g = 0; g < ATT_G; g++) {
    // ALiBi: -slope * (slots seen after this one); rank0 + base + g is this slot's rank.
    sc[g] = g < cnt ? fmaf(sc[g], a.scale, -slope * (float)(last - (rank0 + base + g))) : -INFINITY;
    tmax = fmaxf(tmax, sc[g]);
  }
  const float mn = fmaxf(m, tmax);
  const float corr = m == -INFINITY ? 0.f : expf(m - mn);  // no NaN from (-inf) - (-inf)
  s *= corr;
#pragma unroll
  for (int j = 0; j < E; j++) acc[j] *= corr;
#pragma unroll
  for (int g = 0; g < ATT_G; g++) {
    if (g < cnt) {
      const float p = expf(sc[g] - mn);
      s += p;
      const T *vr = (const T *)a.v_plane + off[g];
#pragma unroll
      for (int j = 0; j < E; j++) {
        const int e = lane + 32 * j;
        if (e < hd) acc[j] = fmaf(p, kv_load(vr, e), acc[j]);
      }
    }
  }
  m = mn;
}

template <int E, typename T>
__global__ void __launch_bounds__(512) attention_kernel(AttnArgs a) {
  extern __shared__ float smem[];  // [nw][hd] partial outputs, then m[nw], s[nw], f[nw]
  __shared__ int list[ATT_LIST];
  __shared__ int s_sq, s_cm, s_nblk, s_bad, s_cnt, s_seen;
  const int i = blockIdx.x, h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = blockDim.x >> 5;
  const int hd = a.head_dim, bs = a.block_size;

  // Validate every slot this token will read (the checks the CPU makes before running).
  if (tid == 0) {
    int bad = 0, cm = 0;
    long long top = 0;
    const int sq = a.seq[i];
    if (sq < 0) {
      report(a.err, E_ATT_SEQ, i, sq, 0, 0);
      bad = 1;
    } else {
      cm = a.committed[sq];
      if (cm < 0) {
        report(a.err, E_ATT_COMMITTED, sq, cm, 0, 0);
        bad = 1;
      } else {
        top = cm;
        int seen = cm;
        for (int wi = 0; wi < a.words; wi++) seen += __popc(a.anc[(size_t)i * a.words + wi]);
        s_seen = seen;
        for (int wi = a.words - 1; wi >= 0; wi--) {
          const unsigned mk = a.anc[(size_t)i * a.words + wi];
          if (mk) {
            top = cm + (long long)wi * 32 + 32 - __clz(mk);
            break;
          }
        }
        const long long lim = (long long)a.max_blocks * bs;
        if (top > lim) {
          report(a.err, E_ATT_TOP, i, top - 1, lim, 0);
          bad = 1;
        }
      }
    }
    s_sq = sq;
    s_cm = cm;
    s_nblk = bad ? 0 : (int)((top + bs - 1) / bs);
    s_bad = bad;
  }
  __syncthreads();
  const int sq = s_sq, cm = s_cm, nblk = s_nblk;
  const int *bt = a.block_tables + (size_t)(sq < 0 ? 0 : sq) * a.max_blocks;
  int bad = s_bad;
  for (int b = tid; b < nblk; b += blockDim.x) {
    const int id = bt[b];
    if (id < 0) {
      report(a.err, E_ATT_BLOCK, sq, b, id, 0);
      bad = 1;
    }
  }
  if (__syncthreads_or(bad)) return;  // uniform: the whole block leaves

  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const size_t row = (size_t)a.n_kv_heads * hd;
  const size_t koff = (size_t)kvh * hd;
  const float *qp = a.q + ((size_t)i * a.n_heads + h) * hd;
  float q[E], acc[E];
#pragma unroll
  for (int j = 0; j < E; j++) {
    const int e = lane + 32 * j;
    q[j] = e < hd ? qp[e] : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, s = 0.f;
  const float slope = a.alibi ? a.alibi[h] : 0.f;
  const int last = s_seen - 1;

  for (int base = w * ATT_G; base < cm; base += nw * ATT_G) {
    const int cnt = cm - base < ATT_G ? cm - base : ATT_G;
    attn_group<E, false, T>(a, q, acc, m, s, list, base, cnt, lane, bt, row, koff, slope, 0, last);
  }
  int listed = 0;  // batch slots of earlier chunks: this chunk's ranks start at cm + listed
  for (int w0 = 0; w0 < a.words; w0 += 32) {  // uniform loop: barriers are safe
    __syncthreads();                           // the previous chunk's list is consumed
    if (w == 0) {
      const int wi = w0 + lane;
      unsigned bits = wi < a.words ? a.anc[(size_t)i * a.words + wi] : 0u;
      const int c = __popc(bits);
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += t;
      }
      int pos = incl - c;
      while (bits) {
        const int b = __ffs(bits) - 1;
        bits &= bits - 1;
        list[pos++] = cm + wi * 32 + b;
      }
      if (lane == 31) s_cnt = incl;
    }
    __syncthreads();
    const int cnt_all = s_cnt;
    for (int base = w * ATT_G; base < cnt_all; base += nw * ATT_G) {
      const int cnt = cnt_all - base < ATT_G ? cnt_all - base : ATT_G;
      attn_group<E, true, T>(a, q, acc, m, s, list, base, cnt, lane, bt, row, koff, slope, cm + listed, last);
    }
    listed += cnt_all;
  }

  // Merge the warps: out = sum_w acc_w e^(m_w - M) / sum_w s_w e^(m_w - M).
  float *pacc = smem;
  float *pm = smem + (size_t)nw * hd;
  float *ps = pm + nw;
  float *pf = ps + nw;
#pragma unroll
  for (int j = 0; j < E; j++) {
    const int e = lane + 32 * j;
    if (e < hd) pacc[(size_t)w * hd + e] = acc[j];
  }
  if (lane == 0) {
    pm[w] = m;
    ps[w] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float M = -INFINITY;
    for (int ww = 0; ww < nw; ww++) M = fmaxf(M, pm[ww]);
    float S = 0.f;
    for (int ww = 0; ww < nw; ww++) {
      pf[ww] = pm[ww] == -INFINITY ? 0.f : expf(pm[ww] - M);
      S += ps[ww] * pf[ww];
    }
    pm[0] = S;  // pm is not read again: it carries the total
  }
  __syncthreads();
  const float S = pm[0];
  const float inv = S > 0.f ? 1.0f / S : 0.f;  // a token that sees nothing gets zeros, as on the CPU
  float *op = a.out + ((size_t)i * a.n_heads + h) * hd;
  for (int e = tid; e < hd; e += blockDim.x) {
    float o = 0.f;
    for (int ww = 0; ww < nw; ww++) o = fmaf(pacc[(size_t)ww * hd + e], pf[ww], o);
    op[e] = o * inv;
  }
}

template <int E, typename T>
static void launch_attention(si_ctx *c, const AttnArgs &a, int nw) {
  const size_t smem = ((size_t)nw * a.head_dim + 3 * (size_t)nw) * sizeof(float);
  dim3 grid((unsigned)a.n, (unsigned)a.n_heads);
  attention_kernel<E, T><<<grid, nw * 32, smem, c->stream>>>(a);
}

// E = head dims per lane, the smallest of 1, 2, 4, ..., 32 that covers head_dim.
template <typename T>
static void launch_attention_for(si_ctx *c, const AttnArgs &a, int nw) {
  const int e = (a.head_dim + 31) / 32;
  if (e <= 1) launch_attention<1, T>(c, a, nw);
  else if (e <= 2) launch_attention<2, T>(c, a, nw);
  else if (e <= 4) launch_attention<4, T>(c, a, nw);
  else if (e <= 8) launch_attention<8, T>(c, a, nw);
  else if (e <= 16) launch_attention<16, T>(c, a, nw);
  else launch_attention<32, T>(c, a, nw);
}

extern "C" int32_t si_attention(si_ctx *c, const float *q, int32_t n, int32_t n_heads, int32_t n_kv_heads,
                                int32_t head_dim, const void *k_plane, const void *v_plane, int32_t kv_dtype,
                                const int32_t *block_tables, int32_t max_blocks, int32_t block_size,
                                const int32_t *seq, const int32_t *committed, const uint32_t *ancestors, int32_t words,
                                float scale, float *out, const float *alibi_slopes) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_attention";
  int rc = check_kv_dtype(c, op, kv_dtype);
  if (!rc) rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "n_heads", n_heads);
  if (!rc) rc = positive(c, op, "n_kv_heads", n_kv_heads);
  if (!rc) rc = positive(c, op, "head_dim", head_dim);
  if (!rc) rc = positive(c, op, "max_blocks", max_blocks);
  if (!rc) rc = positive(c, op, "block_size", block_size);
  if (!rc) rc = non_negative(c, op, "words", words);
  if (rc) return rc;
  if (n_heads % n_kv_heads != 0)
    return fail(c, SI_ERR_ARG, "%s: n_heads=%d is not a multiple of n_kv_heads=%d", op, n_heads, n_kv_heads);
  if (head_dim > kMaxHeadDim) return fail(c, SI_ERR_ARG, "%s: head_dim=%d exceeds %d", op, head_dim, kMaxHeadDim);
  if (n == 0) return SI_OK;
  const void *ps[] = {q, k_plane, v_plane, block_tables, seq, committed, out};
  const char *names[] = {"q", "k_plane", "v_plane", "block_tables", "seq", "committed", "out"};
  for (int j = 0; j < 7; j++)
    if ((rc = need(c, op, names[j], ps[j]))) return rc;
  if (words > 0 && (rc = need(c, op, "ancestors", ancestors))) return rc;
  for (int j = 0; j < 7; j++)
    if ((rc = aligned(c, op, names[j], ps[j], j == 1 || j == 2 ? kv_size(kv_dtype) : 4))) return rc;
  if (words > 0 && (rc = aligned(c, op, "ancestors", ancestors, 4))) return rc;
  if ((rc = aligned(c, op, "alibi_slopes", alibi_slopes, 4))) return rc;
  if (n_heads > 65535) return fail(c, SI_ERR_ARG, "%s: n_heads=%d exceeds the CUDA grid limit 65535", op, n_heads);
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(q), I(n), I(n_heads), I(n_kv_heads), I(head_dim),
       P(k_plane), P(v_plane), I(kv_dtype),
       P(block_tables), I(max_blocks), I(block_size),
       P(seq), P(committed), P(ancestors), I(words), F(scale), P(out), P(alibi_slopes));

  AttnArgs a;
  a.q = q;
  a.n = n;
  a.n_heads = n_heads;
  a.n_kv_heads = n_kv_heads;
  a.head_dim = head_dim;
  a.k_plane = k_plane;
  a.v_plane = v_plane;
  a.block_tables = block_tables;
  a.max_blocks = max_blocks;
  a.block_size = block_size;
  a.seq = seq;
  a.committed = committed;
  a.anc = ancestors;
  a.words = words;
  a.scale = scale;
  a.alibi = alibi_slopes;
  a.out = out;
  a.err = c->derr;
  // More warps per block when there are few blocks (decode), so long prefixes still
  // spread over the SMs; bounded by the merge's shared memory (48 KiB with the list).
  const long long blocks = (long long)n * n_heads;
  int nw = 4;
  if (blocks < 2LL * c->sm_count) nw = 8;
  if (blocks < c->sm_count) nw = 16;
  while (nw > 1 && ((size_t)nw * head_dim + 3 * (size_t)nw) * 4 > 40 * 1024) nw /= 2;
  if (kv_dtype == SI_F16) launch_attention_for<__half>(c, a, nw);
  else launch_attention_for<float>(c, a, nw);
  return launched(c, op);
}

// One block per plane walks i = 0..n-1 in order with a barrier between rows: row i's
// destination may be an earlier row's source (the accepted path moving forward). Every
// block checks all entries first, so a bad entry moves nothing in any plane.
template <typename T>
__global__ void kv_move_kernel(T *cache, long long plane_stride, int row, const int *table, int block_size,
                               const int *src, const int *dst, int n, DevErr *err) {
  int bad = 0;
  for (int i = threadIdx.x; i < n && !bad; i += blockDim.x) {
    const int sv[2] = {src[i], dst[i]};
    for (int wh = 0; wh < 2 && !bad; wh++) {
      if (sv[wh] < 0) {
        report(err, E_KVM_SLOT, sv[wh], i, 0, wh);
        bad = 1;
      } else {
        const int b = table[sv[wh] / block_size];
        if (b < 0) {
          report(err, E_KVM_BLOCK, sv[wh], i, b, wh);
          bad = 1;
        }
      }
    }
  }
  if (__syncthreads_or(bad)) return;
  T *plane = cache + (size_t)blockIdx.x * (size_t)plane_stride;
  for (int i = 0; i < n; i++) {
    const int s = src[i], d = dst[i];
    if (s != d) {
      const size_t so = slot_offset(table, block_size, (size_t)row, s);
      const size_t doff = slot_offset(table, block_size, (size_t)row, d);
      for (int e = threadIdx.x; e < row; e += blockDim.x) plane[doff + e] = plane[so + e];
    }
    __syncthreads();
  }
}

extern "C" int32_t si_kv_move(si_ctx *c, void *cache, int32_t kv_dtype, int32_t n_planes, int64_t plane_stride,
                              int32_t row, const int32_t *table, int32_t block_size, const int32_t *src,
                              const int32_t *dst, int32_t n) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_kv_move";
  int rc = check_kv_dtype(c, op, kv_dtype);
  if (!rc) rc = non_negative(c, op, "n", n);
  if (!rc) rc = non_negative(c, op, "n_planes", n_planes);
  if (!rc) rc = non_negative(c, op, "plane_stride", plane_stride);
  if (!rc) rc = positive(c, op, "row", row);
  if (!rc) rc = positive(c, op, "block_size", block_size);
  if (rc || n == 0 || n_planes == 0) return rc;
  const void *ps[] = {cache, table, src, dst};
  const char *names[] = {"cache", "table", "src", "dst"};
  for (int j = 0; j < 4; j++)
    if ((rc = need(c, op, names[j], ps[j]))) return rc;
  for (int j = 0; j < 4; j++)
    if ((rc = aligned(c, op, names[j], ps[j], j == 0 ? kv_size(kv_dtype) : 4))) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(cache), I(kv_dtype), I(n_planes), I(plane_stride), I(row), P(table), I(block_size), P(src), P(dst),
       I(n));
  const int threads = row >= 256 ? 256 : ((row + 31) / 32) * 32;
  // Rows are copied bit for bit: f16 planes move as 16-bit words.
  if (kv_dtype == SI_F16)
    kv_move_kernel<unsigned short><<<n_planes, threads, 0, c->stream>>>((unsigned short *)cache, plane_stride, row,
                                                                        table, block_size, src, dst, n, c->derr);
  else
    kv_move_kernel<float><<<n_planes, threads, 0, c->stream>>>((float *)cache, plane_stride, row, table, block_size,
                                                               src, dst, n, c->derr);
  return launched(c, op);
}

