// Errors and argument checks shared by every op: the context's message, CUDA failures,
// the device-side error record (reported by drain), and the host-side argument checks
// with the CPU library's wording.
#include <stdarg.h>
#include <stdio.h>

#include "checks.cuh"

int fail(si_ctx *c, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return code;
}

int cuda_fail(si_ctx *c, const char *op, const char *what, cudaError_t e) {
  return fail(c, SI_ERR_DEVICE, "%s: %s: %s (%s, CUDA error %d)", op, what, cudaGetErrorString(e),
              cudaGetErrorName(e), (int)e);
}

int no_device(si_ctx *c, const char *op) { return fail(c, SI_ERR_DEVICE, "%s: %s", op, c->dev_err); }

static void format_async(si_ctx *c, const DevErr *e, const char *where) {
  char m[600];
  long long a = e->a, b = e->b, cc = e->c;
  const char *which = e->d ? "dst" : "src";
  switch (e->kind) {
    case E_EMB_ID: snprintf(m, sizeof m, "si_embedding: id %lld at index %lld is outside [0, %lld)", a, b, cc); break;
    case E_ADDROWS_ID:
      snprintf(m, sizeof m, "si_add_rows: id %lld + offset %lld at index %lld is outside [0, %lld)", a, e->d, b, cc);
      break;
    case E_KVW_SEQ: snprintf(m, sizeof m, "si_kv_write: seq[%lld]=%lld is negative", a, b); break;
    case E_KVW_SLOT: snprintf(m, sizeof m, "si_kv_write: slot %lld (token %lld) is outside [0, %lld)", a, b, cc); break;
    case E_KVW_BLOCK: snprintf(m, sizeof m, "si_kv_write: slot %lld (token %lld) maps to block id %lld", a, b, cc); break;
    case E_ATT_SEQ: snprintf(m, sizeof m, "si_attention: seq[%lld]=%lld is negative", a, b); break;
    case E_ATT_COMMITTED: snprintf(m, sizeof m, "si_attention: committed[%lld]=%lld is negative", a, b); break;
    case E_ATT_TOP:
      snprintf(m, sizeof m, "si_attention: token %lld reads slot %lld, beyond max_blocks*block_size=%lld", a, b, cc);
      break;
    case E_ATT_BLOCK:
      snprintf(m, sizeof m, "si_attention: sequence row %lld block %lld has block id %lld", a, b, cc);
      break;
    case E_KVM_SLOT: snprintf(m, sizeof m, "si_kv_move: %s slot %lld (token %lld) is negative", which, a, b); break;
    case E_KVM_BLOCK:
      snprintf(m, sizeof m, "si_kv_move: %s slot %lld (token %lld) maps to block id %lld", which, a, b, cc);
      break;
    default: snprintf(m, sizeof m, "unknown device-side error kind %d", e->kind); break;
  }
  if (where)
    fail(c, SI_ERR_ARG, "%s (found on the GPU, reported by %s)", m, where);
  else
    fail(c, SI_ERR_ARG, "%s", m);
}

int drain(si_ctx *c, const char *op, const char *where) {
  cudaError_t e = cudaMemcpyAsync(c->herr, c->derr, sizeof(DevErr), cudaMemcpyDeviceToHost, c->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) return cuda_fail(c, op, "GPU work failed", e);
  if (c->herr->code != 0) {
    DevErr copy = *c->herr;
    c->herr->code = 0;
    e = cudaMemsetAsync(c->derr, 0, sizeof(DevErr), c->stream);
    if (e != cudaSuccess) return cuda_fail(c, op, "clearing the error record", e);
    format_async(c, &copy, where);
    return SI_ERR_ARG;
  }
  return SI_OK;
}

int launched(si_ctx *c, const char *op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_fail(c, op, "kernel launch failed", e);
  if (c->checked) return drain(c, op, NULL);
  return SI_OK;
}

// ---- argument helpers (same order and wording as ffi/lib.zig) ---------------------------

int need(si_ctx *c, const char *op, const char *what, const void *p) {
  if (!p) return fail(c, SI_ERR_ARG, "%s: %s is NULL", op, what);
  return SI_OK;
}

int aligned(si_ctx *c, const char *op, const char *what, const void *p, unsigned al) {
  if (((uintptr_t)p) % al != 0)
    return fail(c, SI_ERR_ARG, "%s: %s=0x%llx is not %u-byte aligned", op, what, (unsigned long long)(uintptr_t)p, al);
  return SI_OK;
}

int positive(si_ctx *c, const char *op, const char *what, long long v) {
  if (v <= 0) return fail(c, SI_ERR_ARG, "%s: %s=%lld must be > 0", op, what, v);
  return SI_OK;
}

int non_negative(si_ctx *c, const char *op, const char *what, long long v) {
  if (v < 0) return fail(c, SI_ERR_ARG, "%s: %s=%lld must be >= 0", op, what, v);
  return SI_OK;
}

bool is_quant(int d) { return d == SI_Q8_0 || d == SI_Q4_0; }

const char *dtype_name(int d) {
  switch (d) {
    case SI_F32: return "F32";
    case SI_F16: return "F16";
    case SI_Q4_0: return "Q4_0";
    case SI_Q8_0: return "Q8_0";
    case SI_BF16: return "BF16";
  }
  return "?";
}

int check_dtype(si_ctx *c, const char *op, int d, int inner, const char *inner_name) {
  if (d != SI_F32 && d != SI_F16 && d != SI_Q4_0 && d != SI_Q8_0 && d != SI_BF16)
    return fail(c, SI_ERR_ARG, "%s: unknown dtype %d (expected F32=0, F16=1, Q4_0=2, Q8_0=8, BF16=30)", op, d);
  if (is_quant(d) && inner % 32 != 0)
    return fail(c, SI_ERR_ARG, "%s: %s=%d is not a multiple of 32 for dtype %s", op, inner_name, inner, dtype_name(d));
  return SI_OK;
}

size_t row_bytes(int d, size_t k) {
  switch (d) {
    case SI_F32: return k * 4;
    case SI_F16:
    case SI_BF16: return k * 2;
    case SI_Q8_0: return k / 32 * 34;
    case SI_Q4_0: return k / 32 * 18;
  }
  return 0;
}

unsigned elem_align(int d) { return d == SI_F32 ? 4 : 2; }

unsigned grid_for(si_ctx *c, long long count, int threads) {
  long long b = (count + threads - 1) / threads;
  long long cap = (long long)c->sm_count * 16;
  if (b > cap) b = cap;
  return b < 1 ? 1u : (unsigned)b;
}


int check_kv_dtype(si_ctx *c, const char *op, int d) {
  if (d == SI_F32 || d == SI_F16) return SI_OK;
  const bool known = d == SI_Q4_0 || d == SI_Q8_0 || d == SI_BF16;
  return fail(c, SI_ERR_ARG, "%s: kv_dtype=%d (%s) is not a KV cache dtype (expected F32=0 or F16=1)", op, d,
              known ? dtype_name(d) : "unknown");
}

unsigned kv_size(int d) { return d == SI_F16 ? 2u : 4u; }
