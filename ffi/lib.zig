//! libspecinfer_cpu: the C ABI of ffi/specinfer.h over the Zig CPU kernels.
//!
//! This file owns argument checking, error messages, scratch memory and the split of
//! each op over the context's thread pool; the kernels in kernels/ are plain
//! functions over pointers and shapes. Every op validates its whole input before it
//! touches memory, so a bad call returns an error code and leaves the process alive.
const std = @import("std");
const pool_mod = @import("pool.zig");
const mm = @import("kernels/matmul.zig");
const nn = @import("kernels/nn.zig");
const at = @import("kernels/attention.zig");
const simd = @import("kernels/simd.zig");
const sp = @import("kernels/sampling.zig");

const Pool = pool_mod.Pool;
const parallelFor = pool_mod.parallelFor;
const DType = mm.DType;

const SI_OK: i32 = 0;
const SI_ERR_ARG: i32 = 1;
const SI_ERR_NOMEM: i32 = 2;
const SI_ERR_IO: i32 = 3;
const SI_FLAG_REFERENCE: i32 = 1;

const max_threads = 256;

pub const Ctx = struct {
    pool: Pool,
    reference: bool,
    err: [1024]u8 = undefined,
    scratch: []align(64) u8 = &.{}, // quantized activations; grows, never shrinks
    sink: std.atomic.Atomic(u64) = std.atomic.Atomic(u64).init(0), // keeps the bandwidth probe's sums alive

    fn fail(self: *Ctx, code: i32, comptime fmt: []const u8, args: anytype) i32 {
        const room = self.err[0 .. self.err.len - 1];
        const len = if (std.fmt.bufPrint(room, fmt, args)) |m| m.len else |_| room.len;
        self.err[len] = 0;
        return code;
    }

    fn scratchFor(self: *Ctx, bytes: usize) ?[*]align(64) u8 {
        if (self.scratch.len < bytes) {
            const grown = @max(bytes, self.scratch.len * 3 / 2);
            const mem = std.heap.page_allocator.alignedAlloc(u8, 64, grown) catch return null;
            if (self.scratch.len > 0) std.heap.page_allocator.free(self.scratch);
            self.scratch = mem;
        }
        return self.scratch.ptr;
    }
};

// ---- context ------------------------------------------------------------------------

export fn si_create(n_threads: i32, flags: i32) callconv(.C) ?*Ctx {
    const n: u32 = if (n_threads > 0)
        @intCast(@min(n_threads, max_threads))
    else
        @intCast(@min(std.Thread.getCpuCount() catch 1, max_threads));
    const ctx = std.heap.c_allocator.create(Ctx) catch return null;
    ctx.* = .{ .pool = undefined, .reference = flags & SI_FLAG_REFERENCE != 0 };
    ctx.err[0] = 0;
    ctx.pool.init(n) catch {
        std.heap.c_allocator.destroy(ctx);
        return null;
    };
    return ctx;
}

export fn si_destroy(ctx: ?*Ctx) callconv(.C) void {
    const c = ctx orelse return;
    c.pool.deinit();
    if (c.scratch.len > 0) std.heap.page_allocator.free(c.scratch);
    std.heap.c_allocator.destroy(c);
}

export fn si_last_error(ctx: ?*Ctx) callconv(.C) [*:0]const u8 {
    const c = ctx orelse return "null si_ctx";
    return @ptrCast(&c.err);
}

export fn si_threads(ctx: ?*Ctx) callconv(.C) i32 {
    const c = ctx orelse return 0;
    return @intCast(c.pool.n);
}

export fn si_sync(ctx: ?*Ctx) callconv(.C) i32 {
    _ = ctx orelse return SI_ERR_ARG;
    return SI_OK;
}

// ---- memory -------------------------------------------------------------------------

/// si_alloc blocks carry a 64-byte header (size + magic) in front of the user pointer;
/// whole pages come from mmap, so they are zeroed and untouched pages cost nothing.
const Header = extern struct { magic: u64, total: u64 };
const header_bytes = 64;
const alloc_magic: u64 = 0x5350_4543_414c_4c43; // "SPECALLC"

export fn si_alloc(ctx: ?*Ctx, bytes: u64) callconv(.C) ?*anyopaque {
    const c = ctx orelse return null;
    const total = std.math.add(u64, bytes, header_bytes) catch {
        _ = c.fail(SI_ERR_NOMEM, "si_alloc: {d} bytes is too large", .{bytes});
        return null;
    };
    const mem = std.heap.page_allocator.alignedAlloc(u8, 64, total) catch {
        _ = c.fail(SI_ERR_NOMEM, "si_alloc: out of memory allocating {d} bytes", .{bytes});
        return null;
    };
    const h: *Header = @ptrCast(mem.ptr);
    h.* = .{ .magic = alloc_magic, .total = total };
    return mem.ptr + header_bytes;
}

export fn si_free(ctx: ?*Ctx, ptr: ?*anyopaque) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const p: [*]align(64) u8 = @ptrCast(@alignCast(ptr orelse return SI_OK));
    const base: [*]align(64) u8 = @alignCast(p - header_bytes);
    const h: *Header = @ptrCast(base);
    if (@intFromPtr(p) % 64 != 0 or h.magic != alloc_magic)
        return c.fail(SI_ERR_ARG, "si_free: 0x{x} was not returned by si_alloc (or was freed twice)", .{@intFromPtr(p)});
    h.magic = 0;
    std.heap.page_allocator.free(base[0..h.total]);
    return SI_OK;
}

export fn si_upload(ctx: ?*Ctx, dst: ?*anyopaque, src: ?*const anyopaque, bytes: u64) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    if (bytes == 0) return SI_OK;
    const d: [*]u8 = @ptrCast(dst orelse return c.fail(SI_ERR_ARG, "si_upload: dst is NULL", .{}));
    const s: [*]const u8 = @ptrCast(src orelse return c.fail(SI_ERR_ARG, "si_upload: src is NULL", .{}));
    std.mem.copyForwards(u8, d[0..bytes], s[0..bytes]);
    return SI_OK;
}

export fn si_download(ctx: ?*Ctx, dst: ?*anyopaque, src: ?*const anyopaque, bytes: u64) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    if (bytes == 0) return SI_OK;
    const d: [*]u8 = @ptrCast(dst orelse return c.fail(SI_ERR_ARG, "si_download: dst is NULL", .{}));
    const s: [*]const u8 = @ptrCast(src orelse return c.fail(SI_ERR_ARG, "si_download: src is NULL", .{}));
    std.mem.copyForwards(u8, d[0..bytes], s[0..bytes]);
    return SI_OK;
}

