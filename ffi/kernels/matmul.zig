//! Weight dtypes, row dequantization (embedding) and matmul kernels.
//!
//! Matmul y[n, m] = x[n, k] . W[m, k]^T works on a range of weight rows at a time and
//! runs all n tokens against a block of rows while it sits in L1/L2: every weight byte
//! streams from memory once per call however many tokens the batch has (this is what
//! makes verifying a token tree about as cheap as decoding one token).
//!
//! Quantized weights use integer dot products: the activations are quantized once per
//! call to int8 blocks of 32 with an f32 scale (`quantizeRows`), then each weight
//! block contributes d_w * d_x * sum(q_w * q_x). The SIMD path repacks 32 weight rows
//! at a time (see `packRows`) and feeds vpdpbusd (u8 x i8 -> i32, AVX-512 VNNI) with
//! the weights as unsigned bytes (q_w + 128 for Q8_0, the raw nibble for Q4_0); the
//! offset is removed by a per-(token, block) correction computed at quantization time.
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

/// Quantized activations of n rows of k: q (int8, k a row), the f32 scale of each block
/// of 32, and each block's offset correction -off * sum(q): the kernels read weights
/// as unsigned bytes, u = q_w + off (off = 128 for Q8_0, 8 for Q4_0 nibbles), so
/// sum(u * q) + corr = sum(q_w * q).
pub const QAct = struct {
    q: [*]i8,
    sc: [*]f32,
    corr: [*]i32,

    /// Scratch bytes needed for n rows (each region 64-byte aligned).
    pub fn bytes(n: usize, k: usize) usize {
        return alignUp(n * k) + 2 * alignUp(n * (k / 32) * 4);
    }
    pub fn carve(base: [*]align(64) u8, n: usize, k: usize) QAct {
        const o1 = alignUp(n * k);
        const o2 = o1 + alignUp(n * (k / 32) * 4);
        return .{ .q = @ptrCast(base), .sc = @ptrCast(@alignCast(base + o1)), .corr = @ptrCast(@alignCast(base + o2)) };
    }
};

pub fn alignUp(x: usize) usize {
    return (x + 63) & ~@as(usize, 63);
}

/// Same block math for both paths: d = amax / 127, q = round(x * (1 / d)).
inline fn blockScale(amax: f32) [2]f32 {
    const d = amax / 127.0;
    return .{ d, if (d != 0) 1.0 / d else 0.0 };
}

/// Quantizes activation rows [r0, r1) of x[., k] for weights of dtype `wd`.
pub fn quantizeRows(comptime reference: bool, wd: DType, x: [*]const f32, k: usize, qa: QAct, r0: usize, r1: usize) void {
    const nb = k / 32;
    const off: i32 = if (wd == .q8_0) 128 else 8;
    for (r0..r1) |r| {
        const xr = x + r * k;
        const q = qa.q + r * k;
        for (0..nb) |b| {
            const xb = xr + b * 32;
            var sum: i32 = 0;
            if (reference) {
                var amax: f32 = 0;
                for (0..32) |j| amax = @max(amax, @fabs(xb[j]));
                const ds = blockScale(amax);
                qa.sc[r * nb + b] = ds[0];
                for (0..32) |j| {
                    const v: i32 = @intFromFloat(@round(xb[j] * ds[1]));
                    const qi: i8 = @intCast(std.math.clamp(v, -127, 127));
                    q[b * 32 + j] = qi;
                    sum += qi;
                }
            } else {
                const v0 = s.load(xb);
                const v1 = s.load(xb + 16);
                const amax = @reduce(.Max, @max(@fabs(v0), @fabs(v1)));
                const ds = blockScale(amax);
                qa.sc[r * nb + b] = ds[0];
                const id = s.splat(ds[1]);
                const lim: VI = @splat(127);
                const q0 = @min(@max(s.f2i(@round(v0 * id)), -lim), lim);
                const q1 = @min(@max(s.f2i(@round(v1 * id)), -lim), lim);
                const qv: @Vector(32, i8) = @truncate(concat(i32, 16, q0, q1));
                @as(*align(1) [32]i8, @ptrCast(q + b * 32)).* = qv;
                sum = @reduce(.Add, q0 + q1);
            }
            qa.corr[r * nb + b] = -off * sum;
        }
    }
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
    pack: [*]align(64) u8, // packBytes(k) of packed weights per thread (quantized dtypes only)
};

