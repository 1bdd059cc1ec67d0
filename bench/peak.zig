//! zig build peak -- THREADS   (bench:cpu runs it through scripts/build-native.mjs)
//! Peak arithmetic rates of this CPU (what a compute-bound kernel can reach): int8
//! vpdpbusd on 512-bit registers and f32 FMA, 12 independent accumulators per thread
//! (enough to cover either instruction's latency), all threads at once. JSON on stdout.
const std = @import("std");

const iters: usize = 20_000_000;

/// 12 independent chains of `instr` (AT&T operands: b, a, acc) on 16-lane registers
/// holding a and b.
fn chains(comptime E: type, comptime instr: []const u8, comptime a_lane: E, comptime b_lane: E) fn (*u64) void {
    const T = @Vector(16, E);
    const a: T = @splat(a_lane);
    const b: T = @splat(b_lane);
    return struct {
        fn run(out: *u64) void {
            var acc: [12]T = .{a} ** 12;
            for (0..iters) |_| {
                inline for (0..12) |i| {
                    acc[i] = asm volatile (instr ++ " %[b], %[a], %[acc]"
                        : [acc] "=v" (-> T),
                        : [a] "v" (a),
                          [b] "v" (b),
                          [_] "0" (acc[i]),
                    );
                }
            }
            // Keep the results alive: fold every lane's bits into the sink.
            var s: u32 = 0;
            inline for (0..12) |i| s +%= @reduce(.Add, @as(@Vector(16, u32), @bitCast(acc[i])));
            out.* = s;
        }
    }.run;
}

const vnni = chains(i32, "vpdpbusd", 0x01010101, 0x02020202);
const fma = chains(f32, "vfmadd231ps", 0.999999, 1e-7);

fn rate(comptime body: fn (*u64) void, threads: usize, ops_per_instr: f64) !f64 {
    var sinks: [64]u64 = undefined;
    var handles: [64]std.Thread = undefined;
    const t0 = try std.time.Instant.now();
    for (0..threads) |i| handles[i] = try std.Thread.spawn(.{}, body, .{&sinks[i]});
    for (0..threads) |i| handles[i].join();
    const ns: f64 = @floatFromInt((try std.time.Instant.now()).since(t0));
    const instrs: f64 = @floatFromInt(threads * iters * 12);
    return instrs * ops_per_instr / ns;
}

pub fn main() !void {
    const stdout = std.io.getStdOut().writer();
    if (comptime !std.Target.x86.featureSetHas(@import("builtin").cpu.features, .avx512vnni)) {
        try stdout.print("{{\"error\": \"no AVX-512 VNNI on this CPU\"}}\n", .{});
        return;
    }
    var args = std.process.args();
    _ = args.skip();
    const threads: usize = if (args.next()) |a| try std.fmt.parseInt(usize, a, 10) else 2;
    if (threads == 0 or threads > 64) return error.ThreadsOutOfRange; // 1..64
    var best_vnni: f64 = 0;
    var best_fma: f64 = 0;
    for (0..3) |_| {
        best_vnni = @max(best_vnni, try rate(vnni, threads, 64)); // 16 lanes x 4 u8*i8 multiply-adds
        best_fma = @max(best_fma, try rate(fma, threads, 32)); // 16 lanes x (mul + add)
    }
    try stdout.print("{{\"threads\": {d}, \"int8VnniGMacPerS\": {d:.1}, \"f32FmaGFlopPerS\": {d:.1}}}\n", .{ threads, best_vnni, best_fma });
}