export fn si_map_file(ctx: ?*Ctx, path: ?[*:0]const u8, populate: i32, size_out: ?*u64) callconv(.C) ?*anyopaque {
    const c = ctx orelse return null;
    const p = path orelse {
        _ = c.fail(SI_ERR_ARG, "si_map_file: path is NULL", .{});
        return null;
    };
    const name = std.mem.span(p);
    const fd = std.os.openZ(p, std.os.O.RDONLY | std.os.O.CLOEXEC, 0) catch |e| {
        _ = c.fail(SI_ERR_IO, "si_map_file: cannot open '{s}': {s}", .{ name, ioReason(e) });
        return null;
    };
    defer std.os.close(fd);
    const st = std.os.fstat(fd) catch |e| {
        _ = c.fail(SI_ERR_IO, "si_map_file: cannot stat '{s}': {s}", .{ name, ioReason(e) });
        return null;
    };
    if (!std.os.S.ISREG(st.mode)) {
        _ = c.fail(SI_ERR_IO, "si_map_file: '{s}' is not a regular file", .{name});
        return null;
    }
    if (st.size <= 0) {
        _ = c.fail(SI_ERR_IO, "si_map_file: '{s}': file is empty", .{name});
        return null;
    }
    const size: usize = @intCast(st.size);
    var flags: u32 = std.os.MAP.PRIVATE;
    if (populate != 0) flags |= std.os.linux.MAP.POPULATE;
    const mem = std.os.mmap(null, size, std.os.PROT.READ, flags, fd, 0) catch |e| {
        _ = c.fail(SI_ERR_IO, "si_map_file: cannot map '{s}' ({d} bytes): {s}", .{ name, size, ioReason(e) });
        return null;
    };
    if (size_out) |so| so.* = size;
    return mem.ptr;
}

fn ioReason(e: anyerror) []const u8 {
    return switch (e) {
        error.FileNotFound => "no such file",
        error.AccessDenied, error.PermissionDenied => "permission denied",
        error.IsDir => "is a directory",
        error.NameTooLong => "path too long",
        error.OutOfMemory => "out of memory",
        error.SymLinkLoop => "too many symbolic links",
        else => @errorName(e),
    };
}

export fn si_unmap_file(ctx: ?*Ctx, base: ?*anyopaque, size: u64) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const b = base orelse return SI_OK;
    if (@intFromPtr(b) % std.mem.page_size != 0 or size == 0)
        return c.fail(SI_ERR_ARG, "si_unmap_file: 0x{x} / {d} bytes is not a mapping", .{ @intFromPtr(b), size });
    const p: [*]align(std.mem.page_size) const u8 = @ptrCast(@alignCast(b));
    std.os.munmap(p[0..size]);
    return SI_OK;
}

// ---- argument helpers ---------------------------------------------------------------

fn need(c: *Ctx, comptime op: []const u8, comptime what: []const u8, p: anytype) i32 {
    if (p == null) return c.fail(SI_ERR_ARG, op ++ ": " ++ what ++ " is NULL", .{});
    return SI_OK;
}

fn positive(c: *Ctx, comptime op: []const u8, comptime what: []const u8, v: anytype) i32 {
    if (v <= 0) return c.fail(SI_ERR_ARG, op ++ ": " ++ what ++ "={d} must be > 0", .{v});
    return SI_OK;
}

fn nonNegative(c: *Ctx, comptime op: []const u8, comptime what: []const u8, v: anytype) i32 {
    if (v < 0) return c.fail(SI_ERR_ARG, op ++ ": " ++ what ++ "={d} must be >= 0", .{v});
    return SI_OK;
}

fn getDtype(c: *Ctx, comptime op: []const u8, v: i32, inner: i32, comptime inner_name: []const u8) union(enum) { ok: DType, err: i32 } {
    const d = mm.dtypeFrom(v) orelse
        return .{ .err = c.fail(SI_ERR_ARG, op ++ ": unknown dtype {d} (expected F32=0, F16=1, Q4_0=2, Q8_0=8, BF16=30)", .{v}) };
    if (mm.isQuant(d) and @rem(inner, 32) != 0)
        return .{ .err = c.fail(SI_ERR_ARG, op ++ ": " ++ inner_name ++ "={d} is not a multiple of 32 for dtype {s}", .{ inner, mm.dtypeName(d) }) };
    return .{ .ok = d };
}

/// Threads worth using for `work` multiply-adds (small ops stay on the caller).
fn grainOf(c: *Ctx, total: usize, work_per_item: usize) usize {
    const min_work = 16 * 1024;
    if (total * work_per_item < min_work) return total;
    const by_work = (min_work + work_per_item - 1) / work_per_item;
    return @max(by_work, pool_mod.grainFor(&c.pool, total, 8, 1));
}

// ---- ops ----------------------------------------------------------------------------

/// Multiply-adds below which a matmul runs on the caller alone (a fan-out costs more).
const small_matmul = 64 * 1024;

export fn si_embedding(ctx: ?*Ctx, table: ?*const anyopaque, dtype: i32, vocab: i32, dim: i32, ids: ?[*]const i32, n: i32, out: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_embedding";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "vocab", vocab);
    if (rc == 0) rc = positive(c, op, "dim", dim);
    if (rc != 0) return rc;
    const d = switch (getDtype(c, op, dtype, dim, "dim")) {
        .ok => |d| d,
        .err => |e| return e,
    };
    if (n == 0) return SI_OK;
    rc = need(c, op, "table", table);
    if (rc == 0) rc = need(c, op, "ids", ids);
    if (rc == 0) rc = need(c, op, "out", out);
    if (rc != 0) return rc;
    const idv = ids.?;
    for (0..@intCast(n)) |i| {
        if (idv[i] < 0 or idv[i] >= vocab)
            return c.fail(SI_ERR_ARG, op ++ ": id {d} at index {d} is outside [0, {d})", .{ idv[i], i, vocab });
    }
    const A = struct {
        t: [*]const u8,
        d: DType,
        dim: usize,
        ids: [*]const i32,
        out: [*]f32,
        ref: bool,
        fn body(a: *const @This(), b: usize, e: usize) void {
            const rb = mm.rowBytes(a.d, a.dim);
            for (b..e) |i| {
                const src = a.t + @as(usize, @intCast(a.ids[i])) * rb;
                if (a.ref) mm.dequantRowRef(a.d, src, a.dim, a.out + i * a.dim) else mm.dequantRow(a.d, src, a.dim, a.out + i * a.dim);
            }
        }
    };
    const a = A{ .t = @ptrCast(table.?), .d = d, .dim = @intCast(dim), .ids = idv, .out = out.?, .ref = c.reference };
    parallelFor(&c.pool, @intCast(n), grainOf(c, @intCast(n), @intCast(dim)), &a, A.body);
    return SI_OK;
}

