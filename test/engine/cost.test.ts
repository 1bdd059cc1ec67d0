// The cost model "auto" speculation sizes trees by: interpolated forward costs,
// decaying acceptance by depth, and the batch-wide choice of chain lengths.

import { describe, expect, test } from "bun:test";
import { CostCurve, CostModel, measurementGrid } from "../../src/engine/cost";
import { AcceptanceByDepth } from "../../src/engine/request";

describe("CostCurve", () => {
  const curve = new CostCurve([{ tokens: 1, ms: 10 }, { tokens: 4, ms: 13 }, { tokens: 8, ms: 21 }]);
  test("interpolates between measured batch sizes and extends the last slope past them", () => {
    expect(curve.at(1)).toBe(10);
    expect(curve.at(2)).toBeCloseTo(11, 10);
    expect(curve.at(6)).toBeCloseTo(17, 10);
    expect(curve.at(12)).toBeCloseTo(29, 10);
    expect(curve.at(0)).toBe(10);
  });
  test("an observation scales the whole curve: the machine's speed drifts for every size alike", () => {
    const c = new CostCurve([{ tokens: 1, ms: 10 }, { tokens: 3, ms: 14 }, { tokens: 5, ms: 18 }]);
    c.observe(1, 20, 0.5); // seen at twice the curve: the speed factor moves half way, to 1.5
    expect([c.at(1), c.at(2), c.at(3), c.at(5), c.at(9)]).toEqual([15, 18, 21, 27, 39]);
    c.observe(3, 21, 0.5); // as predicted: nothing moves
    expect(c.at(5)).toBe(27);
    c.observe(1, 1000, 0.5); // one stall counts at most three times the current factor
    expect(c.at(1)).toBe(10 * (1.5 + 0.5 * (4.5 - 1.5)));
  });
  test("more tokens never cost less: a point measured above a larger size's time takes that time", () => {
    const c = new CostCurve([{ tokens: 1, ms: 10 }, { tokens: 2, ms: 25 }, { tokens: 3, ms: 12 }, { tokens: 4, ms: 13 }]);
    expect([c.at(1), c.at(2), c.at(3), c.at(4)]).toEqual([10, 12, 12, 13]);
  });
  test("the measurement grid is every size up to 16, then powers of two up to the limit", () => {
    expect(measurementGrid(40)).toEqual([...Array.from({ length: 16 }, (_, i) => i + 1), 32, 40]);
    expect(measurementGrid(64)).toEqual([...Array.from({ length: 16 }, (_, i) => i + 1), 32, 64]);
    expect(measurementGrid(5)).toEqual([1, 2, 3, 4, 5]);
    expect(measurementGrid(1)).toEqual([1]);
  });
});

describe("AcceptanceByDepth", () => {
  test("expected tokens of a chain multiply the per-depth rates along it", () => {
    const a = new AcceptanceByDepth([0.5, 0.5, 0.5]);
    expect(a.expectedTokens(0)).toBe(1);
    expect(a.expectedTokens(3)).toBeCloseTo(1 + 0.5 + 0.25 + 0.125, 12);
  });
  test("an idle estimate relaxes towards another by the given share at every depth", () => {
    const a = new AcceptanceByDepth([0.2, 0.4, 0.9]);
    a.relaxToward(new AcceptanceByDepth([0.6, 0.8, 0.5]), 0.25);
    expect(a.rates.map((r) => Math.round(r * 1e9) / 1e9)).toEqual([0.3, 0.5, 0.8]);
  });
  test("observations move only the depths the chain reached", () => {
    const a = new AcceptanceByDepth([0.5, 0.5, 0.5, 0.5], 0.5);
    a.observe(4, 1); // depth 1 accepted, depth 2 rejected, depths 3-4 never checked
    expect(a.rates).toEqual([0.75, 0.25, 0.5, 0.5]);
  });
});

