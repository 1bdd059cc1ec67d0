// Diagnostics: the streaming-read bandwidth probe (bench:gpu's copy bandwidth).
#include "checks.cuh"

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
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  if ((rc = graph_flush(c, op))) return rc;
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
