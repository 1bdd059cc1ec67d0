// The LLaMA-family tensor table: which tensors a config needs, with HF names and
// HF shapes ([out, in] for linear weights), and the GGUF <-> HF name mapping.

import type { ModelConfig } from "./config.ts";

/** norm: a norm weight; bias: any bias or 1-D parameter; matrix: embedding or linear weight. */
export type TensorKind = "norm" | "bias" | "matrix";

export interface ExpectedTensor {
  name: string;
  shape: number[];
  kind: TensorKind;
}

export function llamaTensors(cfg: ModelConfig): ExpectedTensor[] {
  const { hiddenSize: hidden, intermediateSize: inter, vocabSize: vocab } = cfg;
  const qRows = cfg.numHeads * cfg.headDim;
  const kvRows = cfg.numKvHeads * cfg.headDim;
  const out: ExpectedTensor[] = [{ name: "model.embed_tokens.weight", shape: [vocab, hidden], kind: "matrix" }];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}.`;
    out.push(
      { name: `${p}input_layernorm.weight`, shape: [hidden], kind: "norm" },
      { name: `${p}self_attn.q_proj.weight`, shape: [qRows, hidden], kind: "matrix" },
      { name: `${p}self_attn.k_proj.weight`, shape: [kvRows, hidden], kind: "matrix" },
      { name: `${p}self_attn.v_proj.weight`, shape: [kvRows, hidden], kind: "matrix" },
    );
    if (cfg.attentionBias) {
      out.push(
        { name: `${p}self_attn.q_proj.bias`, shape: [qRows], kind: "bias" },
        { name: `${p}self_attn.k_proj.bias`, shape: [kvRows], kind: "bias" },
        { name: `${p}self_attn.v_proj.bias`, shape: [kvRows], kind: "bias" },
      );
    }
    out.push(
      { name: `${p}self_attn.o_proj.weight`, shape: [hidden, qRows], kind: "matrix" },
      { name: `${p}post_attention_layernorm.weight`, shape: [hidden], kind: "norm" },
      { name: `${p}mlp.gate_proj.weight`, shape: [inter, hidden], kind: "matrix" },
      { name: `${p}mlp.up_proj.weight`, shape: [inter, hidden], kind: "matrix" },
      { name: `${p}mlp.down_proj.weight`, shape: [hidden, inter], kind: "matrix" },
    );
  }
  out.push({ name: "model.norm.weight", shape: [hidden], kind: "norm" });
  if (!cfg.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [vocab, hidden], kind: "matrix" });
  return out;
}

const GGUF_TO_HF_GLOBAL: Record<string, string> = {
  token_embd: "model.embed_tokens",
  output_norm: "model.norm",
  output: "lm_head",
};

const GGUF_TO_HF_LAYER: Record<string, string> = {
  attn_norm: "input_layernorm",
  attn_q: "self_attn.q_proj",
  attn_k: "self_attn.k_proj",
  attn_v: "self_attn.v_proj",
  attn_output: "self_attn.o_proj",
  ffn_norm: "post_attention_layernorm",
  ffn_gate: "mlp.gate_proj",
  ffn_up: "mlp.up_proj",
  ffn_down: "mlp.down_proj",
};

const HF_TO_GGUF_LAYER = Object.fromEntries(Object.entries(GGUF_TO_HF_LAYER).map(([g, h]) => [h, g]));
const HF_TO_GGUF_GLOBAL = Object.fromEntries(Object.entries(GGUF_TO_HF_GLOBAL).map(([g, h]) => [h, g]));

/** HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
 *  or null for tensors outside the table (e.g. `rope_freqs.weight`). */
export function llamaHFNameFromGGUF(name: string): string | null {
  const layer = /^blk\.(\d+)\.(\w+)\.(weight|bias)$/.exec(name);
  if (layer) {
    const mapped = GGUF_TO_HF_LAYER[layer[2]!];
    return mapped ? `model.layers.${layer[1]}.${mapped}.${layer[3]}` : null;
  }
  const global = /^(\w+)\.(weight|bias)$/.exec(name);
  const mapped = global && GGUF_TO_HF_GLOBAL[global[1]!];
  return mapped ? `${mapped}.${global![2]}` : null;
}

/** GGUF name of an HF tensor (inverse of llamaHFNameFromGGUF). */
export function llamaGGUFNameFromHF(name: string): string | null {
  const layer = /^model\.layers\.(\d+)\.(.+)\.(weight|bias)$/.exec(name);
  if (layer) {
    const mapped = HF_TO_GGUF_LAYER[layer[2]!];
    return mapped ? `blk.${layer[1]}.${mapped}.${layer[3]}` : null;
  }
  const global = /^(.+)\.(weight|bias)$/.exec(name);
  const mapped = global && HF_TO_GGUF_GLOBAL[global[1]!];
  return mapped ? `${mapped}.${global![2]}` : null;
}
