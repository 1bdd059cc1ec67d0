// Seeded random LLaMA models for the CPU benchmark, written straight to GGUF one tensor
// at a time (a 1.1B F16 model is 2.2 GB; the test helper's in-memory writer would need
// several times that), with a synthetic 32000-token SentencePiece-style vocabulary so
// that llama.cpp loads them too. Cached under bench/.models/ and reused.

import { existsSync, mkdirSync, renameSync, statSync } from "node:fs";
import { join } from "node:path";
import { expectedTensors } from "../../src/model/registry";
import type { ModelConfig } from "../../src/model/config";
import type { WriteDType } from "../../src/model/encoding";
import { gguf, ggufModelMetadata, writeGGUF, type GGUFValue, type NamedTensor } from "../../src/model/write";
import type { TinyDims } from "../../test/helpers/tiny-model";

/** The test models' dimensions, plus a file name and tied embeddings. */
export interface RandomShape extends TinyDims {
  name: string;
  tied?: boolean;
}

export const SHAPES = {
  tinyllama1b: { name: "tinyllama-1.1b", vocab: 32000, hidden: 2048, intermediate: 5632, layers: 22, heads: 32, kvHeads: 4 },
  llama110m: { name: "llama-110m", vocab: 32000, hidden: 768, intermediate: 2048, layers: 12, heads: 12, kvHeads: 12 },
  stories15m: { name: "stories-15m", vocab: 32000, hidden: 288, intermediate: 768, layers: 6, heads: 6, kvHeads: 6, tied: true },
} satisfies Record<string, RandomShape>;

export function shapeConfig(s: RandomShape, contextLength = 2048): ModelConfig {
  return {
    arch: "llama",
    vocabSize: s.vocab,
    hiddenSize: s.hidden,
    intermediateSize: s.intermediate,
    numLayers: s.layers,
    numHeads: s.heads,
    numKvHeads: s.kvHeads,
    headDim: s.headDim ?? s.hidden / s.heads,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: contextLength,
    tieWordEmbeddings: s.tied ?? false,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
  };
}

/** `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then distinct word pieces: what
 *  llama.cpp's SPM vocabulary loader expects of a `llama` tokenizer. */
export function syntheticTokenizer(vocab: number): Record<string, GGUFValue> {
  const tokens: string[] = ["<unk>", "<s>", "</s>"];
  const types: number[] = [2, 3, 3];
  for (let b = 0; b < 256 && tokens.length < vocab; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    types.push(6);
  }
  while (tokens.length < vocab) {
    tokens.push(`\u2581w${tokens.length}`);
    types.push(1);
  }
  const scores = new Float32Array(vocab);
  for (let i = 0; i < vocab; i++) scores[i] = -i;
  return {
    "tokenizer.ggml.model": gguf.str("llama"),
    "tokenizer.ggml.tokens": gguf.strings(tokens),
    "tokenizer.ggml.scores": gguf.f32s(scores),
    "tokenizer.ggml.token_type": gguf.i32s(types),
    "tokenizer.ggml.bos_token_id": gguf.u32(1),
    "tokenizer.ggml.eos_token_id": gguf.u32(2),
    "tokenizer.ggml.unknown_token_id": gguf.u32(0),
    "tokenizer.ggml.add_bos_token": gguf.bool(true),
    "tokenizer.ggml.add_eos_token": gguf.bool(false),
  };
}

/** Uniform weights with the std the test helper uses (norms 1 ± 0.1, embeddings
 *  2/sqrt(hidden), linears 1/sqrt(in)); a uniform stream is several times faster to draw
 *  than normals, and the distribution does not matter to the timing or the gate. */
function* randomTensors(c: ModelConfig, seed: number): Generator<NamedTensor> {
  let state = seed >>> 0;
  for (const t of expectedTensors(c)) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    const values = new Float32Array(count);
    const isVocab = t.name === "model.embed_tokens.weight" || t.name === "lm_head.weight";
    const std = t.kind === "norm" ? 0.1 : isVocab ? 2 / Math.sqrt(c.hiddenSize) : 1 / Math.sqrt(t.shape[1]!);
    const center = t.kind === "norm" ? 1 : 0;
    const scale = (2 * std * Math.sqrt(3)) / 4294967296;
    for (let i = 0; i < count; i++) {
      // xorshift32
      state ^= state << 13;
      state ^= state >>> 17;
      state ^= state << 5;
      values[i] = center + ((state >>> 0) - 2147483648) * scale;
    }
    yield { name: t.name, shape: t.shape, values };
  }
}

/** Path of the cached GGUF for `shape` in `dtype`, writing it first if needed. */
export function randomModel(cacheDir: string, shape: RandomShape, dtype: WriteDType, log: (m: string) => void): string {
  const path = join(cacheDir, `${shape.name}-${dtype}.gguf`);
  if (existsSync(path)) return path;
  mkdirSync(cacheDir, { recursive: true });
  const config = shapeConfig(shape);
  const t0 = performance.now();
  log(`writing ${path} (one time)`);
  const tmp = `${path}.partial`;
  writeGGUF(tmp, config, randomTensors(config, 0x5eed + shape.hidden), dtype, {
    ...ggufModelMetadata(config, dtype, `random ${shape.name}`),
    ...syntheticTokenizer(shape.vocab),
  });
  renameSync(tmp, path);
  log(`  ${(statSync(path).size / 1e9).toFixed(2)} GB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return path;
}
