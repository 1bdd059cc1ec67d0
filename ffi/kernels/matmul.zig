//! Weight dtypes, row dequantization (embedding) and matmul kernels.
//!
//! Matmul y[n, m] = x[n, k] . W[m, k]^T works on a range of weight rows at a time and,
//! for each block of 4 rows, loops over all n tokens while the rows sit in L1: every
//! weight byte streams from memory once per call however many tokens the batch has
//! (this is what makes verifying a token tree about as cheap as decoding one token).
//!
//! Quantized weights use integer dot products: the activations are quantized once per
//! call to 8-bit blocks of 32 with an f32 scale (`quantizeRows`), then each weight
//! block contributes d_w * d_x * sum(q_w * q_x). The SIMD path feeds vpdpbusd
//! (u8 x i8 -> i32, AVX-512 VNNI):
//!   Q8_0: x is stored as u8 = q_x + 128 and the 128 * sum(q_w) excess is removed with a
//!         per-row correction computed once per weight block (shared by all tokens);
//!   Q4_0: the weight nibble (0..15) is the u8 operand and x stays i8; the -8 offset is
//!         a per-token correction -8 * sum(q_x) computed at quantization time.
//! The reference path does the same integer math with scalar loops (same quantization,
//! exact integer dots), so SIMD and reference agree to float rounding.
const std = @import("std");
const s = @import("simd.zig");
const V = s.V;
const VI = s.VI;
const L = s.L;

pub const DType = enum(i32) { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };

pub fn dtypeFrom(v: i32) ?DType {
    return switch (v) {
        0 => .f32,
        1 => .f16,
        2 => .q4_0,
        8 => .q8_0,
        30 => .bf16,
        else => null,
    };
}

pub fn dtypeName(d: DType) []const u8 {
    return switch (d) {
        .f32 => "F32",
        .f16 => "F16",
        .q4_0 => "Q4_0",
        .q8_0 => "Q8_0",
        .bf16 => "BF16",
    };
}

pub fn isQuant(d: DType) bool {
    return d == .q4_0 or d == .q8_0;
}

/// Bytes of one row of `k` elements (k a multiple of 32 for quantized types).
pub fn rowBytes(d: DType, k: usize) usize {
    return switch (d) {
        .f32 => k * 4,
        .f16, .bf16 => k * 2,
        .q8_0 => k / 32 * 34,
        .q4_0 => k / 32 * 18,
    };
}

// ---- row dequantization (embedding) -------------------------------------------------

pub fn dequantRowRef(d: DType, src: [*]const u8, k: usize, dst: [*]f32) void {
    switch (d) {
        .f32 => for (0..k) |i| {
            dst[i] = @as(*align(1) const f32, @ptrCast(src + 4 * i)).*;
        },
        .f16 => for (0..k) |i| {
            dst[i] = s.f16At(src + 2 * i);
        },
        .bf16 => for (0..k) |i| {
            dst[i] = s.bf16At(src + 2 * i);
        },
        .q8_0 => for (0..k / 32) |b| {
            const blk = src + b * 34;
            const dd = s.f16At(blk);
            for (0..32) |j| dst[b * 32 + j] = @as(f32, @floatFromInt(@as(i8, @bitCast(blk[2 + j])))) * dd;
        },
        .q4_0 => for (0..k / 32) |b| {
            const blk = src + b * 18;
            const dd = s.f16At(blk);
            for (0..16) |j| {
                const lo: i32 = blk[2 + j] & 15;
                const hi: i32 = blk[2 + j] >> 4;
                dst[b * 32 + j] = @as(f32, @floatFromInt(lo - 8)) * dd;
                dst[b * 32 + j + 16] = @as(f32, @floatFromInt(hi - 8)) * dd;
            }
        },
    }
}

pub fn dequantRow(d: DType, src: [*]const u8, k: usize, dst: [*]f32) void {
    switch (d) {
        inline .f32, .f16, .bf16 => |fd| {
            var i: usize = 0;
            while (i + L <= k) : (i += L) s.store(dst + i, loadW(fd, src, i));
            if (i < k) dequantRowRef(fd, src + rowBytes(fd, i), k - i, dst + i);
        },
        .q8_0 => for (0..k / 32) |b| {
            const blk = src + b * 34;
            const dd = s.splat(s.f16At(blk));
            inline for (0..2) |h| {
                const q: @Vector(16, i8) = @as(*align(1) const [16]i8, @ptrCast(blk + 2 + 16 * h)).*;
                s.store(dst + b * 32 + 16 * h, s.i2f(q) * dd);
            }
        },
        .q4_0 => for (0..k / 32) |b| {
            const blk = src + b * 18;
            const dd = s.splat(s.f16At(blk));
            const q: @Vector(16, u8) = @as(*align(1) const [16]u8, @ptrCast(blk + 2)).*;
            const lo: VI = q & @as(@Vector(16, u8), @splat(15));
            const hi: VI = q >> @splat(4);
            const eight: VI = @splat(8);
            s.store(dst + b * 32, s.i2f(lo - eight) * dd);
            s.store(dst + b * 32 + 16, s.i2f(hi - eight) * dd);
        },
    }
}