/// Scalar reference: f64 accumulation for float weights, exact integer block dots for
/// quantized ones.
pub fn matmulRowsRef(a: *const MatArgs, r0: usize, r1: usize) void {
    const rb = rowBytes(a.dtype, a.k);
    const nb = a.k / 32;
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
                    const q = a.qa.q + t * a.k;
                    const bs: usize = if (a.dtype == .q8_0) 34 else 18;
                    for (0..nb) |b| {
                        const blk = wr + b * bs;
                        var dot: i32 = 0;
                        for (0..32) |j| {
                            const wq: i32 = if (a.dtype == .q8_0)
                                @as(i8, @bitCast(blk[2 + j]))
                            else if (j < 16) @as(i32, blk[2 + j] & 15) - 8 else @as(i32, blk[2 + j - 16] >> 4) - 8;
                            dot += wq * q[b * 32 + j];
                        }
                        acc += @as(f64, s.f16At(blk) * a.qa.sc[t * nb + b]) * @as(f64, @floatFromInt(dot));
                    }
                },
            }
            if (a.bias) |bias| acc += bias[r];
            a.y[t * a.m + r] = @floatCast(acc);
        }
    }
}

/// SIMD matmul of weight rows [r0, r1); `slot` picks this thread's packing scratch.
/// Batch invariance: the float operations that produce y[t, r] are the same sequence
/// whatever n, the tile that holds (t, r), the row range or the thread: tiles only
/// choose which registers hold which (row, token) accumulators.
pub fn matmulRows(a: *const MatArgs, slot: usize, r0: usize, r1: usize) void {
    switch (a.dtype) {
        inline .f32, .f16, .bf16 => |d| floatRows(d, a, r0, r1),
        inline .q8_0, .q4_0 => |d| {
            const pk: [*]align(64) u8 = @alignCast(a.pack + slot * packBytes(a.k));
            var r = r0;
            while (r < r1) : (r += pack_rows) {
                const rows = @min(pack_rows, a.m - r);
                packRows(d, a.w + r * rowBytes(d, a.k), rowBytes(d, a.k), a.k / 32, rows, pk);
                var t: usize = 0;
                while (t + 4 <= a.n) : (t += 4) quantTile(4, a, pk, r, rows, t);
                switch (a.n - t) {
                    inline 1...3 => |T| quantTile(T, a, pk, r, rows, t),
                    else => {},
                }
            }
        },
    }
}

// ---- float weights: register tiles of R rows x T tokens ----------------------------

fn floatRows(comptime d: DType, a: *const MatArgs, r0: usize, r1: usize) void {
    // One or two tokens: 8 rows, so 8-16 independent FMA chains hide the FMA latency.
    // More: 4 rows x 4 tokens, each weight vector feeds 4 tokens.
    var r = r0;
    if (a.n <= 2) {
        while (r + 8 <= r1) : (r += 8) floatRowBlock(d, 8, a, r);
    } else {
        while (r + 4 <= r1) : (r += 4) floatRowBlock(d, 4, a, r);
    }
    while (r < r1) : (r += 1) floatRowBlock(d, 1, a, r);
}

inline fn floatRowBlock(comptime d: DType, comptime R: usize, a: *const MatArgs, r: usize) void {
    var t: usize = 0;
    if (R <= 4) {
        while (t + 4 <= a.n) : (t += 4) floatTile(d, R, 4, a, r, t);
    }
    while (t + 2 <= a.n) : (t += 2) floatTile(d, R, 2, a, r, t);
    if (t < a.n) floatTile(d, R, 1, a, r, t);
}

/// R weight rows from r against T tokens from t0.
inline fn floatTile(comptime d: DType, comptime R: usize, comptime T: usize, a: *const MatArgs, r: usize, t0: usize) void {
    const rb = rowBytes(d, a.k);
    const k = a.k;
    var wr: [R][*]const u8 = undefined;
    inline for (0..R) |i| wr[i] = a.w + (r + i) * rb;
    var x: [T][*]const f32 = undefined;
    inline for (0..T) |j| x[j] = a.x + (t0 + j) * k;
    var acc: [R][T]V = .{.{s.splat(0)} ** T} ** R;
    var i: usize = 0;
    while (i + L <= k) : (i += L) {
        var w: [R]V = undefined;
        inline for (0..R) |ri| {
            w[ri] = loadW(d, wr[ri], i);
            prefetch(wr[ri] + rowBytes(d, i) + R * rb);
        }
        inline for (0..T) |j| {
            const xv = s.load(x[j] + i);
            inline for (0..R) |ri| acc[ri][j] = @mulAdd(V, xv, w[ri], acc[ri][j]);
        }
    }
    inline for (0..R) |ri| {
        const bias: f32 = if (a.bias) |b| b[r + ri] else 0;
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
            a.y[(t0 + j) * a.m + r + ri] = tot + bias;
        }
    }
}

