import { describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import {
  cancel,
  type Database,
  defineDatabaseTask,
  listTasks,
  perform,
  performMany,
  purge,
  retry,
  retryFailed,
  stats,
  type TaskEvent,
} from "../mod.ts";
import {
  countByState,
  startChildRunner,
  taskRows,
  temporaryDatabaseUrl,
  useResources,
  waitFor,
} from "./helpers.ts";

const { open, start } = useResources();

async function rowOf(database: Database, id: string): Promise<Record<string, unknown>> {
  const row = (await taskRows(database)).find((each) => each.id === id);
  if (row === undefined) throw new Error(`No row with id ${id}`);
  return row;
}

/** Defines a task whose attempts record their signals and wait until the test settles them. */
function gatedTask(database: Database, options: { name?: string; lease?: number } = {}) {
  const started: string[] = [];
  const signals = new Map<string, AbortSignal>();
  const gates = new Map<string, { resolve: () => void; reject: (error: Error) => void }>();
  const task = defineDatabaseTask(database, {
    name: options.name ?? "gated",
    lease: options.lease,
    process({ id, signal }) {
      started.push(id);
      signals.set(id, signal);
      return new Promise<void>((resolve, reject) => gates.set(id, { resolve, reject }));
    },
  });
  return { task, started, signals, gates };
}

/** Inserts a failed row directly, as a runner leaves it. */
async function insertFailed(
  database: Database,
  row: { id: string; name: string; finishedAt: number; key?: string },
): Promise<void> {
  await database.ready();
  await database.client.execute({
    sql: `INSERT INTO tasks (id, name, data, created, run_at, state, attempts, failed_nr,
      failed_last, failed_error, finished_at, key)
      VALUES (?, ?, 'null', 0, 0, 'failed', 5, 5, ?, 'Error: boom', ?, ?)`,
    args: [row.id, row.name, row.finishedAt, row.finishedAt, row.key ?? null],
  });
}

describe("cancel()", () => {
  test("a pending task becomes cancelled and never runs", async () => {
    const database = open(undefined, { now: () => 5_000 });
    const runs: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "later",
      process({ id }) {
        runs.push(id);
      },
    });
    const cancelled = await perform(task, null);
    const kept = await perform(task, null);

    expect(await cancel(database, cancelled)).toBe("cancelled");
    await start([task]);
    await waitFor(() => runs.length === 1);

    expect(runs).toEqual([kept]);
    expect(await rowOf(database, cancelled)).toMatchObject({
      state: "cancelled",
      finished_at: 5_000,
      cancelled_at: 5_000,
      attempts: 0,
    });
  });

  test("a task running in this process is aborted and ends cancelled", async () => {
    const database = open();
    const { task, started, signals } = gatedTask(database);
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("cancelled", (event) => void events.push(event));
    const id = await perform(task, null);
    await waitFor(() => started.length === 1);

    expect(await cancel(database, id)).toBe("cancelling");

    const signal = signals.get(id)!;
    expect(signal.aborted).toBe(true);
    expect((signal.reason as Error).name).toBe("AbortError");
    expect((signal.reason as Error).message).toBe(`Task "gated" ${id} was cancelled`);
    await waitFor(async () => (await rowOf(database, id)).state === "cancelled");
    expect(await rowOf(database, id)).toMatchObject({ locked_by: null, attempts: 1 });
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ type: "cancelled", task: "gated", id, attempt: 1 });
  });

  test("a task running in another process is aborted at its next lease renewal", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    const child = startChildRunner(url, { name: "remote", lease: 300 });
    const task = defineDatabaseTask(database, { name: "remote", process() {} });
    const id = await perform(task, null);
    await child.waitForLine(`started ${id} 1`);

    expect(await cancel(database, id)).toBe("cancelling");

    const line = await child.waitForLine(`aborted ${id}`);
    expect(line).toBe(`aborted ${id} Task "remote" ${id} was cancelled`);
    await waitFor(async () => (await rowOf(database, id)).state === "cancelled");
  });

  test("a running task whose lease expired is cancelled at once", async () => {
    const database = open();
    await database.ready();
    await database.client.execute(
      "INSERT INTO tasks (id, name, data, created, run_at, state, attempts, locked_until, locked_by) VALUES ('dead', 'orphan', 'null', 0, 0, 'running', 1, 1, 'dead-runner')",
    );

    expect(await cancel(database, "dead")).toBe("cancelled");
    expect(await rowOf(database, "dead")).toMatchObject({
      state: "cancelled",
      locked_by: null,
      locked_until: null,
    });
  });

  test("a cancel of a runner that died is finished by the lease rescue", async () => {
    const database = open();
    await database.ready();
    await database.client.execute({
      sql:
        "INSERT INTO tasks (id, name, data, created, run_at, state, attempts, locked_until, locked_by) VALUES ('dying', 'orphan', 'null', 0, 0, 'running', 1, ?, 'dead-runner')",
      args: [Date.now() + 100],
    });
    expect(await cancel(database, "dying")).toBe("cancelling");

    const runs: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "orphan",
      pollInterval: 20,
      process({ id }) {
        runs.push(id);
      },
    });
    const events: TaskEvent[] = [];
    await start([task], { onEvent: (event) => void events.push(event) });
    await waitFor(async () => (await rowOf(database, "dying")).state === "cancelled");

    expect(runs).toEqual([]);
    expect(events).toEqual([
      { type: "cancelled", task: "orphan", id: "dying", attempt: 1, duration: undefined },
    ]);
  });

  test("an attempt that fails after a cancel request is not retried", async () => {
    const database = open();
    const { task, started, gates } = gatedTask(database, { lease: 60_000 });
    await start([task]);
    const id = await perform(task, null);
    await waitFor(() => started.length === 1);

    // Another process's cancel sets cancelled_at; this runner has not renewed its lease since.
    await database.client.execute({
      sql: "UPDATE tasks SET cancelled_at = 1 WHERE id = ?",
      args: [id],
    });
    gates.get(id)!.reject(new Error("failed after the cancel"));

    await waitFor(async () => (await rowOf(database, id)).state === "cancelled");
    const row = await rowOf(database, id);
    expect(row.failed_error).toContain("failed after the cancel");
    expect(row.finished_at).toBeNumber();
    expect(started).toEqual([id]);
  });

  test("a runner that stops during a cancelled attempt leaves the task cancelled", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    // A long lease: the child renews it, and so learns of the cancel, only after 10 seconds.
    const child = startChildRunner(url, { name: "remote", lease: 30_000 });
    const task = defineDatabaseTask(database, { name: "remote", process() {} });
    const id = await perform(task, null);
    await child.waitForLine(`started ${id} 1`);
    expect(await cancel(database, id)).toBe("cancelling");

    child.process.kill("SIGTERM");
    await child.exited;

    expect(await rowOf(database, id)).toMatchObject({ state: "cancelled", locked_by: null });
  });

  test("cancelling a cancelled task does nothing", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "later", process() {} });
    const id = await perform(task, null, { delay: "1h" });
    await cancel(database, id);
    const before = await rowOf(database, id);

    expect(await cancel(database, id)).toBe("cancelled");
    expect(await rowOf(database, id)).toEqual(before);
  });

  test("rejects an unknown id and a task that already ended", async () => {
    const database = open();
    await insertFailed(database, { id: "failed-1", name: "import", finishedAt: 1 });

    await expect(cancel(database, "missing")).rejects.toThrow(
      'Cannot cancel task "missing": no task has this id',
    );
    await expect(cancel(database, "failed-1")).rejects.toThrow(
      'Cannot cancel task "failed-1": it already ended as "failed"',
    );
    expect((await rowOf(database, "failed-1")).state).toBe("failed");
  });

  test.each([[""], [42], [undefined]])("rejects the id %p", async (id) => {
    const database = open();
    // deno-lint-ignore no-explicit-any
    await expect(cancel(database, id as any)).rejects.toThrow(
      "Invalid task id for cancel(): expected a task id: a non-empty string, received",
    );
  });
});

