// Proofs by simulation that speculation changes nothing but speed: toy LLM and SSMs
// (seeded logits per context), full speculative steps (draft, merge, linearize, toy
// forward over the TokenBatch, verify).
//   (a) greedy: speculative output == incremental output, token for token;
//   (b) sampling: the joint law of the first two tokens equals the incremental one
//       (chi-square against the exact incremental probabilities);
//   (c) flawed verifiers fail that same test.

import { describe, expect, test } from "bun:test";
import { BatchBuilder } from "../../src/model/batch.ts";
import { draftParams, expandTree } from "../../src/speculation/expand.ts";
import { promptLookup } from "../../src/speculation/ngram.ts";
import { Rng } from "../../src/speculation/rng.ts";
import {
  GREEDY, greedyToken, processLogits, sample, sampleAt, samplingParams, type SamplingParams,
} from "../../src/speculation/sampling.ts";
import {
  linearize, maskWords, mergeTrees, parseTreeShape, pathTo, type DraftTree, type TokenTree,
} from "../../src/speculation/tree.ts";
import { speculativeSamplingStep, verify, type VerifyOptions, type VerifyResult } from "../../src/speculation/verify.ts";
import { ToyModel, chiSquareFit, toyForward } from "./toy.ts";

type Drafter = (context: number[], params: SamplingParams, rng: Rng) => DraftTree;
type Verifier = (tree: TokenTree, logits: Float32Array, vocab: number, options: VerifyOptions) => VerifyResult;

/** A model drafter: the SSM's processed distributions, one batched call per depth. */
function ssm(model: ToyModel, shape: string, sampled: boolean): Drafter {
  const treeShape = parseTreeShape(shape);
  return (context, params, rng) => {
    const processing = draftParams(params);
    return expandTree(
      treeShape,
      (nodes, view) =>
        nodes.map((node) => {
          const path = node < 0 ? context : [...context, ...pathTo(view.parents, node).map((n) => view.tokens[n])];
          return processLogits(model.logits(path), processing, path);
        }),
      { sample: sampled, rng },
    );
  };
}

function ngram(branches: number): Drafter {
  return (context) => promptLookup(context, { length: 4, branches });
}

/** One speculative step from `context` (its last token is the root). */
function speculativeStep(llm: ToyModel, drafters: Drafter[], context: number[], params: SamplingParams, rng: Rng, verifier: Verifier): VerifyResult {
  const tree = mergeTrees(drafters.map((draft) => draft(context, params, rng)));
  const builder = new BatchBuilder(maskWords(tree.size));
  const committed = context.length - 1;
  linearize(tree, { seqRow: 0, committed, rootToken: context[committed], rootPosition: committed }, builder);
  const logits = toyForward(llm, builder.build(), [context.slice(0, committed)]);
  return verifier(tree, logits, llm.vocab, { params, rng, context });
}

interface Generation {
  tokens: number[];
  steps: number;
}

function generate(llm: ToyModel, drafters: Drafter[], prompt: number[], count: number, params: SamplingParams, rng: Rng, verifier: Verifier = verify): Generation {
  const context = [...prompt];
  let steps = 0;
  while (context.length < prompt.length + count) {
    const result = speculativeStep(llm, drafters, context, params, rng, verifier);
    expect(result.tokens.length).toBe(result.accepted.length + 1);
    context.push(...result.tokens);
    steps++;
  }
  return { tokens: context.slice(prompt.length, prompt.length + count), steps };
}

function randomPrompt(rng: Rng, vocab: number): number[] {
  // Short alphabet runs repeat, so the n-gram drafter finds matches.
  const length = 6 + Math.floor(rng.next() * 8);
  return Array.from({ length }, (_, i) => (i % 3 === 2 ? Math.floor(rng.next() * vocab) : (i * 5) % vocab));
}

