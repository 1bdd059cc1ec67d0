//! Weight dtypes, row dequantization (embedding) and matmul kernels.
//!
//! Matmul y[n, m] = x[n, k] . W[m, k]^T works on a range of weight rows at a time and
//! runs all n tokens against a block of rows while it sits in L1/L2: every weight byte
//! streams from memory once per call however many tokens the batch has (this is what
//! makes verifying a token tree about as cheap as decoding one token).
//!
//! Quantized weights use integer dot products: the activations are quantized once per
//! call to int8 blocks of 32 with an f32 scale (`quantizeRows`), then each weight
//! block contributes d_w * d_x * sum(q_w * q_x). vpdpbusd (u8 x i8 -> i32, AVX-512
//! VNNI) takes the weights as unsigned bytes (q_w + 128 for Q8_0, the raw nibble for
//! Q4_0); the offset is removed by a per-(token, block) correction computed at
//! quantization time. Few tokens (decode) stream rows in place with rows in the lanes
//! (`quantLinear`); more use 16-token tiles with tokens in the lanes (`quantTokens`).
//! Both compute the exact integer block dots, then the same float epilogue, so a
//! token's result does not depend on which path ran. The reference path does the
//! same integer math with scalar loops, so SIMD and reference agree to float rounding.
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

/// Quantized activations of n rows of k: q (int8), the f32 scale of each block of 32,
/// and each block's offset correction -off * sum(q): the kernels read weights as
/// unsigned bytes, u = q_w + off (off = 128 for Q8_0, 8 for Q4_0 nibbles), so
/// sum(u * q) + corr = sum(q_w * q).
///
/// Two layouts. Rows (`tiled` false): q[t][k], sc/corr[t][block], for the reference and
/// the few-token path. Tiled: tokens in groups of 16, one per 32-bit lane, for the
/// token-tile path: q[tile][block][g][lane] = bytes 4g..4g+3 of the block, and
/// sc/corr[tile][block][lane]; lanes past n hold zeros.
pub const QAct = struct {
    q: [*]i8,
    sc: [*]f32,
    corr: [*]i32,
    tiled: bool,

    /// Activation rows stored: n, or n rounded up to whole tiles.
    pub fn rowsFor(n: usize, tiled: bool) usize {
        return if (tiled) (n + tile_tokens - 1) / tile_tokens * tile_tokens else n;
    }
    /// Scratch bytes needed for n rows (each region 64-byte aligned).
    pub fn bytes(n: usize, k: usize, tiled: bool) usize {
        const rows = rowsFor(n, tiled);
        return alignUp(rows * k) + 2 * alignUp(rows * (k / 32) * 4);
    }
    pub fn carve(base: [*]align(64) u8, n: usize, k: usize, tiled: bool) QAct {
        const rows = rowsFor(n, tiled);
        const o1 = alignUp(rows * k);
        const o2 = o1 + alignUp(rows * (k / 32) * 4);
        return .{ .q = @ptrCast(base), .sc = @ptrCast(@alignCast(base + o1)), .corr = @ptrCast(@alignCast(base + o2)), .tiled = tiled };
    }
};

/// Whether the SIMD matmul of n tokens wants the tiled activation layout.
pub fn wantsTiles(n: usize) bool {
    return n > linear_max_n;
}

pub fn alignUp(x: usize) usize {
    return (x + 63) & ~@as(usize, 63);
}

/// Same block math for both paths: d = amax / 127, q = round(x * (1 / d)).
inline fn blockScale(amax: f32) [2]f32 {
    const d = amax / 127.0;
    return .{ d, if (d != 0) 1.0 / d else 0.0 };
}