describe("retry()", () => {
  test("a failed task runs again with a fresh attempt budget", async () => {
    const database = open();
    let fail = true;
    const attempts: number[] = [];
    const task = defineDatabaseTask(database, {
      name: "flaky",
      maxAttempts: 1,
      pollInterval: "1h",
      process({ attempt }) {
        attempts.push(attempt);
        if (fail) throw new Error("down");
      },
    });
    const runner = await start([task]);
    const failed: string[] = [];
    runner.on("failed", (event) => void failed.push(event.id));
    const id = await perform(task, null);
    await waitFor(() => failed.length === 1);

    fail = false;
    await retry(database, id);

    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(attempts).toEqual([1, 1]);
  });

  test("keeps the failure history and clears the end state", async () => {
    const database = open(undefined, { now: () => 9_000 });
    await insertFailed(database, { id: "f", name: "import", finishedAt: 1_000 });

    await retry(database, "f");

    expect(await rowOf(database, "f")).toMatchObject({
      state: "pending",
      attempts: 0,
      run_at: 9_000,
      failed_nr: 5,
      failed_error: "Error: boom",
      finished_at: null,
      cancelled_at: null,
    });
  });

  test("a cancelled task can be retried", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "later", process() {} });
    const id = await perform(task, null, { delay: "1h" });
    await cancel(database, id);

    await retry(database, id);

    expect(await rowOf(database, id)).toMatchObject({ state: "pending", cancelled_at: null });
  });

  test("rejects an unknown id and a task that is not failed or cancelled", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "later", process() {} });
    const id = await perform(task, null, { delay: "1h" });

    await expect(retry(database, "missing")).rejects.toThrow(
      'Cannot retry task "missing": no task has this id',
    );
    await expect(retry(database, id)).rejects.toThrow(
      `Cannot retry task "${id}": it is scheduled, and only failed or cancelled tasks can be retried`,
    );
  });
});