describe("greedy: speculative output is the incremental output, token for token", () => {
  const VOCAB = 16;
  // minSpeedup: tokens per step the drafts must reach (random toy text rarely repeats,
  // so the n-gram drafter alone only needs to land some).
  const configs: { name: string; drafters: (llm: ToyModel) => Drafter[]; penalty?: number; minSpeedup?: number }[] = [
    { name: "static chain-and-fork tree, one SSM", drafters: (llm) => [ssm(new ToyModel(VOCAB, 101, 0.8, llm), "1,1,3,1,1", false)] },
    { name: "static wide tree, two SSMs", drafters: (llm) => [ssm(new ToyModel(VOCAB, 102, 1, llm), "2,2,2", false), ssm(new ToyModel(VOCAB, 103, 2, llm), "3,1", false)] },
    { name: "dynamic tree, one SSM", drafters: (llm) => [ssm(new ToyModel(VOCAB, 104, 1, llm), "dynamic:16:6:3", false)] },
    { name: "n-gram alone", drafters: () => [ngram(2)], minSpeedup: 1 },
    { name: "n-gram + dynamic SSM + static SSM", drafters: (llm) => [ngram(1), ssm(new ToyModel(VOCAB, 105, 1, llm), "dynamic:12", false), ssm(new ToyModel(VOCAB, 106, 3, llm), "2,1,1", false)] },
    { name: "repetition penalty, SSM + n-gram", drafters: (llm) => [ssm(new ToyModel(VOCAB, 107, 0.8, llm), "1,2,1,1", false), ngram(2)], penalty: 1.4 },
  ];
  for (const config of configs) {
    test(config.name, () => {
      const params = { ...GREEDY, repetitionPenalty: config.penalty ?? 1 };
      let tokens = 0;
      let steps = 0;
      for (let seed = 0; seed < 25; seed++) {
        const llm = new ToyModel(VOCAB, 1000 + seed, 3);
        const prompt = randomPrompt(new Rng(seed), VOCAB);
        const incremental = [...prompt];
        for (let t = 0; t < 40; t++) incremental.push(greedyToken(llm.logits(incremental), params, incremental));
        const speculative = generate(llm, config.drafters(llm), prompt, 40, params, new Rng(seed));
        expect(speculative.tokens).toEqual(incremental.slice(prompt.length));
        tokens += 40;
        steps += speculative.steps;
      }
      console.log(`${config.name}: ${(tokens / steps).toFixed(2)} tokens per step`);
      expect(tokens / steps).toBeGreaterThan(config.minSpeedup ?? 1.3);
    });
  }
});

describe("sampling with one fixed draw per position: speculative output is the incremental output", () => {
  const VOCAB = 16;
  const uniform = (seed: number, position: number) => new Rng(seed * 1000 + position).next();
  test("for trees of any shape, drafters ranking their children, with and without penalties", () => {
    const shapes = ["1,1,1", "2,2,1", "dynamic:10:5:3", "1"];
    let steps = 0;
    let tokens = 0;
    for (let seed = 0; seed < 40; seed++) {
      const params = samplingParams({ temperature: 0.9, topK: 8, repetitionPenalty: seed % 2 ? 1.3 : 1 });
      const llm = new ToyModel(VOCAB, 2000 + seed, 2);
      const draft = ssm(new ToyModel(VOCAB, 3000 + seed, 1, llm), shapes[seed % shapes.length], false);
      const prompt = randomPrompt(new Rng(seed), VOCAB);
      const incremental = [...prompt];
      for (let t = 0; t < 30; t++) {
        incremental.push(sampleAt(processLogits(llm.logits(incremental), params, incremental), uniform(seed, incremental.length)));
      }
      const context = [...prompt];
      while (context.length < incremental.length) {
        const at = context.length;
        const result = speculativeStep(llm, [draft], context, params, new Rng(seed), (tree, logits, vocab, options) =>
          verify(tree, logits, vocab, { ...options, uniforms: (depth) => uniform(seed, at + depth) }),
        );
        context.push(...result.tokens);
        steps++;
      }
      expect(context.slice(0, incremental.length)).toEqual(incremental);
      tokens += 30;
    }
    // The drafts are the LLM's near relatives: several tokens per step on average.
    expect(tokens / steps).toBeGreaterThan(1.3);
  });
});

/** A verifier with one deliberate flaw, sharing verify's walk and node step. */
function flawedVerifier(flaw: "bonus from unmodified p" | "ranked children as if sampled" | "drawn with replacement"): Verifier {
  return (tree, logits, vocab, { params, rng, context }) => {
    const history = Array.from(context!);
    const accepted: number[] = [];
    let node = -1;
    for (;;) {
      const p = processLogits(logits.subarray((node + 1) * vocab, (node + 2) * vocab), params, history);
      const untouched = p.slice();
      let draws = tree.draws[node + 1];
      if (flaw === "ranked children as if sampled") draws = draws.map((d) => ({ ...d, sampled: d.q !== null }));
      // A drafter id per draw: each draw checked against the full q.
      if (flaw === "drawn with replacement") draws = draws.map((d, j) => ({ ...d, drafter: 1000 + j }));
      const step = speculativeSamplingStep(p, draws, tree.tokens, rng!);
      if (step.child < 0) {
        const bonusToken = flaw === "bonus from unmodified p" ? sample(untouched, rng!) : step.token;
        const tokens = [...accepted.map((id) => tree.tokens[id]), bonusToken];
        return { accepted, bonusToken, tokens, acceptedFromDraft: tokens.map((_, i) => i < accepted.length) };
      }
      accepted.push(step.child);
      history.push(step.token);
      node = step.child;
    }
  };
}

