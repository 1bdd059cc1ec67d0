// Fresh random data for kernel tests: a new seed each run, printed in failure messages;
// SEED=<n> in the environment repeats a run.

export const SEED = process.env.SEED ? Number(process.env.SEED) : (Date.now() ^ (Math.random() * 2 ** 31)) >>> 0;

/** mulberry32: small, fast, good enough for test data. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const rand = rng(SEED);
export const uniform = (lo = -1, hi = 1) => lo + (hi - lo) * rand();
export const randInt = (n: number) => Math.floor(rand() * n);

export function randF32(count: number, scale = 1): Float32Array {
  const a = new Float32Array(count);
  for (let i = 0; i < count; i++) a[i] = uniform(-scale, scale);
  return a;
}

export function shuffle<T>(a: T[]): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = randInt(i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}
