// libspecinfer_cuda: ffi/specinfer.h on an NVIDIA GPU. Every cuda/*.cu is compiled to
// its own object (build.zig) and linked into one library; this header is the context
// they all share (checks.cuh: errors and argument checks; device.cuh: device helpers).
// The GPU-side rules, for every file:
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
// - Each context owns one GPU, chosen at si_create (flags >> SI_DEVICE_SHIFT): its
//   stream, memory, graphs and uploads live there, and every entry point makes it the
//   current device (on_device) before anything else touches the GPU.
// - No usable driver/device at si_create (e.g. cudaErrorInsufficientDriver = 35 on a
//   machine without a GPU): the context is still created so that si_last_error can say
//   why; every op then returns SI_ERR_DEVICE with that reason (after the same argument
//   checks as the CPU, so those stay testable anywhere). Returning NULL would only say
//   "out of memory", which is the one meaning the header gives NULL.
// - Pointers must be aligned to their element size (a misaligned access is a sticky
//   CUDA error that would end the context), which si_alloc memory always is.
// - Helpers shared between files have hidden visibility: the library exports only the
//   si_* symbols of ffi/specinfer.h.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include "specinfer.h"

#define SI_HIDDEN __attribute__((visibility("hidden")))

static const int kMaxHeadDim = 1024;  // same limit as the CPU library (attention, rope)

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

// ---- context ----------------------------------------------------------------------------

struct Graphs;  // graph.cu: captured launch sequences, replayed by key

struct si_ctx {
  int ok;  // 0: no usable device (dev_err says why)
  int device;  // the GPU everything of this context lives on (si_create's SI_DEVICE_SHIFT bits)
  int checked;
  int sm_count;
  cudaDeviceProp prop;
  cudaStream_t stream;
  DevErr *derr;              // device record of asynchronous argument errors
  DevErr *herr;              // pinned host copy
  unsigned long long *sink;  // keeps the bandwidth probe's loads alive
  void *scratch;             // quantized activations; grows, never shrinks
  size_t scratch_cap;
  Graphs *graphs;            // NULL until the first si_graph_begin
  char dev_err[512];
  char err[1024];
};

// ---- context services (context.cu) ---------------------------------------------------------

// Every entry point calls this before touching the GPU: SI_ERR_DEVICE when the context
// has no usable device, else makes the context's GPU current on the calling thread (the
// runtime's current device is per thread and other contexts may have changed it).
SI_HIDDEN int on_device(si_ctx *c, const char *op);

// The activation scratch, at least `bytes` long (grown on demand; a buffer it outgrew
// stays allocated while captured graphs may use it).
SI_HIDDEN int scratch_for(si_ctx *c, const char *op, size_t bytes, void **out);
SI_HIDDEN size_t align256(size_t x);

// ---- CUDA graphs (graph.cu) ------------------------------------------------------------------

// Every kernel op calls this (through GATE) after its argument checks and before it
// launches anything, with its name and scalar arguments. SI_OK: launch as usual (maybe
// into a capture). GRAPH_SKIP: the op is part of a graph being replayed; return SI_OK
// without launching. Anything else is an error code to return.
enum { GRAPH_SKIP = -1 };
SI_HIDDEN int graph_gate(si_ctx *c, const char *op, const uint64_t *args, int count);
// Calls that touch device memory from the host or wait for the stream call this first:
// it ends a capture or launches a replayed graph, so everything queued so far runs first.
SI_HIDDEN int graph_flush(si_ctx *c, const char *op);
SI_HIDDEN bool graph_capturing(si_ctx *c);
// Frees an outgrown scratch buffer, or keeps it until the graphs are dropped.
SI_HIDDEN void release_scratch(si_ctx *c, void *p);
SI_HIDDEN void graph_destroy_all(si_ctx *c);

// A gate value: integers as themselves, pointers as addresses, floats as their bits.
static inline uint64_t I(long long v) { return (uint64_t)v; }
static inline uint64_t P(const void *p) { return (uint64_t)(uintptr_t)p; }
static inline uint64_t F(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
}

// GATE(c, op, I(n), P(x), F(eps), ...): the graph gate with the op's arguments.
#define GATE(c, op, ...)                                                                          \
  do {                                                                                            \
    const uint64_t gate_args_[] = {__VA_ARGS__};                                                  \
    const int gate_rc_ = graph_gate((c), (op), gate_args_, (int)(sizeof gate_args_ / sizeof *gate_args_)); \
    if (gate_rc_ == GRAPH_SKIP) return SI_OK;                                                     \
    if (gate_rc_ != SI_OK) return gate_rc_;                                                       \
  } while (0)
