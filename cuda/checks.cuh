// Errors and argument checks shared by every op (checks.cu).
#pragma once

#include "context.cuh"

// ---- errors (checks.cu) -------------------------------------------------------------------

SI_HIDDEN int fail(si_ctx *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
SI_HIDDEN int cuda_fail(si_ctx *c, const char *op, const char *what, cudaError_t e);
SI_HIDDEN int no_device(si_ctx *c, const char *op);
// Waits for the stream, then reports a kernel fault (SI_ERR_DEVICE) or a recorded
// argument error (SI_ERR_ARG, record cleared). `where` names the reporting call.
SI_HIDDEN int drain(si_ctx *c, const char *op, const char *where);
// After every launch: launch errors at once; in checked mode also wait for the result.
SI_HIDDEN int launched(si_ctx *c, const char *op);

// ---- argument checks (checks.cu; same order and wording as ffi/lib.zig) -------------------

SI_HIDDEN int need(si_ctx *c, const char *op, const char *what, const void *p);
SI_HIDDEN int aligned(si_ctx *c, const char *op, const char *what, const void *p, unsigned al);
SI_HIDDEN int positive(si_ctx *c, const char *op, const char *what, long long v);
SI_HIDDEN int non_negative(si_ctx *c, const char *op, const char *what, long long v);
SI_HIDDEN bool is_quant(int d);
SI_HIDDEN const char *dtype_name(int d);
SI_HIDDEN int check_dtype(si_ctx *c, const char *op, int d, int inner, const char *inner_name);
SI_HIDDEN size_t row_bytes(int d, size_t k);
SI_HIDDEN unsigned elem_align(int d);
// Blocks for a grid-stride loop over `count` items.
SI_HIDDEN unsigned grid_for(si_ctx *c, long long count, int threads);
// The CPU library's check and message for a KV plane dtype (anything but F32 / F16).
SI_HIDDEN int check_kv_dtype(si_ctx *c, const char *op, int d);
SI_HIDDEN unsigned kv_size(int d);
