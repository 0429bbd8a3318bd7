import { afterEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import { type Database, defineDatabaseTask, openDatabase, performMany } from "../mod.ts";
import {
  countByState,
  taskRows,
  temporaryDirectory,
  waitFor as waitForCondition,
} from "./helpers.ts";
import {
  checkRepeats,
  countByTask,
  readEvents,
  startWorker,
  stopWorker,
  type Worker,
  type WorkerConfig,
} from "./worker-process.ts";

// Worker processes start in about 100 ms on an idle machine and in seconds on a loaded one.
setDefaultTimeout(30_000);

/** Waits for a condition, with a time limit that leaves room for slow process start-up. */
function waitFor<T>(
  condition: () => T | Promise<T>,
  options: Parameters<typeof waitForCondition>[1] = {},
): Promise<T> {
  return waitForCondition(condition, { timeout: 15_000, interval: 10, ...options });
}

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

const workers: Worker[] = [];
const databases: Database[] = [];

afterEach(async () => {
  await Promise.all(workers.splice(0).map((worker) => stopWorker(worker)));
  for (const database of databases.splice(0)) database.close();
});

function start(config: WorkerConfig): Worker {
  const worker = startWorker(config);
  workers.push(worker);
  return worker;
}

/** Opens a database file in a new directory, and returns it, its URL and an events file path. */
function setup(): { url: string; events: string; database: Database } {
  const directory = temporaryDirectory();
  const url = `file:${join(directory, "tasks.db")}`;
  const database = openDatabase(url);
  databases.push(database);
  return { url, events: join(directory, "events.log"), database };
}

/** Enqueues tasks named "job" from the test process. */
async function enqueue(database: Database, items: unknown[]): Promise<string[]> {
  const task = defineDatabaseTask(database, { name: "job", process() {} });
  return await performMany(task, items);
}

/** Returns the warnings and errors of the workers, except those that `expected` matches. */
function unexpectedLogs(list: Worker[], expected: RegExp[] = []): string[] {
  return list.flatMap((worker) => [...worker.logs("warn"), ...worker.logs("error")])
    .filter((line) => !expected.some((pattern) => pattern.test(line)));
}

describe("worker processes", () => {
  test("SIGKILLed workers lose no task", async () => {
    const { url, events, database } = setup();
    const ids = await enqueue(database, Array.from({ length: 2_000 }, (_, n) => ({ n })));
    const config: WorkerConfig = {
      url,
      events,
      lease: "2s",
      pollInterval: 100,
      batchSize: 8,
      maxAttempts: 100,
      runMs: [20, 80],
    };
    const running = [start(config), start(config), start(config)];
    await Promise.all(running.map((worker) => worker.ready));

    const killed = new Set<number>();
    for (let kill = 0; kill < 20; kill++) {
      await sleep(150 + Math.random() * 200);
      const index = Math.floor(Math.random() * running.length);
      await stopWorker(running[index], "SIGKILL");
      killed.add(running[index].pid);
      running[index] = start(config);
    }
    await waitFor(async () => Object.keys(await countByState(database)).length === 0, {
      timeout: 30_000,
      interval: 50,
      message: "an empty tasks table",
    });

    const log = readEvents(events);
    const done = countByTask(log, "done");
    expect(ids.filter((id) => !done.has(id))).toEqual([]);
    expect(done.size).toBe(2_000);

    // A run can repeat only if a killed worker had started it and not yet recorded its result.
    const { unexplained } = checkRepeats(log, killed);
    expect(unexplained).toEqual([]);
    expect(killed.size).toBe(20);

    const all = [...workers];
    expect(unexpectedLogs(all, [/lease expired during attempt \d+; the task is due again/]))
      .toEqual([]);
    expect(all.map((worker) => worker.stderr()).join("")).toBe("");
  }, 60_000);

  test("four processes perform and run 10,000 tasks, each once", async () => {
    const directory = temporaryDirectory();
    const url = `file:${join(directory, "tasks.db")}`;
    const events = join(directory, "events.log");
    // The file does not exist yet, so the four workers also race to create the schema.
    const config: WorkerConfig = {
      url,
      events,
      perform: 2_500,
      batchSize: 10,
      handleSignals: true,
    };
    const list = [start(config), start(config), start(config), start(config)];

    await waitFor(() => countByTask(readEvents(events), "settled").size === 10_000, {
      timeout: 60_000,
      interval: 100,
      message: "10,000 settled tasks",
    });
    const exits = await Promise.all(list.map((worker) => stopWorker(worker, "SIGTERM")));

    const log = readEvents(events);
    const done = countByTask(log, "done");
    expect(done.size).toBe(10_000);
    expect([...done.values()].filter((count) => count !== 1)).toEqual([]);
    expect(countByTask(log, "start").size).toBe(10_000);
    expect(log.filter((entry) => entry.event === "start").length).toBe(10_000);
    expect(list.map((worker) => worker.output.find((line) => line.performed)?.performed))
      .toEqual([2_500, 2_500, 2_500, 2_500]);
    expect(unexpectedLogs(list)).toEqual([]);
    expect(list.map((worker) => worker.stderr()).join("")).toBe("");
    expect(exits).toEqual(Array(4).fill({ code: 0, signal: null }));

    const database = openDatabase(url);
    databases.push(database);
    expect(await taskRows(database)).toEqual([]);
  }, 90_000);

  test("dead worker's tasks rerun, counting the lost attempt", async () => {
    const { url, events, database } = setup();
    const ids = await enqueue(database, [{ n: 1 }, { n: 2 }]);
    const dead = start({ url, events, lease: "500ms", pollInterval: 50, runMs: 60_000 });
    await waitFor(() => readEvents(events).filter((entry) => entry.event === "start").length === 2);
    await stopWorker(dead, "SIGKILL");

    const rescuer = start({ url, events, lease: "500ms", pollInterval: 50 });
    await waitFor(() => countByTask(readEvents(events), "settled").size === 2);
    const runs = readEvents(events).filter((entry) => entry.event === "start");
    expect(runs.map((entry) => [entry.pid, entry.detail])).toEqual([
      [dead.pid, "1"],
      [dead.pid, "1"],
      [rescuer.pid, "2"],
      [rescuer.pid, "2"],
    ]);
    expect(runs.slice(2).map((entry) => entry.id).sort()).toEqual([...ids].sort());
    expect(rescuer.logs("warn").sort()).toEqual(
      ids.map((id) => `Task "job" ${id}: lease expired during attempt 1; the task is due again`)
        .sort(),
    );
    expect(await taskRows(database)).toEqual([]);
  });

  test("dead worker's last attempt fails the task", async () => {
    const { url, events, database } = setup();
    const [id] = await enqueue(database, [{ n: 1 }]);
    const dead = start({ url, events, lease: "500ms", maxAttempts: 1, runMs: 60_000 });
    await waitFor(() => readEvents(events).some((entry) => entry.event === "start"));
    await stopWorker(dead, "SIGKILL");

    const rescuer = start({ url, events, lease: "500ms", pollInterval: 50, maxAttempts: 1 });
    await waitFor(() => readEvents(events).some((entry) => entry.event === "failed"));
    expect(readEvents(events).map((entry) => [entry.event, entry.pid])).toEqual([
      ["start", dead.pid],
      ["failed", rescuer.pid],
    ]);
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ id, state: "failed", attempts: 1, failed_nr: 1, locked_by: null });
    expect(row.failed_error).toBe(
      "The worker stopped responding: its lease expired before the attempt ended",
    );
    expect(rescuer.logs("error")).toEqual([
      `Task "job" ${id}: lease expired during attempt 1 of 1; no attempts left, the task failed`,
    ]);
  });

  test.each(["return", "await", "throw"] as const)(
    "blocked run loses its lease, late result (%s) rejected",
    async (finish) => {
      const { url, events, database } = setup();
      const [id] = await enqueue(database, [{ n: 1 }]);
      const blocked = start({ url, events, lease: 300, pollInterval: 50, blockMs: 1_500, finish });
      await waitFor(() => readEvents(events).some((entry) => entry.event === "start"));
      const other = start({ url, events, lease: 300, pollInterval: 50 });

      await waitFor(() => blocked.output.some((line) => line.level === "warn"), {
        message: "a warning from the blocked worker",
      });
      await waitFor(() => readEvents(events).some((entry) => entry.event === "settled"));
      const by = (pid: number) =>
        readEvents(events).filter((entry) => entry.pid === pid).map((entry) => entry.event);
      await waitFor(() => by(blocked.pid).length === 3);
      // "await" returns after the heartbeat found the lease lost, so the signal fired first.
      expect(by(blocked.pid)).toEqual(
        finish === "await" ? ["start", "aborted", "done"] : ["start", "done", "aborted"],
      );
      expect(by(other.pid)).toEqual(["start", "done", "settled"]);

      const warnings = blocked.output.filter((line) => line.level === "warn");
      expect(warnings.at(-1)).toMatchObject({ task: "job", id });
      expect(warnings.at(-1)?.message).toStartWith(`Task "job" ${id}: lease lost`);
      expect(blocked.logs("error")).toEqual([]);
      expect(await taskRows(database)).toEqual([]);
    },
  );
});

