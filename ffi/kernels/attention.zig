//! Paged KV cache: write, tree attention, commit move (semantics in ffi/specinfer.h).
//!
//! A token of sequence row s sees the committed slots [0, committed[s]) of its row
//! plus slot committed[s] + j for each bit j set in its ancestor mask. One (token,
//! head) pair is one work item. Planes hold elements of T (f32 or f16); every kernel is
//! generic over T, so the f32 instantiation is the f32-only code it always was.
const std = @import("std");
const s = @import("simd.zig");
const V = s.V;
const L = s.L;

pub const max_head_dim = 1024; // per-item accumulators live on the stack

pub fn AttnArgs(comptime T: type) type {
    return struct {
        q: [*]const f32,
        n: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        k_plane: [*]const T,
        v_plane: [*]const T,
        block_tables: [*]const i32,
        max_blocks: usize,
        block_size: usize,
        seq: [*]const i32,
        committed: [*]const i32,
        ancestors: [*]const u32,
        words: usize,
        scale: f32,
        /// Per query head ALiBi slopes, or null (ffi/specinfer.h si_attention).
        alibi: ?[*]const f32,
        out: [*]f32,
    };
}

/// Slots token i sees: its row's committed slots plus its ancestor bits.
fn visibleCount(a: anytype, i: usize) usize {
    var count: usize = @intCast(a.committed[@as(usize, @intCast(a.seq[i]))]);
    for (a.ancestors[i * a.words .. (i + 1) * a.words]) |w| count += @popCount(w);
    return count;
}

/// ALiBi slope of head h (0 without ALiBi).
inline fn slopeOf(a: anytype, h: usize) f32 {
    return if (a.alibi) |sl| sl[h] else 0;
}

inline fn widen(x: anytype) f32 {
    return if (@TypeOf(x) == f32) x else @floatCast(x);
}

/// L consecutive plane elements as f32 (f16: vcvtph2ps).
inline fn loadPlane(comptime T: type, p: [*]const T) V {
    return if (T == f32) s.load(p) else s.loadF16(@ptrCast(p));
}

/// Offset in elements of (slot, kv head) inside a plane, through the row's block table.
inline fn rowOffset(bt: [*]const i32, block_size: usize, row: usize, slot: usize) usize {
    const blk: usize = @intCast(bt[slot / block_size]);
    return (blk * block_size + slot % block_size) * row;
}

