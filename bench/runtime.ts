/**
 * What differs between Node.js, Bun and Deno for the benchmark: how to start another process of
 * the same runtime, how to force a garbage collection, and the clock.
 */
import process from "node:process";
import { fileURLToPath } from "node:url";

export type RuntimeName = "node" | "bun" | "deno";

export function runtimeName(): RuntimeName {
  if ("Deno" in globalThis) return "deno";
  if ("Bun" in globalThis) return "bun";
  return "node";
}

/** The command that runs `script` in a new process of the current runtime. */
export function runtimeCommand(
  script: string,
): { command: string; args: string[] } {
  switch (runtimeName()) {
    case "deno":
      return {
        command: process.execPath,
        args: ["run", "--allow-all", "--v8-flags=--expose-gc", script],
      };
    case "bun":
      return { command: process.execPath, args: [script] };
    case "node":
      return { command: process.execPath, args: ["--expose-gc", script] };
  }
}

/** The path of this benchmark's worker script, as this runtime loaded it. */
export function workerScript(): string {
  return fileURLToPath(
    new URL(
      `./worker.${import.meta.url.endsWith(".js") ? "js" : "ts"}`,
      import.meta.url,
    ),
  );
}

/** Runs a full garbage collection where the runtime exposes one. */
export function collectGarbage(): void {
  const bun = (globalThis as { Bun?: { gc(force: boolean): void } }).Bun;
  if (bun !== undefined) return bun.gc(true);
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
}

/** Milliseconds since the epoch with sub-millisecond precision, monotonic within a process. */
export function wallClock(): number {
  return performance.timeOrigin + performance.now();
}

export const sleep = (milliseconds: number) =>
  new Promise<void>((resolve) => setTimeout(resolve, milliseconds));

/** The resident set size of this process in bytes. */
export function residentSetSize(): number {
  return process.memoryUsage().rss;
}

/** CPU time used by this process so far, user plus system, in microseconds. */
export function cpuTime(): number {
  const usage = process.cpuUsage();
  return usage.user + usage.system;
}
