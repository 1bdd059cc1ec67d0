// NCCL for tensor parallelism (src/backend/comm.ts, NcclAllReduce), loaded at run time:
// libnccl.so.2 is opened with dlopen on first use, so neither NCCL's headers nor its
// library are needed to build, and a machine without NCCL gets an error naming it.
//
// One process drives every rank (one si_ctx per GPU), so the communicators come from
// ncclCommInitAll and each all-reduce is one NCCL group call over all ranks, each
// enqueued on its rank's stream (ordered after the kernels that produced its buffer).
// Host code stays plain extern "C" (TRAPS.md).

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "context.cuh"

// ---- the few NCCL declarations used (values from NCCL's public nccl.h) ----------------

typedef struct ncclComm *ncclComm_t;
typedef int ncclResult_t;  // ncclSuccess = 0
static const int kNcclFloat32 = 7;
static const int kNcclSum = 0;

typedef ncclResult_t (*CommInitAllFn)(ncclComm_t *comms, int ndev, const int *devlist);
typedef ncclResult_t (*CommDestroyFn)(ncclComm_t comm);
typedef ncclResult_t (*AllReduceFn)(const void *send, void *recv, size_t count, int dtype, int op, ncclComm_t comm,
                                    cudaStream_t stream);
typedef ncclResult_t (*GroupFn)(void);
typedef const char *(*ErrorStringFn)(ncclResult_t r);

struct NcclApi {
  void *lib;
  CommInitAllFn comm_init_all;
  CommDestroyFn comm_destroy;
  AllReduceFn all_reduce;
  GroupFn group_start;
  GroupFn group_end;
  ErrorStringFn error_string;
};

struct si_nccl {
  NcclApi api;
  int n;
  ncclComm_t *comms;
  int *devices;  // devices[r]: rank r's GPU, which its context must run on
  char err[512];
};

static void nccl_fail(si_nccl *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void nccl_fail(si_nccl *h, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(h->err, sizeof h->err, fmt, ap);
  va_end(ap);
}

// Fills h->api; on failure h->err names the library or the missing symbol.
static int load_nccl(si_nccl *h) {
  void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *why = dlerror();
    nccl_fail(h, "cannot load libnccl.so.2 (%s): install NCCL for CUDA or add its directory to LD_LIBRARY_PATH",
              why ? why : "not found");
    return 0;
  }
  h->api.lib = lib;
  struct { const char *name; void **slot; } syms[] = {
      {"ncclCommInitAll", (void **)&h->api.comm_init_all}, {"ncclCommDestroy", (void **)&h->api.comm_destroy},
      {"ncclAllReduce", (void **)&h->api.all_reduce},      {"ncclGroupStart", (void **)&h->api.group_start},
      {"ncclGroupEnd", (void **)&h->api.group_end},        {"ncclGetErrorString", (void **)&h->api.error_string},
  };
  for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
    *syms[i].slot = dlsym(lib, syms[i].name);
    if (!*syms[i].slot) {
      nccl_fail(h, "libnccl.so.2 has no symbol %s (NCCL 2.x expected)", syms[i].name);
      return 0;
    }
  }
  return 1;
}

static const char *nccl_reason(si_nccl *h, ncclResult_t r) {
  return h->api.error_string ? h->api.error_string(r) : "unknown NCCL error";
}

// Always returns a handle (NULL only when out of memory): si_nccl_error says whether
// NCCL is usable and why not.
extern "C" si_nccl *si_nccl_create(int32_t n, const int32_t *devices) {
  si_nccl *h = (si_nccl *)calloc(1, sizeof(si_nccl));
  if (!h) return NULL;
  if (n < 1 || !devices) {
    nccl_fail(h, "si_nccl_create: n=%d must be >= 1 with a device list", (int)n);
    return h;
  }
  if (!load_nccl(h)) return h;
  h->comms = (ncclComm_t *)calloc((size_t)n, sizeof(ncclComm_t));
  h->devices = (int *)calloc((size_t)n, sizeof(int));
  if (!h->comms || !h->devices) {
    free(h->comms);
    h->comms = NULL;
    nccl_fail(h, "si_nccl_create: out of memory");
    return h;
  }
  for (int r = 0; r < n; r++) h->devices[r] = devices[r];
  ncclResult_t r = h->api.comm_init_all(h->comms, n, devices);
  if (r != 0) {
    free(h->comms);
    h->comms = NULL;
    nccl_fail(h, "ncclCommInitAll over %d device(s) failed: %s (NCCL error %d)", (int)n, nccl_reason(h, r), r);
    return h;
  }
  h->n = n;
  return h;
}

extern "C" const char *si_nccl_error(si_nccl *h) { return h ? h->err : "null si_nccl"; }

// bufs[r] (f32, `count` elements, on rank r's device) := the sum over ranks, in place,
// each on ctxs[r]'s stream.
extern "C" int32_t si_nccl_all_reduce_sum(si_nccl *h, si_ctx **ctxs, float **bufs, int64_t count) {
  if (!h) return SI_ERR_ARG;
  if (!h->comms) {
    if (!h->err[0]) nccl_fail(h, "si_nccl_all_reduce_sum: the communicator is not open");
    return SI_ERR_DEVICE;
  }
  if (!ctxs || !bufs || count < 0) {
    nccl_fail(h, "si_nccl_all_reduce_sum: ctxs, bufs must be given and count >= 0 (count=%lld)", (long long)count);
    return SI_ERR_ARG;
  }
  for (int r = 0; r < h->n; r++) {
    if (!ctxs[r] || !bufs[r]) {
      nccl_fail(h, "si_nccl_all_reduce_sum: rank %d has a NULL %s", r, ctxs[r] ? "buffer" : "context");
      return SI_ERR_ARG;
    }
    if (!ctxs[r]->ok) {
      nccl_fail(h, "si_nccl_all_reduce_sum: rank %d has no usable GPU: %s", r, ctxs[r]->dev_err);
      return SI_ERR_DEVICE;
    }
    if (ctxs[r]->device != h->devices[r]) {
      nccl_fail(h, "si_nccl_all_reduce_sum: rank %d's context runs on GPU %d, its communicator on GPU %d", r,
                ctxs[r]->device, h->devices[r]);
      return SI_ERR_ARG;
    }
  }
  if (count == 0) return SI_OK;
  ncclResult_t r = h->api.group_start();
  for (int i = 0; r == 0 && i < h->n; i++) {
    r = h->api.all_reduce(bufs[i], bufs[i], (size_t)count, kNcclFloat32, kNcclSum, h->comms[i], ctxs[i]->stream);
  }
  ncclResult_t end = h->api.group_end();
  if (r == 0) r = end;
  if (r != 0) {
    nccl_fail(h, "ncclAllReduce of %lld floats over %d rank(s) failed: %s (NCCL error %d)", (long long)count, h->n,
              nccl_reason(h, r), r);
    return SI_ERR_DEVICE;
  }
  return SI_OK;
}

extern "C" void si_nccl_destroy(si_nccl *h) {
  if (!h) return;
  if (h->comms) {
    for (int r = 0; r < h->n; r++) h->api.comm_destroy(h->comms[r]);
    free(h->comms);
  }
  free(h->devices);
  if (h->api.lib) dlclose(h->api.lib);
  free(h);
}
