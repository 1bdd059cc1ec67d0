//! Elementwise and per-row kernels: rmsnorm, rope, swiglu, add, softmax, argmax.
//! Each has a scalar reference (f64 where it matters) and a @Vector version; all work
//! on a row or element range so the caller can split them over threads.
const std = @import("std");
const s = @import("simd.zig");
const V = s.V;
const L = s.L;

// ---- rmsnorm ------------------------------------------------------------------------

pub fn rmsnormRef(x: [*]const f32, w: [*]const f32, dim: usize, eps: f32, y: [*]f32) void {
    var ss: f64 = 0;
    for (0..dim) |i| ss += @as(f64, x[i]) * x[i];
    const scale = 1.0 / @sqrt(ss / @as(f64, @floatFromInt(dim)) + eps);
    for (0..dim) |i| y[i] = @floatCast(x[i] * scale * w[i]);
}

pub fn rmsnorm(x: [*]const f32, w: [*]const f32, dim: usize, eps: f32, y: [*]f32) void {
    var a0 = s.splat(0);
    var a1 = s.splat(0);
    var i: usize = 0;
    while (i + 2 * L <= dim) : (i += 2 * L) {
        const v0 = s.load(x + i);
        const v1 = s.load(x + i + L);
        a0 = @mulAdd(V, v0, v0, a0);
        a1 = @mulAdd(V, v1, v1, a1);
    }
    var ss = @reduce(.Add, a0 + a1);
    while (i < dim) : (i += 1) ss += x[i] * x[i];
    const scale: f32 = 1.0 / @sqrt(ss / @as(f32, @floatFromInt(dim)) + eps);
    const sv = s.splat(scale);
    i = 0;
    while (i + L <= dim) : (i += L) s.store(y + i, s.load(x + i) * sv * s.load(w + i));
    while (i < dim) : (i += 1) y[i] = x[i] * scale * w[i];
}

// ---- rope ---------------------------------------------------------------------------

/// cos/sin of angle pos * inv_freq[j] (the angle in f32, as HF computes it). libm's
/// f32 sin/cos reduce the argument exactly, so they are within an ulp of the f64 values
/// at about half their cost.
pub fn ropeAngles(pos: i32, inv_freq: [*]const f32, half: usize, cs: [*]f32, sn: [*]f32) void {
    const p: f32 = @floatFromInt(pos);
    for (0..half) |j| {
        const ang: f32 = p * inv_freq[j];
        cs[j] = @cos(ang);
        sn[j] = @sin(ang);
    }
}

/// Rotates one token's heads in place. interleaved: pairs (2j, 2j+1); else (j, j + half).
pub fn ropeRef(x: [*]f32, n_heads: usize, head_dim: usize, rot_dim: usize, pos: i32, inv_freq: [*]const f32, interleaved: bool) void {
    const half = rot_dim / 2;
    const p: f32 = @floatFromInt(pos);
    for (0..n_heads) |h| {
        const xh = x + h * head_dim;
        for (0..half) |j| {
            const ang: f64 = p * inv_freq[j];
            const c = @cos(ang);
            const sn = @sin(ang);
            const ia = if (interleaved) 2 * j else j;
            const ib = if (interleaved) 2 * j + 1 else j + half;
            const a: f64 = xh[ia];
            const b: f64 = xh[ib];
            xh[ia] = @floatCast(a * c - b * sn);
            xh[ib] = @floatCast(a * sn + b * c);
        }
    }
}

pub fn rope(x: [*]f32, n_heads: usize, head_dim: usize, rot_dim: usize, cs: [*]const f32, sn: [*]const f32, interleaved: bool) void {
    const half = rot_dim / 2;
    for (0..n_heads) |h| {
        const xh = x + h * head_dim;
        if (interleaved) {
            // Adjacent pairs: the scalar loop is short (rot_dim / 2) and LLVM vectorizes it.
            for (0..half) |j| {
                const a = xh[2 * j];
                const b = xh[2 * j + 1];
                xh[2 * j] = a * cs[j] - b * sn[j];
                xh[2 * j + 1] = a * sn[j] + b * cs[j];
            }
        } else {
            var j: usize = 0;
            while (j + L <= half) : (j += L) {
                const a = s.load(xh + j);
                const b = s.load(xh + j + half);
                const c = s.load(cs + j);
                const sv = s.load(sn + j);
                s.store(xh + j, a * c - b * sv);
                s.store(xh + j + half, @mulAdd(V, a, sv, b * c));
            }
            while (j < half) : (j += 1) {
                const a = xh[j];
                const b = xh[j + half];
                xh[j] = a * cs[j] - b * sn[j];
                xh[j + half] = a * sn[j] + b * cs[j];
            }
        }
    }
}

