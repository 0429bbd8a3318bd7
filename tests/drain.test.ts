import { afterEach, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  type Database,
  defineDatabaseTask,
  drain,
  openDatabase,
  perform,
  performMany,
} from "../mod.ts";
import { captureLogger, taskRows, temporaryDatabaseUrl, temporaryDirectory } from "./helpers.ts";

const databases: Database[] = [];

afterEach(() => {
  for (const database of databases.splice(0)) database.close();
});

function open(now?: () => number): Database {
  const database = openDatabase(temporaryDatabaseUrl(), now ? { now } : {});
  databases.push(database);
  return database;
}

const logger = captureLogger();

describe("drain()", () => {
  test("runs every due task and counts the results", async () => {
    const database = open();
    const runs: number[] = [];
    const task = defineDatabaseTask<number>(database, {
      name: "mail",
      batchSize: 2,
      process({ data }) {
        runs.push(data);
      },
    });
    await performMany(task, [1, 2, 3, 4, 5]);

    const result = await drain(database, { tasks: [task], logger });

    expect(result).toEqual({ succeeded: 5, failed: 0, retried: 0, cancelled: 0 });
    expect(runs.sort()).toEqual([1, 2, 3, 4, 5]);
    expect(await taskRows(database)).toEqual([]);
  });

  test("leaves tasks that are not due, until the database clock reaches them", async () => {
    let now = Date.parse("2025-01-01T00:00:00Z");
    const database = open(() => now);
    const runs: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "remind",
      process({ id }) {
        runs.push(id);
      },
    });
    const id = await perform(task, null, { delay: "1h" });

    expect(await drain(database, { tasks: [task], logger })).toEqual({
      succeeded: 0,
      failed: 0,
      retried: 0,
      cancelled: 0,
    });
    now += 3_600_000;
    expect((await drain(database, { tasks: [task], logger })).succeeded).toBe(1);
    expect(runs).toEqual([id]);
  });

  test("now runs the tasks due at that time", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "remind", process() {} });
    await perform(task, null, { delay: "1h" });
    await perform(task, null, { delay: "3h" });

    const inTwoHours = new Date(Date.now() + 2 * 3_600_000);
    const result = await drain(database, { tasks: [task], now: inTwoHours, logger });

    expect(result.succeeded).toBe(1);
    expect(await taskRows(database)).toHaveLength(1);
  });

  test("a retry waits for its backoff, and a later now runs it", async () => {
    let now = 1_000_000;
    const database = open(() => now);
    let calls = 0;
    const task = defineDatabaseTask(database, {
      name: "flaky",
      backoff: "10s",
      process() {
        calls++;
        if (calls === 1) throw new Error("first attempt fails");
      },
    });
    await perform(task, null);

    expect(await drain(database, { tasks: [task], logger })).toMatchObject({
      succeeded: 0,
      retried: 1,
    });
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ state: "scheduled", run_at: 1_010_000, attempts: 1 });

    now += 10_000;
    expect(await drain(database, { tasks: [task], logger })).toMatchObject({ succeeded: 1 });
  });

  test("a far enough now runs every retry until the task fails", async () => {
    const database = open();
    const failed: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "broken",
      maxAttempts: 3,
      process() {
        throw new Error("always");
      },
      failed({ id }) {
        failed.push(id);
      },
    });
    const id = await perform(task, null);

    const result = await drain(database, {
      tasks: [task],
      now: Date.now() + 86_400_000,
      logger,
    });

    expect(result).toEqual({ succeeded: 0, failed: 1, retried: 2, cancelled: 0 });
    expect(failed).toEqual([id]);
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ state: "failed", attempts: 3 });
  });

  test("runs tasks that a drained task performs, and waits for hooks", async () => {
    const database = open();
    const hooks: string[] = [];
    const second = defineDatabaseTask<number>(database, {
      name: "second",
      process() {},
      async success({ data }) {
        await new Promise((resolve) => setTimeout(resolve, 5));
        hooks.push(`second ${data}`);
      },
    });
    const first = defineDatabaseTask<number>(database, {
      name: "first",
      async process({ data }) {
        await perform(second, data * 10);
      },
    });
    await perform(first, 1);

    const result = await drain(database, { tasks: [first, second], logger });

    expect(result.succeeded).toBe(2);
    expect(hooks).toEqual(["second 10"]);
  });

  test("runs only the tasks it is given", async () => {
    const database = open();
    const drained = defineDatabaseTask(database, { name: "drained", process() {} });
    const other = defineDatabaseTask(database, { name: "other", process() {} });
    await perform(drained, null);
    const left = await perform(other, null);

    await drain(database, { tasks: [drained], logger });

    expect((await taskRows(database)).map((row) => row.id)).toEqual([left]);
  });

  test("leaves no timer behind, so the process can exit", () => {
    const directory = temporaryDirectory();
    const script = join(directory, "drain.ts");
    writeFileSync(
      script,
      `import { defineDatabaseTask, drain, openDatabase, perform } from ${
        JSON.stringify(new URL("../mod.ts", import.meta.url).href)
      };
const database = openDatabase(${JSON.stringify(`file:${join(directory, "tasks.db")}`)});
const task = defineDatabaseTask(database, { name: "mail", lease: "1h", timeout: "1h", process() {} });
await perform(task, null);
console.log(JSON.stringify(await drain(database, { tasks: [task] })));
database.close();
`,
    );

    const result = spawnSync(process.execPath, [script], { encoding: "utf8", timeout: 4_000 });

    expect(result.signal).toBeNull();
    expect(result.status).toBe(0);
    expect(JSON.parse(result.stdout)).toMatchObject({ succeeded: 1 });
  });

  test("rejects a task of another database", async () => {
    const database = open();
    const task = defineDatabaseTask(open(), { name: "elsewhere", process() {} });

    await expect(drain(database, { tasks: [task] })).rejects.toThrow(
      'Invalid task for drain(): task "elsewhere" belongs to another database',
    );
  });

  test("rejects two tasks with one name, and runs neither", async () => {
    const database = open();
    const runs: string[] = [];
    const first = defineDatabaseTask(database, {
      name: "same",
      process: () => void runs.push("a"),
    });
    const second = defineDatabaseTask(database, {
      name: "same",
      process: () => void runs.push("b"),
    });
    await perform(second, 1);

    await expect(drain(database, { tasks: [first, second] })).rejects.toThrow(
      'Two tasks are named "same" on one database',
    );
    expect(runs).toEqual([]);
    expect(await taskRows(database)).toHaveLength(1);
  });

  test("rejects missing tasks and an invalid now", async () => {
    const database = open();
    // deno-lint-ignore no-explicit-any
    await expect(drain(database, {} as any)).rejects.toThrow('Missing drain() option "tasks"');
    await expect(drain(database, { tasks: [], now: Number.NaN })).rejects.toThrow(
      'Invalid drain() option "now": expected a valid Date or milliseconds since the epoch',
    );
  });
});
