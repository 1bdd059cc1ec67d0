//! Paged KV cache: write, tree attention, commit move (semantics in ffi/specinfer.h).
//!
//! A token of sequence row s sees the committed slots [0, committed[s]) of its row
//! plus slot committed[s] + j for each bit j set in its ancestor mask. One (token,
//! head) pair is one work item.
const std = @import("std");
const s = @import("simd.zig");
const V = s.V;
const L = s.L;

pub const max_head_dim = 1024; // per-item accumulators live on the stack

pub const AttnArgs = struct {
    q: [*]const f32,
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k_plane: [*]const f32,
    v_plane: [*]const f32,
    block_tables: [*]const i32,
    max_blocks: usize,
    block_size: usize,
    seq: [*]const i32,
    committed: [*]const i32,
    ancestors: [*]const u32,
    words: usize,
    scale: f32,
    out: [*]f32,
};

/// Offset in floats of (slot, kv head) inside a plane, through the row's block table.
inline fn rowOffset(bt: [*]const i32, block_size: usize, row: usize, slot: usize) usize {
    const blk: usize = @intCast(bt[slot / block_size]);
    return (blk * block_size + slot % block_size) * row;
}

/// Calls f(ctx, slot) for every slot token i may see, in increasing slot order.
inline fn forEachSlot(a: *const AttnArgs, i: usize, ctx: anytype, comptime f: anytype) void {
    const sq: usize = @intCast(a.seq[i]);
    const c: usize = @intCast(a.committed[sq]);
    for (0..c) |slot| f(ctx, slot);
    const mask = a.ancestors + i * a.words;
    for (0..a.words) |wi| {
        var bits = mask[wi];
        while (bits != 0) : (bits &= bits - 1) {
            f(ctx, c + wi * 32 + @ctz(bits));
        }
    }
}

/// Reference: two passes (max, then exp-sum and weighted V) in f64.
pub fn attentionRef(a: *const AttnArgs, it0: usize, it1: usize) void {
    for (it0..it1) |it| {
        const i = it / a.n_heads;
        const h = it % a.n_heads;
        const kvh = h / (a.n_heads / a.n_kv_heads);
        const Ctx = struct {
            a: *const AttnArgs,
            q: [*]const f32,
            bt: [*]const i32,
            kvh: usize,
            mx: f64 = -std.math.inf(f64),
            sum: f64 = 0,
            acc: [max_head_dim]f64 = undefined,

            fn score(c: *@This(), slot: usize) f64 {
                const row = c.a.n_kv_heads * c.a.head_dim;
                const kr = c.a.k_plane + rowOffset(c.bt, c.a.block_size, row, slot) + c.kvh * c.a.head_dim;
                var d: f64 = 0;
                for (0..c.a.head_dim) |e| d += @as(f64, c.q[e]) * kr[e];
                return d * c.a.scale;
            }
            fn passMax(c: *@This(), slot: usize) void {
                c.mx = @max(c.mx, c.score(slot));
            }
            fn passSum(c: *@This(), slot: usize) void {
                const p = @exp(c.score(slot) - c.mx);
                c.sum += p;
                const row = c.a.n_kv_heads * c.a.head_dim;
                const vr = c.a.v_plane + rowOffset(c.bt, c.a.block_size, row, slot) + c.kvh * c.a.head_dim;
                for (0..c.a.head_dim) |e| c.acc[e] += p * vr[e];
            }
        };
        const sq: usize = @intCast(a.seq[i]);
        var c = Ctx{ .a = a, .q = a.q + (i * a.n_heads + h) * a.head_dim, .bt = a.block_tables + sq * a.max_blocks, .kvh = kvh };
        @memset(c.acc[0..a.head_dim], 0);
        forEachSlot(a, i, &c, Ctx.passMax);
        forEachSlot(a, i, &c, Ctx.passSum);
        const o = a.out + (i * a.n_heads + h) * a.head_dim;
        for (0..a.head_dim) |e| o[e] = if (c.sum > 0) @floatCast(c.acc[e] / c.sum) else 0;
    }
}

const tile = 32;

