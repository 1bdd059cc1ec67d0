/* specinfer native ABI.
 *
 * One header for two libraries: libspecinfer_cpu.so (Zig, ffi/) and
 * libspecinfer_cuda.so (cuda/). Both export exactly these symbols, so the
 * TypeScript Backend is one binding table over either library.
 *
 * Conventions
 * - Every op returns int32_t: 0 = ok, otherwise an SI_ERR_* code; the message
 *   is then available from si_last_error(ctx) until the next failing call.
 * - "Device" pointers are host memory on the CPU library and GPU memory on the
 *   CUDA library. Index arrays (ids, positions, seq, slot, block tables,
 *   ancestor masks) are device pointers too.
 * - Activations are f32, row-major. Weights are row-major [out][in] (the HF
 *   layout; GGUF's ne[0] is `in`), in any si_dtype; quantized rows are
 *   sequences of GGML blocks along `in`.
 * - Nothing is allocated inside an op; all scratch comes from the caller.
 * - No global state: everything lives in the context.
 */
#ifndef SPECINFER_H
#define SPECINFER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types. Values are GGML's type ids so GGUF tensor types map 1:1. */
enum si_dtype {
  SI_F32 = 0,
  SI_F16 = 1,
  SI_Q4_0 = 2,  /* blocks of 32: f16 scale d, 16 bytes of nibbles; x = (q - 8) * d;
                   byte j holds element j (low nibble) and element j + 16 (high) */
  SI_Q8_0 = 8,  /* blocks of 32: f16 scale d, 32 x int8 q; x = q * d */
  SI_BF16 = 30,
};

enum si_error {
  SI_OK = 0,
  SI_ERR_ARG = 1,      /* bad argument: shape, dtype, null pointer */
  SI_ERR_NOMEM = 2,    /* allocation failed */
  SI_ERR_IO = 3,       /* file could not be opened or mapped */
  SI_ERR_DEVICE = 4,   /* CUDA runtime / driver error */
};

enum si_rope_layout {
  SI_ROPE_HALF = 0,        /* HF rotate_half: dim i pairs with dim i + rot_dim/2 */
  SI_ROPE_INTERLEAVED = 1, /* GGUF / Meta: dim 2i pairs with dim 2i + 1 */
};

enum si_ctx_flags {
  SI_FLAG_REFERENCE = 1, /* use the scalar reference kernels (tests compare them to SIMD) */
  /* CUDA: the context runs on GPU (flags >> SI_DEVICE_SHIFT) & SI_DEVICE_MASK (default 0);
     the CPU library ignores these bits (each of its contexts is a device of its own). */
  SI_DEVICE_SHIFT = 8,
  SI_DEVICE_MASK = 0xffff,
};

typedef struct si_ctx si_ctx;

/* ---- context -------------------------------------------------------------- */

/* n_threads <= 0 means one per core. Returns NULL only when out of memory. */
si_ctx *si_create(int32_t n_threads, int32_t flags);
void si_destroy(si_ctx *ctx);
/* Message of the last failure on this context ("" if none). Owned by ctx. */
const char *si_last_error(si_ctx *ctx);
/* Worker threads the context runs ops on (CPU) or 1 (CUDA). */
int32_t si_threads(si_ctx *ctx);
/* Waits for all queued work (CUDA); no-op on the CPU. */
int32_t si_sync(si_ctx *ctx);

/* ---- memory --------------------------------------------------------------- */

/* 64-byte aligned, zero-filled device memory; NULL on failure (see si_last_error). */
void *si_alloc(si_ctx *ctx, uint64_t bytes);
int32_t si_free(si_ctx *ctx, void *ptr);
int32_t si_upload(si_ctx *ctx, void *dst_device, const void *src_host, uint64_t bytes);
int32_t si_download(si_ctx *ctx, void *dst_host, const void *src_device, uint64_t bytes);

/* Read-only private mapping of a whole file (host memory). populate != 0 pre-faults it.
 * Returns NULL on failure (missing file, empty file, mmap error) with the reason. */
