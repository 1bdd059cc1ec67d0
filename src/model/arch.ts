// Tensor tables: which tensors a config needs, with HF names and HF shapes ([out, in]
// for linear weights), and GGUF <-> HF name mappings. The LLaMA family's table is here;
// other families keep theirs in their own files.

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

/** GGUF <-> HF tensor names of a family: global names, and per-layer names under
 *  `blk.N.` (GGUF) and `${layerPrefix}N.` (HF). Names outside the tables map to null. */
export interface NameMap {
  hfNameFromGGUF(name: string): string | null;
  ggufNameFromHF(name: string): string | null;
}

export function nameMap(global: Record<string, string>, layerPrefix: string, layer: Record<string, string>): NameMap {
  const invert = (m: Record<string, string>) => Object.fromEntries(Object.entries(m).map(([g, h]) => [h, g]));
  const hfGlobal = invert(global);
  const hfLayer = invert(layer);
  const prefix = new RegExp(`^${layerPrefix.replaceAll(".", "\\.")}(\\d+)\\.(.+)\\.(weight|bias)$`);
  return {
    hfNameFromGGUF(name) {
      const l = /^blk\.(\d+)\.(\w+)\.(weight|bias)$/.exec(name);
      if (l) {
        const mapped = Object.hasOwn(layer, l[2]!) ? layer[l[2]!] : undefined;
        return mapped ? `${layerPrefix}${l[1]}.${mapped}.${l[3]}` : null;
      }
      const g = /^(\w+)\.(weight|bias)$/.exec(name);
      const mapped = g && Object.hasOwn(global, g[1]!) ? global[g[1]!] : undefined;
      return mapped ? `${mapped}.${g![2]}` : null;
    },
    ggufNameFromHF(name) {
      const l = prefix.exec(name);
      if (l) {
        const mapped = Object.hasOwn(hfLayer, l[2]!) ? hfLayer[l[2]!] : undefined;
        return mapped ? `blk.${l[1]}.${mapped}.${l[3]}` : null;
      }
      const g = /^(.+)\.(weight|bias)$/.exec(name);
      const mapped = g && Object.hasOwn(hfGlobal, g[1]!) ? hfGlobal[g[1]!] : undefined;
      return mapped ? `${mapped}.${g![2]}` : null;
    },
  };
}

/** LLaMA's names (`blk.3.attn_q.weight` <-> `model.layers.3.self_attn.q_proj.weight`);
 *  `rope_freqs.weight` is outside the table. */
export const LLAMA_NAMES = nameMap(
  { token_embd: "model.embed_tokens", output_norm: "model.norm", output: "lm_head" },
  "model.layers.",
  {
    attn_norm: "input_layernorm",
    attn_q: "self_attn.q_proj",
    attn_k: "self_attn.k_proj",
    attn_v: "self_attn.v_proj",
    attn_output: "self_attn.o_proj",
    ffn_norm: "post_attention_layernorm",
    ffn_gate: "mlp.gate_proj",
    ffn_up: "mlp.up_proj",
    ffn_down: "mlp.down_proj",
  },
);