/// Quantizes activation rows [r0, r1) of x[n, k] for weights of dtype `wd`; rows
/// n.. (tile padding) become zeros.
pub fn quantizeRows(comptime reference: bool, wd: DType, x: [*]const f32, n: usize, k: usize, qa: QAct, r0: usize, r1: usize) void {
    const nb = k / 32;
    const off: i32 = if (wd == .q8_0) 128 else 8;
    for (r0..r1) |r| {
        const xr = x + r * k;
        for (0..nb) |b| {
            const xb = xr + b * 32;
            var sum: i32 = 0;
            var scale: f32 = 0;
            var qv: @Vector(32, i8) = @splat(0);
            if (r >= n) {} else if (reference) {
                var amax: f32 = 0;
                for (0..32) |j| amax = @max(amax, @fabs(xb[j]));
                const ds = blockScale(amax);
                scale = ds[0];
                for (0..32) |j| {
                    const v: i32 = @intFromFloat(@round(xb[j] * ds[1]));
                    const qi: i8 = @intCast(std.math.clamp(v, -127, 127));
                    qv[j] = qi;
                    sum += qi;
                }
            } else {
                const v0 = s.load(xb);
                const v1 = s.load(xb + 16);
                const amax = @reduce(.Max, @max(@fabs(v0), @fabs(v1)));
                const ds = blockScale(amax);
                scale = ds[0];
                const id = s.splat(ds[1]);
                const lim: VI = @splat(127);
                const q0 = @min(@max(s.f2i(@round(v0 * id)), -lim), lim);
                const q1 = @min(@max(s.f2i(@round(v1 * id)), -lim), lim);
                qv = @truncate(concat(i32, 16, q0, q1));
                sum = @reduce(.Add, q0 + q1);
            }
            if (qa.tiled) {
                const lane = r % tile_tokens;
                const tb = (r / tile_tokens * nb + b) * tile_tokens;
                const dw: @Vector(8, u32) = @bitCast(qv);
                const q32: [*]u32 = @ptrCast(@alignCast(qa.q));
                inline for (0..8) |g| q32[tb * 8 + g * tile_tokens + lane] = dw[g];
                qa.sc[tb + lane] = scale;
                qa.corr[tb + lane] = -off * sum;
            } else {
                @as(*align(1) [32]i8, @ptrCast(qa.q + r * k + b * 32)).* = qv;
                qa.sc[r * nb + b] = scale;
                qa.corr[r * nb + b] = -off * sum;
            }
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

/// SIMD matmul of weight rows [r0, r1) (quantized: r0 and r1 multiples of 8 or r1 = m).
/// Batch invariance: the float operations that produce y[t, r] are the same sequence
/// whatever n, the tile that holds (t, r), the row range or the thread: tiles only
/// choose which registers hold which (row, token) accumulators.
pub fn matmulRows(a: *const MatArgs, r0: usize, r1: usize) void {
    switch (a.dtype) {
        inline .f32, .f16, .bf16 => |d| floatRows(d, a, r0, r1),
        inline .q8_0, .q4_0 => |d| if (a.qa.tiled) quantTokens(d, a, r0, r1) else switch (a.n) {
            inline 1...linear_max_n => |T| quantLinear(d, T, a, r0, r1),
            else => unreachable,
        },
    }
}

// ---- float weights: register tiles of R rows x T tokens ----------------------------
//
// Each weight vector is converted once (vcvtph2ps / bf16 shift) and feeds all T tokens
// of the tile from registers, so a tile of up to 8 tokens costs little more weight
// traffic and conversion than one token. R shrinks as T grows so that R x T
// accumulators, R weight vectors and one activation vector fit in 32 registers.
// Every (token, row) is one FMA chain over k in steps of 16, then the fixed lane tree
// of s.sumLanes, then the scalar tail, then the bias: the same float operations
// whatever the tile, n, row range or thread.

const max_tile_tokens = 8;

fn tileRows(comptime T: usize) usize {
    return switch (T) {
        1, 2 => 8,
        3 => 6,
        4, 5, 6 => 4,
        else => 3,
    };
}

fn floatRows(comptime d: DType, a: *const MatArgs, r0: usize, r1: usize) void {
    var t: usize = 0;
    while (t < a.n) {
        const nt = @min(a.n - t, max_tile_tokens);
        switch (nt) {
            inline 1...max_tile_tokens => |T| floatTokens(d, T, a, r0, r1, t),
            else => unreachable,
        }
        t += nt;
    }
}

/// Tokens [t0, t0 + T) against rows [r0, r1): R-row tiles, then single rows.
fn floatTokens(comptime d: DType, comptime T: usize, a: *const MatArgs, r0: usize, r1: usize, t0: usize) void {
    const R = comptime tileRows(T);
    // Only the first token tile prefetches: the others find the rows in L1/L2.
    const pf = t0 == 0;
    var r = r0;
    while (r + R <= r1) : (r += R) floatTile(d, R, T, a, r, t0, pf);
    while (r < r1) : (r += 1) floatTile(d, 1, T, a, r, t0, pf);
}

/// R weight rows from r against T tokens from t0.
inline fn floatTile(comptime d: DType, comptime R: usize, comptime T: usize, a: *const MatArgs, r: usize, t0: usize, pf: bool) void {
    const rb = rowBytes(d, a.k);
    const k = a.k;
    var wr: [R][*]const u8 = undefined;
    inline for (0..R) |i| wr[i] = a.w + (r + i) * rb;
    var x: [T][*]const f32 = undefined;
    inline for (0..T) |j| x[j] = a.x + (t0 + j) * k;
    var acc: [T * R]V = .{s.splat(0)} ** (T * R);
    // One prefetch per 64-byte line of the next row tile (f16/bf16: every other step).
    const pf_mask: usize = if (d == .f32) 0 else L;
    var i: usize = 0;
    while (i + L <= k) : (i += L) {
        var w: [R]V = undefined;
        inline for (0..R) |ri| w[ri] = loadW(d, wr[ri], i);
        if (pf and i & pf_mask == 0) {
            inline for (0..R) |ri| prefetch(wr[ri] + rowBytes(d, i) + R * rb);
        }
        inline for (0..T) |j| {
            const xv = s.load(x[j] + i);
            inline for (0..R) |ri| acc[j * R + ri] = @mulAdd(V, xv, w[ri], acc[j * R + ri]);
        }
    }
    const sums = s.sumLanes(T * R, acc);
    inline for (0..T) |j| {
        inline for (0..R) |ri| {
            var tot = sums[j * R + ri];
            var ii = i;
            while (ii < k) : (ii += 1) {
                const wv: f32 = switch (d) {
                    .f32 => @as(*align(1) const f32, @ptrCast(wr[ri] + 4 * ii)).*,
                    .f16 => s.f16At(wr[ri] + 2 * ii),
                    else => s.bf16At(wr[ri] + 2 * ii),
                };
                tot += wv * x[j][ii];
            }
            const bias: f32 = if (a.bias) |b| b[r + ri] else 0;
            a.y[(t0 + j) * a.m + r + ri] = tot + bias;
        }
    }
}

/// The rows of a block are short streams that the hardware prefetcher picks up late;
/// fetch the same spot of the next row block while this one runs.
inline fn prefetch(p: [*]const u8) void {
    @prefetch(p, .{ .rw = .read, .locality = 2, .cache = .data });
}

// ---- quantized weights, many tokens: token tiles, VNNI -----------------------------
//
// Tokens go in the lanes: the activations of 16 tokens are laid out once per call (see
// QAct) so that one vector holds the same 4 int8 activations of 16 tokens, and
// vpdpbusd(acc, broadcast of 4 weights of one row, that vector) adds to 16 tokens at
// once. The weights are read where they lie (no repack): R rows at a time, a 4-byte
// broadcast each, so R rows x 16 tokens accumulate in 2R registers and the block
// epilogue is 3 ops per row per 16 tokens. The per-(token, row) float operations are
// those of quantLinear, only the lanes differ.

pub const tile_tokens = 16;
const tile_rows = 8;

fn quantTokens(comptime d: DType, a: *const MatArgs, r0: usize, r1: usize) void {
    const rb = rowBytes(d, a.k);
    const tiles = (a.n + tile_tokens - 1) / tile_tokens;
    var r = r0;
    while (r < r1) : (r += tile_rows) {
        const rows = @min(tile_rows, r1 - r);
        const w = a.w + r * rb;
        // The next row group streams into L2 during the first token tile.
        const next: ?[*]const u8 = if (r + tile_rows < r1) w + tile_rows * rb else null;
        for (0..tiles) |tile| tokenTile(d, a, w, rows, r, tile, if (tile == 0) next else null);
    }
}

inline fn tokenTile(comptime d: DType, a: *const MatArgs, w: [*]const u8, rows: usize, r: usize, tile: usize, next: ?[*]const u8) void {
    const R = tile_rows;
    const rb = rowBytes(d, a.k);
    const bs = blockSize(d);
    const nb = a.k / 32;
    var wr: [R][*]const u8 = undefined;
    inline for (0..R) |i| wr[i] = w + @min(i, rows - 1) * rb + 2; // missing rows repeat the last
    const q32: [*]const u32 = @ptrCast(@alignCast(a.qa.q));
    var facc: [R]V = .{s.splat(0)} ** R;
    for (0..nb) |b| {
        if (next) |nx| prefetchSpan(nx + b * R * bs, R * bs);
        const tb = (tile * nb + b) * tile_tokens;
        var xs: [8]@Vector(64, i8) = undefined;
        inline for (0..8) |g| xs[g] = @bitCast(@as(*const [16]u32, @ptrCast(q32 + tb * 8 + g * tile_tokens)).*);
        var iacc: [R]VI = .{@as(*const [16]i32, @ptrCast(a.qa.corr + tb)).*} ** R;
        // Group-major, so consecutive vpdpbusd go to different rows' chains.
        if (d == .q8_0) {
            inline for (0..8) |g| inline for (0..R) |i| {
                const u = s.bcast32(wr[i] + b * bs + 4 * g) ^ @as(VU, @splat(0x80808080));
                iacc[i] = s.dpbusd(iacc[i], @bitCast(u), xs[g]);
            };
        } else {
            // Bytes 4g..4g+3 hold elements 4g.. (low nibbles) and 16 + 4g.. (high).
            const m: VU = @splat(0x0f0f0f0f);
            inline for (0..4) |g| inline for (0..R) |i| {
                const u = s.bcast32(wr[i] + b * bs + 4 * g);
                iacc[i] = s.dpbusd(iacc[i], @bitCast(u & m), xs[g]);
                iacc[i] = s.dpbusd(iacc[i], @bitCast((u >> @splat(4)) & m), xs[g + 4]);
            };
        }
        const sa = s.load(a.qa.sc + tb);
        inline for (0..R) |i| {
            const sw = s.bcastF16(wr[i] - 2 + b * bs);
            facc[i] = @mulAdd(V, s.i2f(iacc[i]) * sw, sa, facc[i]);
        }
    }
    const t0 = tile * tile_tokens;
    const nt = @min(tile_tokens, a.n - t0);
    inline for (0..R) |i| {
        if (i < rows) {
            const bias: f32 = if (a.bias) |bb| bb[r + i] else 0;
            for (0..nt) |j| a.y[(t0 + j) * a.m + r + i] = facc[i][j] + bias;
        }
    }
}

const VU = @Vector(16, u32);

fn blockSize(comptime d: DType) usize {
    return if (d == .q8_0) 34 else 18;
}

/// The f16 block scales at `p` of 16 rows `rb` apart (rows past `last` repeat it) as f32.
inline fn rowScales(p: [*]const u8, rb: usize, last: usize) V {
    var h: [16]u16 = undefined;
    inline for (0..16) |l| h[l] = @as(*align(1) const u16, @ptrCast(p + @min(l, last) * rb)).*;
    return s.loadF16(@ptrCast(&h));
}

/// Prefetches [p, p + len) into L2, one request per cache line.
inline fn prefetchSpan(p: [*]const u8, len: usize) void {
    var o: usize = 0;
    while (o < len) : (o += 64) @prefetch(p + o, .{ .rw = .read, .locality = 2, .cache = .data });
}

/// The 32 weights of a Q8_0 block as unsigned bytes q_w + 128.
inline fn q8Bytes(blk: [*]const u8) @Vector(32, u8) {
    return @as(*align(1) const [32]u8, @ptrCast(blk + 2)).* ^ @as(@Vector(32, u8), @splat(0x80));
}

// ---- quantized weights, few tokens: rows streamed in place -------------------------
//
// Decode (n = 1) reads every weight byte once and does little math per byte, so the
// repack above would cost more than it saves. Here 16 rows are read where they lie:
// per row, one vector holds two consecutive blocks, one vpdpbusd against the token's
// two activation blocks leaves 8 partial dots per block, and a shuffle-add tree over
// the 16 rows turns those into one vector of 16 exact block dots per block (integer
// sums: exact in any order). From there the float epilogue is quantTile's, op for op,
// with the rows in lanes, so y[t, r] is bit-identical to the packed path's.

/// Up to this many tokens, re-reading 16 rows from L1 per token beats a 16-token tile
/// (measured on 2048x5632 Q8_0 and Q4_0: crossover near n = 7).
pub const linear_max_n = 6;
const lin_rows = 16;

fn quantLinear(comptime d: DType, comptime T: usize, a: *const MatArgs, r0: usize, r1: usize) void {
    @setEvalBranchQuota(10000);
    const rb = rowBytes(d, a.k);
    const bs = blockSize(d);
    const nb = a.k / 32;
    var r = r0;
    while (r < r1) : (r += lin_rows) {
        const rows = @min(lin_rows, r1 - r);
        const last = rows - 1;
        const w = a.w + r * rb;
        const next: ?[*]const u8 = if (r + lin_rows < r1) w + lin_rows * rb else null;
        var facc: [T]V = .{s.splat(0)} ** T;
        var b: usize = 0;
        while (b < nb) : (b += 2) {
            const two = b + 1 < nb;
            if (next) |nx| prefetchSpan(nx + b * lin_rows * bs, 2 * lin_rows * bs);
            const wb = w + b * bs;
            const bs2 = if (two) bs else 0; // an odd last block pairs with itself, against zero activations
            const sw0 = rowScales(wb, rb, last);
            const sw1 = if (two) rowScales(wb + bs, rb, last) else sw0;
            inline for (0..T) |j| {
                const t = j; // T == n
                const xs = pairActs(d, a.qa.q + t * a.k + b * 32, two);
                var part: [lin_rows]VI = undefined;
                inline for (0..lin_rows) |l| {
                    const p = wb + @min(l, last) * rb;
                    part[l] = s.dpbusd(@splat(0), pairBytes(d, p, p + bs2), xs);
                }
                const dots = reduceRows(d, part);
                const c = a.qa.corr + t * nb + b;
                const sc = a.qa.sc + t * nb + b;
                facc[j] = @mulAdd(V, s.i2f(dots[0] + @as(VI, @splat(c[0]))) * sw0, s.splat(sc[0]), facc[j]);
                if (two) facc[j] = @mulAdd(V, s.i2f(dots[1] + @as(VI, @splat(c[1]))) * sw1, s.splat(sc[1]), facc[j]);
            }
        }
        inline for (0..T) |j| {
            const y = a.y + j * a.m + r;
            for (0..rows) |l| y[l] = facc[j][l] + if (a.bias) |bb| bb[r + l] else 0;
        }
    }
}

/// Two weight blocks of one row (at p0, p1) as the u8 operand of vpdpbusd: Q8_0 as
/// q + 128, blocks whole in each half; Q4_0 nibbles as [lo0, lo1, hi0, hi1] x 16.
inline fn pairBytes(comptime d: DType, p0: [*]const u8, p1: [*]const u8) @Vector(64, u8) {
    if (d == .q8_0) return concat(u8, 32, q8Bytes(p0), q8Bytes(p1));
    const lo: @Vector(16, u8) = @as(*align(1) const [16]u8, @ptrCast(p0 + 2)).*;
    const hi: @Vector(16, u8) = @as(*align(1) const [16]u8, @ptrCast(p1 + 2)).*;
    const v = concat(u8, 16, lo, hi);
    const m: @Vector(32, u8) = @splat(15);
    return concat(u8, 32, v & m, v >> @splat(4));
}

/// A token's activation blocks b and b+1 (zeros when !two) in pairBytes' element order.
inline fn pairActs(comptime d: DType, q: [*]const i8, two: bool) @Vector(64, i8) {
    const x0: @Vector(32, i8) = @as(*align(1) const [32]i8, @ptrCast(q)).*;
    const x1: @Vector(32, i8) = if (two) @as(*align(1) const [32]i8, @ptrCast(q + 32)).* else @splat(0);
    if (d == .q8_0) return concat(i8, 32, x0, x1);
    const m = comptime blk: {
        var mm: [64]i32 = undefined;
        for (0..64) |i| {
            const half = i / 16; // lo0, lo1, hi0, hi1
            const src = (half & 1) * 32 + (half >> 1) * 16 + i % 16;
            mm[i] = if (src < 32) src else ~@as(i32, src - 32);
        }
        break :blk mm;
    };
    return @shuffle(i8, x0, x1, m);
}

/// Which of the two blocks each 32-bit lane of a pairBytes . pairActs dot belongs to.
fn pairBlock(comptime d: DType, lane: usize) u8 {
    return if (d == .q8_0) lane / 8 else (lane / 4) & 1;
}

/// part[l] = 16 partial dots of row l (lanes by pairBlock). Returns, per block of the
/// pair, the 16 rows' full dots in row order: three rounds of pairwise shuffle+add
/// (each halves the partials per (row, block)), then one reorder per block.
inline fn reduceRows(comptime d: DType, part: [lin_rows]VI) [2]VI {
    const plan = comptime reducePlan(d);
    var v = part;
    inline for (plan.stages, 0..) |st, stage| {
        const n = lin_rows >> (stage + 1);
        inline for (0..n) |i| v[i] = @shuffle(i32, v[2 * i], v[2 * i + 1], st[0]) + @shuffle(i32, v[2 * i], v[2 * i + 1], st[1]);
    }
    return .{ @shuffle(i32, v[0], v[1], plan.out[0]), @shuffle(i32, v[0], v[1], plan.out[1]) };
}

const ReducePlan = struct { stages: [3][2]@Vector(16, i32), out: [2]@Vector(16, i32) };

/// Shuffle masks of reduceRows, found by tracking the (row, block) label of every lane;
/// every pair of a round has the same layout relative to its rows, so one mask pair per round.
fn reducePlan(comptime d: DType) ReducePlan {
    @setEvalBranchQuota(100000);
    const Lab = struct { row: u8, blk: u8 };
    var labs: [lin_rows][16]Lab = undefined;
    for (0..lin_rows) |l| for (0..16) |i| {
        labs[l][i] = .{ .row = l, .blk = pairBlock(d, i) };
    };
    var plan: ReducePlan = undefined;
    var n: usize = lin_rows;
    for (0..3) |stage| {
        n /= 2;
        var masks: [2][16]i32 = undefined;
        for (0..n) |i| {
            // Lanes of the pair's (row, block) groups in order of appearance; each group's
            // first half goes to the lo operand, its second half to the hi operand.
            var both: [32]Lab = labs[2 * i] ++ labs[2 * i + 1];
            var used = [_]bool{false} ** 32;
            var out: [16]Lab = undefined;
            var lo: [16]i32 = undefined;
            var hi: [16]i32 = undefined;
            var o: usize = 0;
            for (0..32) |first| {
                if (used[first]) continue;
                var members: [32]usize = undefined;
                var cnt: usize = 0;
                for (first..32) |j| {
                    if (!used[j] and both[j].row == both[first].row and both[j].blk == both[first].blk) {
                        members[cnt] = j;
                        cnt += 1;
                        used[j] = true;
                    }
                }
                for (0..cnt / 2) |h| {
                    lo[o] = operand(members[h]);
                    hi[o] = operand(members[cnt / 2 + h]);
                    out[o] = both[first];
                    o += 1;
                }
            }
            if (i == 0) masks = .{ lo, hi } else if (!std.mem.eql(i32, &masks[0], &lo) or !std.mem.eql(i32, &masks[1], &hi)) @compileError("reduceRows: pairs differ");
            labs[i] = out;
        }
        plan.stages[stage] = .{ masks[0], masks[1] };
    }
    // Two vectors of 16 distinct (row, block) lanes: gather each block's rows in order.
    for (0..2) |blk| {
        var m: [16]i32 = undefined;
        for (0..16) |row| {
            m[row] = for (0..32) |j| {
                const lab = if (j < 16) labs[0][j] else labs[1][j - 16];
                if (lab.row == row and lab.blk == blk) break operand(j);
            } else @compileError("reduceRows: lane missing");
        }
        plan.out[blk] = m;
    }
    return plan;
}

/// A @shuffle mask entry for lane j of the 32 lanes (a ++ b).
fn operand(j: usize) i32 {
    return if (j < 16) @intCast(j) else ~@as(i32, @intCast(j - 16));
}