/// The rows of a block are short streams that the hardware prefetcher picks up late;
/// fetch the same spot of the next row block while this one runs.
inline fn prefetch(p: [*]const u8) void {
    @prefetch(p, .{ .rw = .read, .locality = 2, .cache = .data });
}

// ---- quantized weights: packed row blocks, VNNI ------------------------------------
//
// A block of 32 weight rows is first repacked (per thread, into L2-resident scratch)
// so that one 64-byte vector holds the same 4 elements of 16 rows: for block b and
// element group g (elements 4g..4g+3) vector v holds dword l = the 4 weights of row
// 16v + l as unsigned bytes. Then vpdpbusd(acc, weights, broadcast of a token's 4
// int8 activations) adds to 16 rows at once, 8 of them finish a block, and the block
// scales apply once per 16 rows (d_w as a vector, d_x as a broadcast) instead of once
// per 2 blocks of each row: the float epilogue is 3 ops per 8 dot products. The packing
// cost is paid once per row block and shared by all n tokens.

pub const pack_rows = 32;
const pack_block = 8 * pack_rows * 4 + pack_rows * 4; // u8 weights, then f32 scales

pub fn packBytes(k: usize) usize {
    return k / 32 * pack_block;
}

/// Packs `rows` (<= 32) rows of `nb` blocks; missing rows get zero weights and scales.
fn packRows(comptime d: DType, w: [*]const u8, rb: usize, nb: usize, rows: usize, dst: [*]align(64) u8) void {
    const bs: usize = if (d == .q8_0) 34 else 18;
    var src: [pack_rows][*]const u8 = undefined;
    for (0..pack_rows) |l| src[l] = w + @min(l, rows - 1) * rb; // missing rows: repeat the last, zero the scale
    for (0..nb) |b| {
        const pb = dst + b * pack_block;
        inline for (0..2) |v| {
            var p: [8]VU = undefined;
            inline for (0..8) |i| {
                const b0 = src[16 * v + 2 * i] + b * bs;
                const b1 = src[16 * v + 2 * i + 1] + b * bs;
                prefetch(b0 + 8 * 64);
                prefetch(b1 + 8 * 64);
                p[i] = @bitCast(concat(u8, 32, blockBytes(d, b0), blockBytes(d, b1)));
            }
            const o = transpose16x8(p);
            inline for (0..8) |g| @as(*[16]u32, @ptrCast(@alignCast(pb + g * 128 + v * 64))).* = o[g];
        }
        var h: [pack_rows]u16 = undefined;
        inline for (0..pack_rows) |l| h[l] = @as(*align(1) const u16, @ptrCast(src[l] + b * bs)).*;
        const scales: [*]f32 = @ptrCast(@alignCast(pb + 8 * pack_rows * 4));
        inline for (0..2) |v| {
            const sv = s.loadF16(@ptrCast(&h[16 * v]));
            s.store(scales + 16 * v, @select(f32, lane16 + @as(@Vector(16, u32), @splat(16 * v)) < @as(@Vector(16, u32), @splat(@intCast(rows))), sv, s.splat(0)));
        }
    }
}

const VU = @Vector(16, u32);
const lane16: VU = .{ 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };

/// The 32 weights of a block as unsigned bytes q_w + off, in element order.
inline fn blockBytes(comptime d: DType, blk: [*]const u8) @Vector(32, u8) {
    if (d == .q8_0) return @as(*align(1) const [32]u8, @ptrCast(blk + 2)).* ^ @as(@Vector(32, u8), @splat(0x80));
    return nibbles(blk + 2);
}

