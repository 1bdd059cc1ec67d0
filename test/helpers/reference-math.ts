// Float64 functions for reference forwards that Math lacks.

/** erf by its Maclaurin series for |x| < 3 (f64 cancellation below 1e-12), by the
 *  continued fraction of erfc beyond. */
export function erf(x: number): number {
  if (Math.abs(x) >= 3) return Math.sign(x) * (1 - erfcTail(Math.abs(x)));
  let term = x;
  let sum = x;
  for (let n = 1; n < 200; n++) {
    term *= (-x * x) / n;
    const add = term / (2 * n + 1);
    sum += add;
    if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}

export const gelu = (x: number) => 0.5 * x * (1 + erf(x / Math.SQRT2));
export const geluTanh = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
export const relu = (x: number) => Math.max(x, 0);

/** LayerNorm of one row in float64 (biased variance). */
export function layerNorm(x: ArrayLike<number>, w: ArrayLike<number>, b: ArrayLike<number> | null, eps: number): Float64Array {
  const n = x.length;
  let mean = 0;
  for (let i = 0; i < n; i++) mean += x[i]!;
  mean /= n;
  let v = 0;
  for (let i = 0; i < n; i++) v += (x[i]! - mean) ** 2;
  const inv = 1 / Math.sqrt(v / n + eps);
  return Float64Array.from({ length: n }, (_, i) => (x[i]! - mean) * inv * w[i]! + (b ? b[i]! : 0));
}

/** erfc(x) for x >= 3: e^(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...)))),
 *  evaluated from the 80th level back. */
function erfcTail(x: number): number {
  let k = x;
  for (let n = 80; n >= 1; n--) k = x + n / 2 / k;
  return Math.exp(-x * x) / Math.sqrt(Math.PI) / k;
}
