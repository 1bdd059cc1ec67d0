// Per-request statistics: phases, forward passes and, when speculating, how much of
// each token tree the LLM accepted (by depth and by sibling rank).

export interface VerifiedStep {
  /** Tree nodes the LLM checked this step. */
  nodes: number;
  /** Depth (1-based) of every node, and its rank among its siblings (0 = first). */
  depthOf(node: number): number;
  rankOf(node: number): number;
}


export class RequestStats {
  promptTokens = 0;
  prefillMs = 0;
  decodeMs = 0;
  draftMs = 0;
  forwardPasses = 0;
  decodeSteps = 0;
  treeNodes = 0;
  acceptedTokens = 0;
  /** Times the request lost its KV blocks to another and was recomputed. */
  preemptions = 0;
  private readonly tried: { depth: number[]; rank: number[] } = { depth: [], rank: [] };
  private readonly accepted: { depth: number[]; rank: number[] } = { depth: [], rank: [] };

  prefill(tokens: number, ms: number): void {
    this.promptTokens += tokens;
    this.prefillMs += ms;
    this.forwardPasses++;
  }

  /** Tree nodes verified at each decode step (0: none), the size "auto" chose. */
  readonly treeNodesPerStep: number[] = [];

  step(forwardMs: number, draftMs: number, treeNodes: number): void {
    this.treeNodesPerStep.push(treeNodes);
    this.decodeMs += forwardMs + draftMs;
    this.draftMs += draftMs;
    this.forwardPasses++;
    this.decodeSteps++;
  }

  /** A verified tree and the nodes of it whose tokens were emitted. */
  speculative(tree: VerifiedStep, acceptedNodes: readonly number[]): void {
    this.treeNodes += tree.nodes;
    this.acceptedTokens += acceptedNodes.length;
    for (let n = 0; n < tree.nodes; n++) bump(this.tried, tree.depthOf(n) - 1, tree.rankOf(n));
    for (const n of acceptedNodes) bump(this.accepted, tree.depthOf(n) - 1, tree.rankOf(n));
  }

  /** The JSON shape `generate --json` and the scripting API report. */
  summary(generatedTokens: number) {
    const decodeSec = this.decodeMs / 1000;
    const ratio = (a: number[], t: number[]) => t.map((v, i) => (v > 0 ? round((a[i] ?? 0) / v) : 0));
    return {
      promptTokens: this.promptTokens,
      generatedTokens,
      prefillMs: round(this.prefillMs),
      decodeMs: round(this.decodeMs),
      // The first token comes from the prefill pass; the rest from decode steps.
      tokensPerSecond: decodeSec > 0 ? round(Math.max(0, generatedTokens - 1) / decodeSec) : 0,
      forwardPasses: this.forwardPasses,
      decodeSteps: this.decodeSteps,
      // Tokens per decode step, the bonus token included.
      meanAcceptedLength: this.decodeSteps > 0 ? round((this.acceptedTokens + this.decodeSteps) / this.decodeSteps) : 0,
      draftTokens: this.treeNodes,
      acceptedTokens: this.acceptedTokens,
      acceptanceRate: this.treeNodes > 0 ? round(this.acceptedTokens / this.treeNodes) : 0,
      acceptanceByDepth: ratio(this.accepted.depth, this.tried.depth),
      acceptanceBySiblingRank: ratio(this.accepted.rank, this.tried.rank),
      draftMs: round(this.draftMs),
      preemptions: this.preemptions,
      treeNodesPerStep: [...this.treeNodesPerStep],
      verifyMs: round(this.decodeMs - this.draftMs),
    };
  }
}

export type StatsSummary = ReturnType<RequestStats["summary"]>;

function bump(into: { depth: number[]; rank: number[] }, depth: number, rank: number): void {
  into.depth[depth] = (into.depth[depth] ?? 0) + 1;
  into.rank[rank] = (into.rank[rank] ?? 0) + 1;
}

function round(x: number): number {
  return Math.round(x * 1000) / 1000;
}