// ---- swiglu / add -------------------------------------------------------------------

pub fn swigluRef(gate: [*]const f32, up: [*]const f32, out: [*]f32, b: usize, e: usize) void {
    for (b..e) |i| {
        const g: f64 = gate[i];
        out[i] = @floatCast(g / (1.0 + @exp(-g)) * up[i]);
    }
}

pub fn swiglu(gate: [*]const f32, up: [*]const f32, out: [*]f32, b: usize, e: usize) void {
    var i = b;
    while (i + L <= e) : (i += L) {
        const g = s.load(gate + i);
        s.store(out + i, g / (s.splat(1) + s.exp(-g)) * s.load(up + i));
    }
    while (i < e) : (i += 1) out[i] = gate[i] / (1 + @exp(-gate[i])) * up[i];
}

pub fn addRef(x: [*]f32, y: [*]const f32, b: usize, e: usize) void {
    for (b..e) |i| x[i] += y[i];
}

pub fn add(x: [*]f32, y: [*]const f32, b: usize, e: usize) void {
    var i = b;
    while (i + L <= e) : (i += L) s.store(x + i, s.load(x + i) + s.load(y + i));
    while (i < e) : (i += 1) x[i] += y[i];
}

// ---- softmax / argmax ---------------------------------------------------------------

pub fn softmaxRef(x: [*]f32, n: usize, inv_t: f32) void {
    var mx: f64 = -std.math.inf(f64);
    for (0..n) |i| mx = @max(mx, @as(f64, x[i]) * inv_t);
    var sum: f64 = 0;
    for (0..n) |i| sum += @exp(@as(f64, x[i]) * inv_t - mx);
    for (0..n) |i| x[i] = @floatCast(@exp(@as(f64, x[i]) * inv_t - mx) / sum);
}

pub fn softmax(x: [*]f32, n: usize, inv_t: f32) void {
    const it = s.splat(inv_t);
    var mv = s.splat(-std.math.inf(f32));
    var i: usize = 0;
    while (i + L <= n) : (i += L) mv = @max(mv, s.load(x + i) * it);
    var mx = @reduce(.Max, mv);
    while (i < n) : (i += 1) mx = @max(mx, x[i] * inv_t);
    const mxv = s.splat(mx);
    var sv = s.splat(0);
    i = 0;
    while (i + L <= n) : (i += L) {
        const e = s.exp(s.load(x + i) * it - mxv);
        s.store(x + i, e);
        sv += e;
    }
    var sum = @reduce(.Add, sv);
    while (i < n) : (i += 1) {
        x[i] = @exp(x[i] * inv_t - mx);
        sum += x[i];
    }
    const inv = s.splat(1 / sum);
    i = 0;
    while (i + L <= n) : (i += L) s.store(x + i, s.load(x + i) * inv);
    while (i < n) : (i += 1) x[i] /= sum;
}

pub fn argmaxRef(x: [*]const f32, n: usize) i32 {
    var best: usize = 0;
    for (1..n) |i| {
        if (x[i] > x[best]) best = i;
    }
    return @intCast(best);
}

/// Vector max first, then the first index holding it (lowest index on ties).
pub fn argmax(x: [*]const f32, n: usize) i32 {
    var mv = s.splat(-std.math.inf(f32));
    var i: usize = 0;
    while (i + L <= n) : (i += L) mv = @max(mv, s.load(x + i));
    var mx = @reduce(.Max, mv);
    while (i < n) : (i += 1) mx = @max(mx, x[i]);
    const mxv = s.splat(mx);
    i = 0;
    while (i + L <= n) : (i += L) {
        if (@reduce(.Or, s.load(x + i) == mxv)) break;
    }
    while (i < n) : (i += 1) {
        if (x[i] == mx) return @intCast(i);
    }
    return 0; // all NaN
}

// ---- layernorm ----------------------------------------------------------------------

/// y = (x - mean) / sqrt(var + eps) * w (+ b), biased variance, in f64.
pub fn layernormRef(x: [*]const f32, w: [*]const f32, b: ?[*]const f32, dim: usize, eps: f32, y: [*]f32) void {
    const nd: f64 = @floatFromInt(dim);
    var sum: f64 = 0;
    for (0..dim) |i| sum += x[i];
    const mean = sum / nd;
    var ss: f64 = 0;
    for (0..dim) |i| ss += (x[i] - mean) * (x[i] - mean);
    const inv = 1.0 / @sqrt(ss / nd + eps);
    for (0..dim) |i| {
        const v = (x[i] - mean) * inv * w[i];
        y[i] = @floatCast(if (b) |bb| v + bb[i] else v);
    }
}