/// Online softmax over tiles of 32 slots: scores of a tile, one rescale of the
/// accumulator per tile, then the tile's V rows.
pub fn attention(a: *const AttnArgs, it0: usize, it1: usize) void {
    for (it0..it1) |it| {
        const i = it / a.n_heads;
        const h = it % a.n_heads;
        const kvh = h / (a.n_heads / a.n_kv_heads);
        const Ctx = struct {
            a: *const AttnArgs,
            q: [*]const f32,
            bt: [*]const i32,
            koff: usize,
            mx: f32 = -std.math.inf(f32),
            sum: f32 = 0,
            count: usize = 0,
            rows: [tile]usize = undefined,
            acc: [max_head_dim]f32 align(64) = undefined,

            fn push(c: *@This(), slot: usize) void {
                c.rows[c.count] = rowOffset(c.bt, c.a.block_size, c.a.n_kv_heads * c.a.head_dim, slot) + c.koff;
                c.count += 1;
                if (c.count == tile) c.flush();
            }

            fn flush(c: *@This()) void {
                const hd = c.a.head_dim;
                var sc: [tile]f32 = undefined;
                var tmax: f32 = -std.math.inf(f32);
                for (0..c.count) |j| {
                    sc[j] = dot(c.q, c.a.k_plane + c.rows[j], hd) * c.a.scale;
                    tmax = @max(tmax, sc[j]);
                }
                const m_new = @max(c.mx, tmax);
                const corr = @exp(c.mx - m_new); // 0 on the first tile (mx = -inf)
                c.sum *= corr;
                if (corr != 1) scaleRow(&c.acc, hd, corr);
                for (0..c.count) |j| {
                    const p = @exp(sc[j] - m_new);
                    c.sum += p;
                    axpy(&c.acc, c.a.v_plane + c.rows[j], hd, p);
                }
                c.mx = m_new;
                c.count = 0;
            }
        };
        const sq: usize = @intCast(a.seq[i]);
        var c = Ctx{ .a = a, .q = a.q + (i * a.n_heads + h) * a.head_dim, .bt = a.block_tables + sq * a.max_blocks, .koff = kvh * a.head_dim };
        @memset(c.acc[0..a.head_dim], 0);
        forEachSlot(a, i, &c, Ctx.push);
        if (c.count > 0) c.flush();
        const o = a.out + (i * a.n_heads + h) * a.head_dim;
        const inv: f32 = if (c.sum > 0) 1 / c.sum else 0;
        for (0..a.head_dim) |e| o[e] = c.acc[e] * inv;
    }
}

inline fn dot(x: [*]const f32, y: [*]const f32, n: usize) f32 {
    var a0 = s.splat(0);
    var a1 = s.splat(0);
    var e: usize = 0;
    while (e + 2 * L <= n) : (e += 2 * L) {
        a0 = @mulAdd(V, s.load(x + e), s.load(y + e), a0);
        a1 = @mulAdd(V, s.load(x + e + L), s.load(y + e + L), a1);
    }
    if (e + L <= n) {
        a0 = @mulAdd(V, s.load(x + e), s.load(y + e), a0);
        e += L;
    }
    var t = @reduce(.Add, a0 + a1);
    while (e < n) : (e += 1) t += x[e] * y[e];
    return t;
}

inline fn scaleRow(acc: [*]f32, n: usize, f: f32) void {
    var e: usize = 0;
    while (e + L <= n) : (e += L) s.store(acc + e, s.load(acc + e) * s.splat(f));
    while (e < n) : (e += 1) acc[e] *= f;
}

inline fn axpy(acc: [*]f32, v: [*]const f32, n: usize, p: f32) void {
    var e: usize = 0;
    const pv = s.splat(p);
    while (e + L <= n) : (e += L) s.store(acc + e, @mulAdd(V, pv, s.load(v + e), s.load(acc + e)));
    while (e < n) : (e += 1) acc[e] += p * v[e];
}

// ---- cache writes and moves ---------------------------------------------------------

inline fn copyRow(comptime reference: bool, dst: [*]f32, src: [*]const f32, row: usize) void {
    if (reference) {
        for (0..row) |e| dst[e] = src[e];
    } else @memcpy(dst[0..row], src[0..row]);
}

pub fn kvWrite(comptime reference: bool, k: [*]const f32, v: [*]const f32, n: usize, row: usize, seq: [*]const i32, slot: [*]const i32, block_tables: [*]const i32, max_blocks: usize, block_size: usize, k_plane: [*]f32, v_plane: [*]f32) void {
    for (0..n) |i| {
        const bt = block_tables + @as(usize, @intCast(seq[i])) * max_blocks;
        const off = rowOffset(bt, block_size, row, @intCast(slot[i]));
        copyRow(reference, k_plane + off, k + i * row, row);
        copyRow(reference, v_plane + off, v + i * row, row);
    }
}

/// Moves rows for planes [p0, p1) in order i = 0..n-1 within each plane.
pub fn kvMove(comptime reference: bool, cache: [*]f32, plane_stride: usize, row: usize, table: [*]const i32, block_size: usize, src: [*]const i32, dst: [*]const i32, n: usize, p0: usize, p1: usize) void {
    for (p0..p1) |p| {
        const plane = cache + p * plane_stride;
        for (0..n) |i| {
            if (src[i] == dst[i]) continue;
            const so = rowOffset(table, block_size, row, @intCast(src[i]));
            const d = rowOffset(table, block_size, row, @intCast(dst[i]));
            copyRow(reference, plane + d, plane + so, row);
        }
    }
}