inline fn loadW(comptime d: DType, row: [*]const u8, i: usize) V {
    return switch (d) {
        .f32 => @as(*align(1) const [L]f32, @ptrCast(row + 4 * i)).*,
        .f16 => s.loadF16(row + 2 * i),
        .bf16 => s.loadBF16(row + 2 * i),
        else => unreachable,
    };
}

// ---- activation quantization (scratch owned by the context) ------------------------

/// Quantized activations of n rows of k: q (k + 64 bytes a row, padded so a 64-byte
/// load at the last odd block stays inside), the scale per block (reference path),
/// the same scales repeated per dpbusd lane (SIMD path: one load per block pair), and
/// for Q4_0 the per-lane correction -8 * sum of 4 q's. Padding is zeroed.
pub const QAct = struct {
    q: [*]u8,
    sc: [*]f32,
    scl: [*]f32,
    corr: [*]i32,
    k: usize,

    pub fn qStride(k: usize) usize {
        return k + 64;
    }
    pub fn scStride(k: usize) usize {
        return k / 32 + 2;
    }
    /// Block scales repeated over the 8 dpbusd lanes of their block, one block of padding.
    pub fn sclStride(k: usize) usize {
        return (k / 32 + 2) * 8;
    }
    pub fn corrStride(k: usize) usize {
        return k / 4 + 16;
    }
    /// Scratch bytes needed for n rows (each region 64-byte aligned).
    pub fn bytes(n: usize, k: usize) usize {
        return alignUp(n * qStride(k)) + alignUp(n * scStride(k) * 4) + alignUp(n * sclStride(k) * 4) +
            alignUp(n * corrStride(k) * 4);
    }
    pub fn carve(base: [*]align(64) u8, n: usize, k: usize) QAct {
        const o1 = alignUp(n * qStride(k));
        const o2 = o1 + alignUp(n * scStride(k) * 4);
        const o3 = o2 + alignUp(n * sclStride(k) * 4);
        return .{
            .q = base,
            .sc = @ptrCast(@alignCast(base + o1)),
            .scl = @ptrCast(@alignCast(base + o2)),
            .corr = @ptrCast(@alignCast(base + o3)),
            .k = k,
        };
    }
    fn alignUp(x: usize) usize {
        return (x + 63) & ~@as(usize, 63);
    }
};

/// Same block math for both paths: d = amax / 127, q = round(x * (1 / d)).
inline fn blockScale(amax: f32) [2]f32 {
    const d = amax / 127.0;
    return .{ d, if (d != 0) 1.0 / d else 0.0 };
}

