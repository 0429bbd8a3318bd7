import { describe, expect, test } from "bun:test";
import { defineDatabaseTask, perform, runTasks, type TaskEvent } from "../mod.ts";
import { captureLogger, useResources, waitFor } from "./helpers.ts";

const { open, start } = useResources();

describe("runner events", () => {
  test("a success emits claimed and succeeded with name, id, attempt and duration", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "mail",
      async process() {
        await new Promise((resolve) => setTimeout(resolve, 20));
      },
    });
    const events: TaskEvent[] = [];
    await start([task], { onEvent: (event) => void events.push(event) });
    const id = await perform(task, null);

    await waitFor(() => events.length === 2);
    expect(events[0]).toEqual({ type: "claimed", task: "mail", id, attempt: 1 });
    expect(events[1]).toMatchObject({ type: "succeeded", task: "mail", id, attempt: 1 });
    const { duration } = events[1] as { duration: number };
    expect(duration).toBeGreaterThanOrEqual(15);
    expect(duration).toBeLessThan(5_000);
  });

  test("a failure emits retried with the error and due time, then failed", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "flaky",
      maxAttempts: 2,
      backoff: 10,
      process({ attempt }) {
        throw new Error(`attempt ${attempt} failed`);
      },
    });
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("retried", (event) => void events.push(event));
    runner.on("failed", (event) => void events.push(event));
    const before = Date.now();
    const id = await perform(task, null);

    await waitFor(() => events.length === 2);
    const [retried, failed] = events;
    expect(retried).toMatchObject({ type: "retried", task: "flaky", id, attempt: 1 });
    if (retried.type !== "retried") throw new Error("expected a retried event");
    expect(retried.error.message).toBe("attempt 1 failed");
    expect(retried.runAt).toBeGreaterThanOrEqual(before + 10);
    expect(retried.duration).toBeNumber();
    expect(failed).toMatchObject({ type: "failed", task: "flaky", id, attempt: 2 });
    if (failed.type !== "failed") throw new Error("expected a failed event");
    expect(failed.error.message).toBe("attempt 2 failed");
  });

  test("stored data that cannot be decoded emits failed", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "broken", process() {} });
    await database.ready();
    await database.client.execute(
      "INSERT INTO tasks (id, name, data, created) VALUES ('bad', 'broken', '{oops', 0)",
    );
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("failed", (event) => void events.push(event));

    await waitFor(() => events.length === 1);
    expect(events[0]).toMatchObject({ type: "failed", id: "bad", attempt: 1 });
    if (events[0].type !== "failed") throw new Error("expected a failed event");
    expect(events[0].error).toBeInstanceOf(SyntaxError);
  });

  test("a lost lease emits lease-lost", async () => {
    const database = open();
    const started: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "slow",
      lease: 150,
      process({ id, signal }) {
        started.push(id);
        return new Promise<void>((_resolve, reject) => {
          signal.addEventListener("abort", () => reject(signal.reason));
        });
      },
    });
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("lease-lost", (event) => void events.push(event));
    const id = await perform(task, null);
    await waitFor(() => started.length === 1);

    // Another runner took the task over: the next renewal finds the lease gone.
    await database.client.execute({
      sql: "UPDATE tasks SET locked_by = 'other-runner' WHERE id = ?",
      args: [id],
    });

    await waitFor(() => events.length === 1);
    expect(events[0]).toMatchObject({ type: "lease-lost", task: "slow", id, attempt: 1 });
  });

  test("an error thrown by a hook emits error", async () => {
    const database = open();
    const task = defineDatabaseTask(database, {
      name: "hooked",
      process() {},
      success() {
        throw new Error("hook failed");
      },
    });
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("error", (event) => void events.push(event));
    const id = await perform(task, null);

    await waitFor(() => events.length === 1);
    const [event] = events;
    expect(event).toMatchObject({ type: "error", task: "hooked", id, attempt: 1 });
    if (event.type !== "error") throw new Error("expected an error event");
    expect(event.error.message).toBe("hook failed");
  });

  test("a database error emits error", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "mail", pollInterval: 20, process() {} });
    const events: TaskEvent[] = [];
    const runner = await start([task]);
    runner.on("error", (event) => void events.push(event));

    await database.client.execute("ALTER TABLE tasks RENAME TO tasks_moved");
    try {
      await waitFor(() => events.length > 0);
    } finally {
      await database.client.execute("ALTER TABLE tasks_moved RENAME TO tasks");
    }
    const [event] = events;
    expect(event).toMatchObject({ type: "error", task: "mail", id: undefined });
    if (event.type !== "error") throw new Error("expected an error event");
    expect(event.error.message).toContain("no such table");
  });

  test("a listener that throws is logged and the runner goes on", async () => {
    const database = open();
    const runs: number[] = [];
    const task = defineDatabaseTask<number>(database, {
      name: "mail",
      process({ data }) {
        runs.push(data);
      },
    });
    const logger = captureLogger();
    const delivered: string[] = [];
    const runner = await start([task], { logger });
    runner.on("claimed", () => {
      throw new Error("listener broke");
    });
    runner.on("succeeded", () => Promise.reject(new Error("async listener broke")));
    runner.on("succeeded", (event) => void delivered.push(event.id));

    await perform(task, 1);
    await perform(task, 2);

    await waitFor(() => delivered.length === 2);
    expect(runs.sort()).toEqual([1, 2]);
    await waitFor(() => logger.messages("error").length === 4);
    const errors = logger.messages("error");
    expect(errors.filter((line) => line.includes('listener of the "claimed" event threw')))
      .toHaveLength(2);
    expect(errors.filter((line) => line.endsWith("async listener broke"))).toHaveLength(2);
  });

  test("the function that on() returns removes the listener", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    const runner = await start([task]);
    const seen: string[] = [];
    const off = runner.on("succeeded", (event) => void seen.push(event.id));
    const kept: string[] = [];
    runner.on("succeeded", (event) => void kept.push(event.id));

    await perform(task, 1);
    await waitFor(() => kept.length === 1);
    off();
    await perform(task, 2);
    await waitFor(() => kept.length === 2);

    expect(seen).toEqual([kept[0]]);
  });

  test("on() rejects an unknown type and a listener that is not a function", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    const runner = await start([task]);

    // deno-lint-ignore no-explicit-any
    expect(() => runner.on("done" as any, () => {})).toThrow(
      'Invalid event type "done": expected one of "claimed", "succeeded", "failed", "retried", "cancelled", "lease-lost", "error"',
    );
    // deno-lint-ignore no-explicit-any
    expect(() => runner.on("failed", "log" as any)).toThrow(
      'Invalid listener for the "failed" event: expected a function, received "log"',
    );
  });

  test("runTasks() rejects an onEvent that is not a function", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    // deno-lint-ignore no-explicit-any
    await expect(runTasks([task], { onEvent: {} as any })).rejects.toThrow(
      'Invalid runTasks() option "onEvent": expected a function, received an object',
    );
  });
});