/** A sampled tree pruned to its `budget` likeliest nodes by the probabilities of the
 *  tokens actually drawn: the kept children are no longer draws from q. */
function prunedByDrawnProbability(model: ToyModel, budget: number): Drafter {
  const full = ssm(model, "3,3", true);
  return (context, params, rng) => {
    const tree = full(context, params, rng);
    const prob = (i: number) => pathTo(tree.parents, i).reduce((p, n) => p * tree.q![n]![tree.tokens[n]], 1);
    const kept = Array.from(tree.tokens.keys())
      .sort((a, b) => prob(b) - prob(a) || a - b)
      .slice(0, budget)
      .sort((a, b) => a - b);
    return {
      tokens: Int32Array.from(kept, (i) => tree.tokens[i]),
      parents: Int32Array.from(kept, (i) => (tree.parents[i] < 0 ? -1 : kept.indexOf(tree.parents[i]))),
      q: kept.map((i) => tree.q![i]),
      sampled: true,
    };
  };
}

describe("sampling: the first two tokens have the incremental joint distribution", () => {
  const VOCAB = 8;
  const SAMPLES = 20_000;
  const llm = new ToyModel(VOCAB, 7, 2.5);
  const nearSSM = new ToyModel(VOCAB, 8, 1, llm);
  const farSSM = new ToyModel(VOCAB, 9, 2.5, llm);
  const otherSSM = new ToyModel(VOCAB, 10, 1.5, llm);
  const prompt = [1, 2, 3, 1, 2, 3, 4, 1, 2];

  /** P(t1, t2) of incremental sampling, exactly. */
  function incrementalJoint(params: SamplingParams): number[] {
    const joint = new Array(VOCAB * VOCAB).fill(0);
    const first = processLogits(llm.logits(prompt), params, prompt);
    for (let a = 0; a < VOCAB; a++) {
      if (first[a] === 0) continue;
      const context = [...prompt, a];
      const second = processLogits(llm.logits(context), params, context);
      for (let b = 0; b < VOCAB; b++) joint[a * VOCAB + b] = first[a] * second[b];
    }
    return joint;
  }

  function pairCounts(draw: (rng: Rng) => number[], seed: number): number[] {
    const rng = new Rng(seed);
    const counts = new Array(VOCAB * VOCAB).fill(0);
    for (let i = 0; i < SAMPLES; i++) {
      const [a, b] = draw(rng);
      counts[a * VOCAB + b]++;
    }
    return counts;
  }

  function speculativeFit(label: string, drafters: Drafter[], params: SamplingParams, verifier: Verifier = verify) {
    const counts = pairCounts((rng) => generate(llm, drafters, prompt, 2, params, rng, verifier).tokens, 1);
    const fit = chiSquareFit(counts, incrementalJoint(params));
    console.log(`${label}: chi2 ${fit.statistic.toFixed(1)}, df ${fit.df}, p ${fit.pValue.toExponential(2)}`);
    return fit;
  }

  const configs: { name: string; drafters: Drafter[]; params: Partial<SamplingParams> }[] = [
    { name: "sampled static tree, one SSM", drafters: [ssm(nearSSM, "3,2", true)], params: { temperature: 1 } },
    { name: "top-k (deterministic) static tree", drafters: [ssm(nearSSM, "3,2", false)], params: { temperature: 0.8, topK: 5 } },
    { name: "three SSMs: two sampled, one top-k", drafters: [ssm(nearSSM, "2,2", true), ssm(farSSM, "3,1", true), ssm(otherSSM, "2,1", false)], params: { temperature: 1, topP: 0.9 } },
    { name: "n-gram tree alone", drafters: [ngram(3)], params: { temperature: 1 } },
    { name: "n-gram + sampled SSM, repetition penalty", drafters: [ngram(1), ssm(farSSM, "2,2", true)], params: { temperature: 1, minP: 0.05, repetitionPenalty: 1.3 } },
    { name: "dynamic sampled tree", drafters: [ssm(nearSSM, "dynamic:6:3:3", true)], params: { temperature: 1.2, topK: 6 } },
    { name: "dynamic top-k tree + sampled static tree", drafters: [ssm(farSSM, "dynamic:6:3:3", false), ssm(nearSSM, "2,1", true)], params: { temperature: 0.9 } },
  ];

  test("control: incremental sampling itself", () => {
    const params = samplingParams({ temperature: 1, topK: 6 });
    const counts = pairCounts((rng) => {
      const context = [...prompt];
      for (let t = 0; t < 2; t++) context.push(sample(processLogits(llm.logits(context), params, context), rng));
      return context.slice(prompt.length);
    }, 3);
    expect(chiSquareFit(counts, incrementalJoint(params)).pValue).toBeGreaterThan(1e-4);
  });

  for (const config of configs) {
    test(`verify: ${config.name}`, () => {
      expect(speculativeFit(config.name, config.drafters, samplingParams(config.params)).pValue).toBeGreaterThan(1e-4);
    });
  }

  // Side by side with the above: the same test, each with one flaw, must fail.
  test("flawed: bonus from the unmodified p (no residual), sampled tree", () => {
    expect(speculativeFit("flawed, no residual, sampled tree", configs[0].drafters, samplingParams(configs[0].params), flawedVerifier("bonus from unmodified p")).pValue).toBeLessThan(1e-4);
  });

  test("flawed: bonus from the unmodified p (no residual), top-k tree", () => {
    expect(speculativeFit("flawed, no residual, top-k tree", configs[1].drafters, samplingParams(configs[1].params), flawedVerifier("bonus from unmodified p")).pValue).toBeLessThan(1e-4);
  });

  test("flawed: top-k children checked with p/q as if they were sampled", () => {
    expect(speculativeFit("flawed, top-k children as if sampled", configs[1].drafters, samplingParams(configs[1].params), flawedVerifier("ranked children as if sampled")).pValue).toBeLessThan(1e-4);
  });

  test("flawed: children drawn without replacement checked against the full q", () => {
    expect(speculativeFit("flawed, with-replacement check", configs[0].drafters, samplingParams(configs[0].params), flawedVerifier("drawn with replacement")).pValue).toBeLessThan(1e-4);
  });

  test("flawed drafter: a sampled tree pruned by the drawn tokens' probabilities", () => {
    expect(speculativeFit("flawed drafter, pruned by drawn probabilities", [prunedByDrawnProbability(nearSSM, 4)], samplingParams({ temperature: 1 })).pValue).toBeLessThan(1e-4);
  });
});

