import { describe, expect, test } from "bun:test";
import {
  cancel,
  defineDatabaseTask,
  perform,
  performDetailed,
  performMany,
  retry,
  type TaskEvent,
} from "../mod.ts";
import {
  startChildRunner,
  taskRows,
  temporaryDatabaseUrl,
  useResources,
  waitFor,
} from "./helpers.ts";

const { open, start } = useResources();

describe("perform() with a key", () => {
  test("a second perform with the key resolves to the first task's id", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    const first = await perform(task, { day: 1 }, { key: "2025-01-01" });
    const second = await perform(task, { day: 2 }, { key: "2025-01-01" });

    expect(second).toBe(first);
    const rows = await taskRows(database);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ id: first, key: "2025-01-01", data: '{"day":1}' });
  });

  test("performDetailed() tells created from duplicate", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    const first = await performDetailed(task, 1, { key: "k" });
    const second = await performDetailed(task, 2, { key: "k" });

    expect(first.status).toBe("created");
    expect(second).toEqual({ id: first.id, status: "duplicate" });
  });

  test("performDetailed() without a key always creates", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    const first = await performDetailed(task, 1);
    const second = await performDetailed(task, 1);

    expect(first.status).toBe("created");
    expect(second.status).toBe("created");
    expect(second.id).not.toBe(first.id);
  });

  test("the same key under another task name is a separate task", async () => {
    const database = open();
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });

    const first = await performDetailed(report, null, { key: "k" });
    const second = await performDetailed(mail, null, { key: "k" });

    expect(second.status).toBe("created");
    expect(second.id).not.toBe(first.id);
  });

  test("concurrent performs with one key create one task", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    const results = await Promise.all(
      Array.from({ length: 20 }, (_, index) => performDetailed(task, index, { key: "k" })),
    );

    expect(results.filter((result) => result.status === "created")).toHaveLength(1);
    expect(new Set(results.map((result) => result.id)).size).toBe(1);
    expect(await taskRows(database)).toHaveLength(1);
  });

  test("a running task holds its key", async () => {
    const database = open();
    let release!: () => void;
    const started: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "slow",
      process({ id }) {
        started.push(id);
        return new Promise<void>((resolve) => (release = resolve));
      },
    });
    const id = await perform(task, null, { key: "k" });
    await start([task]);
    await waitFor(() => started.length === 1);

    expect(await performDetailed(task, null, { key: "k" })).toEqual({ id, status: "duplicate" });
    release();
  });

  test("success releases the key, whether the row is deleted or kept", async () => {
    for (const keepCompleted of [0, "1h"] as const) {
      const database = open();
      const task = defineDatabaseTask(database, { name: "once", keepCompleted, process() {} });
      const runner = await start([task]);
      const succeeded: string[] = [];
      runner.on("succeeded", (event) => void succeeded.push(event.id));

      const first = await perform(task, null, { key: "k" });
      await waitFor(() => succeeded.length === 1);
      const second = await performDetailed(task, null, { key: "k" });

      expect(second.status).toBe("created");
      expect(second.id).not.toBe(first);
    }
  });

  test("a failed task releases its key", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "broken",
      maxAttempts: 1,
      process() {
        throw new Error("boom");
      },
    });
    const runner = await start([task]);
    const failed: string[] = [];
    runner.on("failed", (event) => void failed.push(event.id));

    const first = await perform(task, null, { key: "k" });
    await waitFor(() => failed.length === 1);
    const second = await performDetailed(task, null, { key: "k" });

    expect(second.status).toBe("created");
    expect(second.id).not.toBe(first);
  });

  test("a cancelled task releases its key", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "later", process() {} });
    const first = await perform(task, null, { key: "k", delay: "1h" });

    await cancel(database, first);
    const second = await performDetailed(task, null, { key: "k" });

    expect(second.status).toBe("created");
  });

  test("retry() of a failed task whose key a new task holds is rejected", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "later", process() {} });
    const first = await perform(task, null, { key: "k", delay: "1h" });
    await cancel(database, first);
    const second = await perform(task, null, { key: "k", delay: "1h" });

    await expect(retry(database, first)).rejects.toThrow(
      `Cannot retry task "${first}": task "${second}" with the same name and key is scheduled, pending or running`,
    );
    const rows = await taskRows(database);
    expect(rows.map((row) => row.state)).toEqual(["cancelled", "scheduled"]);
  });
});

