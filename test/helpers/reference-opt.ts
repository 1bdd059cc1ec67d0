// An independent float64 OPT forward for tests: learned positions at offset 2, optional
// project_in/project_out, LayerNorm before or after each block, ReLU MLP; full causal
// attention over the whole token list, no KV cache, no native code.

import { layerNorm, relu } from "./reference-math.ts";

export interface OPTReferenceConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  tieWordEmbeddings: boolean;
  opt?: { wordEmbedProjDim: number; layerNormBefore: boolean; finalLayerNorm: boolean };
}

type Weights = Map<string, ArrayLike<number>>;

function get(w: Weights, name: string): ArrayLike<number> {
  const t = w.get(name);
  if (!t) throw new Error(`reference: missing ${name}`);
  return t;
}

/** y[m] = W[m, k] x[k] (+ b) */
function matvec(W: ArrayLike<number>, x: Float64Array, m: number, b?: ArrayLike<number>): Float64Array {
  const k = x.length;
  const y = new Float64Array(m);
  for (let r = 0; r < m; r++) {
    let s = b ? b[r]! : 0;
    for (let c = 0; c < k; c++) s += W[r * k + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

export function optReferenceForward(cfg: OPTReferenceConfig, w: Weights, tokens: readonly number[]): Float64Array[] {
  const d = cfg.hiddenSize;
  const o = cfg.opt!;
  const proj = o.wordEmbedProjDim;
  const hd = d / cfg.numHeads;
  const eps = 1e-5;
  const emb = get(w, "model.decoder.embed_tokens.weight");
  const pos = get(w, "model.decoder.embed_positions.weight");
  const ln = (x: Float64Array, name: string) => layerNorm(x, get(w, `${name}.weight`), get(w, `${name}.bias`), eps);
  const lin = (x: Float64Array, name: string, m: number) => matvec(get(w, `${name}.weight`), x, m, get(w, `${name}.bias`));
  let xs: Float64Array[] = tokens.map((t, p) => {
    let x: Float64Array = Float64Array.from({ length: proj }, (_, e) => emb[t * proj + e]!);
    if (proj !== d) x = matvec(get(w, "model.decoder.project_in.weight"), x, d);
    return x.map((v, e) => v + pos[(p + 2) * d + e]!);
  });
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.decoder.layers.${l}.`;
    const inputs = xs.map((x) => (o.layerNormBefore ? ln(x, `${p}self_attn_layer_norm`) : x));
    const qs = inputs.map((h) => lin(h, `${p}self_attn.q_proj`, d));
    const ks = inputs.map((h) => lin(h, `${p}self_attn.k_proj`, d));
    const vs = inputs.map((h) => lin(h, `${p}self_attn.v_proj`, d));
    xs = xs.map((x, i) => {
      const attn = new Float64Array(d);
      for (let head = 0; head < cfg.numHeads; head++) {
        const sc = Array.from({ length: i + 1 }, (_, j) => {
          let s = 0;
          for (let e = 0; e < hd; e++) s += qs[i]![head * hd + e]! * ks[j]![head * hd + e]!;
          return s / Math.sqrt(hd);
        });
        const mx = Math.max(...sc);
        const pr = sc.map((s) => Math.exp(s - mx));
        const sum = pr.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= i; j++) for (let e = 0; e < hd; e++) attn[head * hd + e] += (pr[j]! / sum) * vs[j]![head * hd + e]!;
      }
      const out = lin(attn, `${p}self_attn.out_proj`, d);
      let y: Float64Array = x.map((v, e) => v + out[e]!);
      if (!o.layerNormBefore) y = ln(y, `${p}self_attn_layer_norm`);
      const h = o.layerNormBefore ? ln(y, `${p}final_layer_norm`) : y;
      const f = lin(lin(h, `${p}fc1`, cfg.intermediateSize).map(relu), `${p}fc2`, d);
      y = y.map((v, e) => v + f[e]!);
      return o.layerNormBefore ? y : ln(y, `${p}final_layer_norm`);
    });
  }
  const head = cfg.tieWordEmbeddings ? emb : get(w, "lm_head.weight");
  return xs.map((x) => {
    let h: Float64Array = o.finalLayerNorm ? ln(x, "model.decoder.final_layer_norm") : x;
    if (proj !== d) h = matvec(get(w, "model.decoder.project_out.weight"), h, proj);
    return matvec(head, h, cfg.vocabSize);
  });
}