describe("retryFailed()", () => {
  test("retries every failed task, or those of one name", async () => {
    const database = open(undefined, { now: () => 50_000 });
    await insertFailed(database, { id: "a1", name: "a", finishedAt: 1 });
    await insertFailed(database, { id: "a2", name: "a", finishedAt: 1 });
    await insertFailed(database, { id: "b1", name: "b", finishedAt: 1 });

    expect(await retryFailed(database, { name: "a" })).toEqual({ retried: 2, skipped: 0 });
    expect(await countByState(database)).toEqual({ pending: 2, failed: 1 });
    expect(await retryFailed(database)).toEqual({ retried: 1, skipped: 0 });
    expect(await countByState(database)).toEqual({ pending: 3 });
    expect((await taskRows(database)).map((row) => row.attempts)).toEqual([0, 0, 0]);
  });

  test("skips a failed task whose key a live task holds", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "a", process() {} });
    await insertFailed(database, { id: "old", name: "a", finishedAt: 1, key: "k" });
    await insertFailed(database, { id: "free", name: "a", finishedAt: 1, key: "other" });
    const live = await perform(task, null, { key: "k", delay: "1h" });

    expect(await retryFailed(database)).toEqual({ retried: 1, skipped: 1 });
    expect((await rowOf(database, "old")).state).toBe("failed");
    expect((await rowOf(database, "free")).state).toBe("pending");
    expect((await rowOf(database, live)).state).toBe("scheduled");
  });

  test("wakes a runner of the task", async () => {
    const database = open();
    const runs: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "a",
      pollInterval: "1h",
      process({ id }) {
        runs.push(id);
      },
    });
    // Failed just now: the runner's retention cleanup, which runs at its start, keeps it.
    await insertFailed(database, { id: "f", name: "a", finishedAt: Date.now() });
    await start([task]);

    await retryFailed(database);

    await waitFor(() => runs.length === 1);
    expect(runs).toEqual(["f"]);
  });

  test("rejects an unknown option", async () => {
    const database = open();
    // deno-lint-ignore no-explicit-any
    await expect(retryFailed(database, { task: "a" } as any)).rejects.toThrow(
      'Unknown retryFailed() option "task": check its spelling',
    );
  });
});

describe("purge()", () => {
  test("deletes rows of one state that finished before the cutoff", async () => {
    const database = open(undefined, { now: () => 10 * 3_600_000 });
    await insertFailed(database, { id: "old", name: "a", finishedAt: 3_600_000 });
    await insertFailed(database, { id: "recent", name: "a", finishedAt: 9.5 * 3_600_000 });
    const task = defineDatabaseTask(database, { name: "a", process() {} });
    const pending = await perform(task, null);

    expect(await purge(database, { state: "failed", olderThan: "1h" })).toBe(1);
    expect((await taskRows(database)).map((row) => row.id)).toEqual(["recent", pending]);
    expect(await purge(database, { state: "failed", olderThan: 0 })).toBe(1);
    expect((await taskRows(database)).map((row) => row.id)).toEqual([pending]);
  });

  test("deletes only the rows of the named task", async () => {
    const database = open();
    await insertFailed(database, { id: "a1", name: "a", finishedAt: 1 });
    await insertFailed(database, { id: "b1", name: "b", finishedAt: 1 });

    expect(await purge(database, { state: "failed", olderThan: 0, name: "b" })).toBe(1);
    expect((await taskRows(database)).map((row) => row.id)).toEqual(["a1"]);
  });

  test("deletes more rows than one chunk", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "bulk", process() {} });
    await performMany(task, Array.from({ length: 2_500 }, (_, index) => index));
    await database.client.execute(
      "UPDATE tasks SET state = 'cancelled', finished_at = 1, cancelled_at = 1",
    );

    expect(await purge(database, { state: "cancelled", olderThan: "1s" })).toBe(2_500);
    expect(await taskRows(database)).toEqual([]);
  });

  test.each([
    [{ olderThan: "1d" }, 'Missing purge() option "state"'],
    [
      { state: "pending", olderThan: "1d" },
      'Invalid purge() option "state": expected "completed", "failed" or "cancelled", received "pending"',
    ],
    [{ state: "failed" }, 'Missing purge() option "olderThan"'],
    [{ state: "failed", olderThan: "a week" }, 'Invalid purge() option "olderThan"'],
  ])("rejects %p", async (options, message) => {
    const database = open();
    // deno-lint-ignore no-explicit-any
    await expect(purge(database, options as any)).rejects.toThrow(message);
  });
});

