/**
 * Starts `tests/worker.ts` in child processes and reads what they record. Used by the
 * multi-process tests and by `scripts/soak.ts`.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { WorkerConfig } from "./worker.ts";

export type { WorkerConfig };

const workerScript = fileURLToPath(new URL("./worker.ts", import.meta.url));

/** A log line or another JSON value that a worker printed. */
export interface WorkerOutput {
  level?: "debug" | "info" | "warn" | "error";
  message?: string;
  task?: string;
  id?: string;
  ready?: boolean;
  performed?: number;
}

export interface Worker {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Every JSON line printed on stdout so far. */
  readonly output: WorkerOutput[];
  /** Everything printed on stderr so far. */
  readonly stderr: () => string;
  /** Resolves once the worker's runner started. */
  readonly ready: Promise<void>;
  /** Resolves with the exit code, or the signal that ended the process. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Log lines at a level. */
  logs(level: NonNullable<WorkerOutput["level"]>): string[];
}

/**
 * Starts a worker with the runtime that runs this code (`process.execPath`: Bun under
 * `bun test`).
 */
export function startWorker(config: WorkerConfig): Worker {
  const child = spawn(process.execPath, [workerScript, JSON.stringify(config)], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const output: WorkerOutput[] = [];
  let stderr = "";
  let rest = "";
  let markReady!: () => void;
  let failReady!: (error: Error) => void;
  const ready = new Promise<void>((resolve, reject) => {
    markReady = resolve;
    failReady = reject;
  });

  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (chunk: string) => {
    const lines = (rest + chunk).split("\n");
    rest = lines.pop()!;
    for (const line of lines) {
      if (line.trim() === "") continue;
      const value = JSON.parse(line) as WorkerOutput;
      output.push(value);
      if (value.ready) markReady();
    }
  });
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (chunk: string) => void (stderr += chunk));

  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>(
    (resolve) => {
      child.on("exit", (code, signal) => {
        failReady(new Error(`Worker ${child.pid} exited before it was ready: ${stderr}`));
        resolve({ code, signal });
      });
    },
  );
  ready.catch(() => {});

  return {
    child,
    pid: child.pid!,
    output,
    stderr: () => stderr,
    ready,
    exited,
    logs: (level) =>
      output.filter((line) => line.level === level).map((line) => line.message ?? ""),
  };
}

/** One line of a worker's events file. */
export interface WorkerEvent {
  event: "start" | "done" | "settled" | "failed" | "aborted";
  pid: number;
  id: string;
  detail: string | undefined;
}

/** Reads a worker events file; a missing file has no events. */
export function readEvents(file: string): WorkerEvent[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8").split("\n").filter((line) => line !== "").map((line) => {
    const [event, pid, id, detail] = line.split(" ");
    return { event: event as WorkerEvent["event"], pid: Number(pid), id, detail };
  });
}

/** Counts the events of one kind per task id. */
export function countByTask(
  events: WorkerEvent[],
  kind: WorkerEvent["event"],
): Map<string, number> {
  const counts = new Map<string, number>();
  for (const { event, id } of events) {
    if (event === kind) counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

/**
 * Counts, per task id, the runs that a killed worker started and had not settled, and returns
 * them with the ids done more often than those runs explain. A task is done twice only when a
 * worker was killed after the run's effect and before its result was recorded.
 */
export function checkRepeats(
  events: WorkerEvent[],
  killed: Set<number>,
): { inFlightAtKill: Map<string, number>; unexplained: Array<[string, number]> } {
  const settledBy = new Set(
    events.filter((entry) => entry.event === "settled").map((entry) => `${entry.pid} ${entry.id}`),
  );
  const inFlightAtKill = countByTask(
    events.filter((entry) =>
      entry.event === "start" && killed.has(entry.pid) &&
      !settledBy.has(`${entry.pid} ${entry.id}`)
    ),
    "start",
  );
  const unexplained = [...countByTask(events, "done")].filter(([id, count]) =>
    count - 1 > (inFlightAtKill.get(id) ?? 0)
  );
  return { inFlightAtKill, unexplained };
}

/** Ends a worker, by SIGKILL unless another signal is given, and waits for it to exit. */
export async function stopWorker(worker: Worker, signal: NodeJS.Signals = "SIGKILL") {
  if (worker.child.exitCode === null && worker.child.signalCode === null) {
    worker.child.kill(signal);
  }
  return await worker.exited;
}
