// libspecinfer_cuda: ffi/specinfer.h on an NVIDIA GPU (one file so build.zig needs no
// change). Same symbols and semantics as the Zig CPU library, with these GPU-side rules:
//
// - Host code is plain extern "C" functions over POD structs: no STL, no exceptions,
//   no new/delete (TRAPS.md: nvcc's g++ vs Zig's libc++).
// - Everything runs in order on the context's stream. si_upload / si_download /
//   si_free / si_sync wait for it, so host buffers are safe when they return and a
//   buffer is never freed under a running kernel.
// - Scalar arguments (shapes, dtypes, NULLs) are checked on the host before anything
//   runs, with the CPU library's messages. The *contents* of index arrays (ids, seq,
//   slots, block tables, masks) live in device memory: kernels check them, skip the
//   bad rows (never reading or writing out of bounds) and record the first failure in
//   a device-side record. It is reported as SI_ERR_ARG by the next si_sync or
//   si_download (the points where results are consumed), because reading it back after
//   every op would serialize the stream. With SI_FLAG_REFERENCE ("checked mode" here)
//   every such op waits and reports synchronously, exactly like the CPU library.
// - No usable driver/device at si_create (e.g. cudaErrorInsufficientDriver = 35 on a
//   machine without a GPU): the context is still created so that si_last_error can say
//   why; every op then returns SI_ERR_DEVICE with that reason (after the same argument
//   checks as the CPU, so those stay testable anywhere). Returning NULL would only say
//   "out of memory", which is the one meaning the header gives NULL.
// - Quantized weights (Q8_0, Q4_0) use the CPU's integer math: activations quantized
//   per block of 32 (d = amax / 127, q = round(x / d)), then d_w * d_x * sum(q_w * q_x)
//   via dp4a, so both libraries agree to float rounding.
// - Pointers must be aligned to their element size (a misaligned access is a sticky
//   CUDA error that would end the context), which si_alloc memory always is.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "specinfer.h"

#define FULL_MASK 0xffffffffu

static const int kMaxHeadDim = 1024;  // same limit as the CPU library (attention, rope)
static const int kGemvMaxN = 32;      // above this many tokens the tiled matmul wins

// ---- device-side argument errors -------------------------------------------------------

enum {
  E_EMB_ID = 1,
  E_KVW_SEQ,
  E_KVW_SLOT,
  E_KVW_BLOCK,
  E_ATT_SEQ,
  E_ATT_COMMITTED,
  E_ATT_TOP,
  E_ATT_BLOCK,
  E_KVM_SLOT,
  E_KVM_BLOCK,
  E_ADDROWS_ID,
};

struct DevErr {
  int code;  // 0 = none; set once by atomicCAS so the first failure's fields stay intact
  int kind;
  long long a, b, c, d;
};

__device__ __noinline__ void report(DevErr *e, int kind, long long a, long long b, long long c, long long d) {
  if (atomicCAS(&e->code, 0, 1) == 0) {
    e->kind = kind;
    e->a = a;
    e->b = b;
    e->c = c;
    e->d = d;
    __threadfence();
  }
}

// ---- context ----------------------------------------------------------------------------

struct si_ctx {
  int ok;  // 0: no usable device (dev_err says why)
  int checked;
  int sm_count;
  cudaDeviceProp prop;
  cudaStream_t stream;
  DevErr *derr;              // device record of asynchronous argument errors
  DevErr *herr;              // pinned host copy
  unsigned long long *sink;  // keeps the bandwidth probe's loads alive
  void *scratch;             // quantized activations; grows, never shrinks
  size_t scratch_cap;
  char dev_err[512];
  char err[1024];
};