export fn si_matmul(ctx: ?*Ctx, x: ?[*]const f32, n: i32, k: i32, w: ?*const anyopaque, dtype: i32, m: i32, bias: ?[*]const f32, y: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_matmul";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "k", k);
    if (rc == 0) rc = positive(c, op, "m", m);
    if (rc != 0) return rc;
    const d = switch (getDtype(c, op, dtype, k, "k")) {
        .ok => |d| d,
        .err => |e| return e,
    };
    if (n == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "w", w);
    if (rc == 0) rc = need(c, op, "y", y);
    if (rc != 0) return rc;
    const nu: usize = @intCast(n);
    const ku: usize = @intCast(k);
    const mu: usize = @intCast(m);
    const xa = @intFromPtr(x.?);
    const ya = @intFromPtr(y.?);
    if (xa < ya + nu * mu * 4 and ya < xa + nu * ku * 4)
        return c.fail(SI_ERR_ARG, op ++ ": x and y overlap", .{});

    var args = mm.MatArgs{ .x = x.?, .n = nu, .k = ku, .w = @ptrCast(w.?), .dtype = d, .m = mu, .bias = bias, .y = y.?, .qa = undefined };
    const work = nu * ku * mu;
    // Rows in chunks of `unit` rows (the row tile), ~4-8 chunks per thread, so a thread
    // whose core is busy elsewhere leaves its share to the others.
    var unit: usize = 8;
    var per_thread: usize = 8;
    if (mm.isQuant(d)) {
        const base = c.scratchFor(mm.QAct.bytes(nu, ku)) orelse
            return c.fail(SI_ERR_NOMEM, op ++ ": out of memory for the {d}x{d} activation scratch", .{ nu, ku });
        args.qa = mm.QAct.carve(base, nu, ku);
        const Q = struct {
            fn ref(a: *const mm.MatArgs, b: usize, e: usize) void {
                mm.quantizeRows(true, a.dtype, a.x, a.k, a.qa, b, e);
            }
            fn vec(a: *const mm.MatArgs, b: usize, e: usize) void {
                mm.quantizeRows(false, a.dtype, a.x, a.k, a.qa, b, e);
            }
        };
        // A cheap pass, on the caller alone when small; from 16 tokens x 2048 it is shared
        // (serial, it was ~20% of a 16-token 2048x256 K/V projection).
        const g = if (nu * ku < 32 * 1024) nu else grainOf(c, nu, ku);
        if (c.reference) parallelFor(&c.pool, nu, g, &args, Q.ref) else parallelFor(&c.pool, nu, g, &args, Q.vec);
        unit = mm.quant_rows;
        per_thread = 4;
    }
    const F = struct {
        fn rows(a: *const mm.MatArgs, b: usize, e: usize) void {
            mm.matmulRows(a, b, e);
        }
    };
    const g = if (work < small_matmul) mu else pool_mod.grainFor(&c.pool, mu, per_thread, unit);
    if (c.reference) parallelFor(&c.pool, mu, g, &args, mm.matmulRowsRef) else parallelFor(&c.pool, mu, g, &args, F.rows);
    return SI_OK;
}

export fn si_rmsnorm(ctx: ?*Ctx, x: ?[*]const f32, weight: ?[*]const f32, n: i32, dim: i32, eps: f32, y: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_rmsnorm";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "dim", dim);
    if (rc != 0) return rc;
    if (n == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "weight", weight);
    if (rc == 0) rc = need(c, op, "y", y);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]const f32,
        w: [*]const f32,
        dim: usize,
        eps: f32,
        y: [*]f32,
        ref: bool,
        fn body(a: *const @This(), b: usize, e: usize) void {
            for (b..e) |i| {
                if (a.ref) nn.rmsnormRef(a.x + i * a.dim, a.w, a.dim, a.eps, a.y + i * a.dim) else nn.rmsnorm(a.x + i * a.dim, a.w, a.dim, a.eps, a.y + i * a.dim);
            }
        }
    };
    const a = A{ .x = x.?, .w = weight.?, .dim = @intCast(dim), .eps = eps, .y = y.?, .ref = c.reference };
    parallelFor(&c.pool, @intCast(n), grainOf(c, @intCast(n), @intCast(dim)), &a, A.body);
    return SI_OK;
}

export fn si_rope(ctx: ?*Ctx, x: ?[*]f32, n: i32, n_heads: i32, head_dim: i32, rot_dim: i32, positions: ?[*]const i32, inv_freq: ?[*]const f32, layout: i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_rope";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "n_heads", n_heads);
    if (rc == 0) rc = positive(c, op, "head_dim", head_dim);
    if (rc == 0) rc = nonNegative(c, op, "rot_dim", rot_dim);
    if (rc != 0) return rc;
    if (@rem(rot_dim, 2) != 0 or rot_dim > head_dim)
        return c.fail(SI_ERR_ARG, op ++ ": rot_dim={d} must be even and <= head_dim={d}", .{ rot_dim, head_dim });
    if (head_dim > at.max_head_dim)
        return c.fail(SI_ERR_ARG, op ++ ": head_dim={d} exceeds {d}", .{ head_dim, at.max_head_dim });
    if (layout != 0 and layout != 1)
        return c.fail(SI_ERR_ARG, op ++ ": unknown layout {d} (0 = rotate-half, 1 = interleaved)", .{layout});
    if (n == 0 or rot_dim == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "positions", positions);
    if (rc == 0) rc = need(c, op, "inv_freq", inv_freq);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]f32,
        nh: usize,
        hd: usize,
        rd: usize,
        pos: [*]const i32,
        inv: [*]const f32,
        il: bool,
        ref: bool,
        fn body(a: *const @This(), b: usize, e: usize) void {
            var cs: [at.max_head_dim / 2]f32 = undefined;
            var sn: [at.max_head_dim / 2]f32 = undefined;
            for (b..e) |i| {
                const xi = a.x + i * a.nh * a.hd;
                if (a.ref) {
                    nn.ropeRef(xi, a.nh, a.hd, a.rd, a.pos[i], a.inv, a.il);
                } else {
                    nn.ropeAngles(a.pos[i], a.inv, a.rd / 2, &cs, &sn);
                    nn.rope(xi, a.nh, a.hd, a.rd, &cs, &sn, a.il);
                }
            }
        }
    };
    const a = A{ .x = x.?, .nh = @intCast(n_heads), .hd = @intCast(head_dim), .rd = @intCast(rot_dim), .pos = positions.?, .inv = inv_freq.?, .il = layout == 1, .ref = c.reference };
    const per: usize = @as(usize, @intCast(n_heads)) * @as(usize, @intCast(rot_dim)) * 4;
    parallelFor(&c.pool, @intCast(n), grainOf(c, @intCast(n), per), &a, A.body);
    return SI_OK;
}