describe("CostModel.choose", () => {
  // A GPU-like LLM: verifying up to 16 rows costs as much as one; then linear.
  const flatThenLinear = new CostCurve([1, 2, 4, 8, 16, 32, 64].map((tokens) => ({ tokens, ms: tokens <= 16 ? 10 : (10 * tokens) / 16 })));
  const cheapDraft = new CostCurve([1, 64].map((tokens) => ({ tokens, ms: 0.2 })));
  const good = () => ({ acceptance: new AcceptanceByDepth([0.8, 0.8, 0.8, 0.8, 0.8, 0.8]), maxDepth: 6 });

  test("no tree when verifying k tokens costs k decode steps", () => {
    const linear = new CostCurve([1, 64].map((tokens) => ({ tokens, ms: tokens })));
    const model = new CostModel(linear, new CostCurve([1, 64].map((tokens) => ({ tokens, ms: 0.5 * tokens }))), 6);
    expect(model.choose([good()], 0, 0, 512)).toEqual([0]);
  });

  test("no tree when the best one gains less than 10% over none; a tree when it gains more", () => {
    // A chain of one node accepted with p yields (1 + p) tokens in 16 ms of verifying
    // plus 0.2 ms of drafting (the catch-up pass of 2 tokens), against 1 token in 10 ms.
    const steep = new CostCurve([{ tokens: 1, ms: 10 }, { tokens: 2, ms: 16 }, { tokens: 3, ms: 22 }]);
    const model = new CostModel(steep, new CostCurve([{ tokens: 1, ms: 0.1 }]), 1);
    const chain = (p: number) => model.choose([{ acceptance: new AcceptanceByDepth([p]), maxDepth: 1 }], 0, 0, 512)[0];
    expect(chain(0.7)).toBe(0); // 1.7 / 1.62 = +4.9%
    expect(chain(0.8)).toBe(1); // 1.8 / 1.62 = +11.1%
  });

  test("every step, with trees or without, scales t(L): a slower machine makes the same chain pay less", () => {
    const curve = new CostCurve([1, 2, 4, 8, 16].map((tokens) => ({ tokens, ms: 10 })));
    // A costly drafter: a 1-node chain costs 10 ms to verify and 4 ms to draft.
    const model = new CostModel(curve, new CostCurve([{ tokens: 1, ms: 2 }, { tokens: 2, ms: 4 }]), 1);
    const chain = () => model.choose([{ acceptance: new AcceptanceByDepth([0.8]), maxDepth: 1 }], 0, 0, 512)[0];
    expect(chain()).toBe(1); // 1.8 / 14 ms = +28.6% over 1 / 10 ms
    for (let i = 0; i < 100; i++) model.observeStep(2, 4); // the machine became 2.5x faster, drafting did not
    expect(curve.at(1)).toBeCloseTo(4, 1);
    expect(chain()).toBe(0); // 1.8 / 8 ms = -10% against 1 / 4 ms
  });

  test("whether a probe pays is judged on the curves, not on the acceptance it exists to correct", () => {
    const model = new CostModel(flatThenLinear, cheapDraft, 6);
    for (let i = 0; i < 100; i++) model.observeStep(1, 10); // as predicted: credit for probes
    expect(model.choose([{ acceptance: new AcceptanceByDepth([0.05, 0.05]), maxDepth: 2 }], 0, 0, 512)).toEqual([0]);
    expect(model.probe(64, 2, 1, 1)).toBe(true);
    // Where the curve itself says no (each row costs a decode), no probe whatever the credit.
    const linear = new CostModel(new CostCurve([1, 64].map((tokens) => ({ tokens, ms: tokens }))), cheapDraft, 6);
    for (let i = 0; i < 1000; i++) linear.observeStep(1, 1);
    expect(linear.probe(1000, 2, 1, 1)).toBe(false);
    expect(linear.probe(1000, 2, 16, 16)).toBe(false);
  });

  test("probes together spend at most 2% of the steps' time: each waits until the credit covers it, then pays", () => {
    // Drafting costs 0.1 ms per token fed; a step 10 ms (2% of it: 0.2 ms of credit). A
    // probe of 2 nodes costs its catch-up pass, one more pass of one token, and nothing
    // extra to verify (flat curve): 50 + 0.1 ms after a catch-up of 500 tokens.
    const model = new CostModel(flatThenLinear, new CostCurve([{ tokens: 1, ms: 0.1 }, { tokens: 1000, ms: 100 }]), 6);
    const stepsUntilProbe = (catchUp: number, waited = 64) => {
      let steps = 0;
      while (!model.probe(waited, catchUp, 1, 1)) {
        model.observeStep(1, 10);
        steps++;
      }
      return steps;
    };
    expect(stepsUntilProbe(500)).toBe(251);
    expect(stepsUntilProbe(500)).toBe(250); // the first left 0.1 ms of credit
    expect(stepsUntilProbe(2)).toBeLessThanOrEqual(2); // 0.3 ms
    // However much credit: a request probes at most every 8 steps.
    for (let i = 0; i < 1000; i++) model.observeStep(1, 10);
    expect(model.probe(7, 2, 1, 1)).toBe(false);
    expect(model.probe(8, 2, 1, 1)).toBe(true);
    // Credit is saved over at most 5000 steps (1000 ms here): 19 probes of 50.1 ms.
    for (let i = 0; i < 20000; i++) model.observeStep(1, 10);
    let burst = 0;
    while (model.probe(64, 500, 1, 1)) burst++;
    expect(burst).toBe(19);
  });

  test("deep chains when verifying is nearly free and acceptance is high", () => {
    const model = new CostModel(flatThenLinear, cheapDraft, 6);
    expect(model.choose([good()], 0, 0, 512)).toEqual([6]);
  });

  test("trees shrink smoothly as the batch fills and grow again as it empties", () => {
    const model = new CostModel(flatThenLinear, cheapDraft, 6);
    const total = (n: number) => model.choose(Array.from({ length: n }, good), 0, 0, 512).reduce((a, b) => a + b, 0) / n;
    const sizes = [1, 2, 4, 8, 16, 32].map(total);
    for (let i = 1; i < sizes.length; i++) expect(sizes[i]).toBeLessThanOrEqual(sizes[i - 1]);
    expect(sizes[0]).toBe(6);
    expect(sizes[sizes.length - 1]).toBeLessThan(1);
    expect(total(1)).toBe(6); // emptied again
  });

  test("a request with poor acceptance gets a shorter chain than one with good acceptance", () => {
    const model = new CostModel(flatThenLinear, cheapDraft, 6);
    const poor = { acceptance: new AcceptanceByDepth([0.2, 0.2, 0.2, 0.2, 0.2, 0.2]), maxDepth: 6 };
    const [g, p] = model.choose([good(), poor, good(), poor, good(), poor], 0, 0, 512);
    expect(g).toBeGreaterThan(p);
  });

  test("the row budget bounds the chosen rows", () => {
    const model = new CostModel(flatThenLinear, cheapDraft, 6);
    const depths = model.choose(Array.from({ length: 4 }, good), 0, 0, 8);
    expect(depths.reduce((a, b) => a + b + 1, 0)).toBeLessThanOrEqual(8);
  });
});

