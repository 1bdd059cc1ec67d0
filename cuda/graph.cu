// CUDA graphs: the launches of one step captured once per shape key, then replayed as
// one graph launch (ffi/specinfer.h: si_graph_begin / si_graph_end / si_graph_drop).
//
// A region starts at si_graph_begin(key). Its kernel ops, up to the first call that
// needs the stream (si_upload or si_download after a kernel, si_sync, si_alloc, si_free,
// the probe) or si_graph_end, form the step's launch sequence:
// - the first time for `key` they are captured on the context's stream (nothing runs)
//   and the graph is instantiated and launched at that first call;
// - later, each op is checked against the capture (its name and scalar arguments,
//   pointers included, as a hash) and skipped; the graph is launched in their place.
// Uploads before the first kernel op run as usual, so a step uploads its inputs into
// the same device buffers and replays. Ops after the region's end run eagerly.
// A replay that differs from its capture fails (SI_ERR_ARG, naming the op) before
// anything of it ran: the caller ends the region with run = 0, drops the key and runs
// the step without a graph. Checked mode (SI_FLAG_REFERENCE) never captures.
#include <stdio.h>
#include <stdlib.h>

#include "checks.cuh"

enum Mode { IDLE, ARMED, CAPTURING, REPLAYING, FAILED };

static const int kMaxGraphs = 128;

struct Graph {
  long long key;
  cudaGraphExec_t exec;
  uint64_t *ops;  // hash of each captured op, in order
  int count;
};

struct Graphs {
  Mode mode;
  long long key;
  Graph *replaying;
  uint64_t *ops;  // the region's op hashes while capturing
  int count, cap;
  Graph table[kMaxGraphs];
  int used;
  void **retired;  // scratch buffers that captured graphs may still use
  int n_retired, retired_cap;
};

static uint64_t fnv(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; i++) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 1099511628211ull;
  }
  return h;
}

static uint64_t op_hash(const char *op, const uint64_t *args, int count) {
  uint64_t h = 14695981039346656037ull;
  for (const char *p = op; *p; p++) h = fnv(h, (unsigned char)*p);
  for (int i = 0; i < count; i++) h = fnv(h, args[i]);
  return h;
}

static Graph *find(Graphs *g, long long key) {
  for (int i = 0; i < g->used; i++)
    if (g->table[i].key == key) return &g->table[i];
  return NULL;
}

static int push_op(si_ctx *c, Graphs *g, uint64_t h) {
  if (g->count == g->cap) {
    const int cap = g->cap ? 2 * g->cap : 256;
    uint64_t *grown = (uint64_t *)realloc(g->ops, (size_t)cap * sizeof(uint64_t));
    if (!grown) return fail(c, SI_ERR_NOMEM, "graph capture: out of host memory for %d ops", cap);
    g->ops = grown;
    g->cap = cap;
  }
  g->ops[g->count++] = h;
  return SI_OK;
}

// Ends a capture; keeps the graph when `keep` (and it is valid), launching it when `run`.
static int end_capture(si_ctx *c, Graphs *g, const char *op, bool keep, bool run) {
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
  g->mode = IDLE;
  if (e != cudaSuccess || !keep) {
    cudaGetLastError();  // an invalidated capture is not sticky
    if (graph) cudaGraphDestroy(graph);
    return keep ? cuda_fail(c, op, "ending the graph capture", e) : SI_OK;
  }
  cudaGraphExec_t exec = NULL;
  e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (e != cudaSuccess) return cuda_fail(c, op, "instantiating the captured graph", e);
  Graph *slot = &g->table[g->used++];
  slot->key = g->key;
  slot->exec = exec;
  slot->ops = g->ops;
  slot->count = g->count;
  g->ops = NULL;
  g->count = g->cap = 0;
  if (!run) return SI_OK;
  e = cudaGraphLaunch(exec, c->stream);
  return e == cudaSuccess ? SI_OK : cuda_fail(c, op, "launching the graph", e);
}

// Launches the graph being replayed, if every captured op was seen.
static int end_replay(si_ctx *c, Graphs *g, const char *op) {
  Graph *gr = g->replaying;
  g->mode = IDLE;
  if (g->count != gr->count)
    return fail(c, SI_ERR_ARG, "%s: graph key %lld: the step queued %d of the %d captured ops; run it without the graph",
                op, g->key, g->count, gr->count);
  cudaError_t e = cudaGraphLaunch(gr->exec, c->stream);
  return e == cudaSuccess ? SI_OK : cuda_fail(c, op, "launching the graph", e);
}

