// An independent float64 StarCoder (GPTBigCode) forward for tests: learned positions,
// LayerNorm with bias, multi-query attention from the fused c_attn, GELU MLP; full
// causal attention over the whole token list, no KV cache, no native code.

import { gelu, geluTanh, layerNorm } from "./reference-math.ts";

export interface StarCoderReferenceConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  rmsNormEps: number;
  tieWordEmbeddings: boolean;
  hiddenAct?: string;
}

type Weights = Map<string, ArrayLike<number>>;

function get(w: Weights, name: string): ArrayLike<number> {
  const t = w.get(name);
  if (!t) throw new Error(`reference: missing ${name}`);
  return t;
}

/** y[m] = W[m, k] x[k] + b, W given from row `from`. */
function matvec(W: ArrayLike<number>, x: Float64Array, m: number, b: ArrayLike<number> | null, from = 0): Float64Array {
  const k = x.length;
  const y = new Float64Array(m);
  for (let r = 0; r < m; r++) {
    let s = b ? b[from + r]! : 0;
    const o = (from + r) * k;
    for (let c = 0; c < k; c++) s += W[o + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

/** Logits at every position of `tokens` (positions 0..n-1). */
export function starcoderReferenceForward(cfg: StarCoderReferenceConfig, w: Weights, tokens: readonly number[]): Float64Array[] {
  const d = cfg.hiddenSize;
  const hd = d / cfg.numHeads;
  const act = cfg.hiddenAct === "gelu" ? gelu : geluTanh;
  const wte = get(w, "transformer.wte.weight");
  const wpe = get(w, "transformer.wpe.weight");
  let xs = tokens.map((t, p) => Float64Array.from({ length: d }, (_, e) => wte[t * d + e]! + wpe[p * d + e]!));
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `transformer.h.${l}.`;
    const cw = get(w, `${p}attn.c_attn.weight`);
    const cb = get(w, `${p}attn.c_attn.bias`);
    const qs: Float64Array[] = [];
    const ks: Float64Array[] = [];
    const vs: Float64Array[] = [];
    for (const x of xs) {
      const h = layerNorm(x, get(w, `${p}ln_1.weight`), get(w, `${p}ln_1.bias`), cfg.rmsNormEps);
      qs.push(matvec(cw, h, d, cb, 0));
      ks.push(matvec(cw, h, hd, cb, d));
      vs.push(matvec(cw, h, hd, cb, d + hd));
    }
    xs = xs.map((x, i) => {
      const attn = new Float64Array(d);
      for (let head = 0; head < cfg.numHeads; head++) {
        const sc = Array.from({ length: i + 1 }, (_, j) => {
          let s = 0;
          for (let e = 0; e < hd; e++) s += qs[i]![head * hd + e]! * ks[j]![e]!;
          return s / Math.sqrt(hd);
        });
        const mx = Math.max(...sc);
        const pr = sc.map((s) => Math.exp(s - mx));
        const sum = pr.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= i; j++) for (let e = 0; e < hd; e++) attn[head * hd + e] += (pr[j]! / sum) * vs[j]![e]!;
      }
      const y = Float64Array.from(x);
      const o = matvec(get(w, `${p}attn.c_proj.weight`), attn, d, get(w, `${p}attn.c_proj.bias`));
      for (let e = 0; e < d; e++) y[e] += o[e]!;
      const h = layerNorm(y, get(w, `${p}ln_2.weight`), get(w, `${p}ln_2.bias`), cfg.rmsNormEps);
      const f = matvec(get(w, `${p}mlp.c_fc.weight`), h, cfg.intermediateSize, get(w, `${p}mlp.c_fc.bias`)).map(act);
      const down = matvec(get(w, `${p}mlp.c_proj.weight`), f, d, get(w, `${p}mlp.c_proj.bias`));
      for (let e = 0; e < d; e++) y[e] += down[e]!;
      return y;
    });
  }
  const head = cfg.tieWordEmbeddings ? wte : get(w, "lm_head.weight");
  return xs.map((x) => matvec(head, layerNorm(x, get(w, "transformer.ln_f.weight"), get(w, "transformer.ln_f.bias"), cfg.rmsNormEps), cfg.vocabSize, null));
}
