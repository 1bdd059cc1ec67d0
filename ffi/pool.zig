//! Persistent thread pool: n-1 worker threads plus the calling thread.
//!
//! One op = one job. The caller publishes a function + argument and runs the job
//! itself; work inside a job is split by an atomic chunk counter (`parallelFor`).
//! Workers *join* a job while it is open; when the caller has run out of chunks it
//! closes the job and waits only for the workers that joined (and are mid-chunk). A
//! worker whose core is busy with another process therefore never stalls an op: it
//! wakes up late, finds the job closed and goes back to waiting. (Waiting for every
//! worker to acknowledge every op cost up to a scheduler tick per op here.)
//!
//! Idle workers spin for ~100 us (cheap hand-off between the ops of a forward pass),
//! then sleep on a futex, so an idle engine uses no CPU. Nothing is allocated per job.
//!
//! Contention governor: when another process competes for the cores, either a worker
//! is preempted mid-chunk and the caller waits a scheduler slice for it, or the caller
//! itself waits for its core while the worker spins; that made 2 threads slower than 1.
//! The caller measures both (waits past the spin period, and its own run-queue wait
//! from /proc/thread-self/schedstat); when they take over a quarter of two windows in a
//! row it runs the jobs alone for a back-off period (doubled while contention persists),
//! then tries the workers again.
const std = @import("std");
const Atomic = std.atomic.Atomic;
const Futex = std.Thread.Futex;

const spin_ns: u64 = 100 * std.time.ns_per_us;
const window_ns: u64 = 10 * std.time.ns_per_ms;
const min_solo_ns: u64 = 100 * std.time.ns_per_ms;
const max_solo_ns: u64 = 3200 * std.time.ns_per_ms;

pub const JobFn = *const fn (arg: *anyopaque) void;

// state word: generation (high 32 bits) | closed (bit 31) | joined workers (bits 0..30)
const closed_bit: u64 = 1 << 31;
const active_mask: u64 = closed_bit - 1;

pub const Pool = struct {
    n: u32, // threads including the caller
    threads: []std.Thread = &.{},
    state: Atomic(u64) = Atomic(u64).init(closed_bit), // no open job at start
    gen: Atomic(u32) = Atomic(u32).init(0), // futex word for sleeping workers: bumped per job
    drain: Atomic(u32) = Atomic(u32).init(0), // futex word: bumped when the last joined worker leaves
    sleepers: Atomic(u32) = Atomic(u32).init(0), // workers asleep on `gen`
    main_sleeping: Atomic(u32) = Atomic(u32).init(0), // caller asleep on `drain`
    quit: Atomic(bool) = Atomic(bool).init(false),
    job: JobFn = undefined,
    arg: *anyopaque = undefined,
    governor: Governor = .{},

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
        self.governor.deinit();
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

    /// Whether a job should go to the workers: not without workers, and not while the
    /// governor has the caller working alone.
    pub fn fanOut(self: *Pool) bool {
        return self.threads.len > 0 and !self.governor.solo(self.governor.clock());
    }

    /// Runs job(arg) on the caller and on every worker that joins in time; returns when
    /// the caller's call has returned and every joined worker has left. The job must
    /// be written so that any number of threads (>= 1) completes it.
    pub fn run(self: *Pool, job: JobFn, arg: *anyopaque) void {
        if (self.threads.len == 0) return job(arg);
        const now = self.governor.clock();
        self.job = job;
        self.arg = arg;
        const g = self.gen.load(.Monotonic) +% 1;
        self.state.store(@as(u64, g) << 32, .SeqCst); // open, nobody joined
        self.gen.store(g, .SeqCst);
        if (self.sleepers.load(.SeqCst) != 0) Futex.wake(&self.gen, std.math.maxInt(u32));
        job(arg);
        const st = self.state.fetchOr(closed_bit, .SeqCst);
        if (st & active_mask != 0) {
            const t = self.governor.clock();
            self.waitDrain();
            self.governor.waited(self.governor.clock() - t);
        }
        if (self.governor.windowDue(now)) self.governor.judge(now, self.governor.runQueueDelay());
    }

    fn waitDrain(self: *Pool) void {
        var timer = Spin{};
        while (self.state.load(.SeqCst) & active_mask != 0) {
            if (timer.keepSpinning()) continue;
            // A joined worker was preempted mid-chunk: sleep until it leaves.
            self.main_sleeping.store(1, .SeqCst);
            const d = self.drain.load(.SeqCst);
            if (self.state.load(.SeqCst) & active_mask != 0) Futex.wait(&self.drain, d);
            self.main_sleeping.store(0, .SeqCst);
        }
    }

    /// Joins the open job, if any. Fails once the caller has closed it.
    fn join(self: *Pool) bool {
        var st = self.state.load(.SeqCst);
        while (st & closed_bit == 0) {
            st = self.state.tryCompareAndSwap(st, st + 1, .SeqCst, .SeqCst) orelse return true;
        }
        return false;
    }

    fn leave(self: *Pool) void {
        const prev = self.state.fetchSub(1, .SeqCst);
        if (prev & closed_bit != 0 and prev & active_mask == 1) {
            _ = self.drain.fetchAdd(1, .SeqCst);
            if (self.main_sleeping.load(.SeqCst) != 0) Futex.wake(&self.drain, 1);
        }
    }

    fn worker(self: *Pool) void {
        var seen: u32 = 0;
        while (true) {
            var timer = Spin{};
            var g = self.gen.load(.SeqCst);
            while (g == seen) : (g = self.gen.load(.SeqCst)) {
                if (timer.keepSpinning()) continue;
                _ = self.sleepers.fetchAdd(1, .SeqCst);
                // Returns at once if gen moved after the load above.
                if (self.gen.load(.SeqCst) == seen) Futex.wait(&self.gen, seen);
                _ = self.sleepers.fetchSub(1, .SeqCst);
            }
            seen = g;
            if (self.quit.load(.SeqCst)) return;
            if (self.join()) {
                self.job(self.arg);
                self.leave();
            }
        }
    }
};