static int fail(si_ctx *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(si_ctx *c, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return code;
}

static int cuda_fail(si_ctx *c, const char *op, const char *what, cudaError_t e) {
  return fail(c, SI_ERR_DEVICE, "%s: %s: %s (%s, CUDA error %d)", op, what, cudaGetErrorString(e),
              cudaGetErrorName(e), (int)e);
}

static int no_device(si_ctx *c, const char *op) { return fail(c, SI_ERR_DEVICE, "%s: %s", op, c->dev_err); }

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

// Waits for the stream, then reports a kernel fault (SI_ERR_DEVICE) or a recorded
// argument error (SI_ERR_ARG, record cleared). `where` names the reporting call.
static int drain(si_ctx *c, const char *op, const char *where) {
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

// After every launch: launch errors at once; in checked mode also wait for the result.
static int launched(si_ctx *c, const char *op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_fail(c, op, "kernel launch failed", e);
  if (c->checked) return drain(c, op, NULL);
  return SI_OK;
}

extern "C" si_ctx *si_create(int32_t n_threads, int32_t flags) {
  (void)n_threads;  // one stream; the GPU needs no host threads
  si_ctx *c = (si_ctx *)calloc(1, sizeof(si_ctx));
  if (!c) return NULL;
  c->checked = (flags & SI_FLAG_REFERENCE) != 0;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  const char *step = "cudaGetDeviceCount";
  if (e == cudaSuccess && count <= 0) {
    snprintf(c->dev_err, sizeof c->dev_err, "no CUDA device: cudaGetDeviceCount found none");
    snprintf(c->err, sizeof c->err, "%s", c->dev_err);
    return c;
  }
  if (e == cudaSuccess) { step = "cudaSetDevice(0)"; e = cudaSetDevice(0); }
  if (e == cudaSuccess) { step = "cudaGetDeviceProperties"; e = cudaGetDeviceProperties(&c->prop, 0); }
  if (e == cudaSuccess) { step = "cudaStreamCreate"; e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking); }
  if (e == cudaSuccess) { step = "cudaMalloc (error record)"; e = cudaMalloc((void **)&c->derr, sizeof(DevErr)); }
  if (e == cudaSuccess) { step = "cudaMallocHost"; e = cudaMallocHost((void **)&c->herr, sizeof(DevErr)); }
  if (e == cudaSuccess) { step = "cudaMalloc (probe sink)"; e = cudaMalloc((void **)&c->sink, 64); }
  if (e == cudaSuccess) { step = "cudaMemset"; e = cudaMemsetAsync(c->derr, 0, sizeof(DevErr), c->stream); }
  if (e == cudaSuccess) { step = "cudaMemset"; e = cudaMemsetAsync(c->sink, 0, 64, c->stream); }
  if (e == cudaSuccess) { step = "cudaStreamSynchronize"; e = cudaStreamSynchronize(c->stream); }
  if (e != cudaSuccess) {
    snprintf(c->dev_err, sizeof c->dev_err, "CUDA is not usable: %s failed: %s (%s, CUDA error %d)", step,
             cudaGetErrorString(e), cudaGetErrorName(e), (int)e);
    snprintf(c->err, sizeof c->err, "%s", c->dev_err);
    // Release what was made before the failure; nothing else will use it.
    if (c->sink) cudaFree(c->sink);
    if (c->herr) cudaFreeHost(c->herr);
    if (c->derr) cudaFree(c->derr);
    if (c->stream) cudaStreamDestroy(c->stream);
    c->sink = NULL;
    c->herr = NULL;
    c->derr = NULL;
    c->stream = NULL;
    return c;
  }
  c->herr->code = 0;
  c->sm_count = c->prop.multiProcessorCount > 0 ? c->prop.multiProcessorCount : 1;
  c->ok = 1;
  return c;
}

extern "C" void si_destroy(si_ctx *c) {
  if (!c) return;
  if (c->ok) {
    cudaStreamSynchronize(c->stream);
    if (c->scratch) cudaFree(c->scratch);
    cudaFree(c->sink);
    cudaFree(c->derr);
    cudaFreeHost(c->herr);
    cudaStreamDestroy(c->stream);
  }
  free(c);
}

extern "C" const char *si_last_error(si_ctx *c) { return c ? c->err : "null si_ctx"; }

extern "C" int32_t si_threads(si_ctx *c) { return c ? 1 : 0; }

extern "C" int32_t si_sync(si_ctx *c) {
  if (!c) return SI_ERR_ARG;
  if (!c->ok) return no_device(c, "si_sync");
  return drain(c, "si_sync", "si_sync");
}

// ---- memory -----------------------------------------------------------------------------

extern "C" void *si_alloc(si_ctx *c, uint64_t bytes) {
  if (!c) return NULL;
  if (!c->ok) {
    no_device(c, "si_alloc");
    return NULL;
  }
  void *p = NULL;
  // cudaMalloc(0) may give NULL, which means failure in this ABI: round up.
  size_t n = bytes < 256 ? 256 : (size_t)bytes;
  cudaError_t e = cudaMalloc(&p, n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // allocation failures are not sticky: clear them
    fail(c, e == cudaErrorMemoryAllocation ? SI_ERR_NOMEM : SI_ERR_DEVICE,
         "si_alloc: cannot allocate %llu bytes of GPU memory: %s (CUDA error %d)", (unsigned long long)bytes,
         cudaGetErrorString(e), (int)e);
    return NULL;
  }
  e = cudaMemsetAsync(p, 0, n, c->stream);
  if (e != cudaSuccess) {
    cudaFree(p);
    cuda_fail(c, "si_alloc", "zero-filling", e);
    return NULL;
  }
  return p;
}

extern "C" int32_t si_free(si_ctx *c, void *p) {
  if (!c) return SI_ERR_ARG;
  if (!p) return SI_OK;
  if (!c->ok) return no_device(c, "si_free");
  // Kernels queued before this call may still read the buffer.
  cudaError_t e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) return cuda_fail(c, "si_free", "waiting for queued work", e);
  e = cudaFree(p);
  if (e == cudaErrorInvalidValue || e == cudaErrorInvalidDevicePointer) {
    cudaGetLastError();
    return fail(c, SI_ERR_ARG, "si_free: 0x%llx was not returned by si_alloc (or was freed twice)",
                (unsigned long long)(uintptr_t)p);
  }
  if (e != cudaSuccess) return cuda_fail(c, "si_free", "cudaFree", e);
  return SI_OK;
}