describe("verify details", () => {
  test("greedy result shape", () => {
    // Tree: 3 -> {4, 5}; the LLM's argmax is 3 at the root, 5 after it, then 0.
    const tree = mergeTrees([{ tokens: Int32Array.from([3, 4, 5]), parents: Int32Array.from([-1, 0, 0]), sampled: false }]);
    const vocab = 6;
    const logits = new Float32Array(4 * vocab);
    const argmaxes = [3, 5, 1, 0]; // rows: root, 3, 3.4, 3.5
    argmaxes.forEach((token, row) => token < vocab && (logits[row * vocab + token] = 1));
    const result = verify(tree, logits, vocab, { params: GREEDY });
    expect(result).toEqual({ accepted: [0, 2], bonusToken: 0, tokens: [3, 5, 0], acceptedFromDraft: [true, true, false] });
  });

  test("an empty tree yields just the LLM's token", () => {
    const tree = mergeTrees([]);
    const logits = Float32Array.from([0, 0, 5, 0]);
    expect(verify(tree, logits, 4, { params: GREEDY }).tokens).toEqual([2]);
    expect(verify(tree, logits, 4, { params: samplingParams({ topK: 1 }), rng: new Rng(1) }).tokens).toEqual([2]);
  });

  test("refuses short logits and sampling without an rng", () => {
    const tree = mergeTrees([{ tokens: Int32Array.from([1]), parents: Int32Array.from([-1]), sampled: false }]);
    expect(() => verify(tree, new Float32Array(4), 4, { params: GREEDY })).toThrow("2 logits rows of 4 needed");
    expect(() => verify(tree, new Float32Array(8), 4, { params: samplingParams({}) })).toThrow("needs an rng");
  });
});
