import { describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import * as v from "valibot";
import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  performMany,
  runTasks,
  type TaskContext,
} from "../mod.ts";
import {
  captureLogger,
  countByState,
  taskRows,
  temporaryDatabaseUrl,
  useResources,
  waitFor,
} from "./helpers.ts";

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

const { open, start, keep } = useResources();

describe("runTasks()", () => {
  test("runs a performed task, calls success, and deletes the row", async () => {
    const database = open();
    const seen: Array<TaskContext<{ to: string }>> = [];
    const succeeded: string[] = [];
    const task = defineDatabaseTask<{ to: string }>(database, {
      name: "mail",
      process(context) {
        seen.push(context);
      },
      success({ id }) {
        succeeded.push(id);
      },
    });
    const id = await perform(task, { to: "ada@example.com" });
    await start([task]);

    await waitFor(() => succeeded.length === 1);
    expect(seen).toHaveLength(1);
    expect(seen[0]).toMatchObject({
      name: "mail",
      id,
      data: { to: "ada@example.com" },
      attempt: 1,
      maxAttempts: 5,
    });
    expect(seen[0].signal).toBeInstanceOf(AbortSignal);
    expect(succeeded).toEqual([id]);
    await waitFor(async () => (await taskRows(database)).length === 0);
  });

  test("runs tasks on an in-memory database", async () => {
    const database = open(":memory:");
    const seen: number[] = [];
    const task = defineDatabaseTask<number>(database, {
      name: "memory",
      backoff: 10,
      process({ data, attempt }) {
        if (data === 2 && attempt === 1) throw new Error("retry me");
        seen.push(data);
      },
    });
    await performMany(task, [1, 2, 3]);
    await start([task]);

    await waitFor(() => seen.length === 3);
    expect(seen.sort()).toEqual([1, 2, 3]);
    await waitFor(async () => (await taskRows(database)).length === 0);
  });

  test("runs at most batchSize attempts at a time", async () => {
    const database = open();
    let running = 0;
    let maximum = 0;
    let done = 0;
    const task = defineDatabaseTask(database, {
      name: "slow",
      batchSize: 3,
      async process() {
        running++;
        maximum = Math.max(maximum, running);
        await sleep(20);
        running--;
        done++;
      },
    });
    await performMany(task, Array.from({ length: 12 }, (_, index) => index));
    await start([task]);

    await waitFor(() => done === 12);
    expect(maximum).toBe(3);
  });

  test("batchSize 1 runs one attempt at a time, in claim order", async () => {
    const database = open();
    const order: number[] = [];
    let running = 0;
    let maximum = 0;
    const task = defineDatabaseTask<number>(database, {
      name: "serial",
      batchSize: 1,
      async process({ data }) {
        running++;
        maximum = Math.max(maximum, running);
        await sleep(1);
        order.push(data);
        running--;
      },
    });
    await performMany(task, [1, 2, 3, 4, 5]);
    await start([task]);

    await waitFor(() => order.length === 5);
    expect(maximum).toBe(1);
    expect(order).toEqual([1, 2, 3, 4, 5]);
  });

  test("claims higher priority first, then earlier run_at, then creation order", async () => {
    const database = open();
    const order: string[] = [];
    const task = defineDatabaseTask<string>(database, {
      name: "ordered",
      batchSize: 1,
      process({ data }) {
        order.push(data);
      },
    });
    const now = Date.now();
    await perform(task, "low-first", { priority: -1 });
    await perform(task, "normal-late", { runAt: now - 1_000 });
    await perform(task, "normal-early", { runAt: now - 5_000 });
    await perform(task, "high", { priority: 10 });
    await perform(task, "normal-early-second", { runAt: now - 5_000 });
    await perform(task, "medium", { priority: 5 });
    await start([task]);

    await waitFor(() => order.length === 6);
    expect(order).toEqual([
      "high",
      "medium",
      "normal-early",
      "normal-early-second",
      "normal-late",
      "low-first",
    ]);
  });

  test("a delayed task waits as scheduled, then runs before lower-priority due tasks", async () => {
    const database = open();
    const order: string[] = [];
    const task = defineDatabaseTask<string>(database, {
      name: "waits",
      batchSize: 1,
      async process({ data }) {
        order.push(data);
        await sleep(30);
      },
    });
    // A backlog of higher-priority rows that are not due does not hold up the due ones.
    await performMany(task, Array.from({ length: 50 }, (_, index) => `later-${index}`), {
      priority: 10,
      delay: "1h",
    });
    await perform(task, "soon", { priority: 5, delay: 100 });
    await performMany(task, ["due-1", "due-2", "due-3", "due-4", "due-5"]);
    expect(await countByState(database)).toEqual({ scheduled: 51, pending: 5 });
    await start([task]);

    await waitFor(() => order.length === 6, { timeout: 3_000 });
    expect(order[0]).toBe("due-1");
    // Once due, "soon" becomes pending and its priority puts it ahead of the other due rows.
    expect(order.indexOf("soon")).toBeLessThan(5);
    expect(order.filter((data) => data.startsWith("due-"))).toEqual([
      "due-1",
      "due-2",
      "due-3",
      "due-4",
      "due-5",
    ]);
    await waitFor(async () => (await countByState(database)).running === undefined);
    expect(await countByState(database)).toEqual({ scheduled: 50 });
  });

  test("a delayed task runs at its due time, not at the poll interval", async () => {
    const database = open();
    const started: number[] = [];
    const task = defineDatabaseTask(database, {
      name: "later",
      pollInterval: "1h",
      process() {
        started.push(Date.now());
      },
    });
    await start([task]);
    const performedAt = Date.now();
    await perform(task, null, { delay: 300 });

    await waitFor(() => started.length === 1, { timeout: 3_000 });
    expect(started[0] - performedAt).toBeGreaterThanOrEqual(300);
    // Far below the one-hour poll interval: a timer to run_at woke the runner.
    expect(started[0] - performedAt).toBeLessThan(2_000);
  });

  test("a task with runAt in the past runs at once", async () => {
    const database = open();
    let ran = false;
    const task = defineDatabaseTask(database, {
      name: "overdue",
      pollInterval: "1h",
      process() {
        ran = true;
      },
    });
    await start([task]);
    await perform(task, null, { runAt: new Date(Date.now() - 60_000) });
    await waitFor(() => ran, { timeout: 2_000 });
  });

  test("a perform in the same process wakes an idle runner at once", async () => {
    const database = open();
    let ranAt = 0;
    const task = defineDatabaseTask(database, {
      name: "wake",
      pollInterval: "1h",
      process() {
        ranAt = Date.now();
      },
    });
    await start([task]);
    await sleep(50);
    const performedAt = Date.now();
    await perform(task, null);
    await waitFor(() => ranAt > 0, { timeout: 2_000 });
    expect(ranAt - performedAt).toBeLessThan(1_000);
  });

  test("a perform hands its task to an idle runner of this process, already claimed", async () => {
    const database = open();
    let release!: () => void;
    const started: string[] = [];
    const task = defineDatabaseTask<string>(database, {
      name: "handed",
      batchSize: 1,
      process({ data }) {
        started.push(data);
        return new Promise<void>((resolve) => (release = resolve));
      },
    });
    await start([task]);
    await sleep(50);

    // The runner is idle: the row is inserted running under its lease, and its attempt starts.
    const first = await perform(task, "first");
    expect(started).toEqual(["first"]);
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ id: first, state: "running", attempts: 1 });
    expect(row.locked_by).toBeString();
    expect(row.locked_until as number).toBeGreaterThan(Date.now());

    // Its only slot is taken, so the next row waits as pending for a claim.
    const second = await perform(task, "second");
    expect((await taskRows(database)).find((each) => each.id === second)?.state).toBe("pending");
    release();
    await waitFor(() => started.length === 2);
    release();
    await waitFor(async () => (await taskRows(database)).length === 0);
  });

  test("rows written through another connection are picked up without waiting for the poll", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    let ran = false;
    const task = defineDatabaseTask(database, {
      name: "elsewhere",
      pollInterval: "1h",
      process() {
        ran = true;
      },
    });
    await start([task]);

    // A second client on the same file, as another process would have: only data_version tells.
    const other = openDatabase(createClient({ url, timeout: 5_000 }));
    keep(other);
    const otherTask = defineDatabaseTask(other, { name: "elsewhere", process() {} });
    await perform(otherTask, null);

    await waitFor(() => ran, { timeout: 2_000 });
  });

  test("a failed attempt is retried after the backoff and then succeeds", async () => {
    const database = open();
    const attempts: Array<{ attempt: number; at: number }> = [];
    const backoffCalls: Array<[number, string]> = [];
    const task = defineDatabaseTask(database, {
      name: "flaky",
      backoff(attempt, error) {
        backoffCalls.push([attempt, error.message]);
        return 100;
      },
      process({ attempt }) {
        attempts.push({ attempt, at: Date.now() });
        if (attempt < 3) throw new Error(`failure ${attempt}`);
      },
    });
    await perform(task, null);
    await start([task]);

    await waitFor(() => attempts.length === 3);
    expect(attempts.map((entry) => entry.attempt)).toEqual([1, 2, 3]);
    expect(attempts[1].at - attempts[0].at).toBeGreaterThanOrEqual(95);
    expect(attempts[2].at - attempts[1].at).toBeGreaterThanOrEqual(95);
    expect(backoffCalls).toEqual([[1, "failure 1"], [2, "failure 2"]]);
    await waitFor(async () => (await taskRows(database)).length === 0);
  });

  test("a failed attempt records its error and the default backoff of about one second", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "broken",
      process() {
        throw new Error("smtp unavailable");
      },
    });
    await perform(task, null);
    await start([task]);

    const [row] = await waitFor(async () => {
      const rows = await taskRows(database);
      return rows[0]?.failed_nr === 1 ? rows : undefined;
    });
    expect(row.state).toBe("scheduled");
    expect(row.attempts).toBe(1);
    expect(row.failed_error).toStartWith("Error: smtp unavailable\n");
    expect(row.failed_error).toContain("runner.test.ts");
    expect(row.locked_by).toBeNull();
    const wait = (row.run_at as number) - (row.failed_last as number);
    expect(wait).toBeGreaterThanOrEqual(750);
    expect(wait).toBeLessThanOrEqual(1_250);
  });

  test("after maxAttempts the row becomes failed and failed() runs once", async () => {
    const database = open();
    const failedCalls: Array<{ id: string; attempts: number; message: string; data: unknown }> = [];
    const task = defineDatabaseTask(database, {
      name: "doomed",
      maxAttempts: 3,
      backoff: 10,
      process() {
        throw new TypeError("bad recipient");
      },
      failed({ id, attempts, error, data }) {
        failedCalls.push({ id, attempts, message: error.message, data });
      },
    });
    const id = await perform(task, { to: "nobody" });
    await start([task]);

    await waitFor(() => failedCalls.length === 1);
    await sleep(100);
    expect(failedCalls).toEqual([{
      id,
      attempts: 3,
      message: "bad recipient",
      data: { to: "nobody" },
    }]);
    const rows = await taskRows(database);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      id,
      state: "failed",
      attempts: 3,
      failed_nr: 3,
      locked_by: null,
    });
    expect(rows[0].failed_error).toStartWith("TypeError: bad recipient");
  });

  test("a non-Error throw is recorded as an Error with the value", async () => {
    const database = open();
    const errors: Error[] = [];
    const task = defineDatabaseTask(database, {
      name: "string-throw",
      maxAttempts: 1,
      process() {
        throw "plain string";
      },
      failed({ error }) {
        errors.push(error);
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(() => errors.length === 1);
    expect(errors[0]).toBeInstanceOf(Error);
    expect(errors[0].message).toBe("Non-error value thrown: plain string");
    expect(errors[0].cause).toBe("plain string");
  });

  test("the attempt's signal fires at the timeout and the attempt fails", async () => {
    const database = open();
    const reasons: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "hangs",
      timeout: 100,
      maxAttempts: 1,
      process({ signal }) {
        return new Promise<void>((_, reject) => {
          signal.addEventListener("abort", () => {
            reasons.push(signal.reason);
            reject(signal.reason);
          });
        });
      },
    });
    const startedAt = Date.now();
    await perform(task, null);
    await start([task]);

    const [row] = await waitFor(async () => {
      const rows = await taskRows(database);
      return rows[0]?.state === "failed" ? rows : undefined;
    });
    expect(Date.now() - startedAt).toBeGreaterThanOrEqual(100);
    expect(reasons).toHaveLength(1);
    expect((reasons[0] as DOMException).name).toBe("TimeoutError");
    expect(row.failed_error).toContain("timed out after 100 ms");
  });

  test("a task that ignores its signal still fails at the timeout and frees its slot", async () => {
    const database = open();
    let secondRan = false;
    const task = defineDatabaseTask<string>(database, {
      name: "ignores-signal",
      batchSize: 1,
      timeout: 100,
      maxAttempts: 1,
      process({ data }) {
        if (data === "second") secondRan = true;
        else return new Promise(() => {});
      },
    });
    await perform(task, "first");
    await perform(task, "second");
    await start([task]);

    await waitFor(() => secondRan, { timeout: 2_000 });
    const rows = await waitFor(async () => {
      const rows = await taskRows(database);
      return rows.length === 1 ? rows : undefined;
    });
    expect(rows.map((row) => [row.data, row.state])).toEqual([['"first"', "failed"]]);
  });

  test("a thenable whose then() throws fails the attempt", async () => {
    const database = open();
    const errors: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "bad-thenable",
      maxAttempts: 1,
      // deno-lint-ignore no-explicit-any
      process(): any {
        return {
          then() {
            throw new Error("then exploded");
          },
        };
      },
      failed({ error }) {
        errors.push(error.message);
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(() => errors.length === 1);
    expect(errors).toEqual(["then exploded"]);
  });

  test("an error thrown by success() is logged and the task is not run again", async () => {
    const database = open();
    const logger = captureLogger();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "success-throws",
      process() {
        runs++;
      },
      success() {
        throw new Error("hook exploded");
      },
    });
    const id = await perform(task, null);
    await start([task], { logger });

    await waitFor(() => logger.messages("error").length === 1);
    expect(logger.messages("error")[0]).toBe(
      `Task "success-throws" ${id}: the success hook threw: hook exploded`,
    );
    await sleep(100);
    expect(runs).toBe(1);
    expect(await taskRows(database)).toEqual([]);
  });

  test("an error thrown by failed() is logged and the row stays failed", async () => {
    const database = open();
    const logger = captureLogger();
    const task = defineDatabaseTask(database, {
      name: "failed-throws",
      maxAttempts: 1,
      process() {
        throw new Error("first");
      },
      failed() {
        return Promise.reject(new Error("second"));
      },
    });
    const id = await perform(task, null);
    await start([task], { logger });

    await waitFor(() =>
      logger.messages("error").some((message) => message.includes("failed hook threw"))
    );
    expect(logger.messages("error")).toContain(
      `Task "failed-throws" ${id}: the failed hook threw: second`,
    );
    expect(await countByState(database)).toEqual({ failed: 1 });
  });

  test("stored data that is not JSON fails at once without retries", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "corrupt",
      process() {
        runs++;
      },
    });
    await database.ready();
    await database.client.execute({
      sql:
        "INSERT INTO tasks (id, name, data, created, run_at) VALUES ('x', 'corrupt', '{not json', 0, 0)",
      args: [],
    });
    await start([task]);

    const [row] = await waitFor(async () => {
      const rows = await taskRows(database);
      return rows[0]?.state === "failed" ? rows : undefined;
    });
    expect(runs).toBe(0);
    expect(row.attempts).toBe(1);
    expect(row.failed_error).toContain('Stored data of task "corrupt" x is not valid JSON');
  });

  test("stored data that fails the schema fails at once without retries", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "schema-drift",
      schema: v.object({ email: v.string() }),
      process() {
        runs++;
      },
    });
    await database.ready();
    await database.client.execute(
      `INSERT INTO tasks (id, name, data, created, run_at) VALUES ('y', 'schema-drift', '{"mail":"x"}', 0, 0)`,
    );
    await start([task]);

    const [row] = await waitFor(async () => {
      const rows = await taskRows(database);
      return rows[0]?.state === "failed" ? rows : undefined;
    });
    expect(runs).toBe(0);
    expect(row.failed_error).toContain(
      'Invalid data for task "schema-drift": stored data.email: Invalid key',
    );
  });

  test("process receives the schema's output", async () => {
    const database = open();
    const seen: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "trimmed",
      schema: v.object({ email: v.pipe(v.string(), v.trim(), v.toLowerCase()) }),
      process({ data }) {
        seen.push(data);
      },
    });
    await perform(task, { email: "  Ada@Example.com " });
    expect((await taskRows(database))[0].data).toBe('{"email":"  Ada@Example.com "}');
    await start([task]);
    await waitFor(() => seen.length === 1);
    expect(seen).toEqual([{ email: "ada@example.com" }]);
  });

  test("two runners in one process never run the same task twice", async () => {
    const url = temporaryDatabaseUrl();
    const runs = new Map<number, number>();
    const makeTask = (database: Database) =>
      defineDatabaseTask<number>(database, {
        name: "shared",
        batchSize: 7,
        async process({ data }) {
          runs.set(data, (runs.get(data) ?? 0) + 1);
          await sleep(Math.random() * 3);
        },
      });
    // Two databases on one file share one connection; the multi-process tests cover separate ones.
    const first = makeTask(open(url));
    const second = makeTask(open(url));
    await performMany(first, Array.from({ length: 600 }, (_, index) => index));
    await start([first]);
    await start([second]);

    await waitFor(() => runs.size === 600, { timeout: 10_000 });
    await sleep(50);
    expect([...runs.values()].every((count) => count === 1)).toBe(true);
    expect(runs.size).toBe(600);
  });

  test("stop() waits for running attempts and records them", async () => {
    const database = open();
    let finished = 0;
    const task = defineDatabaseTask(database, {
      name: "graceful",
      batchSize: 4,
      async process() {
        await sleep(200);
        finished++;
      },
    });
    await performMany(task, [1, 2, 3, 4]);
    const runner = await start([task]);
    await waitFor(async () => (await countByState(database)).running === 4);

    await runner.stop({ timeout: "5s" });
    expect(finished).toBe(4);
    expect(await taskRows(database)).toEqual([]);
  });

  test("stop() releases attempts that outlive its timeout, without counting them", async () => {
    const database = open();
    const reasons: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "outlives",
      batchSize: 2,
      process({ signal }) {
        return new Promise<void>((resolve) => {
          signal.addEventListener("abort", () => {
            reasons.push((signal.reason as DOMException).name);
            resolve();
          });
        });
      },
    });
    await performMany(task, [1, 2]);
    const runner = await start([task]);
    await waitFor(async () => (await countByState(database)).running === 2);

    const stoppedAt = Date.now();
    await runner.stop({ timeout: 100 });
    expect(Date.now() - stoppedAt).toBeLessThan(1_000);
    expect(reasons).toEqual(["AbortError", "AbortError"]);
    const rows = await taskRows(database);
    expect(rows.map((row) => [row.state, row.attempts, row.locked_by, row.failed_nr])).toEqual([
      ["pending", 0, null, 0],
      ["pending", 0, null, 0],
    ]);
  });

  test("stop() twice returns the same promise and stopped resolves", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "twice", process() {} });
    const runner = await start([task]);
    const first = runner.stop();
    expect(runner.stop()).toBe(first);
    await first;
    await runner.stopped;
  });

  test("an aborted signal stops the runner", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "signalled", process() {} });
    const controller = new AbortController();
    const runner = await start([task], { signal: controller.signal });
    controller.abort();
    await runner.stopped;
  });

  test("a stopped runner claims nothing", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "after-stop",
      process() {
        runs++;
      },
    });
    const runner = await start([task]);
    await runner.stop();
    await perform(task, null);
    await sleep(100);
    expect(runs).toBe(0);
    expect(await countByState(database)).toEqual({ pending: 1 });
  });

  test("debug logs each claim and success with the task name and id", async () => {
    const database = open();
    const logger = captureLogger();
    const task = defineDatabaseTask(database, { name: "chatty", process() {} });
    const id = await perform(task, null);
    await start([task], { logger, debug: true });

    await waitFor(() => logger.messages("debug").length === 2);
    const [claimed, succeeded] = logger.lines.filter((line) => line.level === "debug");
    expect(claimed.message).toBe(`Task "chatty" ${id}: attempt 1 of 5 started`);
    expect(claimed.fields).toEqual({ task: "chatty", id, attempt: 1 });
    expect(succeeded.message).toStartWith(`Task "chatty" ${id}: attempt 1 succeeded in`);
  });

  test("without debug, claims and successes are not logged", async () => {
    const database = open();
    const logger = captureLogger();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "quiet",
      process() {
        runs++;
      },
    });
    await perform(task, null);
    await start([task], { logger });
    await waitFor(() => runs === 1);
    await sleep(20);
    expect(logger.messages("debug")).toEqual([]);
    expect(logger.messages("info")).toEqual(["tasklite: running 1 task: quiet"]);
  });

  test("a failure is logged as a warning with attempt numbers", async () => {
    const database = open();
    const logger = captureLogger();
    const task = defineDatabaseTask(database, {
      name: "warns",
      backoff: "1h",
      process() {
        throw new Error("nope");
      },
    });
    const id = await perform(task, null);
    await start([task], { logger });
    await waitFor(() => logger.messages("warn").length === 1);
    expect(logger.messages("warn")[0]).toBe(
      `Task "warns" ${id}: attempt 1 of 5 failed, retrying in 1 h: nope`,
    );
  });

  test("rows of a task this runner does not know are left alone and logged once", async () => {
    const database = open();
    const logger = captureLogger();
    const known = defineDatabaseTask(database, { name: "known", process() {} });
    const unknown = defineDatabaseTask(database, { name: "unknown", process() {} });
    await perform(unknown, 1);
    await perform(unknown, 2);
    await start([known], { logger });

    await waitFor(() => logger.messages("warn").length === 1);
    expect(logger.messages("warn")[0]).toStartWith(
      'Pending tasks named "unknown" have no task in this runner',
    );
    expect(await countByState(database)).toEqual({ pending: 2 });
  });

  test("tasks on two Database objects of one file are both known", async () => {
    const url = temporaryDatabaseUrl();
    const first = open(url);
    const second = open(url);
    const logger = captureLogger();
    const runs: string[] = [];
    const a = defineDatabaseTask(first, { name: "a", process: () => void runs.push("a") });
    const b = defineDatabaseTask(second, { name: "b", process: () => void runs.push("b") });
    // Delayed, so both rows are still waiting when the runner checks the names at its start.
    await perform(a, 1, { delay: 300 });
    await perform(b, 1, { delay: 300 });
    await start([a, b], { logger });

    await waitFor(() => runs.length === 2);
    expect(runs.sort()).toEqual(["a", "b"]);
    expect(logger.messages("warn")).toEqual([]);
  });

  test("an expired lease of a dead runner is rescued and the lost attempt counts", async () => {
    const database = open();
    const attempts: number[] = [];
    const task = defineDatabaseTask(database, {
      name: "orphan",
      pollInterval: 50,
      process({ attempt }) {
        attempts.push(attempt);
      },
    });
    await database.ready();
    await database.client.execute(
      "INSERT INTO tasks (id, name, data, created, run_at, state, attempts, locked_until, locked_by) VALUES ('o', 'orphan', 'null', 0, 0, 'running', 1, 1, 'dead-runner')",
    );
    await start([task]);

    await waitFor(() => attempts.length === 1);
    expect(attempts).toEqual([2]);
  });

  test("an expired lease with no attempts left fails the task and says why", async () => {
    const database = open();
    const failed: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "orphan-exhausted",
      pollInterval: 50,
      maxAttempts: 2,
      process() {},
      failed({ error }) {
        failed.push(error.message);
      },
    });
    await database.ready();
    await database.client.execute(
      "INSERT INTO tasks (id, name, data, created, run_at, state, attempts, locked_until, locked_by) VALUES ('e', 'orphan-exhausted', '{}', 0, 0, 'running', 2, 1, 'dead-runner')",
    );
    await start([task]);

    await waitFor(() => failed.length === 1);
    expect(failed[0]).toContain("worker stopped responding");
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ state: "failed", attempts: 2, failed_nr: 1, locked_by: null });
    expect(row.failed_error).toContain("worker stopped responding");
  });

  for (const [count, label] of [[1, "one task"], [3, "a batch of three"]] as const) {
    test(`a lost lease records no success (${label})`, async () => {
      const database = open();
      const logger = captureLogger();
      const releases: Array<() => void> = [];
      const task = defineDatabaseTask(database, {
        name: "taken-over",
        batchSize: count,
        process: () => new Promise<void>((resolve) => void releases.push(resolve)),
      });
      const ids = await performMany(task, Array.from({ length: count }, (_, index) => index));
      await start([task], { logger });
      await waitFor(() => releases.length === count);

      // Another runner rescued the rows, so their leases are its own now.
      await database.client.execute(
        "UPDATE tasks SET locked_by = 'other-runner', attempts = attempts + 1",
      );
      for (const release of releases) release();

      await waitFor(() => logger.messages("warn").length === count);
      for (const id of ids) {
        expect(logger.messages("warn")).toContain(
          `Task "taken-over" ${id}: lease lost before the result was recorded; the runner ` +
            `that holds it now decides the outcome`,
        );
      }
      const rows = await taskRows(database);
      expect(rows.map((row) => [row.id, row.state, row.locked_by])).toEqual(
        ids.map((id) => [id, "running", "other-runner"]),
      );
    });
  }

  test("a live lease is renewed, so a long attempt is not rescued", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "long",
      lease: 400,
      pollInterval: 20,
      async process() {
        runs++;
        await sleep(1_300);
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(async () => (await taskRows(database)).length === 0, { timeout: 4_000 });
    expect(runs).toBe(1);
  });
});

