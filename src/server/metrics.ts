// Prometheus metrics (prom-client, on a registry of our own). Latencies are observed
// by the server as tokens reach it; the engine's gauges and counters (requests, KV
// blocks, tokens, speculation, shaped like vLLM's spec_decode_* metrics) are read
// from one stats() snapshot per scrape.

import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { ServingLLM, EngineStats } from "./client";

const PREFIX = "specinfer_";
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

export class ServerMetrics {
  readonly registry = new Registry();
  private snapshot: EngineStats | null = null;
  private readonly timeToFirstToken: Histogram;
  private readonly interTokenLatency: Histogram;
  private readonly requestLatency: Histogram;

  constructor() {
    const histogram = (name: string, help: string) =>
      new Histogram({ name: PREFIX + name, help, buckets: LATENCY_BUCKETS, registers: [this.registry] });
    this.timeToFirstToken = histogram("time_to_first_token_seconds", "Time from request arrival to its first token");
    this.interTokenLatency = histogram("inter_token_latency_seconds", "Time between tokens of one request (a speculative step's tokens share its gap)");
    this.requestLatency = histogram("e2e_request_latency_seconds", "Time from request arrival to its last token");

    this.engineGauge("num_requests_running", "Requests in the engine's running batch", (s) => s.running);
    this.engineGauge("num_requests_waiting", "Requests waiting for a place in the batch", (s) => s.waiting);
    this.engineGauge("kv_cache_blocks_used", "KV cache blocks in use", (s) => s.kvBlocksUsed);
    this.engineGauge("kv_cache_blocks_total", "KV cache blocks in the pool", (s) => s.kvBlocksTotal);
    this.engineCounter("num_preemptions_total", "Requests preempted to free KV blocks", (s) => s.preemptions);
    this.engineCounter("prompt_tokens_total", "Prompt tokens processed", (s) => s.promptTokens);
    this.engineCounter("generation_tokens_total", "Tokens generated", (s) => s.generatedTokens);
    this.engineCounter("spec_decode_num_drafts_total", "Speculative steps (token trees verified)", (s) => s.numDrafts);
    this.engineCounter("spec_decode_num_draft_tokens_total", "Draft tokens proposed for verification", (s) => s.numDraftTokens);
    this.engineCounter("spec_decode_num_accepted_tokens_total", "Draft tokens accepted by the target model", (s) => s.numAcceptedTokens);
    const snapshot = () => this.snapshot;
    new Counter({
      name: PREFIX + "spec_decode_num_accepted_tokens_per_pos_total",
      help: "Draft tokens accepted, by position in the accepted path (0 = first)",
      labelNames: ["position"],
      registers: [this.registry],
      collect() {
        this.reset();
        snapshot()?.acceptedPerPosition.forEach((v, i) => this.inc({ position: String(i) }, v));
      },
    });
  }

  /** Prometheus text, with the engine's numbers as of now. */
  async render(engine: ServingLLM | null): Promise<string> {
    this.snapshot = engine ? await engine.stats() : null;
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** Latency observations of one generation, fed as its pieces arrive. */
  startRequest(arrival: number) {
    let last: number | null = null;
    return {
      tokens: (count: number) => {
        const now = performance.now();
        if (last === null) this.timeToFirstToken.observe((now - arrival) / 1000);
        else for (let i = 0; i < count; i++) this.interTokenLatency.observe((now - last) / 1000 / count);
        last = now;
      },
      finished: () => this.requestLatency.observe((performance.now() - arrival) / 1000),
    };
  }

  private engineGauge(name: string, help: string, read: (s: EngineStats) => number): void {
    const snapshot = () => this.snapshot;
    new Gauge({
      name: PREFIX + name,
      help,
      registers: [this.registry],
      collect() {
        const s = snapshot();
        if (s) this.set(read(s));
      },
    });
  }

  /** A counter kept by the engine (monotonic since load), copied at each scrape. */
  private engineCounter(name: string, help: string, read: (s: EngineStats) => number): void {
    const snapshot = () => this.snapshot;
    new Counter({
      name: PREFIX + name,
      help,
      registers: [this.registry],
      collect() {
        const s = snapshot();
        if (!s) return;
        this.reset();
        this.inc(read(s));
      },
    });
  }
}