/// Calls f(ctx, slot) for every slot token i may see, in increasing slot order.
inline fn forEachSlot(a: anytype, i: usize, ctx: anytype, comptime f: anytype) void {
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

/// As forEachSlot, but calls f(ctx, offset of the slot's row in a plane): committed
/// slots are walked block by block (no division per slot).
inline fn forEachRow(a: anytype, i: usize, ctx: anytype, comptime f: anytype) void {
    const sq: usize = @intCast(a.seq[i]);
    const c: usize = @intCast(a.committed[sq]);
    const bt = a.block_tables + sq * a.max_blocks;
    const row = a.n_kv_heads * a.head_dim;
    const bs = a.block_size;
    var slot: usize = 0;
    var b: usize = 0;
    while (slot < c) : (b += 1) {
        const end = @min(slot + bs, c);
        var off = @as(usize, @intCast(bt[b])) * bs * row;
        while (slot < end) : (slot += 1) {
            f(ctx, off);
            off += row;
        }
    }
    const mask = a.ancestors + i * a.words;
    for (0..a.words) |wi| {
        var bits = mask[wi];
        while (bits != 0) : (bits &= bits - 1) {
            f(ctx, rowOffset(bt, bs, row, c + wi * 32 + @ctz(bits)));
        }
    }
}

/// Reference: two passes (max, then exp-sum and weighted V) in f64.
pub fn attentionRef(comptime T: type, a: *const AttnArgs(T), it0: usize, it1: usize) void {
    for (it0..it1) |it| {
        const i = it / a.n_heads;
        const h = it % a.n_heads;
        const kvh = h / (a.n_heads / a.n_kv_heads);
        const Ctx = struct {
            a: *const AttnArgs(T),
            q: [*]const f32,
            bt: [*]const i32,
            kvh: usize,
            slope: f64,
            last: usize, // rank of the token's own slot among those it sees
            rank: usize = 0,
            mx: f64 = -std.math.inf(f64),
            sum: f64 = 0,
            acc: [max_head_dim]f64 = undefined,

            /// Score of the next visible slot; ALiBi adds -slope * its distance.
            fn score(c: *@This(), slot: usize) f64 {
                const row = c.a.n_kv_heads * c.a.head_dim;
                const kr = c.a.k_plane + rowOffset(c.bt, c.a.block_size, row, slot) + c.kvh * c.a.head_dim;
                var d: f64 = 0;
                for (0..c.a.head_dim) |e| d += @as(f64, c.q[e]) * widen(kr[e]);
                const dist: f64 = @floatFromInt(c.last - c.rank);
                c.rank += 1;
                return d * c.a.scale - c.slope * dist;
            }
            fn passMax(c: *@This(), slot: usize) void {
                c.mx = @max(c.mx, c.score(slot));
            }
            fn passSum(c: *@This(), slot: usize) void {
                const p = @exp(c.score(slot) - c.mx);
                c.sum += p;
                const row = c.a.n_kv_heads * c.a.head_dim;
                const vr = c.a.v_plane + rowOffset(c.bt, c.a.block_size, row, slot) + c.kvh * c.a.head_dim;
                for (0..c.a.head_dim) |e| c.acc[e] += p * widen(vr[e]);
            }
        };
        const sq: usize = @intCast(a.seq[i]);
        const seen = visibleCount(a, i);
        var c = Ctx{ .a = a, .q = a.q + (i * a.n_heads + h) * a.head_dim, .bt = a.block_tables + sq * a.max_blocks, .kvh = kvh, .slope = slopeOf(a, h), .last = if (seen > 0) seen - 1 else 0 };
        @memset(c.acc[0..a.head_dim], 0);
        forEachSlot(a, i, &c, Ctx.passMax);
        c.rank = 0;
        forEachSlot(a, i, &c, Ctx.passSum);
        const o = a.out + (i * a.n_heads + h) * a.head_dim;
        for (0..a.head_dim) |e| o[e] = if (c.sum > 0) @floatCast(c.acc[e] / c.sum) else 0;
    }
}

const tile = 32;

/// Online softmax over tiles of 32 visible slots (in slot order): the tile's scores,
/// one rescale of the accumulator per tile, then the tile's V rows. The score of a
/// slot is one FMA chain over head_dim in steps of 16, lane sums by s.sumLanes'
/// fixed tree, then the scalar tail; the exponentials are vector ones.
pub fn attention(comptime T: type, a: *const AttnArgs(T), it0: usize, it1: usize) void {
    for (it0..it1) |it| {
        const i = it / a.n_heads;
        const h = it % a.n_heads;
        const kvh = h / (a.n_heads / a.n_kv_heads);
        const Ctx = struct {
            a: *const AttnArgs(T),
            q: [*]const f32,
            koff: usize,
            slope: f32,
            last: usize, // rank of the token's own slot among those it sees
            rank: usize = 0,
            mx: f32 = -std.math.inf(f32),
            sum: f32 = 0,
            count: usize = 0,
            rows: [tile]usize = undefined,
            bias: [tile]f32 = undefined, // ALiBi: -slope * distance (0 without)
            acc: [max_head_dim]f32 align(64) = undefined,

            fn push(c: *@This(), off: usize) void {
                c.rows[c.count] = off + c.koff;
                c.bias[c.count] = -c.slope * @as(f32, @floatFromInt(c.last - c.rank));
                c.rank += 1;
                c.count += 1;
                if (c.count == tile) c.flush();
            }

            fn flush(c: *@This()) void {
                const hd = c.a.head_dim;
                const full = hd / L * L;
                // A short tile repeats its last row; those lanes are masked below.
                for (c.count..tile) |j| c.rows[j] = c.rows[c.count - 1];
                var part: [tile]V = undefined;
                inline for (0..tile) |j| {
                    const kr = c.a.k_plane + c.rows[j];
                    var p = s.splat(0);
                    var e: usize = 0;
                    while (e < full) : (e += L) p = @mulAdd(V, s.load(c.q + e), loadPlane(T, kr + e), p);
                    part[j] = p;
                }
                var sc = s.sumLanes(tile, part);
                if (full < hd) {
                    for (0..c.count) |j| {
                        for (full..hd) |e| sc[j] += c.q[e] * widen(c.a.k_plane[c.rows[j] + e]);
                    }
                }
                const ninf = s.splat(-std.math.inf(f32));
                var lane: @Vector(L, u32) = undefined;
                inline for (0..L) |l| lane[l] = l;
                const cnt: @Vector(L, u32) = @splat(@as(u32, @intCast(c.count)));
                const sv = s.splat(c.a.scale);
                const b0: V = c.bias[0..L].*;
                const b1: V = c.bias[L..tile].*;
                const s0 = @select(f32, lane < cnt, @mulAdd(V, @as(V, sc[0..L].*), sv, b0), ninf);
                const s1 = @select(f32, lane + @as(@Vector(L, u32), @splat(L)) < cnt, @mulAdd(V, @as(V, sc[L..tile].*), sv, b1), ninf);
                const m_new = @max(c.mx, @reduce(.Max, @max(s0, s1)));
                const corr = @exp(c.mx - m_new); // 0 on the first tile (mx = -inf)
                if (corr != 1) scaleRow(&c.acc, hd, corr);
                const mv = s.splat(m_new);
                const p0 = s.exp(s0 - mv);
                const p1 = s.exp(s1 - mv);
                c.sum = c.sum * corr + s.sumLanes(1, .{p0 + p1})[0];
                const ps: [tile]f32 = @as([L]f32, p0) ++ @as([L]f32, p1);
                for (0..c.count) |j| axpy(T, &c.acc, c.a.v_plane + c.rows[j], hd, ps[j]);
                c.mx = m_new;
                c.count = 0;
            }
        };
        const seen = visibleCount(a, i);
        var c = Ctx{ .a = a, .q = a.q + (i * a.n_heads + h) * a.head_dim, .koff = kvh * a.head_dim, .slope = slopeOf(a, h), .last = if (seen > 0) seen - 1 else 0 };
        @memset(c.acc[0..a.head_dim], 0);
        forEachRow(a, i, &c, Ctx.push);
        if (c.count > 0) c.flush();
        const o = a.out + (i * a.n_heads + h) * a.head_dim;
        const inv: f32 = if (c.sum > 0) 1 / c.sum else 0;
        for (0..a.head_dim) |e| o[e] = c.acc[e] * inv;
    }
}

inline fn scaleRow(acc: [*]f32, n: usize, f: f32) void {
    var e: usize = 0;
    while (e + L <= n) : (e += L) s.store(acc + e, s.load(acc + e) * s.splat(f));
    while (e < n) : (e += 1) acc[e] *= f;
}

inline fn axpy(comptime T: type, acc: [*]f32, v: [*]const T, n: usize, p: f32) void {
    var e: usize = 0;
    const pv = s.splat(p);
    while (e + L <= n) : (e += L) s.store(acc + e, @mulAdd(V, pv, loadPlane(T, v + e), s.load(acc + e)));
    while (e < n) : (e += 1) acc[e] += p * widen(v[e]);
}

// ---- cache writes and moves ---------------------------------------------------------

/// dst = src converted to T (f16: round to nearest even).
inline fn storeRow(comptime reference: bool, comptime T: type, dst: [*]T, src: [*]const f32, row: usize) void {
    if (reference) {
        for (0..row) |e| dst[e] = if (T == f32) src[e] else @floatCast(src[e]);
    } else if (T == f32) {
        @memcpy(dst[0..row], src[0..row]);
    } else {
        var e: usize = 0;
        while (e + L <= row) : (e += L) s.storeF16(@ptrCast(dst + e), s.load(src + e));
        while (e < row) : (e += 1) dst[e] = @floatCast(src[e]);
    }
}

inline fn copyRow(comptime reference: bool, comptime T: type, dst: [*]T, src: [*]const T, row: usize) void {
    if (reference) {
        for (0..row) |e| dst[e] = src[e];
    } else @memcpy(dst[0..row], src[0..row]);
}

pub fn kvWrite(comptime reference: bool, comptime T: type, k: [*]const f32, v: [*]const f32, n: usize, row: usize, seq: [*]const i32, slot: [*]const i32, block_tables: [*]const i32, max_blocks: usize, block_size: usize, k_plane: [*]T, v_plane: [*]T) void {
    for (0..n) |i| {
        const bt = block_tables + @as(usize, @intCast(seq[i])) * max_blocks;
        const off = rowOffset(bt, block_size, row, @intCast(slot[i]));
        storeRow(reference, T, k_plane + off, k + i * row, row);
        storeRow(reference, T, v_plane + off, v + i * row, row);
    }
}

/// Moves rows for planes [p0, p1) in order i = 0..n-1 within each plane.
pub fn kvMove(comptime reference: bool, comptime T: type, cache: [*]T, plane_stride: usize, row: usize, table: [*]const i32, block_size: usize, src: [*]const i32, dst: [*]const i32, n: usize, p0: usize, p1: usize) void {
    for (p0..p1) |p| {
        const plane = cache + p * plane_stride;
        for (0..n) |i| {
            if (src[i] == dst[i]) continue;
            const so = rowOffset(table, block_size, row, @intCast(src[i]));
            const d = rowOffset(table, block_size, row, @intCast(dst[i]));
            copyRow(reference, T, plane + d, plane + so, row);
        }
    }
}
