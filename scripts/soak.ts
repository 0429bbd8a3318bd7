/**
 * Heavier versions of the crash and contention tests in `tests/processes.test.ts`, for runs by
 * hand before a release. Prints what it measured and exits with 1 when a check fails.
 *
 * Usage:
 *   bun scripts/soak.ts crash [tasks] [workers] [kills]       (default 20000 4 100)
 *   bun scripts/soak.ts contention [tasks] [workers]          (default 40000 8)
 *   bun scripts/soak.ts                                       (both, with the defaults)
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defineDatabaseTask, openDatabase, performMany } from "../mod.ts";
import {
  checkRepeats,
  countByTask,
  readEvents,
  startWorker,
  stopWorker,
  type Worker,
  type WorkerConfig,
} from "../tests/worker-process.ts";

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

let failures = 0;

function check(condition: boolean, description: string): void {
  console.log(`  ${condition ? "ok  " : "FAIL"} ${description}`);
  if (!condition) failures++;
}

function problems(workers: Worker[], expected: RegExp[] = []): string[] {
  return workers.flatMap((worker) => [...worker.logs("warn"), ...worker.logs("error")])
    .filter((line) => !expected.some((pattern) => pattern.test(line)));
}

async function waitUntil(condition: () => boolean | Promise<boolean>, timeout: number) {
  const deadline = Date.now() + timeout;
  while (!(await condition())) {
    if (Date.now() > deadline) return false;
    await sleep(100);
  }
  return true;
}

async function soakCrash(tasks: number, workerCount: number, kills: number): Promise<void> {
  console.log(`crash: ${tasks} tasks, ${workerCount} workers, ${kills} SIGKILLs`);
  const directory = mkdtempSync(join(tmpdir(), "tasklite-soak-"));
  const url = `file:${join(directory, "tasks.db")}`;
  const events = join(directory, "events.log");
  const database = openDatabase(url);
  const task = defineDatabaseTask(database, { name: "job", process() {} });
  const ids = await performMany(task, Array.from({ length: tasks }, (_, n) => ({ n })));

  const config: WorkerConfig = {
    url,
    events,
    lease: "2s",
    pollInterval: 100,
    batchSize: 8,
    maxAttempts: 1_000,
    runMs: [10, 60],
  };
  const started = Date.now();
  const all: Worker[] = [];
  const running = Array.from({ length: workerCount }, () => startWorker(config));
  all.push(...running);
  const killed = new Set<number>();
  for (let kill = 0; kill < kills; kill++) {
    await sleep(100 + Math.random() * 300);
    const index = Math.floor(Math.random() * running.length);
    await stopWorker(running[index], "SIGKILL");
    killed.add(running[index].pid);
    running[index] = startWorker(config);
    all.push(running[index]);
  }
  const emptied = await waitUntil(async () => {
    const result = await database.client.execute("SELECT count(*) AS n FROM tasks");
    return result.rows[0].n === 0;
  }, 120_000);
  const seconds = (Date.now() - started) / 1_000;
  await Promise.all(running.map((worker) => stopWorker(worker, "SIGKILL")));

  const log = readEvents(events);
  const done = countByTask(log, "done");
  const { inFlightAtKill, unexplained } = checkRepeats(log, killed);
  const repeated = [...done.values()].filter((count) => count > 1).length;
  console.log(
    `  ${seconds.toFixed(1)} s, ${(tasks / seconds).toFixed(0)} tasks/s, ` +
      `${inFlightAtKill.size} runs in flight at a kill, ${repeated} tasks done twice or more`,
  );
  check(emptied, "the table emptied: no pending, running or failed rows");
  check(ids.every((id) => done.has(id)), `every one of ${tasks} tasks was done`);
  check(unexplained.length === 0, "every repeated task was in flight at a kill");
  check(killed.size === kills, `${kills} distinct workers were killed`);
  const unexpected = problems(all, [/lease expired during attempt \d+; the task is due again/]);
  check(unexpected.length === 0, `no other warning or error (${unexpected.slice(0, 3)})`);
  check(all.every((worker) => worker.stderr() === ""), "nothing on stderr");

  database.close();
  rmSync(directory, { recursive: true, force: true });
}

async function soakContention(tasks: number, workerCount: number): Promise<void> {
  console.log(`contention: ${workerCount} workers perform and run ${tasks} tasks on one file`);
  const directory = mkdtempSync(join(tmpdir(), "tasklite-soak-"));
  const url = `file:${join(directory, "tasks.db")}`;
  const events = join(directory, "events.log");
  const perWorker = Math.ceil(tasks / workerCount);
  const config: WorkerConfig = { url, events, perform: perWorker, batchSize: 10 };

  const started = Date.now();
  const workers = Array.from({ length: workerCount }, () => startWorker(config));
  const finished = await waitUntil(
    () => countByTask(readEvents(events), "settled").size === perWorker * workerCount,
    300_000,
  );
  const seconds = (Date.now() - started) / 1_000;
  await Promise.all(workers.map((worker) => stopWorker(worker, "SIGTERM")));

  const done = countByTask(readEvents(events), "done");
  console.log(
    `  ${seconds.toFixed(1)} s including start-up, ${(done.size / seconds).toFixed(0)} tasks/s`,
  );
  check(finished, `all ${perWorker * workerCount} tasks settled`);
  check([...done.values()].every((count) => count === 1), "each task was done exactly once");
  const unexpected = problems(workers);
  check(unexpected.length === 0, `no warning or error (${unexpected.slice(0, 3)})`);
  check(workers.every((worker) => worker.stderr() === ""), "nothing on stderr");
  rmSync(directory, { recursive: true, force: true });
}

const [mode, ...numbers] = process.argv.slice(2);
const argument = (index: number, fallback: number) =>
  numbers[index] === undefined ? fallback : Number(numbers[index]);
if (mode === undefined || mode === "crash") {
  await soakCrash(argument(0, 20_000), argument(1, 4), argument(2, 100));
}
if (mode === undefined || mode === "contention") {
  await soakContention(argument(0, 40_000), argument(1, 8));
}
console.log(failures === 0 ? "all checks passed" : `${failures} checks failed`);
process.exit(failures === 0 ? 0 : 1);
