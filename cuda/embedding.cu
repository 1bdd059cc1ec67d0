// Row lookups from weight tables of any dtype, as f32: embedding (also the f32 row
// gather of the logits head) and add_rows (learned position embeddings).
#include "device.cuh"

__global__ void embedding_kernel(const unsigned char *table, int dt, int vocab, int dim, size_t rb,
                                 const int *ids, float *out, DevErr *err) {
  const int i = blockIdx.x;
  const int id = ids[i];
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0) report(err, E_EMB_ID, id, i, vocab, 0);
    return;
  }
  const unsigned char *row = table + (size_t)id * rb;
  float *o = out + (size_t)i * dim;
  for (int e = threadIdx.x; e < dim; e += blockDim.x) o[e] = load_elem(dt, row, e);
}

extern "C" int32_t si_embedding(si_ctx *c, const void *table, int32_t dtype, int32_t vocab, int32_t dim,
                                const int32_t *ids, int32_t n, float *out) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_embedding";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "vocab", vocab);
  if (!rc) rc = positive(c, op, "dim", dim);
  if (!rc) rc = check_dtype(c, op, dtype, dim, "dim");
  if (rc || n == 0) return rc;
  rc = need(c, op, "table", table);
  if (!rc) rc = need(c, op, "ids", ids);
  if (!rc) rc = need(c, op, "out", out);
  if (!rc) rc = aligned(c, op, "table", table, elem_align(dtype));
  if (!rc) rc = aligned(c, op, "ids", ids, 4);
  if (!rc) rc = aligned(c, op, "out", out, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(table), I(dtype), I(vocab), I(dim), P(ids), I(n), P(out));
  int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
  embedding_kernel<<<n, threads, 0, c->stream>>>((const unsigned char *)table, dtype, vocab, dim,
                                                 row_bytes(dtype, dim), ids, out, c->derr);
  return launched(c, op);
}

__global__ void add_rows_kernel(float *x, const unsigned char *table, int dt, int rows, int dim, size_t rb,
                                const int *ids, int offset, DevErr *err) {
  const int i = blockIdx.x;
  const long long r = (long long)ids[i] + offset;
  if (r < 0 || r >= rows) {
    if (threadIdx.x == 0) report(err, E_ADDROWS_ID, ids[i], i, rows, offset);
    return;
  }
  const unsigned char *row = table + (size_t)r * rb;
  float *o = x + (size_t)i * dim;
  for (int e = threadIdx.x; e < dim; e += blockDim.x) o[e] += load_elem(dt, row, e);
}

extern "C" int32_t si_add_rows(si_ctx *c, float *x, const void *table, int32_t dtype, int32_t rows, int32_t dim,
                               const int32_t *ids, int32_t n, int32_t offset) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_add_rows";
  int rc = non_negative(c, op, "n", n);
  if (!rc) rc = positive(c, op, "rows", rows);
  if (!rc) rc = positive(c, op, "dim", dim);
  if (!rc) rc = check_dtype(c, op, dtype, dim, "dim");
  if (rc || n == 0) return rc;
  rc = need(c, op, "x", x);
  if (!rc) rc = need(c, op, "table", table);
  if (!rc) rc = need(c, op, "ids", ids);
  if (!rc) rc = aligned(c, op, "x", x, 4);
  if (!rc) rc = aligned(c, op, "table", table, elem_align(dtype));
  if (!rc) rc = aligned(c, op, "ids", ids, 4);
  if (rc) return rc;
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  GATE(c, op, P(x), P(table), I(dtype), I(rows), I(dim), P(ids), I(n), I(offset));
  int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
  add_rows_kernel<<<n, threads, 0, c->stream>>>(x, (const unsigned char *)table, dtype, rows, dim,
                                                row_bytes(dtype, dim), ids, offset, c->derr);
  return launched(c, op);
}