extern "C" int32_t si_upload(si_ctx *c, void *dst, const void *src, uint64_t bytes) {
  if (!c) return SI_ERR_ARG;
  if (bytes == 0) return SI_OK;
  if (!dst) return fail(c, SI_ERR_ARG, "si_upload: dst is NULL");
  if (!src) return fail(c, SI_ERR_ARG, "si_upload: src is NULL");
  if (!c->ok) return no_device(c, "si_upload");
  // On the stream: ordered after kernels still reading the old contents.
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) return cuda_fail(c, "si_upload", "copy to the GPU", e);
  return SI_OK;
}

extern "C" int32_t si_download(si_ctx *c, void *dst, const void *src, uint64_t bytes) {
  if (!c) return SI_ERR_ARG;
  if (bytes == 0) return SI_OK;
  if (!dst) return fail(c, SI_ERR_ARG, "si_download: dst is NULL");
  if (!src) return fail(c, SI_ERR_ARG, "si_download: src is NULL");
  if (!c->ok) return no_device(c, "si_download");
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream);
  if (e != cudaSuccess) return cuda_fail(c, "si_download", "copy from the GPU", e);
  return drain(c, "si_download", "si_download");
}

static const char *io_reason(int e) {
  switch (e) {
    case ENOENT: return "no such file";
    case EACCES:
    case EPERM: return "permission denied";
    case EISDIR: return "is a directory";
    case ENAMETOOLONG: return "path too long";
    case ENOMEM: return "out of memory";
    case ELOOP: return "too many symbolic links";
    default: return strerror(e);
  }
}

// Host mapping, as on the CPU: the TS side copies weights to the GPU with si_upload.
extern "C" void *si_map_file(si_ctx *c, const char *path, int32_t populate, uint64_t *size_out) {
  if (!c) return NULL;
  if (!path) {
    fail(c, SI_ERR_ARG, "si_map_file: path is NULL");
    return NULL;
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail(c, SI_ERR_IO, "si_map_file: cannot open '%s': %s", path, io_reason(errno));
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int er = errno;
    close(fd);
    fail(c, SI_ERR_IO, "si_map_file: cannot stat '%s': %s", path, io_reason(er));
    return NULL;
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    fail(c, SI_ERR_IO, "si_map_file: '%s' is not a regular file", path);
    return NULL;
  }
  if (st.st_size <= 0) {
    close(fd);
    fail(c, SI_ERR_IO, "si_map_file: '%s': file is empty", path);
    return NULL;
  }
  size_t size = (size_t)st.st_size;
  int flags = MAP_PRIVATE;
  if (populate) flags |= MAP_POPULATE;
  void *m = mmap(NULL, size, PROT_READ, flags, fd, 0);
  int er = errno;
  close(fd);
  if (m == MAP_FAILED) {
    fail(c, SI_ERR_IO, "si_map_file: cannot map '%s' (%zu bytes): %s", path, size, io_reason(er));
    return NULL;
  }
  if (size_out) *size_out = size;
  return m;
}

