// The context (device, stream, error record), device memory, host<->device copies and
// file mappings.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checks.cuh"

// CUDA devices this process sees, or -(CUDA error code) when the runtime cannot say
// (e.g. -35, no driver). Not in ffi/specinfer.h: the CPU library has no GPUs to count.
extern "C" int32_t si_cuda_device_count(void) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return -(int32_t)e;
  }
  return count;
}

extern "C" si_ctx *si_create(int32_t n_threads, int32_t flags) {
  (void)n_threads;  // one stream; the GPU needs no host threads
  si_ctx *c = (si_ctx *)calloc(1, sizeof(si_ctx));
  if (!c) return NULL;
  c->checked = (flags & SI_FLAG_REFERENCE) != 0;
  c->device = (int)(((uint32_t)flags >> SI_DEVICE_SHIFT) & SI_DEVICE_MASK);
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  const char *step = "cudaGetDeviceCount";
  if (e == cudaSuccess && count <= 0) {
    snprintf(c->dev_err, sizeof c->dev_err, "no CUDA device: cudaGetDeviceCount found none");
    snprintf(c->err, sizeof c->err, "%s", c->dev_err);
    return c;
  }
  if (e == cudaSuccess && c->device >= count) {
    snprintf(c->dev_err, sizeof c->dev_err, "CUDA device %d was asked for, but this machine has %d CUDA device%s (0..%d)",
             c->device, count, count == 1 ? "" : "s", count - 1);
    snprintf(c->err, sizeof c->err, "%s", c->dev_err);
    return c;
  }
  // Everything below is made on the context's device (the stream and buffers belong to it).
  char set_step[48];
  snprintf(set_step, sizeof set_step, "cudaSetDevice(%d)", c->device);
  if (e == cudaSuccess) { step = set_step; e = cudaSetDevice(c->device); }
  if (e == cudaSuccess) { step = "cudaGetDeviceProperties"; e = cudaGetDeviceProperties(&c->prop, c->device); }
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
  if (c->ok && on_device(c, "si_destroy") == SI_OK) {
    cudaStreamSynchronize(c->stream);
    graph_destroy_all(c);
    if (c->scratch) cudaFree(c->scratch);
    cudaFree(c->sink);
    cudaFree(c->derr);
    cudaFreeHost(c->herr);
    cudaStreamDestroy(c->stream);
  }
  free(c);
}

int on_device(si_ctx *c, const char *op) {
  if (!c->ok) return no_device(c, op);
  cudaError_t e = cudaSetDevice(c->device);
  if (e != cudaSuccess) return cuda_fail(c, op, "making the context's GPU current (cudaSetDevice)", e);
  return SI_OK;
}

extern "C" const char *si_last_error(si_ctx *c) { return c ? c->err : "null si_ctx"; }

extern "C" int32_t si_threads(si_ctx *c) { return c ? 1 : 0; }

extern "C" int32_t si_sync(si_ctx *c) {
  if (!c) return SI_ERR_ARG;
  if (const int dev_rc = on_device(c, "si_sync")) return dev_rc;
  int rc = graph_flush(c, "si_sync");
  if (rc) return rc;
  return drain(c, "si_sync", "si_sync");
}

// ---- memory -----------------------------------------------------------------------------

extern "C" void *si_alloc(si_ctx *c, uint64_t bytes) {
  if (!c) return NULL;
  if (on_device(c, "si_alloc")) return NULL;
  if (graph_flush(c, "si_alloc")) return NULL;
  void *p = NULL;
  // cudaMalloc(0) may give NULL, which means failure in this ABI: round up. Whole 16-byte
  // words: kernels read the aligned words that cover their bytes (matmul weights).
  size_t n = bytes < 256 ? 256 : ((size_t)bytes + 15) & ~(size_t)15;
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
  if (const int dev_rc = on_device(c, "si_free")) return dev_rc;
  int rc = graph_flush(c, "si_free");
  if (rc) return rc;
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
  if (const int dev_rc = on_device(c, "si_upload")) return dev_rc;
  int rc = graph_flush(c, "si_upload");
  if (rc) return rc;
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
  if (const int dev_rc = on_device(c, "si_download")) return dev_rc;
  int rc = graph_flush(c, "si_download");
  if (rc) return rc;
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

// ---- activation scratch ---------------------------------------------------------------------

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

int scratch_for(si_ctx *c, const char *op, size_t bytes, void **out) {
  if (c->scratch_cap < bytes) {
    if (graph_capturing(c))
      return fail(c, SI_ERR_ARG,
                  "%s: the activation scratch would grow (to %zu bytes) inside a graph capture: run the step once "
                  "without a graph first",
                  op, bytes);
    size_t grown = bytes > c->scratch_cap * 3 / 2 ? bytes : c->scratch_cap * 3 / 2;
    // Queued kernels may still read the old scratch.
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) return cuda_fail(c, op, "waiting for queued work", e);
    if (c->scratch) release_scratch(c, c->scratch);
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
