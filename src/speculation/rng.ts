// Seeded pseudo-random numbers (xoshiro128**, state filled by splitmix32): the same
// seed gives the same stream on every machine, so sampling runs are reproducible.

function splitmix32(state: number): number {
  let t = (state + 0x9e3779b9) | 0;
  t = Math.imul(t ^ (t >>> 16), 0x21f0aaad);
  t = Math.imul(t ^ (t >>> 15), 0x735a2d97);
  return (t ^ (t >>> 15)) >>> 0;
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** A uniform number in [0, 1) fixed by (seed, position): the random draw of the token at
 *  `position`. Sampling every position from its own draw makes a seeded request's text
 *  independent of how its steps were batched or speculated. */
export function uniformAt(seed: number, position: number): number {
  const s = splitmix32((seed >>> 0) ^ splitmix32(Math.floor(seed / 4294967296) >>> 0));
  const p = splitmix32(s ^ splitmix32((position >>> 0) ^ 0x632be5ab));
  const q = splitmix32(p ^ splitmix32(Math.floor(position / 4294967296) ^ 0x9e3779b9));
  // Two mixed 32-bit words make the 53-bit seed of a fresh generator.
  return new Rng(p * 2097152 + (q >>> 11)).next();
}

export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** `seed`: any integer that a double holds exactly (up to 2^53). */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new Error(`rng: seed must be a safe integer, got ${seed}`);
    // Both halves of the seed feed the state, so seeds above 2^32 stay distinct.
    let mix = splitmix32((seed >>> 0) ^ splitmix32(Math.floor(seed / 4294967296) >>> 0));
    this.s0 = mix = splitmix32(mix);
    this.s1 = mix = splitmix32(mix);
    this.s2 = mix = splitmix32(mix);
    this.s3 = splitmix32(mix) | 1; // never the all-zero state
  }

  /** Uniform 32-bit unsigned integer. */
  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  next(): number {
    const high = this.nextUint32() >>> 5; // 27 bits
    const low = this.nextUint32() >>> 6; // 26 bits
    return (high * 67108864 + low) / 9007199254740992;
  }

  /** The generator's state, to carry it to another thread and back (`state = ...`). */
  get state(): [number, number, number, number] {
    return [this.s0, this.s1, this.s2, this.s3];
  }

  set state([s0, s1, s2, s3]: readonly number[]) {
    this.s0 = s0;
    this.s1 = s1;
    this.s2 = s2;
    this.s3 = s3;
  }
}