/// Two vector passes (mean, then the centered sum of squares), then the write.
pub fn layernorm(x: [*]const f32, w: [*]const f32, b: ?[*]const f32, dim: usize, eps: f32, y: [*]f32) void {
    const nd: f32 = @floatFromInt(dim);
    var sv = s.splat(0);
    var i: usize = 0;
    while (i + L <= dim) : (i += L) sv += s.load(x + i);
    var sum = @reduce(.Add, sv);
    while (i < dim) : (i += 1) sum += x[i];
    const mean = sum / nd;
    const mv = s.splat(mean);
    var qv = s.splat(0);
    i = 0;
    while (i + L <= dim) : (i += L) {
        const d = s.load(x + i) - mv;
        qv = @mulAdd(V, d, d, qv);
    }
    var ss = @reduce(.Add, qv);
    while (i < dim) : (i += 1) ss += (x[i] - mean) * (x[i] - mean);
    const inv: f32 = 1.0 / @sqrt(ss / nd + eps);
    const iv = s.splat(inv);
    i = 0;
    while (i + L <= dim) : (i += L) {
        const v = (s.load(x + i) - mv) * iv * s.load(w + i);
        s.store(y + i, if (b) |bb| v + s.load(bb + i) else v);
    }
    while (i < dim) : (i += 1) {
        const v = (x[i] - mean) * inv * w[i];
        y[i] = if (b) |bb| v + bb[i] else v;
    }
}

// ---- clamp --------------------------------------------------------------------------

pub fn clampRef(x: [*]f32, limit: f32, b: usize, e: usize) void {
    for (b..e) |i| x[i] = if (x[i] > limit) limit else if (x[i] < -limit) -limit else x[i];
}

pub fn clamp(x: [*]f32, limit: f32, b: usize, e: usize) void {
    const hi = s.splat(limit);
    var i = b;
    while (i + L <= e) : (i += L) s.store(x + i, @min(@max(s.load(x + i), -hi), hi));
    while (i < e) : (i += 1) x[i] = @min(@max(x[i], -limit), limit);
}

// ---- activations --------------------------------------------------------------------

/// ffi/specinfer.h si_activation kinds.
pub const Activation = enum(i32) { relu = 0, gelu = 1, gelu_tanh = 2 };

extern "c" fn erf(x: f64) f64;

const sqrt_2_over_pi: f64 = 0.7978845608028654;

pub fn activationRef(kind: Activation, x: [*]const f32, out: [*]f32, b: usize, e: usize) void {
    for (b..e) |i| {
        const v: f64 = x[i];
        out[i] = @floatCast(switch (kind) {
            .relu => @max(v, 0),
            .gelu => 0.5 * v * (1 + erf(v / std.math.sqrt2)),
            .gelu_tanh => 0.5 * v * (1 + std.math.tanh(sqrt_2_over_pi * (v + 0.044715 * v * v * v))),
        });
    }
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), odd-extended.
inline fn erfV(x: V) V {
    const ax = @fabs(x);
    const t = s.splat(1) / (s.splat(1) + s.splat(0.3275911) * ax);
    var p = s.splat(1.061405429);
    p = @mulAdd(V, p, t, s.splat(-1.453152027));
    p = @mulAdd(V, p, t, s.splat(1.421413741));
    p = @mulAdd(V, p, t, s.splat(-0.284496736));
    p = @mulAdd(V, p, t, s.splat(0.254829592));
    const y = s.splat(1) - p * t * s.exp(-ax * ax);
    return @select(f32, x < s.splat(0), -y, y);
}

/// tanh(u) = 1 - 2 / (e^(2u) + 1): exp overflow to inf gives 1, underflow gives -1.
inline fn tanhV(u: V) V {
    return s.splat(1) - s.splat(2) / (s.exp(u + u) + s.splat(1));
}

inline fn activationV(comptime kind: Activation, v: V) V {
    return switch (kind) {
        .relu => @max(v, s.splat(0)),
        .gelu => s.splat(0.5) * v * (s.splat(1) + erfV(v * s.splat(std.math.sqrt1_2))),
        .gelu_tanh => s.splat(0.5) * v * (s.splat(1) + tanhV(s.splat(@floatCast(sqrt_2_over_pi)) * @mulAdd(V, s.splat(0.044715) * v * v, v, v))),
    };
}

pub fn activation(comptime kind: Activation, x: [*]const f32, out: [*]f32, b: usize, e: usize) void {
    var i = b;
    while (i + L <= e) : (i += L) s.store(out + i, activationV(kind, s.load(x + i)));
    if (i < e) {
        var tail: [L]f32 = .{0} ** L;
        for (i..e) |j| tail[j - i] = x[j];
        const r: [L]f32 = activationV(kind, tail);
        for (i..e) |j| out[j] = r[j - i];
    }
}