/// Caller-side only (jobs are published by one thread at a time): no atomics.
const Governor = struct {
    base: ?std.time.Instant = null,
    window_start: u64 = 0,
    stalled: u64 = 0, // ns the caller waited past the spin period in this window
    /// The caller's run-queue wait at the window start (null: not read yet).
    delay_start: ?u64 = null,
    solo_until: u64 = 0,
    contended: u8 = 0, // contended windows in a row
    /// The next solo period: doubles each time contention is seen, shrinks by the
    /// minimum with each clean window (a competitor that leaves some windows clean
    /// still drives it up), so a lasting competitor costs one window per 3.2 s.
    backoff: u64 = min_solo_ns,
    schedstat: ?std.os.fd_t = null,
    schedstat_tid: i32 = 0,

    fn deinit(self: *Governor) void {
        if (self.schedstat) |fd| std.os.close(fd);
        self.schedstat = null;
    }

    /// Monotonic ns since the first call (0 if the clock fails: the governor then
    /// never leaves the multi-threaded mode).
    fn clock(self: *Governor) u64 {
        const now = std.time.Instant.now() catch return 0;
        const b = self.base orelse {
            self.base = now;
            return 0;
        };
        return now.since(b);
    }

    /// ns the calling thread has spent runnable but not running (the second field of
    /// /proc/thread-self/schedstat): when another process holds the caller's core, the
    /// caller is what waits, not a worker. null where the kernel does not report it.
    fn runQueueDelay(self: *Governor) ?u64 {
        const tid = std.os.linux.gettid();
        if (tid != self.schedstat_tid) {
            self.deinit();
            self.schedstat = std.os.open("/proc/thread-self/schedstat", std.os.O.RDONLY | std.os.O.CLOEXEC, 0) catch null;
            self.schedstat_tid = tid;
            self.delay_start = null;
        }
        var buf: [96]u8 = undefined;
        const n = std.os.pread(self.schedstat orelse return null, &buf, 0) catch return null;
        var fields = std.mem.tokenizeAny(u8, buf[0..n], " \n");
        _ = fields.next();
        return std.fmt.parseInt(u64, fields.next() orelse return null, 10) catch null;
    }

    fn solo(self: *Governor, now: u64) bool {
        if (now < self.solo_until) return true;
        if (self.solo_until != 0) {
            // Back from a solo period: measure a fresh window with the workers.
            self.solo_until = 0;
            self.window_start = now;
            self.stalled = 0;
            self.delay_start = self.runQueueDelay();
        }
        return false;
    }

    fn waited(self: *Governor, ns: u64) void {
        if (ns > spin_ns) self.stalled += ns - spin_ns;
    }

    fn windowDue(self: *const Governor, now: u64) bool {
        return now -| self.window_start >= window_ns;
    }

    /// Ends a window: contended when the caller waited, for preempted workers or for
    /// its own core, over a quarter of it (a tick's preemption on a quiet machine is
    /// not). `delay`: the caller's run-queue wait so far.
    fn judge(self: *Governor, now: u64, delay: ?u64) void {
        const span = now -| self.window_start;
        const queued = if (delay != null and self.delay_start != null) delay.? -| self.delay_start.? else 0;
        if ((self.stalled + queued) * 4 > span) {
            // One such window can be a tick lost to a short-lived thread (Bun's own JIT
            // and GC threads, on a quiet machine); two in a row are a competitor.
            self.contended += 1;
            if (self.contended == 2) {
                self.contended = 0;
                self.solo_until = now + self.backoff;
                self.backoff = @min(self.backoff * 2, max_solo_ns);
            }
        } else {
            self.contended = 0;
            self.backoff = @max(self.backoff -| min_solo_ns, min_solo_ns);
        }
        self.window_start = now;
        self.stalled = 0;
        self.delay_start = delay;
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
pub fn parallelFor(pool: *Pool, total: usize, grain: usize, args: anytype, comptime body: fn (@TypeOf(args), usize, usize) void) void {
    const W = struct {
        fn f(a: @TypeOf(args), _: usize, b: usize, e: usize) void {
            body(a, b, e);
        }
    };
    parallelForSlot(pool, total, grain, args, W.f);
}

/// As parallelFor; body also gets `slot`, distinct per thread running the job and
/// < pool.n, to index per-thread scratch.
pub fn parallelForSlot(pool: *Pool, total: usize, grain_in: usize, args: anytype, comptime body: fn (@TypeOf(args), usize, usize, usize) void) void {
    if (total == 0) return;
    const grain = @max(grain_in, 1);
    // Alone, one chunk: chunk boundaries break the weight streams' prefetch.
    if (total <= grain or !pool.fanOut()) return body(args, 0, 0, total);
    const Job = struct {
        next: Atomic(usize) = Atomic(usize).init(0),
        slots: Atomic(usize) = Atomic(usize).init(0),
        total: usize,
        grain: usize,
        args: @TypeOf(args),

        fn run(p: *anyopaque) void {
            const self: *@This() = @ptrCast(@alignCast(p));
            const slot = self.slots.fetchAdd(1, .Monotonic); // each thread runs a job at most once
            while (true) {
                const s = self.next.fetchAdd(self.grain, .Monotonic);
                if (s >= self.total) return;
                body(self.args, slot, s, @min(s + self.grain, self.total));
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
    for (0..2000) |_| parallelFor(&pool, 1000, 7, &hits, Body.body);
    for (hits) |h| try std.testing.expectEqual(@as(u32, 2000), h.load(.Monotonic));
    // Let the workers fall asleep, then wake them again.
    std.time.sleep(2 * std.time.ns_per_ms);
    parallelFor(&pool, 1000, 7, &hits, Body.body);
    for (hits) |h| try std.testing.expectEqual(@as(u32, 2001), h.load(.Monotonic));
}

test "slow workers are waited for, late ones skip" {
    var pool: Pool = undefined;
    try pool.init(2);
    defer pool.deinit();
    var sum = Atomic(u64).init(0);
    const Body = struct {
        fn body(s: *Atomic(u64), b: usize, e: usize) void {
            // Make chunks slow enough that the worker is mid-chunk when the caller closes.
            var x: u64 = 0;
            for (0..20000) |i| x +%= i *% i;
            std.mem.doNotOptimizeAway(x);
            for (b..e) |i| _ = s.fetchAdd(i, .Monotonic);
        }
    };
    for (0..300) |_| parallelFor(&pool, 64, 1, &sum, Body.body);
    try std.testing.expectEqual(@as(u64, 300 * (63 * 64 / 2)), sum.load(.Monotonic));
}

test "governor runs solo while workers stall the caller, backs off, and recovers" {
    const ms = std.time.ns_per_ms;
    var g = Governor{};
    var t: u64 = 0;
    const Op = struct {
        // One 1 ms op at t: the caller waited `stall` ns for a worker.
        fn run(gov: *Governor, at: *u64, stall: u64) bool {
            if (gov.solo(at.*)) {
                at.* += ms;
                return true;
            }
            gov.waited(stall);
            if (gov.windowDue(at.*)) gov.judge(at.*, null);
            at.* += ms;
            return false;
        }
    };
    // Quiet: waits shorter than the spin period never count.
    for (0..200) |_| try std.testing.expect(!Op.run(&g, &t, spin_ns));
    // Contended: half of every op spent waiting -> solo after two windows, for 100 ms.
    var ops: usize = 0;
    while (!g.solo(t)) : (ops += 1) _ = Op.run(&g, &t, spin_ns + ms / 2);
    try std.testing.expect(ops > window_ns / ms and ops <= 2 * (window_ns / ms + 1));
    try std.testing.expectEqual(min_solo_ns, g.solo_until - (t - ms));
    // Contention persists: every solo period is twice the last, up to the cap.
    while (Op.run(&g, &t, spin_ns + ms / 2)) {}
    var periods = std.ArrayList(u64).init(std.testing.allocator);
    defer periods.deinit();
    while (periods.items.len < 6) {
        while (!g.solo(t)) _ = Op.run(&g, &t, spin_ns + ms / 2);
        const start = t;
        while (Op.run(&g, &t, spin_ns + ms / 2)) {}
        try periods.append(t - start);
    }
    try std.testing.expectEqual(2 * min_solo_ns, periods.items[0]);
    try std.testing.expectEqual(4 * min_solo_ns, periods.items[1]);
    try std.testing.expectEqual(max_solo_ns, periods.items[5]);
    // Gone: clean windows bring the back-off down to the minimum, workers stay on.
    while (Op.run(&g, &t, 0)) {}
    for (0..(max_solo_ns / min_solo_ns + 1) * window_ns / ms) |_| try std.testing.expect(!Op.run(&g, &t, 0));
    try std.testing.expectEqual(min_solo_ns, g.backoff);
}

test "governor counts the caller's own run-queue wait" {
    const ms = std.time.ns_per_ms;
    var g = Governor{};
    defer g.deinit();
    // First window: no baseline yet, so a large reading alone proves nothing.
    g.judge(window_ns, 500 * ms);
    try std.testing.expect(!g.solo(window_ns));
    // Waited a tenth of the window for its core: below a quarter, workers stay on.
    g.judge(2 * window_ns, 500 * ms + window_ns / 10);
    try std.testing.expect(!g.solo(2 * window_ns));
    // Waited half a window, once: could be one lost tick, workers stay on.
    g.judge(3 * window_ns, 500 * ms + window_ns / 10 + window_ns / 2);
    try std.testing.expect(!g.solo(3 * window_ns));
    // Twice in a row: solo.
    g.judge(4 * window_ns, 500 * ms + window_ns / 10 + window_ns);
    try std.testing.expect(g.solo(4 * window_ns));
    // The kernel's counter is readable here (Linux with schedstats) and only grows.
    if (g.runQueueDelay()) |a| {
        const b = g.runQueueDelay() orelse return error.TestUnexpectedResult;
        try std.testing.expect(b >= a);
    }
}
