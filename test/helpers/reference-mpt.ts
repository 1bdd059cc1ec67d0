// An independent float64 MPT forward for tests: ALiBi (slopes from alibi_bias_max), clip_qkv,
// LayerNorm without bias, fused Wqkv, exact GELU, no biases, tied head; full causal
// attention over the whole token list, no KV cache, no native code.

import { gelu, layerNorm } from "./reference-math.ts";

export interface MPTReferenceConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  rmsNormEps: number;
  alibiMaxBias?: number;
  clipQkv?: number;
}

type Weights = Map<string, ArrayLike<number>>;

function get(w: Weights, name: string): ArrayLike<number> {
  const t = w.get(name);
  if (!t) throw new Error(`reference: missing ${name}`);
  return t;
}

function matvec(W: ArrayLike<number>, x: Float64Array, m: number, from = 0): Float64Array {
  const k = x.length;
  const y = new Float64Array(m);
  for (let r = 0; r < m; r++) {
    let s = 0;
    for (let c = 0; c < k; c++) s += W[(from + r) * k + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

/** MPT's build_alibi_bias slopes: for the next power of two n >= heads, 1 / 2^(k * max / n),
 *  k = 1..n; with fewer heads, the slopes at odd then even k. */
function slopes(heads: number, max: number): number[] {
  let n = 1;
  while (n < heads) n *= 2;
  const m = Array.from({ length: n }, (_, i) => 1 / 2 ** (((i + 1) * max) / n));
  if (n === heads) return m;
  const odd = m.filter((_, i) => i % 2 === 1);
  const even = m.filter((_, i) => i % 2 === 0);
  return [...odd, ...even].slice(0, heads);
}

export function mptReferenceForward(cfg: MPTReferenceConfig, w: Weights, tokens: readonly number[]): Float64Array[] {
  const d = cfg.hiddenSize;
  const hd = d / cfg.numHeads;
  const s = slopes(cfg.numHeads, cfg.alibiMaxBias ?? 8);
  const wte = get(w, "transformer.wte.weight");
  let xs: Float64Array[] = tokens.map((t) => Float64Array.from({ length: d }, (_, e) => wte[t * d + e]!));
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `transformer.blocks.${l}.`;
    const hs = xs.map((x) => layerNorm(x, get(w, `${p}norm_1.weight`), null, cfg.rmsNormEps));
    const qkv = get(w, `${p}attn.Wqkv.weight`);
    const c = cfg.clipQkv ?? Infinity;
    const clip = (y: Float64Array) => y.map((v) => Math.min(Math.max(v, -c), c));
    const qs = hs.map((h) => clip(matvec(qkv, h, d, 0)));
    const ks = hs.map((h) => clip(matvec(qkv, h, d, d)));
    const vs = hs.map((h) => clip(matvec(qkv, h, d, 2 * d)));
    xs = xs.map((x, i) => {
      const attn = new Float64Array(d);
      for (let head = 0; head < cfg.numHeads; head++) {
        const sc = Array.from({ length: i + 1 }, (_, j) => {
          let dot = 0;
          for (let e = 0; e < hd; e++) dot += qs[i]![head * hd + e]! * ks[j]![head * hd + e]!;
          return dot / Math.sqrt(hd) + s[head]! * (j - i);
        });
        const mx = Math.max(...sc);
        const pr = sc.map((v) => Math.exp(v - mx));
        const sum = pr.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= i; j++) for (let e = 0; e < hd; e++) attn[head * hd + e] += (pr[j]! / sum) * vs[j]![head * hd + e]!;
      }
      const o = matvec(get(w, `${p}attn.out_proj.weight`), attn, d);
      const y = x.map((v, e) => v + o[e]!);
      const h = layerNorm(y, get(w, `${p}norm_2.weight`), null, cfg.rmsNormEps);
      const f = matvec(get(w, `${p}ffn.up_proj.weight`), h, cfg.intermediateSize).map(gelu);
      const down = matvec(get(w, `${p}ffn.down_proj.weight`), f, d);
      return y.map((v, e) => v + down[e]!);
    });
  }
  return xs.map((x) => matvec(wte, layerNorm(x, get(w, "transformer.norm_f.weight"), null, cfg.rmsNormEps), cfg.vocabSize));
}