describe("stats()", () => {
  test("counts per task and oldest due age", async () => {
    let now = 100_000;
    const database = open(undefined, { now: () => now });
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await perform(mail, 1);
    now += 5_000;
    await perform(mail, 2);
    await perform(mail, 3, { delay: "1h" });
    await perform(report, 4, { delay: "1h" });
    await insertFailed(database, { id: "f", name: "report", finishedAt: 1 });
    now += 1_000;

    const result = await stats(database);

    expect(result.tasks).toEqual([
      {
        name: "mail",
        scheduled: 1,
        pending: 2,
        running: 0,
        completed: 0,
        failed: 0,
        cancelled: 0,
        oldestPendingAge: 6_000,
      },
      {
        name: "report",
        scheduled: 1,
        pending: 0,
        running: 0,
        completed: 0,
        failed: 1,
        cancelled: 0,
        oldestPendingAge: null,
      },
    ]);
    expect(result.totals).toEqual({
      scheduled: 2,
      pending: 2,
      running: 0,
      completed: 0,
      failed: 1,
      cancelled: 0,
      oldestPendingAge: 6_000,
    });
  });

  test("an empty queue has no tasks and zero totals", async () => {
    const database = open();
    expect(await stats(database)).toEqual({
      tasks: [],
      totals: {
        scheduled: 0,
        pending: 0,
        running: 0,
        completed: 0,
        failed: 0,
        cancelled: 0,
        oldestPendingAge: null,
      },
    });
  });
});

describe("listTasks()", () => {
  test("lists tasks newest first with their fields", async () => {
    let now = 1_000;
    const database = open(undefined, { now: () => now });
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    const first = await perform(task, { to: "ada" });
    now += 1;
    const second = await perform(task, undefined, { key: "k", delay: "1s", priority: 2 });

    const tasks = await listTasks(database);

    expect(tasks.map((each) => each.id)).toEqual([second, first]);
    expect(tasks[0]).toEqual({
      id: second,
      name: "mail",
      state: "scheduled",
      data: undefined,
      key: "k",
      priority: 2,
      attempts: 0,
      createdAt: new Date(1_001),
      runAt: new Date(2_001),
      lockedUntil: null,
      lockedBy: null,
      failures: 0,
      lastError: null,
      lastFailedAt: null,
      finishedAt: null,
      cancelRequestedAt: null,
    });
    expect(tasks[1].data).toEqual({ to: "ada" });
  });

  test("filters by state and name, and limits the count", async () => {
    const database = open();
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    await performMany(mail, [1, 2, 3]);
    await insertFailed(database, { id: "f1", name: "mail", finishedAt: 1 });
    await insertFailed(database, { id: "f2", name: "report", finishedAt: 2 });

    const failed = await listTasks(database, { state: "failed" });
    expect(failed.map((each) => each.id)).toEqual(["f2", "f1"]);
    expect(failed[0]).toMatchObject({
      lastError: "Error: boom",
      failures: 5,
      finishedAt: new Date(2),
    });
    expect((await listTasks(database, { name: "report" })).map((each) => each.id)).toEqual([
      "f2",
    ]);
    expect(await listTasks(database, { state: "pending", limit: 2 })).toHaveLength(2);
  });

  test("returns stored data that is not JSON as text", async () => {
    const database = open();
    await database.ready();
    await database.client.execute(
      "INSERT INTO tasks (id, name, data, created) VALUES ('x', 'mail', '{oops', 0)",
    );
    const [task] = await listTasks(database);
    expect(task.data).toBe("{oops");
  });

  test.each([
    [{ limit: 0 }, RangeError, 'Invalid listTasks() option "limit"'],
    [{ limit: "10" }, TypeError, 'Invalid listTasks() option "limit"'],
    [{ state: "done" }, TypeError, 'Invalid listTasks() option "state"'],
  ])("rejects %p", async (options, ErrorClass, message) => {
    const database = open();
    // deno-lint-ignore no-explicit-any
    const promise = listTasks(database, options as any);
    await expect(promise).rejects.toThrow(ErrorClass);
    await expect(promise).rejects.toThrow(message);
  });
});

