//! Vector helpers shared by the SIMD kernels. Zig 0.11 has no vector @floatCast /
//! @intFromFloat / @floatFromInt, so those are element loops LLVM turns into one
//! instruction each (vcvtph2ps, vcvttps2dq, vcvtdq2ps). All loads are align(1):
//! weights inside a safetensors/GGUF mapping may be only 2-byte aligned.
const std = @import("std");
const builtin = @import("builtin");

pub const L = 16; // f32 lanes per vector (one zmm; two ymm on AVX2 machines)
pub const V = @Vector(L, f32);
pub const VI = @Vector(L, i32);

pub const has_vnni512 = builtin.cpu.arch == .x86_64 and
    std.Target.x86.featureSetHas(builtin.cpu.features, .avx512vnni) and
    std.Target.x86.featureSetHas(builtin.cpu.features, .avx512bw);

pub inline fn splat(x: f32) V {
    return @splat(x);
}

pub inline fn load(p: [*]const f32) V {
    return @as(*align(1) const [L]f32, @ptrCast(p)).*;
}

pub inline fn store(p: [*]f32, v: V) void {
    @as(*align(1) [L]f32, @ptrCast(p)).* = v;
}

pub inline fn loadF16(p: [*]const u8) V {
    const h: @Vector(L, f16) = @as(*align(1) const [L]f16, @ptrCast(p)).*;
    var r: V = undefined;
    inline for (0..L) |j| r[j] = @floatCast(h[j]);
    return r;
}

/// Stores L lanes as f16, rounded to nearest even (vcvtps2ph).
pub inline fn storeF16(p: [*]u8, v: V) void {
    var h: @Vector(L, f16) = undefined;
    inline for (0..L) |j| h[j] = @floatCast(v[j]);
    @as(*align(1) [L]f16, @ptrCast(p)).* = h;
}

pub inline fn loadBF16(p: [*]const u8) V {
    const h: @Vector(L, u16) = @as(*align(1) const [L]u16, @ptrCast(p)).*;
    const w: @Vector(L, u32) = h;
    return @bitCast(w << @as(@Vector(L, u5), @splat(16)));
}

pub inline fn i2f(v: VI) V {
    var r: V = undefined;
    inline for (0..L) |j| r[j] = @floatFromInt(v[j]);
    return r;
}

pub inline fn f2i(v: V) VI {
    var r: VI = undefined;
    inline for (0..L) |j| r[j] = @intFromFloat(v[j]);
    return r;
}

pub inline fn f16At(p: [*]const u8) f32 {
    return @floatCast(@as(*align(1) const f16, @ptrCast(p)).*);
}

pub inline fn bf16At(p: [*]const u8) f32 {
    const h: u32 = @as(*align(1) const u16, @ptrCast(p)).*;
    return @bitCast(h << 16);
}

/// A broadcast of the 32 (16) bits at p that LLVM cannot see through (an empty asm), so
/// lane-wise math on it stays in vector registers: the combiner would otherwise do it
/// on the scalar and broadcast from a general register, 2 extra uops each.
pub inline fn bcast32(p: [*]const u8) @Vector(16, u32) {
    const v: @Vector(16, u32) = @splat(@as(*align(1) const u32, @ptrCast(p)).*);
    return asm ("" : [r] "=v" (-> @Vector(16, u32)) : [v] "0" (v));
}

/// The f16 at p, broadcast to 16 f32 lanes (vpbroadcastw + vcvtph2ps).
pub inline fn bcastF16(p: [*]const u8) V {
    const h: @Vector(16, u16) = @splat(@as(*align(1) const u16, @ptrCast(p)).*);
    const hv = asm ("" : [r] "=v" (-> @Vector(16, u16)) : [v] "0" (h));
    return loadF16(@ptrCast(&hv));
}

/// The lane sums of N vectors, each by the same fixed tree (halves added lane-wise: 8,
/// 4, 2, 1 lanes), so a sum does not depend on N or on its neighbours. The vectors are
/// reduced together: each round packs the halves of two vectors into one shuffle pair
/// and one add, 3 ops per pair of vectors instead of a tree per vector.
pub inline fn sumLanes(comptime N: usize, v: [N]V) [N]f32 {
    var cur = v;
    comptime var c = N;
    inline for (.{ 8, 4, 2, 1 }) |w| {
        const m = comptime halvingMasks(w);
        const nc = (c + 1) / 2;
        inline for (0..nc) |p| {
            const b = if (2 * p + 1 < c) cur[2 * p + 1] else cur[2 * p];
            cur[p] = @shuffle(f32, cur[2 * p], b, m[0]) + @shuffle(f32, cur[2 * p], b, m[1]);
        }
        c = nc;
    }
    // Lane l of cur[q] now holds the sum of vector 16q + l.
    var out: [N]f32 = undefined;
    inline for (0..N) |u| out[u] = cur[u / 16][u % 16];
    return out;
}

/// The round of sumLanes that leaves w lanes per vector: operands a, b each hold
/// 16 / (2w) vectors' partial sums of 2w lanes; the result holds a's then b's, each as
/// lane e = lane e + lane e + w of its 2w.
fn halvingMasks(comptime w: usize) [2]@Vector(16, i32) {
    const per = 16 / (2 * w);
    var lo: [16]i32 = undefined;
    var hi: [16]i32 = undefined;
    for (0..16) |l| {
        const u = l / w;
        const e = l % w;
        const j = u % per;
        const a: i32 = @intCast(2 * w * j + e);
        const b: i32 = @intCast(2 * w * j + w + e);
        lo[l] = if (u < per) a else ~a;
        hi[l] = if (u < per) b else ~b;
    }
    return .{ lo, hi };
}