/// Quantizes activation rows [r0, r1) of x[., k] for weights of dtype `wd`.
pub fn quantizeRows(comptime reference: bool, wd: DType, x: [*]const f32, k: usize, qa: QAct, r0: usize, r1: usize) void {
    const nb = k / 32;
    const flip: u8 = if (wd == .q8_0) 0x80 else 0; // Q8_0 path wants u8 = q + 128
    for (r0..r1) |r| {
        const xr = x + r * k;
        const q = qa.q + r * QAct.qStride(k);
        const sc = qa.sc + r * QAct.scStride(k);
        const corr = qa.corr + r * QAct.corrStride(k);
        const scl = qa.scl + r * QAct.sclStride(k);
        for (0..nb) |b| {
            const xb = xr + b * 32;
            if (reference) {
                var amax: f32 = 0;
                for (0..32) |j| amax = @max(amax, @fabs(xb[j]));
                const ds = blockScale(amax);
                sc[b] = ds[0];
                for (0..32) |j| {
                    const v: i32 = @intFromFloat(@round(xb[j] * ds[1]));
                    const qi: i8 = @intCast(std.math.clamp(v, -127, 127));
                    q[b * 32 + j] = @as(u8, @bitCast(qi)) ^ flip;
                }
                if (wd == .q4_0) for (0..8) |l| {
                    var sum: i32 = 0;
                    for (0..4) |j| sum += @as(i8, @bitCast(q[b * 32 + 4 * l + j]));
                    corr[b * 8 + l] = -8 * sum;
                };
            } else {
                const v0 = s.load(xb);
                const v1 = s.load(xb + 16);
                const amax = @reduce(.Max, @max(@fabs(v0), @fabs(v1)));
                const ds = blockScale(amax);
                sc[b] = ds[0];
                const id = s.splat(ds[1]);
                const lim: VI = @splat(127);
                const q0 = @min(@max(s.f2i(@round(v0 * id)), -lim), lim);
                const q1 = @min(@max(s.f2i(@round(v1 * id)), -lim), lim);
                const qv: @Vector(32, i8) = @truncate(concat(i32, 16, q0, q1));
                const ub: @Vector(32, u8) = @as(@Vector(32, u8), @bitCast(qv)) ^ @as(@Vector(32, u8), @splat(flip));
                @as(*align(1) [32]u8, @ptrCast(q + b * 32)).* = ub;
                if (wd == .q4_0) {
                    const w: @Vector(32, i32) = qv;
                    var sums: @Vector(8, i32) = @splat(0);
                    inline for (0..4) |j| sums += @shuffle(i32, w, undefined, stride4(j));
                    @as(*align(1) [8]i32, @ptrCast(corr + b * 8)).* = sums * @as(@Vector(8, i32), @splat(-8));
                }
            }
        }
        // Padding read by the odd-block tail of the SIMD kernel: keep it finite.
        for (0..nb) |b| @memset(scl[b * 8 .. b * 8 + 8], sc[b]);
        @memset(scl[nb * 8 .. nb * 8 + 16], 0);
        sc[nb] = 0;
        sc[nb + 1] = 0;
        @memset(q[k .. k + 64], 0);
        if (wd == .q4_0) @memset(corr[k / 4 .. k / 4 + 16], 0);
    }
}

fn stride4(comptime off: usize) @Vector(8, i32) {
    var m: [8]i32 = undefined;
    for (0..8) |i| m[i] = @intCast(4 * i + off);
    return m;
}

fn concatMask(comptime n: usize) @Vector(2 * n, i32) {
    var m: [2 * n]i32 = undefined;
    for (0..n) |i| {
        m[i] = @intCast(i);
        m[n + i] = ~@as(i32, @intCast(i));
    }
    return m;
}

inline fn concat(comptime T: type, comptime n: usize, a: @Vector(n, T), b: @Vector(n, T)) @Vector(2 * n, T) {
    return @shuffle(T, a, b, concatMask(n));
}

// ---- matmul ------------------------------------------------------------------------

pub const MatArgs = struct {
    x: [*]const f32,
    n: usize,
    k: usize,
    w: [*]const u8,
    dtype: DType,
    m: usize,
    bias: ?[*]const f32,
    y: [*]f32,
    qa: QAct, // quantized x (quantized dtypes only)
};

/// Scalar reference: f64 accumulation for float weights, exact integer block dots for
/// quantized ones.
pub fn matmulRowsRef(a: *const MatArgs, r0: usize, r1: usize) void {
    const rb = rowBytes(a.dtype, a.k);
    for (r0..r1) |r| {
        const wr = a.w + r * rb;
        for (0..a.n) |t| {
            var acc: f64 = 0;
            switch (a.dtype) {
                .f32, .f16, .bf16 => {
                    const xr = a.x + t * a.k;
                    for (0..a.k) |i| {
                        const wv: f32 = switch (a.dtype) {
                            .f32 => @as(*align(1) const f32, @ptrCast(wr + 4 * i)).*,
                            .f16 => s.f16At(wr + 2 * i),
                            else => s.bf16At(wr + 2 * i),
                        };
                        acc += @as(f64, wv) * xr[i];
                    }
                },
                .q8_0, .q4_0 => {
                    const q = a.qa.q + t * QAct.qStride(a.k);
                    const sc = a.qa.sc + t * QAct.scStride(a.k);
                    const bs: usize = if (a.dtype == .q8_0) 34 else 18;
                    for (0..a.k / 32) |b| {
                        const blk = wr + b * bs;
                        var dot: i32 = 0;
                        for (0..32) |j| {
                            const wq: i32 = if (a.dtype == .q8_0)
                                @as(i8, @bitCast(blk[2 + j]))
                            else if (j < 16) @as(i32, blk[2 + j] & 15) - 8 else @as(i32, blk[2 + j - 16] >> 4) - 8;
                            const xq: i32 = if (a.dtype == .q8_0)
                                @as(i32, q[b * 32 + j]) - 128
                            else
                                @as(i8, @bitCast(q[b * 32 + j]));
                            dot += wq * xq;
                        }
                        acc += @as(f64, s.f16At(blk) * sc[b]) * @as(f64, @floatFromInt(dot));
                    }
                },
            }
            if (a.bias) |bias| acc += bias[r];
            a.y[t * a.m + r] = @floatCast(acc);
        }
    }
}

