// An independent float64 Falcon forward for tests: parallel attention and MLP from one
// or two LayerNorms, fused QKV grouped per KV head as HF lays it out ([q heads.., k, v]),
// rotate-half RoPE, exact GELU; full causal attention, no KV cache, no native code.

import { gelu, layerNorm } from "./reference-math.ts";

export interface FalconReferenceConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  rmsNormEps: number;
  ropeTheta: number;
  tieWordEmbeddings: boolean;
  falcon?: { twoNorms: boolean };
}

type Weights = Map<string, ArrayLike<number>>;

function get(w: Weights, name: string): ArrayLike<number> {
  const t = w.get(name);
  if (!t) throw new Error(`reference: missing ${name}`);
  return t;
}

function matvec(W: ArrayLike<number>, x: Float64Array, m: number): Float64Array {
  const k = x.length;
  const y = new Float64Array(m);
  for (let r = 0; r < m; r++) {
    let s = 0;
    for (let c = 0; c < k; c++) s += W[r * k + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

/** HF rotate_half RoPE of one head at `pos` (angles from f32 inverse frequencies, as HF). */
function rope(x: Float64Array, pos: number, theta: number): Float64Array {
  const hd = x.length;
  const half = hd / 2;
  const out = Float64Array.from(x);
  for (let j = 0; j < half; j++) {
    const inv = Math.fround(1 / theta ** ((2 * j) / hd));
    const ang = Math.fround(pos * inv);
    out[j] = x[j]! * Math.cos(ang) - x[j + half]! * Math.sin(ang);
    out[j + half] = x[j]! * Math.sin(ang) + x[j + half]! * Math.cos(ang);
  }
  return out;
}

export function falconReferenceForward(cfg: FalconReferenceConfig, w: Weights, tokens: readonly number[]): Float64Array[] {
  const d = cfg.hiddenSize;
  const H = cfg.numHeads;
  const K = cfg.numKvHeads;
  const hd = d / H;
  const r = H / K;
  const emb = get(w, "transformer.word_embeddings.weight");
  const ln = (x: Float64Array, name: string) => layerNorm(x, get(w, `${name}.weight`), get(w, `${name}.bias`), cfg.rmsNormEps);
  let xs: Float64Array[] = tokens.map((t) => Float64Array.from({ length: d }, (_, e) => emb[t * d + e]!));
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `transformer.h.${l}.`;
    const two = cfg.falcon?.twoNorms ?? false;
    const ha = xs.map((x) => ln(x, two ? `${p}ln_attn` : `${p}input_layernorm`));
    const hm = two ? xs.map((x) => ln(x, `${p}ln_mlp`)) : ha;
    // One head of the fused product: group g holds q heads g*r.., then k, then v.
    const fused = ha.map((h) => matvec(get(w, `${p}self_attention.query_key_value.weight`), h, (H + 2 * K) * hd));
    const head = (t: number, row: number) => fused[t]!.subarray(row * hd, (row + 1) * hd);
    const q = (t: number, h: number) => rope(head(t, Math.floor(h / r) * (r + 2) + (h % r)), t, cfg.ropeTheta);
    const k = (t: number, g: number) => rope(head(t, g * (r + 2) + r), t, cfg.ropeTheta);
    const v = (t: number, g: number) => head(t, g * (r + 2) + r + 1);
    xs = xs.map((x, i) => {
      const attn = new Float64Array(d);
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / r);
        const qh = q(i, h);
        const sc = Array.from({ length: i + 1 }, (_, j) => {
          const kj = k(j, g);
          let s = 0;
          for (let e = 0; e < hd; e++) s += qh[e]! * kj[e]!;
          return s / Math.sqrt(hd);
        });
        const mx = Math.max(...sc);
        const pr = sc.map((s) => Math.exp(s - mx));
        const sum = pr.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= i; j++) {
          const vj = v(j, g);
          for (let e = 0; e < hd; e++) attn[h * hd + e] += (pr[j]! / sum) * vj[e]!;
        }
      }
      const a = matvec(get(w, `${p}self_attention.dense.weight`), attn, d);
      const f = matvec(get(w, `${p}mlp.dense_h_to_4h.weight`), hm[i]!, cfg.intermediateSize).map(gelu);
      const m = matvec(get(w, `${p}mlp.dense_4h_to_h.weight`), f, d);
      return x.map((val, e) => val + a[e]! + m[e]!);
    });
  }
  const headW = cfg.tieWordEmbeddings ? emb : get(w, "lm_head.weight");
  return xs.map((x) => matvec(headW, ln(x, "transformer.ln_f"), cfg.vocabSize));
}
