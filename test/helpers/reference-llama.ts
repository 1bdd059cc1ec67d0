// An independent float64 LLaMA forward for tests: full causal attention over the
// whole token list, HF rotate_half RoPE, no KV cache, no batching, no native code.

export interface ReferenceConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
  ropeScaling?: { type: string; factor: number; lowFreqFactor?: number; highFreqFactor?: number; originalMaxPositionEmbeddings?: number } | null;
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
    let s = b ? b[r] : 0;
    const o = r * k;
    for (let c = 0; c < k; c++) s += W[o + c] * x[c];
    y[r] = s;
  }
  return y;
}

function rmsnorm(x: Float64Array, w: ArrayLike<number>, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const inv = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * inv * w[i]);
}

function invFreq(cfg: ReferenceConfig): Float64Array {
  const half = cfg.headDim / 2;
  const f = new Float64Array(half);
  for (let i = 0; i < half; i++) f[i] = 1 / Math.pow(cfg.ropeTheta, (2 * i) / cfg.headDim);
  const s = cfg.ropeScaling;
  if (s?.type === "linear") for (let i = 0; i < half; i++) f[i] /= s.factor;
  if (s?.type === "llama3") {
    const lowWavelen = s.originalMaxPositionEmbeddings! / s.lowFreqFactor!;
    const highWavelen = s.originalMaxPositionEmbeddings! / s.highFreqFactor!;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / f[i];
      if (wavelen > lowWavelen) f[i] /= s.factor;
      else if (wavelen >= highWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings! / wavelen - s.lowFreqFactor!) / (s.highFreqFactor! - s.lowFreqFactor!);
        f[i] = (1 - smooth) * (f[i] / s.factor) + smooth * f[i];
      }
    }
  }
  return f;
}

function ropeHalf(v: Float64Array, heads: number, hd: number, pos: number, freq: Float64Array): void {
  const half = hd / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      const a = pos * freq[i];
      const c = Math.cos(a);
      const s = Math.sin(a);
      const x0 = v[h * hd + i];
      const x1 = v[h * hd + i + half];
      v[h * hd + i] = x0 * c - x1 * s;
      v[h * hd + i + half] = x1 * c + x0 * s;
    }
  }
}

/** Logits [tokens.length][vocab] for every position of one sequence. */
export function referenceForward(cfg: ReferenceConfig, w: Weights, tokens: readonly number[]): Float64Array[] {
  const T = tokens.length;
  const D = cfg.hiddenSize;
  const hd = cfg.headDim;
  const H = cfg.numHeads;
  const KVH = cfg.numKvHeads;
  const freq = invFreq(cfg);
  const emb = get(w, "model.embed_tokens.weight");
  let xs: Float64Array[] = tokens.map((t) => Float64Array.from({ length: D }, (_, i) => emb[t * D + i]));
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}`;
    const bias = (n: string) => (cfg.attentionBias ? get(w, `${p}.self_attn.${n}_proj.bias`) : undefined);
    const qs: Float64Array[] = [];
    const ks: Float64Array[] = [];
    const vs: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const h = rmsnorm(xs[t], get(w, `${p}.input_layernorm.weight`), cfg.rmsNormEps);
      const q = matvec(get(w, `${p}.self_attn.q_proj.weight`), h, H * hd, bias("q"));
      const k = matvec(get(w, `${p}.self_attn.k_proj.weight`), h, KVH * hd, bias("k"));
      ropeHalf(q, H, hd, t, freq);
      ropeHalf(k, KVH, hd, t, freq);
      qs.push(q);
      ks.push(k);
      vs.push(matvec(get(w, `${p}.self_attn.v_proj.weight`), h, KVH * hd, bias("v")));
    }
    const next: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const att = new Float64Array(H * hd);
      for (let h = 0; h < H; h++) {
        const kvh = Math.floor(h / (H / KVH));
        const scores = new Float64Array(t + 1);
        for (let s = 0; s <= t; s++) {
          let dot = 0;
          for (let i = 0; i < hd; i++) dot += qs[t][h * hd + i] * ks[s][kvh * hd + i];
          scores[s] = dot / Math.sqrt(hd);
        }
        const mx = Math.max(...scores);
        let sum = 0;
        for (let s = 0; s <= t; s++) sum += (scores[s] = Math.exp(scores[s] - mx));
        for (let s = 0; s <= t; s++) for (let i = 0; i < hd; i++) att[h * hd + i] += (scores[s] / sum) * vs[s][kvh * hd + i];
      }
      const x = xs[t].slice();
      const o = matvec(get(w, `${p}.self_attn.o_proj.weight`), att, D);
      for (let i = 0; i < D; i++) x[i] += o[i];
      const h2 = rmsnorm(x, get(w, `${p}.post_attention_layernorm.weight`), cfg.rmsNormEps);
      const g = matvec(get(w, `${p}.mlp.gate_proj.weight`), h2, cfg.intermediateSize);
      const u = matvec(get(w, `${p}.mlp.up_proj.weight`), h2, cfg.intermediateSize);
      for (let i = 0; i < g.length; i++) g[i] = (g[i] / (1 + Math.exp(-g[i]))) * u[i];
      const d = matvec(get(w, `${p}.mlp.down_proj.weight`), g, D);
      for (let i = 0; i < D; i++) x[i] += d[i];
      next.push(x);
    }
    xs = next;
  }
  const head = get(w, cfg.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  return xs.map((x) => matvec(head, rmsnorm(x, get(w, "model.norm.weight"), cfg.rmsNormEps), cfg.vocabSize));
}