const Elementwise = struct {
    a: [*]f32,
    b: [*]const f32,
    out: [*]f32,
    fn swiglu(e: *const Elementwise, lo: usize, hi: usize) void {
        nn.swiglu(e.a, e.b, e.out, lo, hi);
    }
    fn swigluRef(e: *const Elementwise, lo: usize, hi: usize) void {
        nn.swigluRef(e.a, e.b, e.out, lo, hi);
    }
    fn add(e: *const Elementwise, lo: usize, hi: usize) void {
        nn.add(e.a, e.b, lo, hi);
    }
    fn addRef(e: *const Elementwise, lo: usize, hi: usize) void {
        nn.addRef(e.a, e.b, lo, hi);
    }
};

fn elementGrain(c: *Ctx, count: usize) usize {
    if (count < 64 * 1024) return count;
    return pool_mod.grainFor(&c.pool, count, 4, 64);
}

export fn si_swiglu(ctx: ?*Ctx, gate: ?[*]const f32, up: ?[*]const f32, count: i64, out: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_swiglu";
    var rc = nonNegative(c, op, "count", count);
    if (rc != 0 or count == 0) return rc;
    rc = need(c, op, "gate", gate);
    if (rc == 0) rc = need(c, op, "up", up);
    if (rc == 0) rc = need(c, op, "out", out);
    if (rc != 0) return rc;
    const e = Elementwise{ .a = @constCast(gate.?), .b = up.?, .out = out.? };
    const cu: usize = @intCast(count);
    if (c.reference) parallelFor(&c.pool, cu, elementGrain(c, cu), &e, Elementwise.swigluRef) else parallelFor(&c.pool, cu, elementGrain(c, cu), &e, Elementwise.swiglu);
    return SI_OK;
}

export fn si_add(ctx: ?*Ctx, x: ?[*]f32, y: ?[*]const f32, count: i64) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_add";
    var rc = nonNegative(c, op, "count", count);
    if (rc != 0 or count == 0) return rc;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "y", y);
    if (rc != 0) return rc;
    const e = Elementwise{ .a = x.?, .b = y.?, .out = x.? };
    const cu: usize = @intCast(count);
    if (c.reference) parallelFor(&c.pool, cu, elementGrain(c, cu), &e, Elementwise.addRef) else parallelFor(&c.pool, cu, elementGrain(c, cu), &e, Elementwise.add);
    return SI_OK;
}

export fn si_layernorm(ctx: ?*Ctx, x: ?[*]const f32, weight: ?[*]const f32, bias: ?[*]const f32, n: i32, dim: i32, eps: f32, y: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_layernorm";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "dim", dim);
    if (rc != 0) return rc;
    if (n == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "weight", weight);
    if (rc == 0) rc = need(c, op, "y", y);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]const f32,
        w: [*]const f32,
        b: ?[*]const f32,
        dim: usize,
        eps: f32,
        y: [*]f32,
        ref: bool,
        fn body(a: *const @This(), lo: usize, hi: usize) void {
            for (lo..hi) |i| {
                const xi = a.x + i * a.dim;
                const yi = a.y + i * a.dim;
                if (a.ref) nn.layernormRef(xi, a.w, a.b, a.dim, a.eps, yi) else nn.layernorm(xi, a.w, a.b, a.dim, a.eps, yi);
            }
        }
    };
    const a = A{ .x = x.?, .w = weight.?, .b = bias, .dim = @intCast(dim), .eps = eps, .y = y.?, .ref = c.reference };
    parallelFor(&c.pool, @intCast(n), grainOf(c, @intCast(n), @intCast(dim)), &a, A.body);
    return SI_OK;
}

export fn si_activation(ctx: ?*Ctx, x: ?[*]const f32, count: i64, kind: i32, out: ?[*]f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_activation";
    if (kind < 0 or kind > 2)
        return c.fail(SI_ERR_ARG, op ++ ": unknown kind {d} (0 = relu, 1 = gelu, 2 = gelu_tanh)", .{kind});
    var rc = nonNegative(c, op, "count", count);
    if (rc != 0 or count == 0) return rc;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "out", out);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]const f32,
        out: [*]f32,
        kind: nn.Activation,
        ref: bool,
        fn body(a: *const @This(), lo: usize, hi: usize) void {
            if (a.ref) return nn.activationRef(a.kind, a.x, a.out, lo, hi);
            switch (a.kind) {
                inline else => |k| nn.activation(k, a.x, a.out, lo, hi),
            }
        }
    };
    const a = A{ .x = x.?, .out = out.?, .kind = @enumFromInt(kind), .ref = c.reference };
    const cu: usize = @intCast(count);
    parallelFor(&c.pool, cu, elementGrain(c, cu), &a, A.body);
    return SI_OK;
}

export fn si_clamp(ctx: ?*Ctx, x: ?[*]f32, count: i64, limit: f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_clamp";
    if (!(limit > 0)) return c.fail(SI_ERR_ARG, op ++ ": limit={d} must be positive", .{limit});
    var rc = nonNegative(c, op, "count", count);
    if (rc != 0 or count == 0) return rc;
    rc = need(c, op, "x", x);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]f32,
        limit: f32,
        ref: bool,
        fn body(a: *const @This(), lo: usize, hi: usize) void {
            if (a.ref) nn.clampRef(a.x, a.limit, lo, hi) else nn.clamp(a.x, a.limit, lo, hi);
        }
    };
    const a = A{ .x = x.?, .limit = limit, .ref = c.reference };
    const cu: usize = @intCast(count);
    parallelFor(&c.pool, cu, elementGrain(c, cu), &a, A.body);
    return SI_OK;
}

