//! Logits -> tokens: penalties, logit bias, temperature, top-k / top-p / min-p, the seeded
//! draw, and the greedy walk of a token tree. The steps, their order and their rounding
//! (f32 rows, f64 weights and sums) are those of src/speculation/sampling.ts, the tests'
//! oracle, and the draw is src/speculation/rng.ts's uniformAt(seed, position), so a
//! given draw picks the same token here as there (up to exp's last bit, which can move a
//! draw that lies on a boundary of the cumulative distribution).
const std = @import("std");
const s = @import("simd.zig");
const L = s.L;

// ---- the draw: uniformAt of src/speculation/rng.ts -------------------------------------

pub fn splitmix32(state: u32) u32 {
    var t = state +% 0x9e3779b9;
    t = (t ^ (t >> 16)) *% 0x21f0aaad;
    t = (t ^ (t >> 15)) *% 0x735a2d97;
    return t ^ (t >> 15);
}

/// The low and high 32-bit words of an integer: JS's `v >>> 0` and `floor(v / 2^32) >>> 0`.
fn words(v: i64) [2]u32 {
    const u: u64 = @bitCast(v);
    return .{ @truncate(u), @truncate(u >> 32) };
}

/// xoshiro128** seeded through splitmix32, as rng.ts's Rng.
const Xoshiro = struct {
    st: [4]u32,

    fn init(seed: i64) Xoshiro {
        const w = words(seed);
        var mix = splitmix32(w[0] ^ splitmix32(w[1]));
        var r: Xoshiro = undefined;
        mix = splitmix32(mix);
        r.st[0] = mix;
        mix = splitmix32(mix);
        r.st[1] = mix;
        mix = splitmix32(mix);
        r.st[2] = mix;
        r.st[3] = splitmix32(mix) | 1;
        return r;
    }

    fn nextU32(r: *Xoshiro) u32 {
        const result = std.math.rotl(u32, r.st[1] *% 5, 7) *% 9;
        const t = r.st[1] << 9;
        r.st[2] ^= r.st[0];
        r.st[3] ^= r.st[1];
        r.st[1] ^= r.st[2];
        r.st[0] ^= r.st[3];
        r.st[2] ^= t;
        r.st[3] = std.math.rotl(u32, r.st[3], 11);
        return result;
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next(r: *Xoshiro) f64 {
        const high: f64 = @floatFromInt(r.nextU32() >> 5);
        const low: f64 = @floatFromInt(r.nextU32() >> 6);
        return (high * 67108864.0 + low) / 9007199254740992.0;
    }
};

/// The uniform draw in [0, 1) of the token at `position` of a request seeded `seed`.
pub fn uniformAt(seed: i64, position: i64) f64 {
    const sd = words(seed);
    const ps = words(position);
    const base = splitmix32(sd[0] ^ splitmix32(sd[1]));
    const p = splitmix32(base ^ splitmix32(ps[0] ^ 0x632be5ab));
    const q = splitmix32(p ^ splitmix32(ps[1] ^ 0x9e3779b9));
    var r = Xoshiro.init(@intCast(@as(u64, p) * 2097152 + (q >> 11)));
    return r.next();
}

// ---- per-row parameters ---------------------------------------------------------------

/// Fields of one row's parameters (ffi/specinfer.h si_sampling_field), doubles.
pub const fields = 9;
pub const Params = struct {
    temperature: f64, // 0 = greedy
    top_k: usize, // 0 = off
    top_p: f64, // 1 = off
    min_p: f64, // 0 = off
    repetition: f64, // 1 = off
    presence: f64,
    frequency: f64,
    seed: i64,
    position: i64,

    pub fn at(p: [*]const f64) Params {
        return .{
            .temperature = p[0],
            .top_k = @intFromFloat(p[1]),
            .top_p = p[2],
            .min_p = p[3],
            .repetition = p[4],
            .presence = p[5],
            .frequency = p[6],
            .seed = @intFromFloat(p[7]),
            .position = @intFromFloat(p[8]),
        };
    }
};

/// Why a row's parameters are refused, or null when they are fine. The values are
/// doubles from the caller; every later conversion relies on these checks.
pub fn paramsProblem(p: [*]const f64) ?[]const u8 {
    const safe = 9007199254740992.0;
    if (!(p[0] >= 0) or !std.math.isFinite(p[0])) return "temperature must be finite and >= 0";
    if (!(p[1] >= 0 and p[1] < 2147483648.0) or @floor(p[1]) != p[1]) return "top_k must be an integer >= 0";
    if (!(p[2] > 0 and p[2] <= 1)) return "top_p must be in (0, 1]";
    if (!(p[3] >= 0 and p[3] <= 1)) return "min_p must be in [0, 1]";
    if (!(p[4] > 0) or !std.math.isFinite(p[4])) return "repetition penalty must be finite and > 0";
    if (!std.math.isFinite(p[5]) or !std.math.isFinite(p[6])) return "presence and frequency penalties must be finite";
    if (!(@fabs(p[7]) < safe) or @floor(p[7]) != p[7]) return "seed must be an integer below 2^53";
    if (!(p[8] >= 0 and p[8] < safe) or @floor(p[8]) != p[8]) return "position must be an integer >= 0";
    return null;
}

/// One row's context: unique tokens with their counts in the context (0 = bias only)
/// and their logit bias (0 = none).
pub const Edits = struct {
    tokens: []const i32,
    counts: []const i32,
    bias: []const f64,
};

// ---- row passes -------------------------------------------------------------------------

/// y = x with NaN read as -inf (a NaN logit is never picked).
pub fn cleanCopyRef(x: [*]const f32, n: usize, y: [*]f32) void {
    for (0..n) |i| y[i] = if (std.math.isNan(x[i])) -std.math.inf(f32) else x[i];
}

pub fn cleanCopy(x: [*]const f32, n: usize, y: [*]f32) void {
    const ninf = s.splat(-std.math.inf(f32));
    var i: usize = 0;
    while (i + L <= n) : (i += L) {
        const v = s.load(x + i);
        s.store(y + i, @select(f32, v != v, ninf, v));
    }
    cleanCopyRef(x + i, n - i, y + i);
}

/// Penalties, then bias, per listed token (sampling.ts `penalized`): HF repetition
/// (divide a positive logit, multiply a negative one), OpenAI presence and frequency,
/// each result rounded to f32 as the TypeScript row stores it.
pub fn applyEdits(y: [*]f32, p: Params, e: Edits) void {
    for (e.tokens, e.counts, e.bias) |token, count, bias| {
        const t: usize = @intCast(token);
        var v = y[t];
        if (count > 0) {
            const w: f64 = v;
            v = @floatCast(if (w > 0) w / p.repetition else w * p.repetition);
            v = @floatCast(@as(f64, v) - (p.presence + p.frequency * @as(f64, @floatFromInt(count))));
        }
        y[t] = @floatCast(@as(f64, v) + bias);
    }
}

/// Index of the largest value with NaN read as -inf, lowest index on ties (0 when every
/// value is -inf or NaN).
pub fn argmaxRef(x: [*]const f32, n: usize) usize {
    var best: usize = 0;
    var best_value = -std.math.inf(f32);
    for (0..n) |i| {
        if (x[i] > best_value) {
            best = i;
            best_value = x[i];
        }
    }
    return best;
}

pub fn argmax(x: [*]const f32, n: usize) usize {
    const ninf = s.splat(-std.math.inf(f32));
    var mv = ninf;
    var i: usize = 0;
    while (i + L <= n) : (i += L) {
        const v = s.load(x + i);
        mv = @max(mv, @select(f32, v != v, ninf, v));
    }
    var mx = @reduce(.Max, mv);
    while (i < n) : (i += 1) {
        if (x[i] > mx) mx = x[i];
    }
    if (mx == -std.math.inf(f32)) return 0;
    for (0..n) |j| {
        if (x[j] == mx) return j;
    }
    return 0;
}

inline fn idx(i: i32) usize {
    return @intCast(i);
}

/// `a` ranks above `b`: larger key, then lower index.
inline fn above(key: [*]const f32, a: i32, b: i32) bool {
    const ka = key[idx(a)];
    const kb = key[idx(b)];
    return ka > kb or (ka == kb and a < b);
}

fn siftDown(key: [*]const f32, heap: []i32, start: usize) void {
    var at = start;
    while (true) {
        const left = 2 * at + 1;
        if (left >= heap.len) return;
        const right = left + 1;
        // Min-heap on rank: the root is the worst kept index.
        const child = if (right < heap.len and above(key, heap[left], heap[right])) right else left;
        if (!above(key, heap[at], heap[child])) return;
        std.mem.swap(i32, &heap[at], &heap[child]);
        at = child;
    }
}

/// The (up to) k best indices of key[0..n] by rank, best first, into out. Returns how
/// many. A size-k heap: O(n log k).
pub fn selectTop(key: [*]const f32, n: usize, k: usize, out: []i32) usize {
    if (k == 0) return 0;
    var size: usize = 0;
    for (0..n) |i| {
        const cand: i32 = @intCast(i);
        if (size < k) {
            out[size] = cand;
            size += 1;
            // Sift up.
            var at = size - 1;
            while (at > 0) {
                const up = (at - 1) / 2;
                if (!above(key, out[up], out[at])) break;
                std.mem.swap(i32, &out[up], &out[at]);
                at = up;
            }
        } else if (above(key, cand, out[0])) {
            out[0] = cand;
            siftDown(key, out[0..size], 0);
        }
    }
    // Popping the worst to the back leaves the heap sorted best first.
    var end = size;
    while (end > 1) {
        end -= 1;
        std.mem.swap(i32, &out[0], &out[end]);
        siftDown(key, out[0..end], 0);
    }
    return size;
}

/// sampling.ts `processLogits` after the penalties, for temperature > 0: the row y
/// (penalized, no NaN; best = its argmax) becomes its distribution, in place. `order` is
/// scratch of 2 * n entries. Returns false when no token has mass (every logit -inf).
pub fn distribution(y: [*]f32, n: usize, p: Params, best: usize, order: []i32) bool {
    const inv_t = 1 / p.temperature;
    const limit_k = p.top_k > 0 and p.top_k < n;
    const limit_p = p.top_p < 1;
    if (!limit_k and !limit_p) {
        // No ordering needed: weights relative to the top token, whose weight is 1.
        const max: f64 = y[best];
        if (max == -std.math.inf(f64)) return false;
        var total: f64 = 0;
        for (0..n) |i| {
            const w = @exp((@as(f64, y[i]) - max) * inv_t);
            const w32: f32 = @floatCast(w);
            y[i] = if (w >= p.min_p) w32 else 0;
            total += y[i];
        }
        for (0..n) |i| y[i] = @floatCast(@as(f64, y[i]) / total);
        return true;
    }
    // Otherwise the kept tokens are a prefix of the tokens ranked by probability; their
    // probabilities go to `values` (the second half of order) before the row is cleared.
    const values: [*]f32 = @ptrCast(order.ptr + n);
    if (limit_k) {
        // Ranked by logit; f64 weights.
        const ranked = order[0..selectTop(y, n, p.top_k, order)];
        const max: f64 = y[idx(ranked[0])];
        if (max == -std.math.inf(f64)) return false;
        var total: f64 = 0;
        for (ranked) |t| total += @exp((@as(f64, y[idx(t)]) - max) * inv_t);
        const nucleus = p.top_p * total;
        const floor = p.min_p; // times the top token's weight, exp(0) = 1
        var kept: usize = 0;
        var covered: f64 = 0;
        while (kept < ranked.len) : (kept += 1) {
            const w = @exp((@as(f64, y[idx(ranked[kept])]) - max) * inv_t);
            if (!((kept == 0 or covered < nucleus) and w >= floor)) break;
            covered += w;
        }
        for (0..kept) |j| values[j] = @floatCast(@exp((@as(f64, y[idx(ranked[j])]) - max) * inv_t) / covered);
        scatter(y, n, ranked[0..kept], values);
        return true;
    }
    // Top-p alone: f32 weights over the row, ranked by weight (positive ones only).
    const max: f64 = y[best];
    if (max == -std.math.inf(f64)) return false;
    var total: f64 = 0;
    for (0..n) |i| {
        y[i] = @floatCast(@exp((@as(f64, y[i]) - max) * inv_t));
        total += y[i];
    }
    // The fewest most likely tokens covering top_p of the mass (at least one), in rank
    // order: only tokens at or above a weight cut need ranking.
    const mass = p.top_p * total;
    var cut = coverCut(y, n, mass);
    var taken: usize = 0;
    while (true) {
        const got = rankAbove(y, n, cut, order);
        var covered: f64 = 0;
        taken = 0;
        while (taken < got and (taken == 0 or covered < mass)) : (taken += 1) covered += y[idx(order[taken])];
        // Out of candidates before covering (rounding past the margin): rank them all.
        if (taken < got or covered >= mass or cut == 0) break;
        cut = 0;
    }
    const ranked = order[0..taken];
    if (ranked.len == 0) return false; // NaN weights (an infinite 1 / temperature)
    const nucleus = p.top_p * total;
    const floor = p.min_p * @as(f64, y[idx(ranked[0])]);
    var kept: usize = 0;
    var covered: f64 = 0;
    while (kept < ranked.len) : (kept += 1) {
        const w: f64 = y[idx(ranked[kept])];
        if (!((kept == 0 or covered < nucleus) and w >= floor)) break;
        covered += w;
    }
    for (0..kept) |j| values[j] = @floatCast(@as(f64, y[idx(ranked[j])]) / covered);
    scatter(y, n, ranked[0..kept], values);
    return true;
}

/// Weight buckets: the top bits of a positive f32, which order like the weights.
const bucket_shift = 20;
const buckets = 1 << (31 - bucket_shift);

inline fn bucketOf(w: f32) usize {
    return @as(u32, @bitCast(w)) >> bucket_shift;
}

/// The lowest weight bucket that may hold the top-p prefix: where the bucketed mass from
/// the top first reaches `mass`, one bucket lower for rounding (a shortfall is caught by
/// the caller, which then ranks every token).
fn coverCut(w: [*]const f32, n: usize, mass: f64) usize {
    var per_bucket = [_]f64{0} ** buckets;
    for (0..n) |i| {
        if (w[i] > 0) per_bucket[bucketOf(w[i])] += w[i];
    }
    var covered: f64 = 0;
    var b: usize = buckets;
    while (b > 0) {
        b -= 1;
        covered += per_bucket[b];
        if (covered >= mass) return b -| 1;
    }
    return 0;
}

fn rankedBefore(key: [*]const f32, a: i32, b: i32) bool {
    return above(key, a, b);
}

/// The positive-weight tokens in buckets >= cut into order, sorted by rank. Returns how many.
fn rankAbove(w: [*]const f32, n: usize, cut: usize, order: []i32) usize {
    var m: usize = 0;
    for (0..n) |i| {
        if (w[i] > 0 and bucketOf(w[i]) >= cut) {
            order[m] = @intCast(i);
            m += 1;
        }
    }
    std.sort.pdq(i32, order[0..m], w, rankedBefore);
    return m;
}

/// Clears the row, then row[ranked[j]] = values[j].
fn scatter(row: [*]f32, n: usize, ranked: []const i32, values: [*]const f32) void {
    @memset(row[0..n], 0);
    for (ranked, 0..) |t, j| row[idx(t)] = values[j];
}

/// sampling.ts `sampleAt`: the index whose cumulative interval holds u * total, over the
/// positive entries; -1 when the row has no mass.
pub fn sampleAt(probs: [*]const f32, n: usize, u: f64) i32 {
    var total: f64 = 0;
    for (0..n) |i| total += probs[i];
    if (!(total > 0)) return -1;
    const target = u * total;
    var cumulative: f64 = 0;
    var last: i32 = -1;
    for (0..n) |i| {
        if (!(probs[i] > 0)) continue;
        cumulative += probs[i];
        if (target < cumulative) return @intCast(i);
        last = @intCast(i);
    }
    return last; // rounding left the target just past the end
}

/// One row: logits x -> penalized copy in out_row; greedy rows pick its argmax, sampled
/// rows turn it into their distribution and draw from it. Returns the token, or -1 when
/// a sampled row has no mass.
pub fn pickRow(x: [*]const f32, n: usize, p: Params, e: Edits, out_row: [*]f32, order: []i32, ref: bool) i32 {
    // A greedy row with nothing to edit is read in place: its out_row stays unwritten.
    if (p.temperature == 0 and e.tokens.len == 0) return @intCast(if (ref) argmaxRef(x, n) else argmax(x, n));
    if (ref) cleanCopyRef(x, n, out_row) else cleanCopy(x, n, out_row);
    applyEdits(out_row, p, e);
    const best = if (ref) argmaxRef(out_row, n) else argmax(out_row, n);
    if (p.temperature == 0) return @intCast(best);
    return sampled(out_row, n, p, best, order);
}

fn sampled(row: [*]f32, n: usize, p: Params, best: usize, order: []i32) i32 {
    if (!distribution(row, n, p, best, order)) return -1;
    return sampleAt(row, n, uniformAt(p.seed, p.position));
}

// ---- greedy tree walk -------------------------------------------------------------------

/// Walks one tree from its root (row 0): at row r, the child whose token equals
/// picked[r] is accepted, until none does. parents[r] is the parent row of r (rows in
/// tree order: parents first). Writes the accepted rows to `accepted`, returns
/// { count, bonus } where bonus = picked at the last accepted row (or the root).
pub fn walk(parents: []const i32, tokens: []const i32, picked: []const i32, accepted: []i32) struct { count: usize, bonus: i32 } {
    var at: usize = 0;
    var count: usize = 0;
    outer: while (true) {
        const want = picked[at];
        if (want >= 0) {
            for (at + 1..parents.len) |r| {
                if (parents[r] == @as(i32, @intCast(at)) and tokens[r] == want) {
                    accepted[count] = @intCast(r);
                    count += 1;
                    at = r;
                    continue :outer;
                }
            }
        }
        return .{ .count = count, .bonus = want };
    }
}

test "argmax reads NaN as -inf, ties go to the lowest index, and an all -inf row gives 0" {
    const nan = std.math.nan(f32);
    const ninf = -std.math.inf(f32);
    var row = [_]f32{ nan, 1, 3, nan, 3, ninf, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, nan };
    try std.testing.expectEqual(@as(usize, 2), argmaxRef(&row, row.len));
    try std.testing.expectEqual(@as(usize, 2), argmax(&row, row.len));
    var empty = [_]f32{ nan, ninf, nan, ninf, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, ninf, nan };
    try std.testing.expectEqual(@as(usize, 0), argmaxRef(&empty, empty.len));
    try std.testing.expectEqual(@as(usize, 0), argmax(&empty, empty.len));
}

test "the top-p cut keeps every token the prefix needs" {
    // Weights 1, 1/2, 1/4, ...: covering 0.9 of the mass needs the four largest.
    var w: [40]f32 = undefined;
    var total: f64 = 0;
    for (&w, 0..) |*x, i| {
        x.* = std.math.pow(f32, 0.5, @as(f32, @floatFromInt(i)));
        total += x.*;
    }
    var order: [40]i32 = undefined;
    const got = rankAbove(&w, w.len, coverCut(&w, w.len, 0.9 * total), &order);
    try std.testing.expect(got >= 4);
    try std.testing.expectEqualSlices(i32, &.{ 0, 1, 2, 3 }, order[0..4]);
}

test "selectTop ranks by key then lower index" {
    const key = [_]f32{ 1, 3, 3, -std.math.inf(f32), 2, 3 };
    var out: [6]i32 = undefined;
    const got = selectTop(&key, key.len, 4, &out);
    try std.testing.expectEqual(@as(usize, 4), got);
    try std.testing.expectEqualSlices(i32, &.{ 1, 2, 5, 4 }, out[0..4]);
}

test "walk follows picked tokens and stops at the first miss" {
    // root(0) -> a(1, token 5) -> b(2, token 7); root -> c(3, token 6)
    const parents = [_]i32{ -1, 0, 1, 0 };
    const tokens = [_]i32{ 0, 5, 7, 6 };
    const picked = [_]i32{ 6, 7, 1, 9 };
    var acc: [4]i32 = undefined;
    const r = walk(&parents, &tokens, &picked, &acc);
    try std.testing.expectEqual(@as(usize, 1), r.count);
    try std.testing.expectEqual(@as(i32, 3), acc[0]);
    try std.testing.expectEqual(@as(i32, 9), r.bonus);
}
