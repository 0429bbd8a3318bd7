/**
 * Measures what an idle runner costs and how soon it picks up a task that another process
 * performs.
 *
 * 1. Starts runners for `tasks` tasks on an empty database file and measures the process's CPU
 *    time with `process.cpuUsage()` over `seconds` seconds.
 * 2. Starts a second process that performs 20 tasks, 200 ms apart, and prints the time from each
 *    perform to the start of its run. The poll interval is 1 s, so shorter times come from the
 *    `data_version` watcher.
 *
 * Usage: `bun scripts/idle-cpu.ts [seconds] [tasks]`, by default 10 seconds and 1 task.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { defineDatabaseTask, openDatabase, runTasks, type Task } from "../mod.ts";

const seconds = Number(process.argv[2] ?? 10);
const taskCount = Number(process.argv[3] ?? 1);

const directory = mkdtempSync(join(tmpdir(), "tasklite-idle-"));
const url = `file:${join(directory, "tasks.db")}`;
const database = openDatabase(url);
const delays: number[] = [];
const tasks: Array<Task<unknown>> = [];
for (let index = 0; index < taskCount; index++) {
  tasks.push(defineDatabaseTask<{ at: number }>(database, {
    name: `idle-${index}`,
    process({ data }) {
      delays.push(Date.now() - data.at);
    },
  }));
}
const runner = await runTasks(tasks, { logger: { ...console, info() {} } });

// Let start-up work finish before measuring.
await new Promise((resolve) => setTimeout(resolve, 1_000));
const before = process.cpuUsage();
const startedAt = performance.now();
await new Promise((resolve) => setTimeout(resolve, seconds * 1_000));
const used = process.cpuUsage(before);
const elapsed = performance.now() - startedAt;
const cpuMilliseconds = (used.user + used.system) / 1_000;
console.log(
  `idle runner, ${taskCount} task(s), ${(elapsed / 1_000).toFixed(1)} s: ` +
    `${cpuMilliseconds.toFixed(0)} ms CPU (user ${(used.user / 1_000).toFixed(0)} ms, ` +
    `system ${(used.system / 1_000).toFixed(0)} ms), ` +
    `${(cpuMilliseconds / elapsed * 100).toFixed(2)} % of one core`,
);

const library = new URL("../mod.ts", import.meta.url).href;
const performer = spawn(process.execPath, [
  "-e",
  `import { defineDatabaseTask, openDatabase, perform } from ${JSON.stringify(library)};
  const database = openDatabase(${JSON.stringify(url)});
  const task = defineDatabaseTask(database, { name: "idle-0", process() {} });
  for (let index = 0; index < 20; index++) {
    await new Promise((resolve) => setTimeout(resolve, 200));
    await perform(task, { at: Date.now() });
  }
  database.close();`,
], { cwd: fileURLToPath(new URL("..", import.meta.url)), stdio: "inherit" });
await new Promise((resolve) => performer.on("exit", resolve));
await new Promise((resolve) => setTimeout(resolve, 500));

delays.sort((a, b) => a - b);
const median = delays[Math.floor(delays.length / 2)];
console.log(
  `pickup of ${delays.length} tasks performed by another process: median ${median} ms, ` +
    `max ${delays.at(-1)} ms (poll interval 1 s, watch interval 25 ms)`,
);

await runner.stop();
database.close();
rmSync(directory, { recursive: true, force: true });
