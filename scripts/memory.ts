/**
 * Runs many tasks through one runner and prints heap and RSS after each round, to show that
 * memory stays flat as the number of processed tasks grows. One attempt keeps running from the
 * start to the end, as a slow task would, while the others pass it.
 *
 * Usage: `bun scripts/memory.ts [tasks] [round]`, by default 150,000 tasks in rounds of 10,000.
 * Also runs under Node.js with a TypeScript loader and `--expose-gc`, and under
 * `deno run -A --v8-flags=--expose-gc`.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defineDatabaseTask, openDatabase, performMany, runTasks } from "../mod.ts";

const total = Number(process.argv[2] ?? 150_000);
const round = Number(process.argv[3] ?? 10_000);

const directory = mkdtempSync(join(tmpdir(), "tasklite-memory-"));
const database = openDatabase(`file:${join(directory, "tasks.db")}`);
let done = 0;
let waiter: (() => void) | undefined;
let releaseHeld!: () => void;
const held = new Promise<void>((resolve) => (releaseHeld = resolve));
const task = defineDatabaseTask<{ n: number; hold?: boolean }>(database, {
  name: "memory",
  batchSize: 50,
  async process({ data, signal }) {
    if (data.hold) return await held;
    // Reads the signal, so every attempt creates its AbortController as user code often does.
    if (signal.aborted) throw new Error("aborted");
    await Promise.resolve();
  },
  success({ data }) {
    if (data.hold) return;
    done++;
    if (done % round === 0) waiter?.();
  },
});

function collectGarbage(): void {
  const bun = (globalThis as { Bun?: { gc(force: boolean): void } }).Bun;
  if (bun !== undefined) bun.gc(true);
  else (globalThis as { gc?: () => void }).gc?.();
}

const megabytes = (bytes: number) => (bytes / 1_048_576).toFixed(1);

const runner = await runTasks([task], { logger: { ...console, info() {} } });
await performMany(task, [{ n: -1, hold: true }]);
console.log("tasks processed | heap used MB | RSS MB");
for (let performed = 0; performed < total; performed += round) {
  const finished = new Promise<void>((resolve) => (waiter = resolve));
  await performMany(task, Array.from({ length: round }, (_, n) => ({ n: performed + n })));
  await finished;
  collectGarbage();
  const usage = process.memoryUsage();
  console.log(
    `${String(done).padStart(15)} | ${megabytes(usage.heapUsed).padStart(12)} | ${
      megabytes(usage.rss).padStart(6)
    }`,
  );
}

releaseHeld();
await runner.stop();
database.close();
rmSync(directory, { recursive: true, force: true });