extern "C" int32_t si_unmap_file(si_ctx *c, void *base, uint64_t size) {
  if (!c) return SI_ERR_ARG;
  if (!base) return SI_OK;
  long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) page = 4096;
  if ((uintptr_t)base % (uintptr_t)page != 0 || size == 0)
    return fail(c, SI_ERR_ARG, "si_unmap_file: 0x%llx / %llu bytes is not a mapping",
                (unsigned long long)(uintptr_t)base, (unsigned long long)size);
  munmap(base, (size_t)size);
  return SI_OK;
}

// ---- argument helpers (same order and wording as ffi/lib.zig) ---------------------------

static int need(si_ctx *c, const char *op, const char *what, const void *p) {
  if (!p) return fail(c, SI_ERR_ARG, "%s: %s is NULL", op, what);
  return SI_OK;
}

static int aligned(si_ctx *c, const char *op, const char *what, const void *p, unsigned al) {
  if (((uintptr_t)p) % al != 0)
    return fail(c, SI_ERR_ARG, "%s: %s=0x%llx is not %u-byte aligned", op, what, (unsigned long long)(uintptr_t)p, al);
  return SI_OK;
}

static int positive(si_ctx *c, const char *op, const char *what, long long v) {
  if (v <= 0) return fail(c, SI_ERR_ARG, "%s: %s=%lld must be > 0", op, what, v);
  return SI_OK;
}

static int non_negative(si_ctx *c, const char *op, const char *what, long long v) {
  if (v < 0) return fail(c, SI_ERR_ARG, "%s: %s=%lld must be >= 0", op, what, v);
  return SI_OK;
}

static bool is_quant(int d) { return d == SI_Q8_0 || d == SI_Q4_0; }

static const char *dtype_name(int d) {
  switch (d) {
    case SI_F32: return "F32";
    case SI_F16: return "F16";
    case SI_Q4_0: return "Q4_0";
    case SI_Q8_0: return "Q8_0";
    case SI_BF16: return "BF16";
  }
  return "?";
}

static int check_dtype(si_ctx *c, const char *op, int d, int inner, const char *inner_name) {
  if (d != SI_F32 && d != SI_F16 && d != SI_Q4_0 && d != SI_Q8_0 && d != SI_BF16)
    return fail(c, SI_ERR_ARG, "%s: unknown dtype %d (expected F32=0, F16=1, Q4_0=2, Q8_0=8, BF16=30)", op, d);
  if (is_quant(d) && inner % 32 != 0)
    return fail(c, SI_ERR_ARG, "%s: %s=%d is not a multiple of 32 for dtype %s", op, inner_name, inner, dtype_name(d));
  return SI_OK;
}

static size_t row_bytes(int d, size_t k) {
  switch (d) {
    case SI_F32: return k * 4;
    case SI_F16:
    case SI_BF16: return k * 2;
    case SI_Q8_0: return k / 32 * 34;
    case SI_Q4_0: return k / 32 * 18;
  }
  return 0;
}

static unsigned elem_align(int d) { return d == SI_F32 ? 4 : 2; }

// Blocks for a grid-stride loop over `count` items.
static unsigned grid_for(si_ctx *c, long long count, int threads) {
  long long b = (count + threads - 1) / threads;
  long long cap = (long long)c->sm_count * 16;
  if (b > cap) b = cap;
  return b < 1 ? 1u : (unsigned)b;
}

// ---- device helpers -----------------------------------------------------------------------

// Quantized blocks (18 / 34 bytes) are only 2-byte aligned: scales and quants are read
// as 16-bit words.
__device__ __forceinline__ float ld_f16(const unsigned char *p) {
  return __half2float(__ushort_as_half(*(const unsigned short *)p));
}
__device__ __forceinline__ float ld_bf16(const unsigned char *p) {
  return __uint_as_float(((unsigned)*(const unsigned short *)p) << 16);
}
__device__ __forceinline__ int ld_i32_a2(const unsigned char *p) {
  const unsigned short *s = (const unsigned short *)p;
  return (int)((unsigned)s[0] | ((unsigned)s[1] << 16));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024); all threads get it.