/// In: p[i] = dwords 0..7 of row 2i, then of row 2i+1. Out: o[g] = dword g of rows 0..15.
/// Three stages of two-source shuffles (vpermt2d); each stage halves the dword range
/// a vector holds and doubles its rows.
inline fn transpose16x8(p: [8]VU) [8]VU {
    @setEvalBranchQuota(100000);
    // Stage 1: rows 4j..4j+3 x dwords 4h..4h+3 (lane = 4 * row + dword, relative).
    var a: [8]VU = undefined;
    inline for (0..4) |j| inline for (0..2) |h| {
        a[2 * j + h] = pick(p[2 * j], p[2 * j + 1], labelsIn(2 * j), labelsIn(2 * j + 1), labelsBox(4 * j, 4, 4 * h, 4));
    };
    // Stage 2: rows 8j..8j+7 x dwords 2h..2h+1.
    var c: [8]VU = undefined;
    inline for (0..2) |j| inline for (0..4) |h| {
        c[4 * j + h] = pick(a[4 * j + h / 2], a[4 * j + 2 + h / 2], labelsBox(8 * j, 4, 4 * (h / 2), 4), labelsBox(8 * j + 4, 4, 4 * (h / 2), 4), labelsBox(8 * j, 8, 2 * h, 2));
    };
    // Stage 3: rows 0..15 x dword g.
    var o: [8]VU = undefined;
    inline for (0..8) |g| {
        o[g] = pick(c[g / 2], c[4 + g / 2], labelsBox(0, 8, 2 * (g / 2), 2), labelsBox(8, 8, 2 * (g / 2), 2), labelsBox(0, 16, g, 1));
    }
    return o;
}

/// A lane's content as row * 8 + dword.
fn labelsIn(comptime i: usize) [16]u8 {
    var l: [16]u8 = undefined;
    for (0..16) |j| l[j] = @intCast((2 * i + j / 8) * 8 + j % 8);
    return l;
}

fn labelsBox(comptime r0: usize, comptime nr: usize, comptime d0: usize, comptime nd: usize) [16]u8 {
    var l: [16]u8 = undefined;
    for (0..nr) |r| for (0..nd) |dd| {
        l[r * nd + dd] = @intCast((r0 + r) * 8 + d0 + dd);
    };
    return l;
}

inline fn pick(a: VU, b: VU, comptime la: [16]u8, comptime lb: [16]u8, comptime want: [16]u8) VU {
    const mask = comptime blk: {
        @setEvalBranchQuota(100000);
        var m: [16]i32 = undefined;
        for (want, 0..) |x, lane| {
            m[lane] = for (la, 0..) |y, i| {
                if (y == x) break @intCast(i);
            } else for (lb, 0..) |y, i| {
                if (y == x) break ~@as(i32, @intCast(i));
            } else @compileError("label not in either source");
        }
        break :blk m;
    };
    return @shuffle(u32, a, b, mask);
}

/// Packed rows [r, r + rows) against tokens [t0, t0 + T).
inline fn quantTile(comptime T: usize, a: *const MatArgs, pk: [*]align(64) const u8, r: usize, rows: usize, t0: usize) void {
    @setEvalBranchQuota(20000);
    const nb = a.k / 32;
    var facc: [2][T]V = .{.{s.splat(0)} ** T} ** 2;
    for (0..nb) |b| {
        const pb = pk + b * pack_block;
        var iacc: [2][T]VI = undefined;
        inline for (0..T) |j| {
            const c: VI = @splat(a.qa.corr[(t0 + j) * nb + b]);
            iacc[0][j] = c;
            iacc[1][j] = c;
        }
        inline for (0..8) |g| {
            const w0: @Vector(64, u8) = @as(*const [64]u8, @ptrCast(@alignCast(pb + g * 128))).*;
            const w1: @Vector(64, u8) = @as(*const [64]u8, @ptrCast(@alignCast(pb + g * 128 + 64))).*;
            inline for (0..T) |j| {
                const xw: VI = @splat(@as(*align(1) const i32, @ptrCast(a.qa.q + (t0 + j) * a.k + b * 32 + 4 * g)).*);
                const xs: @Vector(64, i8) = @bitCast(xw);
                iacc[0][j] = s.dpbusd(iacc[0][j], w0, xs);
                iacc[1][j] = s.dpbusd(iacc[1][j], w1, xs);
            }
        }
        const scales: [*]const f32 = @ptrCast(@alignCast(pb + 8 * pack_rows * 4));
        const sw0 = s.load(scales);
        const sw1 = s.load(scales + 16);
        inline for (0..T) |j| {
            const sa = s.splat(a.qa.sc[(t0 + j) * nb + b]);
            facc[0][j] = @mulAdd(V, s.i2f(iacc[0][j]) * sw0, sa, facc[0][j]);
            facc[1][j] = @mulAdd(V, s.i2f(iacc[1][j]) * sw1, sa, facc[1][j]);
        }
    }
    inline for (0..T) |j| {
        const y = a.y + (t0 + j) * a.m + r;
        inline for (0..2) |v| {
            for (0..@min(16, rows -| 16 * v)) |l| {
                const bias: f32 = if (a.bias) |bb| bb[r + 16 * v + l] else 0;
                y[16 * v + l] = facc[v][j][l] + bias;
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