export fn si_add_rows(ctx: ?*Ctx, x: ?[*]f32, table: ?*const anyopaque, dtype: i32, rows: i32, dim: i32, ids: ?[*]const i32, n: i32, offset: i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_add_rows";
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "rows", rows);
    if (rc == 0) rc = positive(c, op, "dim", dim);
    if (rc != 0) return rc;
    const d = switch (getDtype(c, op, dtype, dim, "dim")) {
        .ok => |d| d,
        .err => |e| return e,
    };
    if (n == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "table", table);
    if (rc == 0) rc = need(c, op, "ids", ids);
    if (rc != 0) return rc;
    for (0..@intCast(n)) |i| {
        const r = @as(i64, ids.?[i]) + offset;
        if (r < 0 or r >= rows)
            return c.fail(SI_ERR_ARG, op ++ ": id {d} + offset {d} at index {d} is outside [0, {d})", .{ ids.?[i], offset, i, rows });
    }
    const A = struct {
        x: [*]f32,
        t: [*]const u8,
        d: DType,
        dim: usize,
        ids: [*]const i32,
        offset: i32,
        ref: bool,
        fn body(a: *const @This(), lo: usize, hi: usize) void {
            const chunk = 256; // whole quantization blocks, dequantized on the stack
            var buf: [chunk]f32 = undefined;
            for (lo..hi) |i| {
                const row = a.t + @as(usize, @intCast(a.ids[i] + a.offset)) * mm.rowBytes(a.d, a.dim);
                const xi = a.x + i * a.dim;
                var e: usize = 0;
                while (e < a.dim) : (e += chunk) {
                    const len = @min(chunk, a.dim - e);
                    const src = row + mm.rowBytes(a.d, e);
                    if (a.ref) {
                        mm.dequantRowRef(a.d, src, len, &buf);
                        nn.addRef(xi + e, &buf, 0, len);
                    } else {
                        mm.dequantRow(a.d, src, len, &buf);
                        nn.add(xi + e, &buf, 0, len);
                    }
                }
            }
        }
    };
    const a = A{ .x = x.?, .t = @ptrCast(table.?), .d = d, .dim = @intCast(dim), .ids = ids.?, .offset = offset, .ref = c.reference };
    parallelFor(&c.pool, @intCast(n), grainOf(c, @intCast(n), @intCast(dim)), &a, A.body);
    return SI_OK;
}

/// Element type of a KV cache plane (ffi/specinfer.h: SI_F32 or SI_F16).
const KvType = enum { f32, f16 };

fn KvElem(comptime t: KvType) type {
    return if (t == .f32) f32 else f16;
}

fn getKvType(c: *Ctx, comptime op: []const u8, v: i32) union(enum) { ok: KvType, err: i32 } {
    return switch (v) {
        0 => .{ .ok = .f32 },
        1 => .{ .ok = .f16 },
        else => .{ .err = c.fail(SI_ERR_ARG, op ++ ": kv_dtype={d} ({s}) is not a KV cache dtype (expected F32=0 or F16=1)", .{ v, if (mm.dtypeFrom(v)) |d| mm.dtypeName(d) else "unknown" }) },
    };
}

/// The plane pointer p as elements of t, or an error when it is not aligned to them.
fn planePtr(c: *Ctx, comptime op: []const u8, comptime what: []const u8, comptime t: KvType, p: anytype) union(enum) { ok: [*]KvElem(t), err: i32 } {
    const al = @alignOf(KvElem(t));
    if (@intFromPtr(p) % al != 0) return .{ .err = c.fail(SI_ERR_ARG, op ++ ": " ++ what ++ "=0x{x} is not {d}-byte aligned", .{ @intFromPtr(p), al }) };
    return .{ .ok = @ptrFromInt(@intFromPtr(p)) };
}

/// Checks a (row, slot) of the paged cache: seq row >= 0, slot inside the table,
/// block id >= 0. Row counts and pool size are not in the ABI, so they cannot be checked.
fn checkSlot(c: *Ctx, comptime op: []const u8, bt: [*]const i32, max_blocks: usize, block_size: usize, slot: i64, what: []const u8, idx: usize) i32 {
    if (slot < 0 or (max_blocks > 0 and slot >= @as(i64, @intCast(max_blocks * block_size))))
        return c.fail(SI_ERR_ARG, op ++ ": {s} slot {d} (token {d}) is outside [0, {d})", .{ what, slot, idx, max_blocks * block_size });
    const b = bt[@as(usize, @intCast(slot)) / block_size];
    if (b < 0) return c.fail(SI_ERR_ARG, op ++ ": {s} slot {d} (token {d}) maps to block id {d}", .{ what, slot, idx, b });
    return SI_OK;
}

export fn si_kv_write(ctx: ?*Ctx, k: ?[*]const f32, v: ?[*]const f32, n: i32, row: i32, seq: ?[*]const i32, slot: ?[*]const i32, block_tables: ?[*]const i32, max_blocks: i32, block_size: i32, k_plane: ?*anyopaque, v_plane: ?*anyopaque, kv_dtype: i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_kv_write";
    const kt = switch (getKvType(c, op, kv_dtype)) {
        .ok => |t| t,
        .err => |e| return e,
    };
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "row", row);
    if (rc == 0) rc = positive(c, op, "max_blocks", max_blocks);
    if (rc == 0) rc = positive(c, op, "block_size", block_size);
    if (rc != 0 or n == 0) return rc;
    inline for (.{ .{ "k", k }, .{ "v", v }, .{ "seq", seq }, .{ "slot", slot }, .{ "block_tables", block_tables }, .{ "k_plane", k_plane }, .{ "v_plane", v_plane } }) |p| {
        rc = need(c, op, p[0], p[1]);
        if (rc != 0) return rc;
    }
    const mb: usize = @intCast(max_blocks);
    const bs: usize = @intCast(block_size);
    for (0..@intCast(n)) |i| {
        if (seq.?[i] < 0) return c.fail(SI_ERR_ARG, op ++ ": seq[{d}]={d} is negative", .{ i, seq.?[i] });
        rc = checkSlot(c, op, block_tables.? + @as(usize, @intCast(seq.?[i])) * mb, mb, bs, slot.?[i], "", i);
        if (rc != 0) return rc;
    }
    switch (kt) {
        inline else => |t| {
            const kp = switch (planePtr(c, op, "k_plane", t, k_plane.?)) {
                .ok => |p| p,
                .err => |e| return e,
            };
            const vp = switch (planePtr(c, op, "v_plane", t, v_plane.?)) {
                .ok => |p| p,
                .err => |e| return e,
            };
            const T = KvElem(t);
            if (c.reference)
                at.kvWrite(true, T, k.?, v.?, @intCast(n), @intCast(row), seq.?, slot.?, block_tables.?, mb, bs, kp, vp)
            else
                at.kvWrite(false, T, k.?, v.?, @intCast(n), @intCast(row), seq.?, slot.?, block_tables.?, mb, bs, kp, vp);
        },
    }
    return SI_OK;
}