pub fn matmulRows(a: *const MatArgs, r0: usize, r1: usize) void {
    switch (a.dtype) {
        inline else => |d| matmulRowsT(d, a, r0, r1),
    }
}

fn matmulRowsT(comptime d: DType, a: *const MatArgs, r0: usize, r1: usize) void {
    // Register tiles of 4 weight rows x 4 tokens (x 1 token for the rest): each weight
    // vector loaded feeds 4 tokens and each activation vector 4 rows, which keeps the
    // activations of a 16-token batch from streaming out of L2 once per weight row.
    var r = r0;
    while (r + 4 <= r1) : (r += 4) rowBlock(d, 4, a, r);
    while (r < r1) : (r += 1) rowBlock(d, 1, a, r);
}

inline fn rowBlock(comptime d: DType, comptime R: usize, a: *const MatArgs, r: usize) void {
    var t: usize = 0;
    while (t + 4 <= a.n) : (t += 4) {
        if (comptime isQuant(d) and R == 4) {
            // 2 x 4 tiles: 4 x 4 int8 tiles need more than 32 vector registers.
            tile(d, 2, 4, a, r, t);
            tile(d, 2, 4, a, r + 2, t);
        } else tile(d, R, 4, a, r, t);
    }
    while (t < a.n) : (t += 1) tile(d, R, 1, a, r, t);
}

/// R weight rows from r against T tokens from t0.
inline fn tile(comptime d: DType, comptime R: usize, comptime T: usize, a: *const MatArgs, r: usize, t0: usize) void {
    var out: [R][T]f32 = undefined;
    const rb = rowBytes(d, a.k);
    var wr: [R][*]const u8 = undefined;
    inline for (0..R) |i| wr[i] = a.w + (r + i) * rb;
    switch (d) {
        .f32, .f16, .bf16 => {
            var x: [T][*]const f32 = undefined;
            inline for (0..T) |j| x[j] = a.x + (t0 + j) * a.k;
            floatTile(d, R, T, wr, x, a.k, R * rb, &out);
        },
        .q8_0, .q4_0 => {
            var q: [T][*]const u8 = undefined;
            var scl: [T][*]const f32 = undefined;
            var corr: [T][*]const i32 = undefined;
            inline for (0..T) |j| {
                q[j] = a.qa.q + (t0 + j) * QAct.qStride(a.k);
                scl[j] = a.qa.scl + (t0 + j) * QAct.sclStride(a.k);
                corr[j] = a.qa.corr + (t0 + j) * QAct.corrStride(a.k);
            }
            quantTile(d, R, T, wr, q, scl, corr, a.k / 32, R * rb, &out);
        },
    }
    inline for (0..R) |i| {
        const b: f32 = if (a.bias) |bias| bias[r + i] else 0;
        inline for (0..T) |j| a.y[(t0 + j) * a.m + r + i] = out[i][j] + b;
    }
}

fn floatTile(comptime d: DType, comptime R: usize, comptime T: usize, wr: [R][*]const u8, x: [T][*]const f32, k: usize, ahead: usize, out: *[R][T]f32) void {
    var acc: [R][T]V = .{.{s.splat(0)} ** T} ** R;
    var i: usize = 0;
    while (i + L <= k) : (i += L) {
        var w: [R]V = undefined;
        inline for (0..R) |ri| {
            w[ri] = loadW(d, wr[ri], i);
            prefetch(wr[ri] + rowBytes(d, i) + ahead);
        }
        inline for (0..T) |j| {
            const xv = s.load(x[j] + i);
            inline for (0..R) |ri| acc[ri][j] = @mulAdd(V, xv, w[ri], acc[ri][j]);
        }
    }
    inline for (0..R) |ri| {
        inline for (0..T) |j| {
            var tot = @reduce(.Add, acc[ri][j]);
            var ii = i;
            while (ii < k) : (ii += 1) {
                const wv: f32 = switch (d) {
                    .f32 => @as(*align(1) const f32, @ptrCast(wr[ri] + 4 * ii)).*,
                    .f16 => s.f16At(wr[ri] + 2 * ii),
                    else => s.bf16At(wr[ri] + 2 * ii),
                };
                tot += wv * x[j][ii];
            }
            out[ri][j] = tot;
        }
    }
}