void *si_map_file(si_ctx *ctx, const char *path, int32_t populate, uint64_t *size_out);
int32_t si_unmap_file(si_ctx *ctx, void *base, uint64_t size);

/* ---- ops ------------------------------------------------------------------ */

/* out[i, :] = row ids[i] of table[vocab, dim] (any dtype), as f32. Doubles as a row
 * gather when table is f32 activations. Fails on ids outside [0, vocab). */
int32_t si_embedding(si_ctx *ctx, const void *table, int32_t dtype, int32_t vocab, int32_t dim,
                     const int32_t *ids, int32_t n, float *out);

/* y[n, m] = x[n, k] . W[m, k]^T (+ bias[m] when bias != NULL).
 * k must be a multiple of 32 for quantized dtypes. x and y must not overlap. */
int32_t si_matmul(si_ctx *ctx, const float *x, int32_t n, int32_t k, const void *w, int32_t dtype,
                  int32_t m, const float *bias, float *y);

/* y[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight (f32). y may equal x. */
int32_t si_rmsnorm(si_ctx *ctx, const float *x, const float *weight, int32_t n, int32_t dim, float eps,
                   float *y);

/* In-place rotary embedding of x[n, n_heads, head_dim] at positions[n]. The first
 * rot_dim dims of each head rotate (rot_dim even, <= head_dim), pair j by angle
 * positions[i] * inv_freq[j], j < rot_dim / 2 (scaling such as Llama 3's is folded
 * into inv_freq by the caller). */
int32_t si_rope(si_ctx *ctx, float *x, int32_t n, int32_t n_heads, int32_t head_dim, int32_t rot_dim,
                const int32_t *positions, const float *inv_freq, int32_t layout);

/* out[i] = silu(gate[i]) * up[i] for count elements. out may equal gate. */
int32_t si_swiglu(si_ctx *ctx, const float *gate, const float *up, int64_t count, float *out);

/* x[i] += y[i] for count elements. */
int32_t si_add(si_ctx *ctx, float *x, const float *y, int64_t count);

/* y[i, :] = (x[i, :] - mean) / sqrt(var + eps) * weight (+ bias when bias != NULL),
 * with the biased variance of row i (f32 weight and bias). y may equal x. */
int32_t si_layernorm(si_ctx *ctx, const float *x, const float *weight, const float *bias, int32_t n,
                     int32_t dim, float eps, float *y);