__device__ float block_sum(float v, float *red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read from a previous call
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}
__device__ float block_max(float v, float *red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  return warp_max(t);
}

// One element of a row of any dtype (k % 32 == 0 for the quantized ones).
__device__ __forceinline__ float load_elem(int dt, const unsigned char *row, long long i) {
  switch (dt) {
    case SI_F32: return ((const float *)row)[i];
    case SI_F16: return ld_f16(row + 2 * i);
    case SI_BF16: return ld_bf16(row + 2 * i);
    case SI_Q8_0: {
      const unsigned char *blk = row + (i >> 5) * 34;
      return (float)(signed char)blk[2 + (i & 31)] * ld_f16(blk);
    }
    default: {  // SI_Q4_0
      const unsigned char *blk = row + (i >> 5) * 18;
      const int j = (int)(i & 31);
      const int b = blk[2 + (j & 15)];
      const int q = (j < 16 ? (b & 15) : (b >> 4)) - 8;
      return (float)q * ld_f16(blk);
    }
  }
}

// ---- embedding --------------------------------------------------------------------------

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
  if (!c->ok) return no_device(c, op);
  int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
  embedding_kernel<<<n, threads, 0, c->stream>>>((const unsigned char *)table, dtype, vocab, dim,
                                                 row_bytes(dtype, dim), ids, out, c->derr);
  return launched(c, op);
}

// ---- matmul -------------------------------------------------------------------------------
//
// Small n (decode, token trees): warp-per-row GEMV. A warp owns R consecutive weight rows
// and streams them once per pass of up to 8 tokens (8, then 4, 2, 1 for the rest), so a
// row is read from DRAM once and re-read from L1/L2 only for n > 8. Each token's sum is
// accumulated in the same order whatever the pass size or R, so a token's result does
// not depend on the rest of the batch (for n <= kGemvMaxN).
// Large n (prefill): 64x64 output tiles over k-steps of 32 in shared memory.

template <int DT>
struct WF;  // float-family weight loaders
template <>
struct WF<SI_F32> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return __ldg((const float *)row + i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const float4 *p = (const float4 *)(row + (size_t)i * 4);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  }
};
template <>
struct WF<SI_F16> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return ld_f16(row + 2 * (size_t)i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const uint4 u = __ldg((const uint4 *)(row + (size_t)i * 2));
    const unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      w[2 * j] = __half2float(__ushort_as_half((unsigned short)(v[j] & 0xffffu)));
      w[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(v[j] >> 16)));
    }
  }
};
template <>
struct WF<SI_BF16> {
  __device__ static __forceinline__ float one(const unsigned char *row, int i) { return ld_bf16(row + 2 * (size_t)i); }
  __device__ static __forceinline__ void eight(const unsigned char *row, int i, float *w) {
    const uint4 u = __ldg((const uint4 *)(row + (size_t)i * 2));
    const unsigned v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      w[2 * j] = __uint_as_float(v[j] << 16);
      w[2 * j + 1] = __uint_as_float(v[j] & 0xffff0000u);
    }
  }
};