/// A row block holds 4 short row streams that the hardware prefetcher picks up late;
/// fetch the same spot of the next row block (`ahead` bytes on) while this one runs.
inline fn prefetch(p: [*]const u8) void {
    @prefetch(p, .{ .rw = .read, .locality = 2, .cache = .data });
}

const lo8 = blk: {
    var m: @Vector(16, bool) = undefined;
    for (0..16) |i| m[i] = i < 8;
    break :blk m;
};

/// f32 lanes 0-7 = a, 8-15 = b: the scales of two consecutive blocks, matching the
/// lane layout of dpbusd over 64 bytes (lane l covers bytes 4l..4l+3).
inline fn pair(a: f32, b: f32) V {
    return @select(f32, lo8, s.splat(a), s.splat(b));
}

fn quantTile(comptime d: DType, comptime R: usize, comptime T: usize, wr: [R][*]const u8, q: [T][*]const u8, scl: [T][*]const f32, corr: [T][*]const i32, nb: usize, ahead: usize, out: *[R][T]f32) void {
    var acc: [R][T]V = .{.{s.splat(0)} ** T} ** R;
    var b: usize = 0;
    while (b + 2 <= nb) : (b += 2) quantStep(d, R, T, false, wr, q, scl, corr, b, ahead, &acc);
    if (b < nb) quantStep(d, R, T, true, wr, q, scl, corr, b, ahead, &acc);
    inline for (0..R) |ri| {
        inline for (0..T) |j| out[ri][j] = @reduce(.Add, acc[ri][j]);
    }
}

/// Blocks b and b+1 (only b when `last`; the other half of the lanes then sees
/// zero weights and zero scales) of R rows against T tokens.
inline fn quantStep(comptime d: DType, comptime R: usize, comptime T: usize, comptime last: bool, wr: [R][*]const u8, q: [T][*]const u8, scl: [T][*]const f32, corr: [T][*]const i32, b: usize, ahead: usize, acc: *[R][T]V) void {
    const bs: usize = if (d == .q8_0) 34 else 18;
    var sw: [R]V = undefined;
    var w8: [R]@Vector(64, i8) = undefined; // Q8_0 weights (signed operand)
    var base: [R]VI = undefined; // Q8_0: -128 * sum(q_w) per lane
    var w4: [R]@Vector(64, u8) = undefined; // Q4_0 nibbles (unsigned operand)
    inline for (0..R) |ri| {
        const p0 = wr[ri] + b * bs;
        const p1 = p0 + bs;
        prefetch(p0 + ahead);
        prefetch(p0 + ahead + 64);
        sw[ri] = pair(s.f16At(p0), if (last) 0 else s.f16At(p1));
        if (d == .q8_0) {
            const w0: @Vector(32, i8) = @as(*align(1) const [32]i8, @ptrCast(p0 + 2)).*;
            const w1: @Vector(32, i8) = if (last) @splat(0) else @as(*align(1) const [32]i8, @ptrCast(p1 + 2)).*;
            w8[ri] = concat(i8, 32, w0, w1);
            base[ri] = -s.dpbusd(@splat(0), @splat(0x80), w8[ri]);
        } else {
            w4[ri] = concat(u8, 32, nibbles(p0 + 2), if (last) @as(@Vector(32, u8), @splat(0)) else nibbles(p1 + 2));
        }
    }
    inline for (0..T) |j| {
        const sa = s.load(scl[j] + b * 8);
        if (d == .q8_0) {
            const xq: @Vector(64, u8) = @as(*align(1) const [64]u8, @ptrCast(q[j] + b * 32)).*;
            inline for (0..R) |ri| {
                const dot = s.dpbusd(base[ri], xq, w8[ri]);
                acc[ri][j] = @mulAdd(V, s.i2f(dot) * sw[ri], sa, acc[ri][j]);
            }
        } else {
            const xq: @Vector(64, i8) = @as(*align(1) const [64]i8, @ptrCast(q[j] + b * 32)).*;
            const c: VI = @as(*align(1) const [16]i32, @ptrCast(corr[j] + b * 8)).*;
            inline for (0..R) |ri| {
                const dot = s.dpbusd(c, w4[ri], xq);
                acc[ri][j] = @mulAdd(V, s.i2f(dot) * sw[ri], sa, acc[ri][j]);
            }
        }
    }
}

/// The 32 unsigned 4-bit values of a Q4_0 block in element order (low nibbles are
/// elements 0..15, high nibbles 16..31).
inline fn nibbles(p: [*]const u8) @Vector(32, u8) {
    const v: @Vector(16, u8) = @as(*align(1) const [16]u8, @ptrCast(p)).*;
    return concat(u8, 16, v & @as(@Vector(16, u8), @splat(15)), v >> @splat(4));
}
