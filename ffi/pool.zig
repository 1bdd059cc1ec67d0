//! Persistent thread pool: n-1 worker threads plus the calling thread.
//!
//! One op = one job: the caller publishes a function + argument, bumps a generation
//! counter, runs the job itself, then waits for the workers to finish it. Work inside a
//! job is split by an atomic chunk counter (see `parallelFor`), so a worker that is
//! late (its core busy with another process) just finds no chunks left.
//!
//! Idle workers spin for ~100 us (cheap barrier between the ops of a forward pass),
//! then sleep on a futex, so a busy core never stalls a pass and an idle engine uses
//! no CPU. Nothing is allocated per job.
const std = @import("std");
const Atomic = std.atomic.Atomic;
const Futex = std.Thread.Futex;

const spin_ns: u64 = 100 * std.time.ns_per_us;

pub const JobFn = *const fn (arg: *anyopaque) void;

pub const Pool = struct {
    n: u32, // threads including the caller
    threads: []std.Thread = &.{},
    gen: Atomic(u32) = Atomic(u32).init(0), // futex word: bumped once per job
    pending: Atomic(u32) = Atomic(u32).init(0), // workers still inside the current job
    sleepers: Atomic(u32) = Atomic(u32).init(0), // workers asleep on `gen`
    main_sleeping: Atomic(u32) = Atomic(u32).init(0), // caller asleep on `pending`
    quit: Atomic(bool) = Atomic(bool).init(false),
    job: ?JobFn = null,
    arg: *anyopaque = undefined,

    /// The pool must not move after init (workers hold its address).
    pub fn init(self: *Pool, n_threads: u32) !void {
        self.* = .{ .n = @max(1, n_threads) };
        if (self.n == 1) return;
        const threads = try std.heap.c_allocator.alloc(std.Thread, self.n - 1);
        var started: usize = 0;
        errdefer {
            self.stopWorkers(threads[0..started]);
            std.heap.c_allocator.free(threads);
        }
        for (threads) |*t| {
            t.* = try std.Thread.spawn(.{ .stack_size = 1 << 20 }, worker, .{self});
            started += 1;
        }
        self.threads = threads;
    }

    pub fn deinit(self: *Pool) void {
        if (self.threads.len == 0) return;
        self.stopWorkers(self.threads);
        std.heap.c_allocator.free(self.threads);
        self.threads = &.{};
    }

    fn stopWorkers(self: *Pool, threads: []std.Thread) void {
        self.quit.store(true, .SeqCst);
        _ = self.gen.fetchAdd(1, .SeqCst);
        Futex.wake(&self.gen, std.math.maxInt(u32));
        for (threads) |t| t.join();
    }

    /// Runs job(arg) on every thread (the caller included) and returns when all are done.
    pub fn run(self: *Pool, job: JobFn, arg: *anyopaque) void {
        if (self.threads.len == 0) return job(arg);
        self.job = job;
        self.arg = arg;
        self.pending.store(@intCast(self.threads.len), .SeqCst);
        _ = self.gen.fetchAdd(1, .SeqCst); // publishes job/arg/pending
        if (self.sleepers.load(.SeqCst) != 0) Futex.wake(&self.gen, std.math.maxInt(u32));
        job(arg);
        self.waitWorkers();
    }

    fn waitWorkers(self: *Pool) void {
        var timer = Spin{};
        while (true) {
            const p = self.pending.load(.Acquire);
            if (p == 0) return;
            if (timer.keepSpinning()) continue;
            // A worker is descheduled: sleep until the last one finishes.
            self.main_sleeping.store(1, .SeqCst);
            const p2 = self.pending.load(.SeqCst);
            if (p2 != 0) Futex.wait(&self.pending, p2);
            self.main_sleeping.store(0, .SeqCst);
        }
    }

    fn worker(self: *Pool) void {
        var seen: u32 = 0; // workers start before the first job (gen == 0)
        while (true) {
            var timer = Spin{};
            var g = self.gen.load(.Acquire);
            while (g == seen) : (g = self.gen.load(.Acquire)) {
                if (timer.keepSpinning()) continue;
                _ = self.sleepers.fetchAdd(1, .SeqCst);
                // Futex.wait returns at once if gen moved after our last load.
                if (self.gen.load(.SeqCst) == seen) Futex.wait(&self.gen, seen);
                _ = self.sleepers.fetchSub(1, .SeqCst);
            }
            seen = g;
            if (self.quit.load(.SeqCst)) return;
            self.job.?(self.arg);
            if (self.pending.fetchSub(1, .SeqCst) == 1) {
                if (self.main_sleeping.load(.SeqCst) != 0) Futex.wake(&self.pending, 1);
            }
        }
    }
};

/// Spins with `pause` until ~spin_ns have passed (clock read every 64 pauses).
const Spin = struct {
    count: u32 = 0,
    start: ?std.time.Instant = null,

    fn keepSpinning(self: *Spin) bool {
        self.count +%= 1;
        if (self.count & 63 == 0) {
            const now = std.time.Instant.now() catch return false;
            if (self.start) |s| {
                if (now.since(s) > spin_ns) return false;
            } else self.start = now;
        }
        std.atomic.spinLoopHint();
        return true;
    }
};

/// Calls body(args, begin, end) over [0, total) in chunks of `grain`, on all threads.
/// Small ranges run inline on the caller (no fan-out cost).
pub fn parallelFor(pool: *Pool, total: usize, grain_in: usize, args: anytype, comptime body: fn (@TypeOf(args), usize, usize) void) void {
    if (total == 0) return;
    const grain = @max(grain_in, 1);
    if (pool.threads.len == 0 or total <= grain) return body(args, 0, total);
    const Job = struct {
        next: Atomic(usize) = Atomic(usize).init(0),
        total: usize,
        grain: usize,
        args: @TypeOf(args),

        fn run(p: *anyopaque) void {
            const self: *@This() = @ptrCast(@alignCast(p));
            while (true) {
                const s = self.next.fetchAdd(self.grain, .Monotonic);
                if (s >= self.total) return;
                body(self.args, s, @min(s + self.grain, self.total));
            }
        }
    };
    var job = Job{ .total = total, .grain = grain, .args = args };
    pool.run(Job.run, &job);
}

/// A chunk size giving each thread ~`per_thread` chunks, rounded up to `multiple`.
pub fn grainFor(pool: *const Pool, total: usize, per_thread: usize, multiple: usize) usize {
    const chunks = @as(usize, pool.n) * per_thread;
    const g = (total + chunks - 1) / chunks;
    return @max(multiple, (g + multiple - 1) / multiple * multiple);
}

test "pool runs every chunk exactly once" {
    var pool: Pool = undefined;
    try pool.init(3);
    defer pool.deinit();
    var hits = [_]Atomic(u32){Atomic(u32).init(0)} ** 1000;
    const Body = struct {
        fn body(h: *[1000]Atomic(u32), b: usize, e: usize) void {
            for (b..e) |i| _ = h[i].fetchAdd(1, .Monotonic);
        }
    };
    for (0..200) |_| parallelFor(&pool, 1000, 7, &hits, Body.body);
    for (hits) |h| try std.testing.expectEqual(@as(u32, 200), h.load(.Monotonic));
    // Let the workers fall asleep, then wake them again.
    std.time.sleep(2 * std.time.ns_per_ms);
    parallelFor(&pool, 1000, 7, &hits, Body.body);
    for (hits) |h| try std.testing.expectEqual(@as(u32, 201), h.load(.Monotonic));
}