export fn si_attention(ctx: ?*Ctx, q: ?[*]const f32, n: i32, n_heads: i32, n_kv_heads: i32, head_dim: i32, k_plane: ?*const anyopaque, v_plane: ?*const anyopaque, kv_dtype: i32, block_tables: ?[*]const i32, max_blocks: i32, block_size: i32, seq: ?[*]const i32, committed: ?[*]const i32, ancestors: ?[*]const u32, words: i32, scale: f32, out: ?[*]f32, alibi_slopes: ?[*]const f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_attention";
    const kt = switch (getKvType(c, op, kv_dtype)) {
        .ok => |t| t,
        .err => |e| return e,
    };
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = positive(c, op, "n_heads", n_heads);
    if (rc == 0) rc = positive(c, op, "n_kv_heads", n_kv_heads);
    if (rc == 0) rc = positive(c, op, "head_dim", head_dim);
    if (rc == 0) rc = positive(c, op, "max_blocks", max_blocks);
    if (rc == 0) rc = positive(c, op, "block_size", block_size);
    if (rc == 0) rc = nonNegative(c, op, "words", words);
    if (rc != 0) return rc;
    if (@rem(n_heads, n_kv_heads) != 0)
        return c.fail(SI_ERR_ARG, op ++ ": n_heads={d} is not a multiple of n_kv_heads={d}", .{ n_heads, n_kv_heads });
    if (head_dim > at.max_head_dim)
        return c.fail(SI_ERR_ARG, op ++ ": head_dim={d} exceeds {d}", .{ head_dim, at.max_head_dim });
    if (n == 0) return SI_OK;
    inline for (.{ .{ "q", q }, .{ "k_plane", k_plane }, .{ "v_plane", v_plane }, .{ "block_tables", block_tables }, .{ "seq", seq }, .{ "committed", committed }, .{ "out", out } }) |p| {
        rc = need(c, op, p[0], p[1]);
        if (rc != 0) return rc;
    }
    if (words > 0) {
        rc = need(c, op, "ancestors", ancestors);
        if (rc != 0) return rc;
    }
    const mb: usize = @intCast(max_blocks);
    const bs: usize = @intCast(block_size);
    const wu: usize = @intCast(words);
    // Every slot a token will read must be inside its block table and map to a real block.
    for (0..@intCast(n)) |i| {
        const sq = seq.?[i];
        if (sq < 0) return c.fail(SI_ERR_ARG, op ++ ": seq[{d}]={d} is negative", .{ i, sq });
        const cm = committed.?[@intCast(sq)];
        if (cm < 0) return c.fail(SI_ERR_ARG, op ++ ": committed[{d}]={d} is negative", .{ sq, cm });
        var top: i64 = cm; // one past the highest slot read
        if (wu > 0) {
            const mask = ancestors.? + i * wu;
            var wi = wu;
            while (wi > 0) : (wi -= 1) {
                if (mask[wi - 1] != 0) {
                    top = cm + @as(i64, @intCast((wi - 1) * 32 + 32 - @clz(mask[wi - 1])));
                    break;
                }
            }
        }
        if (top > mb * bs)
            return c.fail(SI_ERR_ARG, op ++ ": token {d} reads slot {d}, beyond max_blocks*block_size={d}", .{ i, top - 1, mb * bs });
        const bt = block_tables.? + @as(usize, @intCast(sq)) * mb;
        const nblk = (@as(usize, @intCast(top)) + bs - 1) / bs;
        for (0..nblk) |b| {
            if (bt[b] < 0) return c.fail(SI_ERR_ARG, op ++ ": sequence row {d} block {d} has block id {d}", .{ sq, b, bt[b] });
        }
    }
    switch (kt) {
        inline else => |t| {
            const kp = switch (planePtr(c, op, "k_plane", t, k_plane.?)) {
                .ok => |p| p,
                .err => |e| return e,
            };
            const vp = switch (planePtr(c, op, "v_plane", t, v_plane.?)) {
                .ok => |p| p,
                .err => |e| return e,
            };
            const T = KvElem(t);
            const Args = at.AttnArgs(T);
            const a = Args{
                .q = q.?,
                .n = @intCast(n),
                .n_heads = @intCast(n_heads),
                .n_kv_heads = @intCast(n_kv_heads),
                .head_dim = @intCast(head_dim),
                .k_plane = kp,
                .v_plane = vp,
                .block_tables = block_tables.?,
                .max_blocks = mb,
                .block_size = bs,
                .seq = seq.?,
                .committed = committed.?,
                .ancestors = ancestors orelse @as([*]const u32, @ptrFromInt(@alignOf(u32))),
                .words = wu,
                .scale = scale,
                .alibi = alibi_slopes,
                .out = out.?,
            };
            runAttention(T, c, &a);
        },
    }
    return SI_OK;
}

/// The planes of one si_kv_move, split over the pool by plane.
fn KvMoveJob(comptime T: type) type {
    return struct {
        cache: [*]T,
        ps: usize,
        row: usize,
        table: [*]const i32,
        bs: usize,
        src: [*]const i32,
        dst: [*]const i32,
        n: usize,
        ref: bool,
        fn body(a: *const @This(), p0: usize, p1: usize) void {
            if (a.ref) at.kvMove(true, T, a.cache, a.ps, a.row, a.table, a.bs, a.src, a.dst, a.n, p0, p1) else at.kvMove(false, T, a.cache, a.ps, a.row, a.table, a.bs, a.src, a.dst, a.n, p0, p1);
        }
    };
}

/// One (token, head) work item per index, split over the pool. A generic function, so
/// each T gets its own kernel wrappers (a struct inside an inline switch prong would be
/// one type for both).
fn runAttention(comptime T: type, c: *Ctx, a: *const at.AttnArgs(T)) void {
    const K = struct {
        fn ref(x: *const at.AttnArgs(T), b: usize, e: usize) void {
            at.attentionRef(T, x, b, e);
        }
        fn vec(x: *const at.AttnArgs(T), b: usize, e: usize) void {
            at.attention(T, x, b, e);
        }
    };
    const items = a.n * a.n_heads;
    const g = if (c.pool.n == 1) items else @max(1, items / (@as(usize, c.pool.n) * 8));
    if (c.reference) parallelFor(&c.pool, items, g, a, K.ref) else parallelFor(&c.pool, items, g, a, K.vec);
}