/// Per 32-bit lane i: acc[i] + sum_{j<4} u[4i+j] * s[4i+j] (the vpdpbusd contract).
pub inline fn dpbusd(acc: VI, u: @Vector(64, u8), s: @Vector(64, i8)) VI {
    if (comptime has_vnni512) {
        return asm ("vpdpbusd %[s], %[u], %[acc]"
            : [acc] "=v" (-> VI),
            : [u] "v" (u),
              [s] "v" (s),
              [_] "0" (acc),
        );
    }
    const a: @Vector(64, i32) = u;
    const b: @Vector(64, i32) = s;
    const p = a * b;
    return acc + @shuffle(i32, p, undefined, lanes4(0)) + @shuffle(i32, p, undefined, lanes4(1)) +
        @shuffle(i32, p, undefined, lanes4(2)) + @shuffle(i32, p, undefined, lanes4(3));
}

/// dpbusd(acc, u, the 4 signed bytes at p + off broadcast to every lane), the
/// broadcast folded into the instruction ({1to16}).
pub inline fn dpbusdBcast(acc: VI, u: @Vector(64, u8), p: [*]const u8, comptime off: usize) VI {
    if (comptime has_vnni512) {
        return asm (std.fmt.comptimePrint("vpdpbusd {d}(%[p]){{1to16}}, %[u], %[acc]", .{off})
            : [acc] "=v" (-> VI),
            : [u] "v" (u),
              [p] "r" (p),
              [_] "0" (acc),
        );
    }
    const x: @Vector(16, u32) = @splat(@as(*align(1) const u32, @ptrCast(p + off)).*);
    return dpbusd(acc, u, @bitCast(x));
}

fn lanes4(comptime off: i32) @Vector(16, i32) {
    var m: [16]i32 = undefined;
    for (0..16) |i| m[i] = 4 * @as(i32, @intCast(i)) + off;
    return m;
}

/// exp(x) for f32 lanes: Cody-Waite range reduction + degree-6 polynomial (~2 ulp).
/// Lanes below -87.3 (incl. -inf) give 0; above 88.7 give +inf.
pub inline fn exp(x: V) V {
    const log2e = splat(1.44269504088896341);
    const hi = splat(88.7228391);
    const lo = splat(-87.3365447);
    const xc = @min(@max(x, lo), hi);
    const n = @round(xc * log2e);
    var r = @mulAdd(V, n, splat(-0.693359375), xc);
    r = @mulAdd(V, n, splat(2.12194440e-4), r);
    var p = splat(1.9875691500e-4);
    p = @mulAdd(V, p, r, splat(1.3981999507e-3));
    p = @mulAdd(V, p, r, splat(8.3334519073e-3));
    p = @mulAdd(V, p, r, splat(4.1665795894e-2));
    p = @mulAdd(V, p, r, splat(1.6666665459e-1));
    p = @mulAdd(V, p, r, splat(5.0000001201e-1));
    p = @mulAdd(V, p * r, r, r + splat(1.0));
    // 2^n: n in [-126, 128]; split in two factors so n = 128 does not overflow the exponent.
    const ni = f2i(n);
    const half = ni >> @splat(1);
    const e1: V = @bitCast((half + @as(VI, @splat(127))) << @splat(23));
    const e2: V = @bitCast((ni - half + @as(VI, @splat(127))) << @splat(23));
    const res = p * e1 * e2;
    const zero = splat(0);
    const inf = splat(std.math.inf(f32));
    return @select(f32, x < lo, zero, @select(f32, x > hi, inf, res));
}

test "vector exp matches std.math.exp" {
    var xs: V = undefined;
    var worst: f64 = 0;
    var t: f32 = -87;
    while (t < 88) : (t += 0.37) {
        inline for (0..L) |j| xs[j] = t + @as(f32, @floatFromInt(j)) * 0.021;
        const e = exp(xs);
        inline for (0..L) |j| {
            const want = @exp(@as(f64, xs[j]));
            worst = @max(worst, @fabs(e[j] - want) / want);
        }
    }
    try std.testing.expect(worst < 1e-6);
    const special = exp(V{ -std.math.inf(f32), -100, 0, 1, 100, 88, -87, 0.5, 0, 0, 0, 0, 0, 0, 0, 0 });
    try std.testing.expectEqual(@as(f32, 0), special[0]);
    try std.testing.expectEqual(@as(f32, 0), special[1]);
    try std.testing.expectEqual(@as(f32, 1), special[2]);
    try std.testing.expect(std.math.isInf(special[4]));
}

test "sumLanes adds each vector by the fixed halving tree" {
    var vs: [21]V = undefined;
    for (0..21) |q| {
        for (0..L) |l| vs[q][l] = @as(f32, @floatFromInt((q * 7 + l * 13) % 29)) * 0.37 + 1e-3 * @as(f32, @floatFromInt(l));
    }
    const got = sumLanes(21, vs);
    for (0..21) |q| {
        var h: [16]f32 = vs[q];
        var w: usize = 8;
        while (w >= 1) : (w /= 2) {
            for (0..w) |e| h[e] = h[e] + h[e + w];
        }
        try std.testing.expectEqual(h[0], got[q]);
    }
}

test "dpbusd generic matches scalar" {
    var u: [64]u8 = undefined;
    var s: [64]i8 = undefined;
    for (0..64) |i| {
        u[i] = @intCast((i * 37 + 11) % 256);
        s[i] = @intCast(@as(i32, @intCast((i * 53) % 255)) - 127);
    }
    const got = dpbusd(@splat(3), u, s);
    for (0..16) |l| {
        var want: i32 = 3;
        for (0..4) |j| want += @as(i32, u[4 * l + j]) * s[4 * l + j];
        try std.testing.expectEqual(want, got[l]);
    }
}