struct MM {
  const float *x;
  const signed char *xq;  // quantized x [n][k] (quantized dtypes)
  const float *xd;        // its block scales [n][k / 32]
  int n, k, m;
  const unsigned char *w;
  size_t rb;  // weight row bytes
  const float *bias;
  float *y;
};

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
template <int DT, int R, int T>
__device__ __forceinline__ void gemv_q_pass(const MM &a, long long r0, int t0, int lane) {
  const bool q8 = DT == SI_Q8_0;
  const int BS = q8 ? 34 : 18;
  const int LPB = q8 ? 4 : 2;
  const int STEP = 32 / LPB;
  const int sub = lane % LPB;
  const int nb = a.k / 32;
  const unsigned char *rows[R];
#pragma unroll
  for (int rr = 0; rr < R; rr++) {
    const long long r = r0 + rr < a.m ? r0 + rr : a.m - 1;
    rows[rr] = a.w + (size_t)r * a.rb;
  }
  float acc[R][T];
#pragma unroll
  for (int rr = 0; rr < R; rr++)
#pragma unroll
    for (int t = 0; t < T; t++) acc[rr][t] = 0.f;
  for (int b = lane / LPB; b < nb; b += STEP) {
    float dw[R];
    int wq[R][4];
#pragma unroll
    for (int rr = 0; rr < R; rr++) {
      const unsigned char *blk = rows[rr] + (size_t)b * BS;
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
  gemv_store<R, T>(a, acc, r0, t0, lane);
}

template <int DT, int R>
__global__ void __launch_bounds__(128) gemv_q_kernel(MM a) {
  const int lane = threadIdx.x & 31;
  const long long r0 = ((long long)blockIdx.x * 4 + (threadIdx.x >> 5)) * R;
  if (r0 >= a.m) return;
  int t0 = 0;
  for (; t0 + 8 <= a.n; t0 += 8) gemv_q_pass<DT, R, 8>(a, r0, t0, lane);
  if (a.n - t0 >= 4) { gemv_q_pass<DT, R, 4>(a, r0, t0, lane); t0 += 4; }
  if (a.n - t0 >= 2) { gemv_q_pass<DT, R, 2>(a, r0, t0, lane); t0 += 2; }
  if (a.n - t0 >= 1) gemv_q_pass<DT, R, 1>(a, r0, t0, lane);
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

// y tile [64 tokens][64 rows]; thread (ty, tx) owns tokens ty + 16i and rows tx + 16j so
// shared reads are broadcast / conflict-free and y stores coalesce.
template <int DT>
__global__ void __launch_bounds__(256) gemm_f_kernel(MM a) {
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
      ws[kk][rr] = (r < a.m && kg < a.k) ? WF<DT>::one(a.w + (size_t)r * a.rb, kg) : 0.f;
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

// Quantized tiles: one weight block (32 values) per k-step, exact int dots per block.
template <int DT>
__global__ void __launch_bounds__(256) gemm_q_kernel(MM a) {
  __shared__ int xs[8][TILE + 1];
  __shared__ int ws[8][TILE + 1];
  __shared__ float xds[TILE], wds[TILE];
  const bool q8 = DT == SI_Q8_0;
  const int BS = q8 ? 34 : 18;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const long long r0 = (long long)blockIdx.x * TILE;
  const int t0 = blockIdx.y * TILE;
  const int nb = a.k / 32;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int b = 0; b < nb; b++) {
#pragma unroll
    for (int p = 0; p < 2; p++) {  // x: 64 tokens x 8 words
      const int idx = tid + 256 * p, tt = idx >> 3, j = idx & 7;
      const int t = t0 + tt;
      xs[j][tt] = t < a.n ? ((const int *)(a.xq + (size_t)t * a.k + (size_t)b * 32))[j] : 0;
    }
    if (tid < TILE) {
      const int t = t0 + tid;
      xds[tid] = t < a.n ? a.xd[(size_t)t * nb + b] : 0.f;
    }
    {  // w: 64 rows x 4 threads
      const int rr = tid >> 2, sub = tid & 3;
      const long long r = r0 + rr;
      int w0 = 0, w1 = 0;
      float d = 0.f;
      if (r < a.m) {
        const unsigned char *blk = a.w + (size_t)r * a.rb + (size_t)b * BS;
        d = ld_f16(blk);
        if (q8) {
          w0 = ld_i32_a2(blk + 2 + 8 * sub);
          w1 = ld_i32_a2(blk + 2 + 8 * sub + 4);
        } else {  // bytes 4sub..4sub+3: values 4sub.. (low nibbles), 16+4sub.. (high)
          const unsigned v = (unsigned)ld_i32_a2(blk + 2 + 4 * sub);
          w0 = (int)__vsub4(v & 0x0f0f0f0fu, 0x08080808u);
          w1 = (int)__vsub4((v >> 4) & 0x0f0f0f0fu, 0x08080808u);
        }
      }
      if (q8) {
        ws[2 * sub][rr] = w0;
        ws[2 * sub + 1][rr] = w1;
      } else {
        ws[sub][rr] = w0;
        ws[4 + sub][rr] = w1;
      }
      if (sub == 0) wds[rr] = d;
    }
    __syncthreads();
    int dot[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int j = 0; j < 4; j++) dot[i][j] = 0;
#pragma unroll
    for (int jw = 0; jw < 8; jw++) {
      int xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) xv[i] = xs[jw][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) wv[j] = ws[jw][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) dot[i][j] = __dp4a(wv[j], xv[i], dot[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int j = 0; j < 4; j++)
        acc[i][j] = fmaf((float)dot[i][j], wds[tx + 16 * j] * xds[ty + 16 * i], acc[i][j]);
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

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static int scratch_for(si_ctx *c, const char *op, size_t bytes, void **out) {
  if (c->scratch_cap < bytes) {
    size_t grown = bytes > c->scratch_cap * 3 / 2 ? bytes : c->scratch_cap * 3 / 2;
    // Queued kernels may still read the old scratch.
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) return cuda_fail(c, op, "waiting for queued work", e);
    if (c->scratch) cudaFree(c->scratch);
    c->scratch = NULL;
    c->scratch_cap = 0;
    e = cudaMalloc(&c->scratch, grown);
    if (e != cudaSuccess) {
      cudaGetLastError();
      c->scratch = NULL;
      return fail(c, SI_ERR_NOMEM, "%s: out of GPU memory for %zu bytes of activation scratch", op, grown);
    }
    c->scratch_cap = grown;
  }
  *out = c->scratch;
  return SI_OK;
}

template <int DT>
static void launch_float_matmul(si_ctx *c, const MM &a, bool vec) {
  if (a.n <= kGemvMaxN) {
    const int R = a.n >= 4 ? 4 : 1;  // more rows per warp amortize the x loads
    const unsigned blocks = (unsigned)((a.m + 4LL * R - 1) / (4LL * R));
    if (R == 4) {
      if (vec) gemv_f_kernel<DT, 4, true><<<blocks, 128, 0, c->stream>>>(a);
      else gemv_f_kernel<DT, 4, false><<<blocks, 128, 0, c->stream>>>(a);
    } else {
      if (vec) gemv_f_kernel<DT, 1, true><<<blocks, 128, 0, c->stream>>>(a);
      else gemv_f_kernel<DT, 1, false><<<blocks, 128, 0, c->stream>>>(a);
    }
  } else {
    dim3 grid((unsigned)((a.m + TILE - 1) / TILE), (unsigned)((a.n + TILE - 1) / TILE));
    gemm_f_kernel<DT><<<grid, 256, 0, c->stream>>>(a);
  }
}

template <int DT>
static void launch_quant_matmul(si_ctx *c, const MM &a) {
  if (a.n <= kGemvMaxN) {
    const int R = a.n >= 4 ? 4 : 1;
    const unsigned blocks = (unsigned)((a.m + 4LL * R - 1) / (4LL * R));
    if (R == 4) gemv_q_kernel<DT, 4><<<blocks, 128, 0, c->stream>>>(a);
    else gemv_q_kernel<DT, 1><<<blocks, 128, 0, c->stream>>>(a);
  } else {
    dim3 grid((unsigned)((a.m + TILE - 1) / TILE), (unsigned)((a.n + TILE - 1) / TILE));
    gemm_q_kernel<DT><<<grid, 256, 0, c->stream>>>(a);
  }
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
  if (n > kGemvMaxN && (n + TILE - 1) / TILE > 65535)
    return fail(c, SI_ERR_ARG, "%s: n=%d exceeds the CUDA grid limit (65535 tiles of %d)", op, n, TILE);
  if (!c->ok) return no_device(c, op);

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
    if (dtype == SI_Q8_0) launch_quant_matmul<SI_Q8_0>(c, a);
    else launch_quant_matmul<SI_Q4_0>(c, a);
  } else {
    const bool vec = k % 8 == 0 && xa % 16 == 0 && (uintptr_t)w % 16 == 0;
    if (dtype == SI_F32) launch_float_matmul<SI_F32>(c, a, vec);
    else if (dtype == SI_F16) launch_float_matmul<SI_F16>(c, a, vec);
    else launch_float_matmul<SI_BF16>(c, a, vec);
  }
  return launched(c, op);
}

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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
  add_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(x, y, count);
  return launched(c, op);
}

// ---- layernorm, activations, learned positions -------------------------------------------

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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
  clamp_kernel<<<grid_for(c, count, 256), 256, 0, c->stream>>>(x, count, limit);
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
  if (!c->ok) return no_device(c, op);
  int threads = dim >= 256 ? 256 : ((dim + 31) / 32) * 32;
  add_rows_kernel<<<n, threads, 0, c->stream>>>(x, (const unsigned char *)table, dtype, rows, dim,
                                                row_bytes(dtype, dim), ids, offset, c->derr);
  return launched(c, op);
}

// ---- paged KV cache -------------------------------------------------------------------------
//
// Planes hold float (SI_F32) or __half (SI_F16) elements; every KV kernel is a template
// over that element type T. Writes round to f16 to nearest even (__float2half_rn, as the
// CPU's conversion), reads widen to f32, all arithmetic stays f32.

__device__ __forceinline__ float kv_load(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float kv_load(const __half *p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void kv_store(float *p, size_t i, float x) { p[i] = x; }
__device__ __forceinline__ void kv_store(__half *p, size_t i, float x) { p[i] = __float2half_rn(x); }

// The CPU library's check and message for a plane dtype (anything but F32 / F16).
static int check_kv_dtype(si_ctx *c, const char *op, int d) {
  if (d == SI_F32 || d == SI_F16) return SI_OK;
  const bool known = d == SI_Q4_0 || d == SI_Q8_0 || d == SI_BF16;
  return fail(c, SI_ERR_ARG, "%s: kv_dtype=%d (%s) is not a KV cache dtype (expected F32=0 or F16=1)", op, d,
              known ? dtype_name(d) : "unknown");
}

static unsigned kv_size(int d) { return d == SI_F16 ? 2u : 4u; }

__device__ __forceinline__ size_t slot_offset(const int *bt, int block_size, size_t row, int slot) {
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
  if (!c->ok) return no_device(c, op);
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
__device__ __forceinline__ void attn_group(const AttnArgs &a, const float (&q)[E], float (&acc)[E], float &m, float &s,
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
  if (!c->ok) return no_device(c, op);

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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
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
  if (!c->ok) return no_device(c, op);
  const int threads = n >= 8192 ? 1024 : 256;
  softmax_kernel<<<rows, threads, 0, c->stream>>>(x, n, 1.0f / temperature);
  return launched(c, op);
}

// ---- diagnostics -------------------------------------------------------------------------------

__global__ void probe_kernel(const uint4 *p, long long count, unsigned long long *sink) {
  unsigned acc = 0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(p + i);  // streaming: do not keep the buffer in L2
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) atomicAdd(sink, 1ull);  // depends on every load, so none is dropped
}

extern "C" int32_t si_probe_bandwidth(si_ctx *c, const void *buf, uint64_t bytes, int32_t reps, double *gbps) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_probe_bandwidth";
  int rc = positive(c, op, "reps", reps);
  if (!rc) rc = need(c, op, "buf", buf);
  if (!rc) rc = need(c, op, "gbps", gbps);
  if (rc) return rc;
  if (bytes < 64 * 1024)
    return fail(c, SI_ERR_ARG, "%s: bytes=%llu is too small to measure (>= 64 KiB)", op, (unsigned long long)bytes);
  if (!c->ok) return no_device(c, op);
  const uintptr_t lo = ((uintptr_t)buf + 15) & ~(uintptr_t)15;
  const uintptr_t hi = ((uintptr_t)buf + bytes) & ~(uintptr_t)15;
  const long long count = (long long)((hi - lo) / 16);
  const unsigned blocks = (unsigned)c->sm_count * 8;
  cudaEvent_t t0 = NULL, t1 = NULL;
  cudaError_t e = cudaEventCreate(&t0);
  if (e == cudaSuccess) e = cudaEventCreate(&t1);
  if (e != cudaSuccess) {
    if (t0) cudaEventDestroy(t0);
    return cuda_fail(c, op, "cudaEventCreate", e);
  }
  probe_kernel<<<blocks, 256, 0, c->stream>>>((const uint4 *)lo, count, c->sink);  // warm-up
  cudaEventRecord(t0, c->stream);
  for (int r = 0; r < reps; r++) probe_kernel<<<blocks, 256, 0, c->stream>>>((const uint4 *)lo, count, c->sink);
  cudaEventRecord(t1, c->stream);
  e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaEventSynchronize(t1);
  float ms = 0.f;
  if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, t0, t1);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  if (e != cudaSuccess) return cuda_fail(c, op, "timing the read kernel", e);
  const double ns = ms > 0.f ? (double)ms * 1e6 : 1.0;
  *gbps = (double)count * 16.0 * (double)reps / ns;
  return SI_OK;
}