export fn si_kv_move(ctx: ?*Ctx, cache: ?*anyopaque, kv_dtype: i32, n_planes: i32, plane_stride: i64, row: i32, table: ?[*]const i32, block_size: i32, src: ?[*]const i32, dst: ?[*]const i32, n: i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_kv_move";
    const kt = switch (getKvType(c, op, kv_dtype)) {
        .ok => |t| t,
        .err => |e| return e,
    };
    var rc = nonNegative(c, op, "n", n);
    if (rc == 0) rc = nonNegative(c, op, "n_planes", n_planes);
    if (rc == 0) rc = nonNegative(c, op, "plane_stride", plane_stride);
    if (rc == 0) rc = positive(c, op, "row", row);
    if (rc == 0) rc = positive(c, op, "block_size", block_size);
    if (rc != 0 or n == 0 or n_planes == 0) return rc;
    inline for (.{ .{ "cache", cache }, .{ "table", table }, .{ "src", src }, .{ "dst", dst } }) |p| {
        rc = need(c, op, p[0], p[1]);
        if (rc != 0) return rc;
    }
    const bs: usize = @intCast(block_size);
    for (0..@intCast(n)) |i| {
        rc = checkSlot(c, op, table.?, 0, bs, src.?[i], "src", i);
        if (rc == 0) rc = checkSlot(c, op, table.?, 0, bs, dst.?[i], "dst", i);
        if (rc != 0) return rc;
    }
    switch (kt) {
        inline else => |t| {
            const cp = switch (planePtr(c, op, "cache", t, cache.?)) {
                .ok => |p| p,
                .err => |e| return e,
            };
            const A = KvMoveJob(KvElem(t));
            const a = A{ .cache = cp, .ps = @intCast(plane_stride), .row = @intCast(row), .table = table.?, .bs = bs, .src = src.?, .dst = dst.?, .n = @intCast(n), .ref = c.reference };
            const np: usize = @intCast(n_planes);
            parallelFor(&c.pool, np, grainOf(c, np, a.n * a.row), &a, A.body);
        },
    }
    return SI_OK;
}

export fn si_argmax(ctx: ?*Ctx, x: ?[*]const f32, rows: i32, n: i32, out: ?[*]i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_argmax";
    var rc = nonNegative(c, op, "rows", rows);
    if (rc == 0) rc = positive(c, op, "n", n);
    if (rc != 0 or rows == 0) return rc;
    rc = need(c, op, "x", x);
    if (rc == 0) rc = need(c, op, "out", out);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]const f32,
        n: usize,
        out: [*]i32,
        ref: bool,
        fn body(a: *const @This(), b: usize, e: usize) void {
            for (b..e) |r| a.out[r] = if (a.ref) nn.argmaxRef(a.x + r * a.n, a.n) else nn.argmax(a.x + r * a.n, a.n);
        }
    };
    const a = A{ .x = x.?, .n = @intCast(n), .out = out.?, .ref = c.reference };
    const ru: usize = @intCast(rows);
    parallelFor(&c.pool, ru, grainOf(c, ru, a.n / 4), &a, A.body);
    return SI_OK;
}

export fn si_softmax(ctx: ?*Ctx, x: ?[*]f32, rows: i32, n: i32, temperature: f32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_softmax";
    var rc = nonNegative(c, op, "rows", rows);
    if (rc == 0) rc = positive(c, op, "n", n);
    if (rc != 0) return rc;
    if (!(temperature > 0) or std.math.isInf(temperature))
        return c.fail(SI_ERR_ARG, op ++ ": temperature={d} must be finite and > 0", .{temperature});
    if (rows == 0) return SI_OK;
    rc = need(c, op, "x", x);
    if (rc != 0) return rc;
    const A = struct {
        x: [*]f32,
        n: usize,
        it: f32,
        ref: bool,
        fn body(a: *const @This(), b: usize, e: usize) void {
            for (b..e) |r| {
                if (a.ref) nn.softmaxRef(a.x + r * a.n, a.n, a.it) else nn.softmax(a.x + r * a.n, a.n, a.it);
            }
        }
    };
    const a = A{ .x = x.?, .n = @intCast(n), .it = 1 / temperature, .ref = c.reference };
    const ru: usize = @intCast(rows);
    parallelFor(&c.pool, ru, grainOf(c, ru, a.n * 4), &a, A.body);
    return SI_OK;
}

export fn si_sample(ctx: ?*Ctx, logits: ?[*]const f32, rows: i32, vocab: i32, params: ?[*]const f64, list_start: ?[*]const i32, list_token: ?[*]const i32, list_count: ?[*]const i32, list_bias: ?[*]const f64, probs: ?[*]f32, out: ?[*]i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_sample";
    var rc = nonNegative(c, op, "rows", rows);
    if (rc == 0) rc = positive(c, op, "vocab", vocab);
    if (rc != 0 or rows == 0) return rc;
    rc = need(c, op, "logits", logits);
    if (rc == 0) rc = need(c, op, "params", params);
    if (rc == 0) rc = need(c, op, "list_start", list_start);
    if (rc == 0) rc = need(c, op, "probs", probs);
    if (rc == 0) rc = need(c, op, "out", out);
    if (rc != 0) return rc;
    const ru: usize = @intCast(rows);
    const n: usize = @intCast(vocab);
    for (0..ru) |r| {
        if (sp.paramsProblem(params.? + r * sp.fields)) |why| return c.fail(SI_ERR_ARG, op ++ ": row {d}: {s}", .{ r, why });
    }
    const starts = list_start.?;
    if (starts[0] != 0) return c.fail(SI_ERR_ARG, op ++ ": list_start[0]={d} must be 0", .{starts[0]});
    for (0..ru) |r| {
        if (starts[r + 1] < starts[r]) return c.fail(SI_ERR_ARG, op ++ ": list_start decreases at row {d}", .{r});
    }
    const entries: usize = @intCast(starts[ru]);
    if (entries > 0) {
        rc = need(c, op, "list_token", list_token);
        if (rc == 0) rc = need(c, op, "list_count", list_count);
        if (rc == 0) rc = need(c, op, "list_bias", list_bias);
        if (rc != 0) return rc;
        for (0..entries) |e| {
            const t = list_token.?[e];
            if (t < 0 or t >= vocab) return c.fail(SI_ERR_ARG, op ++ ": list token {d} at entry {d} is outside [0, {d})", .{ t, e, vocab });
            if (list_count.?[e] < 0) return c.fail(SI_ERR_ARG, op ++ ": list count {d} at entry {d} is negative", .{ list_count.?[e], e });
            if (!std.math.isFinite(list_bias.?[e])) return c.fail(SI_ERR_ARG, op ++ ": list bias at entry {d} is not finite", .{e});
        }
    }
    const per_slot = 2 * n;
    const scratch = c.scratchFor(@as(usize, c.pool.n) * per_slot * 4) orelse
        return c.fail(SI_ERR_NOMEM, op ++ ": out of memory for {d} x {d} ranking scratch", .{ c.pool.n, per_slot });
    const A = struct {
        x: [*]const f32,
        n: usize,
        params: [*]const f64,
        starts: [*]const i32,
        tokens: [*]const i32,
        counts: [*]const i32,
        bias: [*]const f64,
        probs: [*]f32,
        out: [*]i32,
        scratch: [*]i32,
        ref: bool,
        fn body(a: *const @This(), slot: usize, b: usize, e: usize) void {
            const order = a.scratch[slot * 2 * a.n ..][0 .. 2 * a.n];
            for (b..e) |r| {
                const lo: usize = @intCast(a.starts[r]);
                const hi: usize = @intCast(a.starts[r + 1]);
                const edits = sp.Edits{ .tokens = a.tokens[lo..hi], .counts = a.counts[lo..hi], .bias = a.bias[lo..hi] };
                a.out[r] = sp.pickRow(a.x + r * a.n, a.n, sp.Params.at(a.params + r * sp.fields), edits, a.probs + r * a.n, order, a.ref);
            }
        }
    };
    // With no entries the list arrays may be NULL: point them at something valid.
    const none_i = [_]i32{0};
    const none_f = [_]f64{0};
    const a = A{
        .x = logits.?,
        .n = n,
        .params = params.?,
        .starts = starts,
        .tokens = list_token orelse &none_i,
        .counts = list_count orelse &none_i,
        .bias = list_bias orelse &none_f,
        .probs = probs.?,
        .out = out.?,
        .scratch = @ptrCast(scratch),
        .ref = c.reference,
    };
    pool_mod.parallelForSlot(&c.pool, ru, 1, &a, A.body);
    return SI_OK;
}