describe("runTasks() edge cases", () => {
  test("odd thrown values fail the attempt with a stored error", async () => {
    const database = open();
    const circular = Object.create(null);
    circular.self = circular;
    const numericStack = new Error("stack is a number");
    // deno-lint-ignore no-explicit-any
    (numericStack as any).stack = 42;
    const errors: string[] = [];
    const task = defineDatabaseTask<number>(database, {
      name: "odd-throws",
      maxAttempts: 1,
      async process({ data }) {
        await sleep(1);
        throw data === 1 ? circular : numericStack;
      },
      failed({ error }) {
        errors.push(error.message);
      },
    });
    await performMany(task, [1, 2]);
    await start([task]);

    await waitFor(() => errors.length === 2);
    expect(errors.sort()).toEqual(["Non-error value thrown: [object Object]", "stack is a number"]);
    const rows = await taskRows(database);
    expect(rows.map((row) => row.state)).toEqual(["failed", "failed"]);
    expect(rows.map((row) => row.failed_error).sort()).toEqual([
      "Error: stack is a number",
      "Error: Non-error value thrown: [object Object]",
    ].sort());
  });

  test("a retry after an asynchronous failure waits for the backoff, not the poll", async () => {
    const database = open();
    const attempts: number[] = [];
    const task = defineDatabaseTask(database, {
      name: "async-retry",
      pollInterval: "1h",
      backoff: 50,
      async process({ attempt }) {
        attempts.push(attempt);
        await sleep(1);
        if (attempt === 1) throw new Error("first attempt fails");
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(() => attempts.length === 2, { timeout: 3_000 });
    expect(attempts).toEqual([1, 2]);
  });

  test("a hook that never settles does not hold stop() beyond its timeout", async () => {
    const database = open();
    const logger = captureLogger();
    let ran = false;
    const task = defineDatabaseTask(database, {
      name: "endless-hook",
      process() {
        ran = true;
      },
      success() {
        return new Promise(() => {});
      },
    });
    await perform(task, null);
    const runner = await start([task], { logger });
    await waitFor(() => ran);
    await waitFor(async () => (await taskRows(database)).length === 0);

    await runner.stop({ timeout: 100 });
    expect(logger.messages("warn")).toContain(
      'Task "endless-hook": stopped with 1 success or failed hook still running after the stop timeout of 100 ms',
    );
  });

  test("closing the database stops its runners and says what was not recorded", async () => {
    const database = open();
    const logger = captureLogger();
    let started = false;
    const task = defineDatabaseTask(database, {
      name: "closed-under",
      process({ signal }) {
        started = true;
        return new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve()));
      },
    });
    await perform(task, null);
    const runner = await start([task], { logger });
    await waitFor(() => started);

    database.close();
    await runner.stopped;
    expect(logger.messages("warn")).toContain(
      'Task "closed-under": the database was closed while its runner was running; 1 running attempt and 0 finished results were not recorded, so those tasks run again after their lease expires. Call runner.stop() before database.close().',
    );
  });

  test("a runner whose event loop was blocked past the lease does not run its task twice", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "blocks-loop",
      lease: 300,
      pollInterval: 50,
      async process() {
        runs++;
        await sleep(5);
        const until = Date.now() + 700;
        while (Date.now() < until) {
          // Blocks the event loop, as CPU-bound work would.
        }
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(async () => (await taskRows(database)).length === 0, { timeout: 3_000 });
    await sleep(100);
    expect(runs).toBe(1);
  });

  test("a timeout fires on time when the injected clock steps back", async () => {
    let offset = 0;
    const database = openDatabase(temporaryDatabaseUrl(), { now: () => Date.now() + offset });
    keep(database);
    const reasons: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "clock-step",
      timeout: 100,
      maxAttempts: 1,
      process({ signal }) {
        offset = -3_600_000;
        return new Promise<void>((_, reject) =>
          signal.addEventListener("abort", () => {
            reasons.push((signal.reason as DOMException).name);
            reject(signal.reason);
          })
        );
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(() => reasons.length === 1, { timeout: 2_000 });
    expect(reasons).toEqual(["TimeoutError"]);
  });

  test("tasks with one name on two databases each get a runner", async () => {
    const first = open();
    const second = open();
    const seen: string[] = [];
    const firstTask = defineDatabaseTask<string>(first, {
      name: "same",
      process: ({ data }) => void seen.push(data),
    });
    const secondTask = defineDatabaseTask<string>(second, {
      name: "same",
      process: ({ data }) => void seen.push(data),
    });
    await perform(firstTask, "first");
    await perform(secondTask, "second");
    const runner = await start([firstTask, secondTask]);
    expect(runner.tasks).toEqual(["same"]);
    await waitFor(() => seen.length === 2);
    expect(seen.sort()).toEqual(["first", "second"]);
  });
});

describe("runTasks() input", () => {
  test("rejects an empty array", async () => {
    await expect(runTasks([])).rejects.toThrow(
      "Invalid tasks for runTasks(): the array is empty, pass at least one task",
    );
  });

  test("rejects an item that is not a task", async () => {
    // deno-lint-ignore no-explicit-any
    await expect(runTasks([{ name: "x" } as any])).rejects.toThrow(
      "Invalid task for runTasks() (item 0): expected the result of defineDatabaseTask(), received an object",
    );
  });

  test("rejects two tasks with one name", async () => {
    const database = open();
    const first = defineDatabaseTask(database, { name: "same", process() {} });
    const second = defineDatabaseTask(database, { name: "same", process() {} });
    await expect(runTasks([first, second])).rejects.toThrow('Two tasks are named "same"');
  });

  test("rejects an empty directory path", async () => {
    await expect(runTasks("")).rejects.toThrow(
      'Invalid tasks for runTasks(): the directory path "" is empty; pass the directory of the task modules',
    );
  });

  test("rejects a value that is neither a directory nor an array", async () => {
    // deno-lint-ignore no-explicit-any
    await expect(runTasks(42 as any)).rejects.toThrow(
      "Invalid tasks for runTasks(): expected a directory path or an array of tasks, received 42",
    );
  });

  test.each([
    [{ debug: "yes" }, 'Invalid runTasks() option "debug": expected true or false, received "yes"'],
    [
      { logger: console.log },
      'Invalid runTasks() option "logger": expected an object with debug, info, warn and error methods, received a function',
    ],
    [
      { signal: {} },
      'Invalid runTasks() option "signal": expected an AbortSignal, received an object',
    ],
    [{ stopTimeout: "forever" }, 'Invalid runTasks() option "stopTimeout": expected a duration'],
    [{ debg: true }, 'Unknown runTasks() option "debg"'],
  ])("rejects the option %p", async (options, message) => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "options", process() {} });
    // deno-lint-ignore no-explicit-any
    await expect(runTasks([task], options as any)).rejects.toThrow(message);
  });

  test("stop() rejects an invalid timeout", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "stop-options", process() {} });
    const runner = await start([task]);
    // deno-lint-ignore no-explicit-any
    expect(() => runner.stop({ timeout: -1 } as any)).toThrow('Invalid stop() option "timeout"');
  });
});