describe("worker processes with handleSignals", () => {
  test("SIGTERM finishes short runs and releases long ones", async () => {
    const { url, events, database } = setup();
    const [shortA, shortB, longA, longB] = await enqueue(database, [
      { ms: 200 },
      { ms: 200 },
      { ms: 5_000 },
      { ms: 5_000 },
    ]);
    const stopping = start({
      url,
      events,
      runMs: "data",
      batchSize: 4,
      handleSignals: true,
      stopTimeout: "1s",
    });
    await waitFor(() => readEvents(events).filter((entry) => entry.event === "start").length === 4);

    const signalled = Date.now();
    stopping.child.kill("SIGTERM");
    expect(await stopping.exited).toEqual({ code: 0, signal: null });
    expect(Date.now() - signalled).toBeLessThan(4_000);
    const settled = readEvents(events).filter((entry) => entry.event === "settled");
    expect(settled.map((entry) => entry.id).sort()).toEqual([shortA, shortB].sort());
    const aborted = readEvents(events).filter((entry) => entry.event === "aborted");
    expect(aborted.map((entry) => [entry.id, entry.detail]).sort()).toEqual(
      [[longA, "AbortError"], [longB, "AbortError"]].sort(),
    );
    expect(stopping.logs("warn")).toEqual([
      'Task "job": stop timed out after 1 s; released 2 running attempts for another runner',
    ]);
    const rows = await taskRows(database);
    expect(rows.map((row) => [row.id, row.state, row.attempts, row.locked_by])).toEqual([
      [longA, "pending", 0, null],
      [longB, "pending", 0, null],
    ]);

    const other = start({ url, events, runMs: 10 });
    await waitFor(() => countByTask(readEvents(events), "settled").size === 4);
    const runs = readEvents(events).filter((entry) => entry.pid === other.pid);
    expect(runs.filter((entry) => entry.event === "start").map((entry) => [entry.id, entry.detail]))
      .toEqual([[longA, "1"], [longB, "1"]]);
    expect(await taskRows(database)).toEqual([]);
  });

  test("second SIGTERM exits at once", async () => {
    const { url, events, database } = setup();
    await enqueue(database, [{ ms: 5_000 }]);
    const worker = start({ url, events, runMs: "data", handleSignals: true, stopTimeout: "30s" });
    await waitFor(() => readEvents(events).some((entry) => entry.event === "start"));

    worker.child.kill("SIGTERM");
    await waitFor(() => worker.logs("info").some((line) => line.includes("received SIGTERM")));
    const signalled = Date.now();
    worker.child.kill("SIGTERM");
    expect(await worker.exited).toEqual({ code: 143, signal: null });
    expect(Date.now() - signalled).toBeLessThan(2_000);
    expect(readEvents(events).map((entry) => entry.event)).toEqual(["start"]);
    expect((await countByState(database)).running).toBe(1);
  });
});