describe("overlapping drafting with verification", () => {
  const chains = (n: number, depth: number) => Array.from({ length: n }, () => ({ depth, rows: 1 + depth }));
  test("a forward that costs the same for half the rows (memory-bound) and a cheap drafter: drafting and verifying all at once wins", () => {
    const flat = new CostModel(new CostCurve([{ tokens: 1, ms: 20 }, { tokens: 64, ms: 22 }]), new CostCurve([{ tokens: 1, ms: 0.5 }, { tokens: 64, ms: 0.6 }]), 6);
    expect(flat.overlapPays(chains(8, 3), 0)).toBe(false);
  });
  test("a forward linear in its rows and a drafter as costly as it: overlapping hides the drafting and wins", () => {
    const linear = new CostModel(new CostCurve([{ tokens: 1, ms: 1 }, { tokens: 64, ms: 64 }]), new CostCurve([{ tokens: 1, ms: 4 }, { tokens: 64, ms: 256 }]), 6);
    // All at once: drafting 8 chains (catch-up 16 rows, then 8 and 8) + t(32) = 64 + 32 + 32 + 32 = 160;
    // overlapped: 2 x max(drafting 4 chains = 32 + 16 + 16, t(16) = 16) = 128.
    expect(linear.overlapPays(chains(8, 3), 0)).toBe(true);
    // One speculating request cannot be split in two.
    expect(linear.overlapPays(chains(1, 3), 0)).toBe(false);
  });
});
