// Small measurement helpers for the CPU benchmark: medians, the machine's load, how
// much CPU other processes took while we measured, and a competing busy loop.

import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

export function round(x: number, digits = 3): number {
  if (!Number.isFinite(x)) return x;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

export function loadavg(): string {
  return readFileSync("/proc/loadavg", "utf8").trim();
}

function cpuJiffies(): { busy: number; self: number } {
  const cpu = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const idle = cpu[3] + (cpu[4] ?? 0);
  const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0);
  // /proc/self/stat: the command name may hold spaces; fields after ")" are fixed.
  const stat = readFileSync("/proc/self/stat", "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const self = Number(fields[11]) + Number(fields[12]); // utime, stime
  return { busy: total - idle, self };
}

/** Cores' worth of CPU that *other* processes used between start() and stop(). */
export class OtherLoad {
  private at = cpuJiffies();
  private t = performance.now();

  stop(): number {
    const now = cpuJiffies();
    const seconds = (performance.now() - this.t) / 1000;
    const hz = 100; // USER_HZ on Linux
    return round(Math.max(0, (now.busy - this.at.busy - (now.self - this.at.self)) / hz / seconds), 2);
  }
}

/** A process spinning on one core until stopped (the "another process competes" case). */
export function startBusyLoop(): ChildProcess {
  return spawn(process.execPath, ["-e", "for(;;){}"], { stdio: "ignore" });
}

export function stopBusyLoop(child: ChildProcess): void {
  child.kill("SIGKILL");
}