enum si_activation_kind {
  SI_ACT_RELU = 0,      /* max(x, 0) */
  SI_ACT_GELU = 1,      /* x/2 (1 + erf(x / sqrt 2)) */
  SI_ACT_GELU_TANH = 2, /* x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
};

/* out[i] = act(x[i]) for count elements. out may equal x. */
int32_t si_activation(si_ctx *ctx, const float *x, int64_t count, int32_t kind, float *out);

/* In place: x[i] = min(max(x[i], -limit), limit) for count elements, limit > 0 (MPT's
 * clip_qkv). */
int32_t si_clamp(si_ctx *ctx, float *x, int64_t count, float limit);

/* x[i, :] += row ids[i] + offset of table[rows, dim] (any dtype): learned position
 * embeddings added in place (OPT's offset is 2). Fails on rows outside [0, rows). */
int32_t si_add_rows(si_ctx *ctx, float *x, const void *table, int32_t dtype, int32_t rows, int32_t dim,
                    const int32_t *ids, int32_t n, int32_t offset);

/* ---- paged KV cache and tree attention -------------------------------------
 *
 * A cache plane is [n_blocks][block_size][row] elements of kv_dtype, with
 * row = n_kv_heads * head_dim. kv_dtype is SI_F32 or SI_F16 (any other value is
 * refused with SI_ERR_ARG); it is the same for every op on one cache. With SI_F16, K/V are
 * rounded to f16 on write (round to nearest, ties to even; a value beyond the f16
 * range becomes +-inf, as in a plain conversion), and attention converts them back
 * to f32 and accumulates in f32, so an f16 cache changes only the stored values.
 * Plane pointers must be aligned to their element (2 bytes for SI_F16, 4 for SI_F32).
 * A model's cache is planes laid out as [layer][K, V], plane_stride elements (of
 * kv_dtype, not bytes) apart.
 * block_tables[s * max_blocks + b] is the pool block holding logical slots
 * [b * block_size, (b + 1) * block_size) of sequence row s.
 *
 * A batch token i belongs to sequence row seq[i]; committed[s] slots of row s hold
 * committed K/V. The j-th batch token of row s is written at slot committed[s] + j,
 * and bit j of its ancestor mask (ancestors[i * words + j / 32] >> (j % 32)) says
 * whether token i attends to it. Every token attends to all committed slots of
 * its row. Chains (prefill, decode) and token trees are the same case. */

/* Writes k[n, row], v[n, row] (f32) at (seq[i], slot[i]) into one layer's K and V
 * planes of kv_dtype. */
int32_t si_kv_write(si_ctx *ctx, const float *k, const float *v, int32_t n, int32_t row,
                    const int32_t *seq, const int32_t *slot, const int32_t *block_tables,
                    int32_t max_blocks, int32_t block_size, void *k_plane, void *v_plane,
                    int32_t kv_dtype);

/* out[n, n_heads * head_dim] = softmax(q K^T * scale + bias) V over the slots each token
 * may see (see above). GQA: query head h reads KV head h / (n_heads / n_kv_heads).
 * bias is 0 when alibi_slopes is NULL; otherwise ALiBi: -alibi_slopes[h] * distance,
 * where the distance of a slot is the number of slots the token sees after it. A
 * token's visible slots are its path (the committed prefix, its tree ancestors, itself),
 * so that is the distance between the two positions. */
int32_t si_attention(si_ctx *ctx, const float *q, int32_t n, int32_t n_heads, int32_t n_kv_heads,
                     int32_t head_dim, const void *k_plane, const void *v_plane, int32_t kv_dtype,
                     const int32_t *block_tables, int32_t max_blocks, int32_t block_size,
                     const int32_t *seq, const int32_t *committed, const uint32_t *ancestors,
                     int32_t words, float scale, float *out, const float *alibi_slopes);

/* For every plane p < n_planes (at cache + p * plane_stride elements of kv_dtype): copy
 * the row at logical slot src[i] of the sequence with block table `table` to slot
 * dst[i], in order i = 0..n-1 (dst[i] <= src[i], increasing: the accepted path moving
 * forward). Rows are copied bit for bit. */
int32_t si_kv_move(si_ctx *ctx, void *cache, int32_t kv_dtype, int32_t n_planes, int64_t plane_stride,
                   int32_t row, const int32_t *table, int32_t block_size, const int32_t *src,
                   const int32_t *dst, int32_t n);

/* ---- logits helpers ------------------------------------------------------- */

/* out[i] = argmax of row i of x[rows, n] (lowest index on ties). */
int32_t si_argmax(si_ctx *ctx, const float *x, int32_t rows, int32_t n, int32_t *out);

/* In place: x[i, :] = softmax(x[i, :] / temperature), temperature > 0. */
int32_t si_softmax(si_ctx *ctx, float *x, int32_t rows, int32_t n, float temperature);

/* ---- sampling and tree verification ----------------------------------------
 *
 * The steps, order and rounding of src/speculation/sampling.ts: per row, a NaN logit
 * reads as -inf; listed tokens get the HF repetition penalty (a positive logit divided,
 * a negative one multiplied), then presence + frequency * count subtracted, then their
 * bias added, each rounded to f32. A greedy row (temperature 0) picks the argmax (lowest
 * index on ties). A sampled row keeps weights exp((logit - max) / temperature) (f64),
 * the top_k best (by logit) and/or the fewest most likely covering top_p of the mass,
 * then those >= min_p * the top weight, renormalized; the token is drawn by inverse CDF
 * with u = uniformAt(seed, position) (src/speculation/rng.ts: splitmix32 + xoshiro128**),
 * so a request's draw at a position is the same on every backend and batch. */

/* params[row * SI_SAMPLING_FIELDS + field], doubles. */
enum si_sampling_field {
  SI_SAMPLE_TEMPERATURE = 0, /* >= 0; 0 = greedy */
  SI_SAMPLE_TOP_K = 1,       /* integer >= 0; 0 = off */
  SI_SAMPLE_TOP_P = 2,       /* (0, 1]; 1 = off */
  SI_SAMPLE_MIN_P = 3,       /* [0, 1]; 0 = off */
  SI_SAMPLE_REPETITION = 4,  /* > 0; 1 = off */
  SI_SAMPLE_PRESENCE = 5,    /* 0 = off */
  SI_SAMPLE_FREQUENCY = 6,   /* 0 = off */
  SI_SAMPLE_SEED = 7,        /* integer, |seed| < 2^53 */
  SI_SAMPLE_POSITION = 8,    /* integer >= 0: the position of the token drawn */
  SI_SAMPLING_FIELDS = 9,
};

/* out[i] = the token of row i of logits[rows, vocab] under params row i, or -1 when a
 * sampled row has no mass (every logit -inf, or weights lost to an infinite
 * 1 / temperature). Row i's listed tokens are entries list_start[i] .. list_start[i+1]-1
 * (list_start[0] = 0): list_token (unique within a row, in [0, vocab)), list_count (its
 * count in the context; 0 = bias only) and list_bias (finite). The list arrays may be NULL
 * when list_start[rows] = 0. probs[rows, vocab]: a sampled row's distribution (what
 * stochastic verification reads); scratch, left unspecified, for a greedy row. */
int32_t si_sample(si_ctx *ctx, const float *logits, int32_t rows, int32_t vocab, const double *params,
                  const int32_t *list_start, const int32_t *list_token, const int32_t *list_count,
                  const double *list_bias, float *probs, int32_t *out);

/* Greedy walk of n_trees token trees. Tree t is rows tree_start[t] .. tree_start[t+1]-1
 * (tree_start[0] = 0, at least one row each); its row 0 is the root and row r > 0 a node
 * with token tokens[row] whose parent is row parents[row] of the same tree (< r). From the
 * root, the child whose token equals picked[row] (the LLM's own token after that row,
 * from si_sample) is accepted, until no child matches. Writes the accepted rows (within
 * the tree) to accepted[tree_start[t] ..], their number to counts[t], and picked at the
 * last accepted row (or the root) to bonus[t]: -1 when that row had no mass. */
int32_t si_tree_accept(si_ctx *ctx, int32_t n_trees, const int32_t *tree_start, const int32_t *parents,
                       const int32_t *tokens, const int32_t *picked, int32_t *accepted, int32_t *counts,
                       int32_t *bonus);

/* ---- CUDA graphs ---------------------------------------------------------- */

/* A graph region: the kernel ops after si_graph_begin(ctx, key), up to the first call
 * that needs their results or the stream (si_download, si_sync, si_upload after an op,
 * si_alloc, si_free) or si_graph_end, are captured as a CUDA graph the first time for
 * `key` (>= 0) and replayed by later regions of that key: each op is then checked
 * against the capture (its name and arguments, pointers included) instead of launched,
 * and the graph runs in their place. Inputs uploaded before the first op are read by
 * the replay, so a step uploads into the same buffers and replays. A region that
 * differs from its capture fails with SI_ERR_ARG before any of it ran. si_graph_end:
 * run != 0 runs what the region holds; run = 0 drops it unrun (after an error).
 * si_graph_drop frees the graph of `key` (key < 0: every graph). The CPU library
 * runs each op at once: these are no-ops there. */
int32_t si_graph_begin(si_ctx *ctx, int32_t key);
int32_t si_graph_end(si_ctx *ctx, int32_t run);
int32_t si_graph_drop(si_ctx *ctx, int32_t key);

/* ---- diagnostics ---------------------------------------------------------- */

/* Streams `bytes` of buffer `buf` `reps` times on all threads; returns GB/s read
 * in *gbps (the DRAM bandwidth probe of the CPU benchmark). */
int32_t si_probe_bandwidth(si_ctx *ctx, const void *buf, uint64_t bytes, int32_t reps, double *gbps);

#ifdef __cplusplus
}
#endif
#endif
