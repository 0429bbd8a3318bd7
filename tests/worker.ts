/**
 * A worker process for the multi-process tests and `scripts/soak.ts`. It runs one task against a
 * database file and records what happens, so the spawning process can check it even after a
 * SIGKILL:
 *
 * - Each event is appended as one line `<event> <pid> <id>` to the `events` file. The write is
 *   synchronous, so it survives a kill. The events are `start` when a run begins, `done` when its
 *   work is finished (the task's visible effect), `settled` when the success hook runs (after the
 *   deletion of the row was committed), `failed` when the failed hook runs, and `aborted` when
 *   the run's signal fires.
 * - Each log line and `{"ready":true}` after `runTasks` resolved are written to stdout as JSON.
 *
 * Usage: `bun tests/worker.ts '<WorkerConfig as JSON>'`. The worker runs until a signal stops
 * it; with `handleSignals`, SIGTERM stops it gracefully.
 */
import { appendFileSync, writeSync } from "node:fs";
import {
  defineDatabaseTask,
  type Duration,
  openDatabase,
  perform,
  performMany,
  runTasks,
} from "../mod.ts";

export interface WorkerConfig {
  /** The database URL. */
  url: string;
  /** The file that receives one line per event. */
  events: string;
  /** @default {"job"} */
  name?: string;
  lease?: Duration;
  pollInterval?: Duration;
  batchSize?: number;
  maxAttempts?: number;
  busyTimeout?: Duration;
  /**
   * How long a run takes, in ms: a number, a `[minimum, maximum]` range to pick from at random,
   * or `"data"` to take it from the task's data (`{ ms: number }`).
   *
   * @default {0}
   */
  runMs?: number | [number, number] | "data";
  /** Whether a run ends early when its signal fires. */
  honorSignal?: boolean;
  /** Blocks the event loop for this many ms at the start of each run. */
  blockMs?: number;
  /** How a blocked run ends: return at once, return after a timer, or throw. */
  finish?: "return" | "await" | "throw";
  /** Tasks that this worker performs after its runner started, in batches of varied size. */
  perform?: number;
  handleSignals?: boolean;
  stopTimeout?: Duration;
}

const config = JSON.parse(process.argv[2]) as WorkerConfig;
const pid = process.pid;

function record(event: string, id: string, detail = ""): void {
  appendFileSync(config.events, `${event} ${pid} ${id}${detail ? ` ${detail}` : ""}\n`);
}

function print(value: unknown): void {
  writeSync(1, `${JSON.stringify(value)}\n`);
}

const logLine = (level: string) => (message: string, fields?: Record<string, unknown>) =>
  print({ level, message, task: fields?.task, id: fields?.id });
const logger = {
  debug: logLine("debug"),
  info: logLine("info"),
  warn: logLine("warn"),
  error: logLine("error"),
};

function runDuration(data: unknown): number {
  const runMs = config.runMs ?? 0;
  if (runMs === "data") return (data as { ms: number }).ms;
  if (Array.isArray(runMs)) return runMs[0] + Math.random() * (runMs[1] - runMs[0]);
  return runMs;
}

function wait(milliseconds: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, milliseconds);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

const database = openDatabase(config.url, { busyTimeout: config.busyTimeout ?? "5s" });

const task = defineDatabaseTask<unknown>(database, {
  name: config.name ?? "job",
  lease: config.lease,
  pollInterval: config.pollInterval,
  batchSize: config.batchSize,
  maxAttempts: config.maxAttempts,
  backoff: 10,
  process({ id, data, signal, attempt }) {
    record("start", id, String(attempt));
    signal.addEventListener("abort", () => {
      record("aborted", id, (signal.reason as Error).name);
    });
    if (config.blockMs !== undefined) {
      const until = Date.now() + config.blockMs;
      while (Date.now() < until) {
        // Blocks the event loop, as a CPU-bound handler or a paused process would.
      }
      if (config.finish === "throw") {
        record("done", id);
        throw new Error("failed after blocking");
      }
      if (config.finish === "await") {
        return wait(50, undefined).then(() => record("done", id));
      }
      record("done", id);
      return;
    }
    return wait(runDuration(data), config.honorSignal ? signal : undefined).then(() => {
      record("done", id);
    });
  },
  success({ id }) {
    record("settled", id);
  },
  failed({ id }) {
    record("failed", id);
  },
});

await runTasks([task], {
  logger,
  handleSignals: config.handleSignals ?? false,
  stopTimeout: config.stopTimeout,
});
print({ ready: true });

if (config.perform !== undefined) {
  // Alternate single performs, which share one statement per tick, and performMany batches.
  let performed = 0;
  for (let round = 0; performed < config.perform; round++) {
    const size = Math.min(config.perform - performed, 1 + (round % 7) * 13);
    const items = Array.from({ length: size }, (_, index) => ({ n: performed + index }));
    if (round % 2 === 0) await Promise.all(items.map((item) => perform(task, item)));
    else await performMany(task, items);
    performed += size;
  }
  print({ performed });
}