export fn si_tree_accept(ctx: ?*Ctx, n_trees: i32, tree_start: ?[*]const i32, parents: ?[*]const i32, tokens: ?[*]const i32, picked: ?[*]const i32, accepted: ?[*]i32, counts: ?[*]i32, bonus: ?[*]i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_tree_accept";
    var rc = nonNegative(c, op, "n_trees", n_trees);
    if (rc != 0 or n_trees == 0) return rc;
    rc = need(c, op, "tree_start", tree_start);
    if (rc == 0) rc = need(c, op, "parents", parents);
    if (rc == 0) rc = need(c, op, "tokens", tokens);
    if (rc == 0) rc = need(c, op, "picked", picked);
    if (rc == 0) rc = need(c, op, "accepted", accepted);
    if (rc == 0) rc = need(c, op, "counts", counts);
    if (rc == 0) rc = need(c, op, "bonus", bonus);
    if (rc != 0) return rc;
    const nt: usize = @intCast(n_trees);
    const starts = tree_start.?;
    if (starts[0] != 0) return c.fail(SI_ERR_ARG, op ++ ": tree_start[0]={d} must be 0", .{starts[0]});
    for (0..nt) |t| {
        if (starts[t + 1] <= starts[t]) return c.fail(SI_ERR_ARG, op ++ ": tree {d} has no rows (each has its root)", .{t});
        const base: usize = @intCast(starts[t]);
        const size: usize = @intCast(starts[t + 1] - starts[t]);
        for (1..size) |r| {
            const parent = parents.?[base + r];
            if (parent < 0 or parent >= r)
                return c.fail(SI_ERR_ARG, op ++ ": tree {d} row {d} has parent {d}; parents must come before children", .{ t, r, parent });
        }
    }
    for (0..nt) |t| {
        const base: usize = @intCast(starts[t]);
        const end: usize = @intCast(starts[t + 1]);
        const r = sp.walk(parents.?[base..end], tokens.?[base..end], picked.?[base..end], accepted.?[base..end]);
        counts.?[t] = @intCast(r.count);
        bonus.?[t] = r.bonus;
    }
    return SI_OK;
}

// ---- CUDA graphs: the CPU runs each op at once, so a graph region changes nothing ----

export fn si_graph_begin(ctx: ?*Ctx, key: i32) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    return nonNegative(c, "si_graph_begin", "key", key);
}

export fn si_graph_end(ctx: ?*Ctx, run: i32) callconv(.C) i32 {
    _ = run;
    _ = ctx orelse return SI_ERR_ARG;
    return SI_OK;
}

export fn si_graph_drop(ctx: ?*Ctx, key: i32) callconv(.C) i32 {
    _ = key;
    _ = ctx orelse return SI_ERR_ARG;
    return SI_OK;
}

export fn si_probe_bandwidth(ctx: ?*Ctx, buf: ?*const anyopaque, bytes: u64, reps: i32, gbps: ?*f64) callconv(.C) i32 {
    const c = ctx orelse return SI_ERR_ARG;
    const op = "si_probe_bandwidth";
    var rc = positive(c, op, "reps", reps);
    if (rc == 0) rc = need(c, op, "buf", buf);
    if (rc == 0) rc = need(c, op, "gbps", gbps);
    if (rc != 0) return rc;
    if (bytes < 64 * 1024) return c.fail(SI_ERR_ARG, op ++ ": bytes={d} is too small to measure (>= 64 KiB)", .{bytes});
    const parts: usize = c.pool.n;
    const A = struct {
        base: [*]const u8,
        part: usize,
        reps: usize,
        sink: *std.atomic.Atomic(u64),
        fn body(a: *const @This(), p0: usize, p1: usize) void {
            const W = @Vector(16, u32);
            for (p0..p1) |p| {
                const lo = a.base + p * a.part;
                var acc0: W = @splat(0);
                var acc1: W = @splat(0);
                for (0..a.reps) |_| {
                    var o: usize = 0;
                    while (o + 128 <= a.part) : (o += 128) {
                        acc0 +%= @as(*align(1) const [16]u32, @ptrCast(lo + o)).*;
                        acc1 +%= @as(*align(1) const [16]u32, @ptrCast(lo + o + 64)).*;
                    }
                }
                _ = a.sink.fetchAdd(@reduce(.Add, acc0 +% acc1), .Monotonic);
            }
        }
    };
    const part = (bytes / parts) & ~@as(u64, 127);
    const a = A{ .base = @ptrCast(buf.?), .part = @intCast(part), .reps = @intCast(reps), .sink = &c.sink };
    const t0 = std.time.Instant.now() catch return c.fail(SI_ERR_ARG, op ++ ": no monotonic clock", .{});
    parallelFor(&c.pool, parts, 1, &a, A.body);
    const t1 = std.time.Instant.now() catch return c.fail(SI_ERR_ARG, op ++ ": no monotonic clock", .{});
    const ns: f64 = @floatFromInt(@max(t1.since(t0), 1));
    gbps.?.* = @as(f64, @floatFromInt(part * parts * @as(u64, @intCast(reps)))) / ns;
    return SI_OK;
}

test {
    _ = pool_mod;
    _ = simd;
    _ = sp;
}