describe("retention", () => {
  test("keepCompleted keeps a successful row until its retention passes", async () => {
    let now = 1_000_000;
    const database = open(undefined, { now: () => now });
    const task = defineDatabaseTask(database, { name: "audit", keepCompleted: "1h", process() {} });
    const runner = await start([task]);
    const succeeded: string[] = [];
    runner.on("succeeded", (event) => void succeeded.push(event.id));
    const id = await perform(task, null);
    await waitFor(() => succeeded.length === 1);

    expect(await rowOf(database, id)).toMatchObject({
      state: "completed",
      finished_at: 1_000_000,
      locked_by: null,
    });
    expect(await runner.cleanup(now + 3_599_999)).toBe(0);
    now += 3_600_000;
    expect(await runner.cleanup()).toBe(1);
    expect(await taskRows(database)).toEqual([]);
  });

  test("failed and cancelled rows are kept 30 days by default", async () => {
    const database = open(undefined, { now: () => 0 });
    const task = defineDatabaseTask(database, { name: "a", process() {} });
    await insertFailed(database, { id: "f", name: "a", finishedAt: 0 });
    const cancelled = await perform(task, null, { delay: "1h" });
    await cancel(database, cancelled);
    const runner = await start([task]);

    expect(await runner.cleanup(new Date(29 * 86_400_000))).toBe(0);
    expect(await runner.cleanup(new Date(30 * 86_400_000))).toBe(2);
    expect(await taskRows(database)).toEqual([]);
  });

  test("keepFailed sets how long failed rows stay", async () => {
    const database = open(undefined, { now: () => 0 });
    const task = defineDatabaseTask(database, { name: "a", keepFailed: "2h", process() {} });
    await insertFailed(database, { id: "f", name: "a", finishedAt: 0 });
    const runner = await start([task]);

    expect(await runner.cleanup(7_199_999)).toBe(0);
    expect(await runner.cleanup(7_200_000)).toBe(1);
  });

  test("the cleanup leaves rows of other tasks alone", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "a", keepFailed: 0, process() {} });
    await insertFailed(database, { id: "other", name: "b", finishedAt: 0 });
    const runner = await start([task]);

    expect(await runner.cleanup()).toBe(0);
    expect((await taskRows(database)).map((row) => row.id)).toEqual(["other"]);
  });

  test("the runner runs the cleanup every cleanupInterval", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "a",
      keepFailed: "1s",
      pollInterval: "1h",
      process() {},
    });
    await start([task], { cleanupInterval: 20 });

    await insertFailed(database, { id: "f", name: "a", finishedAt: Date.now() });

    await waitFor(async () => (await taskRows(database)).length === 0, { timeout: 3_000 });
  });

  test("cleanup() rejects a time that is not a Date or a number", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "a", process() {} });
    const runner = await start([task]);
    // deno-lint-ignore no-explicit-any
    await expect(runner.cleanup("tomorrow" as any)).rejects.toThrow(
      'Invalid cleanup() option "now": expected a valid Date or milliseconds since the epoch, received "tomorrow"',
    );
  });

  test.each([
    [{ keepCompleted: -1 }, 'Invalid task option "keepCompleted"'],
    [{ keepFailed: "forever" }, 'Invalid task option "keepFailed"'],
  ])("defineDatabaseTask() rejects %p", (options, message) => {
    const database = open();
    expect(() => defineDatabaseTask(database, { name: "a", process() {}, ...options })).toThrow(
      message,
    );
  });
});

describe("schema upgrade", () => {
  test("a failed row of an older schema gets finished_at from failed_last", async () => {
    const url = temporaryDatabaseUrl();
    const client = createClient({ url });
    await client.execute(`CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL,
      data TEXT, created INTEGER NOT NULL, failed_last INTEGER,
      failed_nr INTEGER NOT NULL DEFAULT 0, failed_error TEXT, run_at INTEGER NOT NULL DEFAULT 0,
      state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
      locked_until INTEGER, locked_by TEXT, priority INTEGER NOT NULL DEFAULT 0, key TEXT)`);
    await client.execute(
      "INSERT INTO tasks (id, name, created, failed_last, state) VALUES ('f', 'a', 0, 1234, 'failed')",
    );
    await client.execute("PRAGMA user_version = 1");
    client.close();

    const database = open(url);
    await database.ready();

    expect(await rowOf(database, "f")).toMatchObject({ finished_at: 1234, cancelled_at: null });
  });
});
