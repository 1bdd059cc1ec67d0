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
//! quantization time. One kernel serves every n (`quantBatch`): 16 rows in the lanes,
//! each weight block transposed once in registers and applied to up to 16 tokens, the
//! exact integer block dot then one float FMA per block in block order, so a token's
//! result does not depend on n, the tile or the thread. The reference path does the
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
/// Layout: q[t][k], sc/corr[t][block] (every path reads the same rows).
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

/// Quantizes activation rows [r0, r1) of x[n, k] for weights of dtype `wd`.
pub fn quantizeRows(comptime reference: bool, wd: DType, x: [*]const f32, k: usize, qa: QAct, r0: usize, r1: usize) void {
    const nb = k / 32;
    const off: i32 = if (wd == .q8_0) 128 else 8;
    for (r0..r1) |r| {
        const xr = x + r * k;
        for (0..nb) |b| {
            const xb = xr + b * 32;
            var sum: i32 = 0;
            var scale: f32 = 0;
            var qv: @Vector(32, i8) = @splat(0);
            if (reference) {
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
            @as(*align(1) [32]i8, @ptrCast(qa.q + r * k + b * 32)).* = qv;
            qa.sc[r * nb + b] = scale;
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

/// SIMD matmul of weight rows [r0, r1) (quantized: r0 and r1 multiples of quant_rows, or r1 = m).
/// Batch invariance: the float operations that produce y[t, r] are the same sequence
/// whatever n, the tile that holds (t, r), the row range or the thread: tiles only
/// choose which registers hold which (row, token) accumulators.
pub fn matmulRows(a: *const MatArgs, r0: usize, r1: usize) void {
    switch (a.dtype) {
        inline .f32, .f16, .bf16 => |d| floatRows(d, a, r0, r1),
        inline .q8_0, .q4_0 => |d| quantBatch(d, a, r0, r1),
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

// ---- quantized weights: 16 rows transposed in registers, VNNI ---------------------
//
// Rows go in the lanes. Each weight block of 16 rows is read where it lies and
// transposed once in registers (a 4x4 dword transpose per 128-bit lane: vector g holds
// bytes 4g..4g+3 of the block of all 16 rows), then serves every token of the tile:
// per token, 8 vpdpbusd with the token's 4 activation bytes broadcast straight from
// memory ({1to16}) leave the 16 rows' exact block dots in one vector (started at the
// offset correction), then y += float(dot) * d_w * d_x, one FMA per block in block
// order. Each weight byte is read from memory once per call (later token tiles find the
// 16 rows in L1/L2) and the activations stay in L1/L2. At n = 1 this streams at the
// DRAM bandwidth like a dedicated decode kernel (measured: no slower than the former
// shuffle-tree path); at 16 tokens the transpose costs ~3 ops per token-block against
// 8 vpdpbusd + 4 epilogue ops.

/// Tokens per register tile (16 accumulators + 8 weight vectors + temporaries).
pub const batch_tokens = 16;
/// Rows per group (the 16 lanes); row ranges handed to matmulRows are multiples of it.
pub const quant_rows = 16;

fn quantBatch(comptime d: DType, a: *const MatArgs, r0: usize, r1: usize) void {
    @setEvalBranchQuota(20000);
    const rb = rowBytes(d, a.k);
    const tiles = (a.n + batch_tokens - 1) / batch_tokens;
    var r = r0;
    while (r < r1) : (r += quant_rows) {
        const rows = @min(quant_rows, r1 - r);
        const w = a.w + r * rb;
        // The next row group streams into L2 during the first token tile.
        const next: ?[*]const u8 = if (r + quant_rows < r1) w + quant_rows * rb else null;
        var t0: usize = 0;
        for (0..tiles) |ti| {
            // Balanced tiles (17 tokens: 9 + 8), each a register-resident kernel.
            const nt = a.n / tiles + @intFromBool(ti < a.n % tiles);
            switch (nt) {
                inline 1...batch_tokens => |T| batchTile(d, T, a, w, rows, r, t0, if (ti == 0) next else null),
                else => unreachable,
            }
            t0 += nt;
        }
    }
}

fn batchTile(comptime d: DType, comptime T: usize, a: *const MatArgs, w: [*]const u8, rows: usize, r: usize, t0: usize, next: ?[*]const u8) void {
    @setEvalBranchQuota(20000);
    const rb = rowBytes(d, a.k);
    const bs = blockSize(d);
    const nb = a.k / 32;
    const last = rows - 1;
    var facc: [T]V = .{s.splat(0)} ** T;
    for (0..nb) |b| {
        if (next) |nx| prefetchSpan(nx + b * quant_rows * bs, quant_rows * bs);
        const wb = w + b * bs;
        const wt = transposeBlock(d, wb, rb, last);
        const sw = rowScales(wb, rb, last);
        inline for (0..T) |j| {
            const t = t0 + j;
            const xq: [*]const u8 = @ptrCast(a.qa.q + t * a.k + b * 32);
            var acc: VI = @splat(a.qa.corr[t * nb + b]);
            inline for (0..8) |g| acc = s.dpbusdBcast(acc, wt[g], xq, 4 * g);
            facc[j] = @mulAdd(V, s.i2f(acc) * sw, s.splat(a.qa.sc[t * nb + b]), facc[j]);
        }
    }
    inline for (0..T) |j| {
        const y = a.y + (t0 + j) * a.m + r;
        if (rows == quant_rows) {
            const bv = if (a.bias) |bb| s.load(bb + r) else s.splat(0);
            s.store(y, facc[j] + bv);
        } else for (0..rows) |l| {
            y[l] = facc[j][l] + if (a.bias) |bb| bb[r + l] else 0;
        }
    }
}

/// The 32 weights of one block of 16 rows (at p, rows rb apart, rows past `last`
/// repeat it) as vpdpbusd u8 operands: vector g, lane l = the 4 unsigned weights of row
/// l that meet activation bytes 4g..4g+3 (Q8_0: q + 128; Q4_0: the raw nibbles).
inline fn transposeBlock(comptime d: DType, p: [*]const u8, rb: usize, last: usize) [8]@Vector(64, u8) {
    var out: [8]@Vector(64, u8) = undefined;
    const halves = if (d == .q8_0) 2 else 1;
    inline for (0..halves) |h| {
        const v = transpose16x4(p + 2 + 16 * h, rb, last);
        inline for (0..4) |g| {
            if (d == .q8_0) {
                out[4 * h + g] = @bitCast(v[g] ^ @as(VU, @splat(0x80808080)));
            } else {
                const m: VU = @splat(0x0f0f0f0f);
                out[g] = @bitCast(v[g] & m);
                out[g + 4] = @bitCast((v[g] >> @splat(4)) & m);
            }
        }
    }
    return out;
}

/// Dwords 0..3 at p of 16 rows: result g, lane l = dword g of row l. Four rows per
/// vector (row i + 4L in 128-bit lane L), then a 4x4 transpose inside each lane.
inline fn transpose16x4(p: [*]const u8, rb: usize, last: usize) [4]VU {
    var x: [4]VU = undefined;
    inline for (0..4) |i| {
        var q: [4]@Vector(4, u32) = undefined;
        inline for (0..4) |L4| q[L4] = @as(*align(1) const [4]u32, @ptrCast(p + @min(i + 4 * L4, last) * rb)).*;
        x[i] = concat(u32, 8, concat(u32, 4, q[0], q[1]), concat(u32, 4, q[2], q[3]));
    }
    const t0 = @shuffle(u32, x[0], x[1], unpack(32, false));
    const t1 = @shuffle(u32, x[0], x[1], unpack(32, true));
    const t2 = @shuffle(u32, x[2], x[3], unpack(32, false));
    const t3 = @shuffle(u32, x[2], x[3], unpack(32, true));
    return .{
        @shuffle(u32, t0, t2, unpack(64, false)),
        @shuffle(u32, t0, t2, unpack(64, true)),
        @shuffle(u32, t1, t3, unpack(64, false)),
        @shuffle(u32, t1, t3, unpack(64, true)),
    };
}

/// vpunpck{l,h}{dq,qdq} masks on 16 dwords: per 128-bit lane, interleave the low (hi:
/// high) halves of a and b in units of `bits`.
fn unpack(comptime bits: usize, comptime hi: bool) @Vector(16, i32) {
    var m: [16]i32 = undefined;
    const u = bits / 32; // dwords per unit
    for (0..4) |lane| for (0..4 / u / 2) |e| for (0..2) |src| for (0..u) |k| {
        const idx: i32 = @intCast(lane * 4 + (if (hi) 2 else 0) + e * u + k);
        m[lane * 4 + (e * 2 + src) * u + k] = if (src == 0) idx else ~idx;
    };
    return m;
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