describe('perform() with onConflict: "replace"', () => {
  test("replaces the data, due time and priority of a pending task", async () => {
    const database = open(undefined, { now: () => 10_000 });
    const task = defineDatabaseTask(database, { name: "digest", process() {} });
    const first = await perform(task, { items: 1 }, { key: "k", delay: "1h" });

    const second = await performDetailed(task, { items: 2 }, {
      key: "k",
      onConflict: "replace",
      delay: "1m",
      priority: 3,
    });

    expect(second).toEqual({ id: first, status: "replaced" });
    const rows = await taskRows(database);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      id: first,
      data: '{"items":2}',
      run_at: 70_000,
      priority: 3,
      created: 10_000,
    });
  });

  test("creates a task when none holds the key", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "digest", process() {} });

    const result = await performDetailed(task, 1, { key: "k", onConflict: "replace" });

    expect(result.status).toBe("created");
  });

  test("leaves a running task alone and reports a duplicate", async () => {
    const database = open();
    let release!: () => void;
    const seen: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "digest",
      process({ data }) {
        seen.push(data);
        return new Promise<void>((resolve) => (release = resolve));
      },
    });
    const id = await perform(task, "old", { key: "k" });
    await start([task]);
    await waitFor(() => seen.length === 1);

    const result = await performDetailed(task, "new", { key: "k", onConflict: "replace" });

    expect(result).toEqual({ id, status: "duplicate" });
    const [row] = await taskRows(database);
    expect(row.data).toBe('"old"');
    release();
  });

  test("wakes the runner when the new due time is sooner", async () => {
    const database = open();
    const seen: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "digest",
      pollInterval: "1h",
      process({ data }) {
        seen.push(data);
      },
    });
    await perform(task, "late", { key: "k", delay: "1h" });
    await start([task]);

    await perform(task, "now", { key: "k", onConflict: "replace" });

    await waitFor(() => seen.length === 1);
    expect(seen).toEqual(["now"]);
  });
});

describe("perform() key options", () => {
  const keyExpected =
    'Invalid perform() option "key": expected a string of 1 to 1000 UTF-16 code units (an emoji is 2)';
  test.each([
    ["an empty key", { key: "" }, keyExpected],
    ["a number as key", { key: 5 }, keyExpected],
    ["a key of 1001 characters", { key: "x".repeat(1_001) }, keyExpected],
    [
      "an unknown onConflict",
      { key: "k", onConflict: "update" },
      'Invalid perform() option "onConflict": expected "ignore" or "replace", received "update"',
    ],
    [
      "onConflict without a key",
      { onConflict: "replace" },
      'Invalid perform() option "onConflict": it applies to a task with a "key", and no key was passed',
    ],
  ])("rejects %s and writes nothing", async (_label, options, message) => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    // deno-lint-ignore no-explicit-any
    await expect(perform(task, 1, options as any)).rejects.toThrow(message);
    expect(await taskRows(database)).toHaveLength(0);
  });

  test("performMany() rejects a key", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "report", process() {} });

    await expect(performMany(task, [1, 2], { key: "k" })).rejects.toThrow(
      'Invalid performMany() option "key": a key belongs to one run, so pass it to perform() for each run (received key "k")',
    );
    expect(await taskRows(database)).toHaveLength(0);
  });
});

describe("key through crash recovery", () => {
  test("a crashed runner's task keeps its key until it is rescued and run", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    const child = startChildRunner(url, { name: "import", lease: 300, pollInterval: 50 });
    const task = defineDatabaseTask(database, { name: "import", pollInterval: 50, process() {} });
    const id = await perform(task, null, { key: "k" });

    await child.waitForLine(`started ${id} 1`);
    expect(await performDetailed(task, null, { key: "k" })).toEqual({ id, status: "duplicate" });

    child.process.kill("SIGKILL");
    await child.exited;
    // The lease runs out 300 ms after its last renewal, and no runner has rescued the row yet.
    await waitFor(async () => (await taskRows(database))[0].locked_until as number < Date.now());
    expect((await taskRows(database))[0].state).toBe("running");
    expect(await performDetailed(task, null, { key: "k" })).toEqual({ id, status: "duplicate" });

    const events: TaskEvent[] = [];
    await start([task], { onEvent: (event) => void events.push(event) });
    await waitFor(() => events.some((event) => event.type === "succeeded"));

    expect(events.map((event) => [event.type, event.attempt])).toEqual([
      ["retried", 1],
      ["claimed", 2],
      ["succeeded", 2],
    ]);
    const next = await performDetailed(task, null, { key: "k", delay: "1h" });
    expect(next.status).toBe("created");
    expect(next.id).not.toBe(id);
  });

  test("a crashed runner's last attempt fails the task and releases its key", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    const options = { name: "import", lease: 300, pollInterval: 50, maxAttempts: 1 };
    const child = startChildRunner(url, options);
    const task = defineDatabaseTask(database, { ...options, process() {} });
    const id = await perform(task, null, { key: "k" });
    await child.waitForLine(`started ${id} 1`);

    child.process.kill("SIGKILL");
    await child.exited;
    const runner = await start([task]);
    const failed: string[] = [];
    runner.on("failed", (event) => void failed.push(event.id));
    await waitFor(() => failed.length === 1);

    const [row] = await taskRows(database);
    expect(row).toMatchObject({ id, state: "failed", key: "k" });
    expect(row.finished_at).toBeNumber();
    const next = await performDetailed(task, null, { key: "k", delay: "1h" });
    expect(next.status).toBe("created");
  });
});