int graph_gate(si_ctx *c, const char *op, const uint64_t *args, int count) {
  Graphs *g = c->graphs;
  if (!g || g->mode == IDLE) return SI_OK;
  if (g->mode == FAILED)
    return fail(c, SI_ERR_ARG, "%s: an earlier op of this graph region failed; end it with si_graph_end", op);
  const uint64_t h = op_hash(op, args, count);
  if (g->mode == ARMED) {  // the region's first kernel op
    g->count = 0;
    g->replaying = find(g, g->key);
    if (g->replaying) {
      g->mode = REPLAYING;
    } else {
      cudaError_t e = cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal);
      if (e != cudaSuccess) {
        g->mode = FAILED;
        return cuda_fail(c, op, "starting the graph capture", e);
      }
      g->mode = CAPTURING;
    }
  }
  if (g->mode == CAPTURING) {
    const int rc = push_op(c, g, h);
    if (rc) g->mode = FAILED;
    return rc;  // SI_OK: the op launches into the capture
  }
  Graph *gr = g->replaying;
  if (g->count >= gr->count || gr->ops[g->count] != h) {
    const int at = g->count;
    g->mode = FAILED;
    return fail(c, SI_ERR_ARG,
                "%s: graph key %lld: op %d differs from the capture (%d ops; other shapes or buffers); run the step "
                "without the graph",
                op, g->key, at, gr->count);
  }
  g->count++;
  return GRAPH_SKIP;
}

int graph_flush(si_ctx *c, const char *op) {
  Graphs *g = c->graphs;
  if (!g) return SI_OK;
  switch (g->mode) {
    case CAPTURING: return end_capture(c, g, op, true, true);
    case REPLAYING: return end_replay(c, g, op);
    case FAILED: return fail(c, SI_ERR_ARG, "%s: an earlier op of this graph region failed; end it with si_graph_end", op);
    default: return SI_OK;  // IDLE, or ARMED with nothing queued yet
  }
}

bool graph_capturing(si_ctx *c) { return c->graphs && c->graphs->mode == CAPTURING; }

void release_scratch(si_ctx *c, void *p) {
  Graphs *g = c->graphs;
  if (!g || g->used == 0) {
    cudaFree(p);
    return;
  }
  if (g->n_retired == g->retired_cap) {
    const int cap = g->retired_cap ? 2 * g->retired_cap : 8;
    void **grown = (void **)realloc(g->retired, (size_t)cap * sizeof(void *));
    if (!grown) return;  // out of host memory: keeping the buffer forever is the safe side
    g->retired = grown;
    g->retired_cap = cap;
  }
  g->retired[g->n_retired++] = p;
}

static void drop_graph(Graphs *g, int i) {
  cudaGraphExecDestroy(g->table[i].exec);
  free(g->table[i].ops);
  g->table[i] = g->table[--g->used];
}

void graph_destroy_all(si_ctx *c) {
  Graphs *g = c->graphs;
  if (!g) return;
  if (g->mode == CAPTURING) end_capture(c, g, "si_destroy", false, false);
  while (g->used > 0) drop_graph(g, 0);
  for (int i = 0; i < g->n_retired; i++) cudaFree(g->retired[i]);
  free(g->retired);
  free(g->ops);
  free(g);
  c->graphs = NULL;
}

extern "C" int32_t si_graph_begin(si_ctx *c, int32_t key) {
  if (!c) return SI_ERR_ARG;
  const char *op = "si_graph_begin";
  if (key < 0) return fail(c, SI_ERR_ARG, "%s: key=%d must be >= 0", op, (int)key);
  if (const int dev_rc = on_device(c, op)) return dev_rc;
  if (c->checked) return SI_OK;  // checked mode waits after every op: no capture
  if (!c->graphs) {
    c->graphs = (Graphs *)calloc(1, sizeof(Graphs));
    if (!c->graphs) return fail(c, SI_ERR_NOMEM, "%s: out of host memory", op);
  }
  Graphs *g = c->graphs;
  if (g->mode != IDLE) return fail(c, SI_ERR_ARG, "%s: the previous graph region was not ended (si_graph_end)", op);
  if (!find(g, key) && g->used == kMaxGraphs) return SI_OK;  // table full: this step runs eagerly
  g->key = key;
  g->mode = ARMED;
  return SI_OK;
}

extern "C" int32_t si_graph_end(si_ctx *c, int32_t run) {
  if (!c) return SI_ERR_ARG;
  Graphs *g = c->graphs;
  if (!g) return SI_OK;
  if (const int dev_rc = on_device(c, "si_graph_end")) return dev_rc;
  int rc = SI_OK;
  if (run) rc = graph_flush(c, "si_graph_end");
  else if (g->mode == CAPTURING) rc = end_capture(c, g, "si_graph_end", false, false);
  g->mode = IDLE;  // unrun: an armed region, a replay not launched, a failed one
  return rc;
}

extern "C" int32_t si_graph_drop(si_ctx *c, int32_t key) {
  if (!c) return SI_ERR_ARG;
  Graphs *g = c->graphs;
  if (!g) return SI_OK;
  if (const int dev_rc = on_device(c, "si_graph_drop")) return dev_rc;
  if (g->mode != IDLE) return fail(c, SI_ERR_ARG, "si_graph_drop: a graph region is open (si_graph_end first)");
  for (int i = g->used - 1; i >= 0; i--)
    if (key < 0 || g->table[i].key == key) drop_graph(g, i);
  if (g->used == 0) {  // no graph can use a retired scratch buffer any more
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) return cuda_fail(c, "si_graph_drop", "waiting for queued work", e);
    for (int i = 0; i < g->n_retired; i++) cudaFree(g->retired[i]);
    g->n_retired = 0;
  }
  return SI_OK;
}
