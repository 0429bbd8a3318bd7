import { describe, expect, test } from "bun:test";
import * as v from "valibot";
import { defineDatabaseTask, openDatabase } from "../mod.ts";
import namedByFile from "./fixtures/named-by-file.ts";

describe("defineDatabaseTask()", () => {
  const database = openDatabase(":memory:");

  test("takes the name from the option", () => {
    const task = defineDatabaseTask(database, { name: "send-email", process() {} });
    expect(task.name).toBe("send-email");
    expect(task.database).toBe(database);
  });

  test("derives the name from the defining module's file name", () => {
    expect(namedByFile.name).toBe("named-by-file");
  });

  test("derives the name from the calling test file", () => {
    const task = defineDatabaseTask(database, { process() {} });
    expect(task.name).toBe("define.test");
  });

  test("applies the defaults", () => {
    // Defaults are internal; a definition with none set is valid.
    expect(() => defineDatabaseTask(database, { name: "defaults", process() {} })).not.toThrow();
  });

  test("accepts every option", () => {
    const task = defineDatabaseTask(database, {
      name: "everything",
      schema: v.object({ email: v.string() }),
      batchSize: 100,
      pollInterval: "500ms",
      maxAttempts: 3,
      backoff: (attempt) => attempt * 1_000,
      timeout: "30s",
      lease: "1m",
      process() {},
      success() {},
      failed() {},
    });
    expect(task.name).toBe("everything");
  });

  const invalid: Array<
    [string, Record<string, unknown>, typeof TypeError | typeof RangeError, string]
  > = [
    [
      "negative batchSize",
      { batchSize: -1 },
      RangeError,
      'Invalid task option "batchSize": expected an integer from 1 to 10000, received -1',
    ],
    [
      "zero batchSize",
      { batchSize: 0 },
      RangeError,
      'option "batchSize": expected an integer from 1 to 10000, received 0',
    ],
    [
      "fractional batchSize",
      { batchSize: 1.5 },
      RangeError,
      'option "batchSize": expected an integer from 1 to 10000, received 1.5',
    ],
    [
      "string batchSize",
      { batchSize: "5" },
      TypeError,
      'option "batchSize": expected an integer from 1 to 10000, received "5"',
    ],
    [
      "non-numeric timeout",
      { timeout: "soon" },
      TypeError,
      'option "timeout": expected a duration (milliseconds or a string such as "500ms", "30s", "5m", "1h" or "2d"), received "soon"',
    ],
    [
      "zero timeout",
      { timeout: 0 },
      RangeError,
      'option "timeout": expected a duration from 1 ms to 100 years',
    ],
    ["NaN timeout", { timeout: Number.NaN }, TypeError, 'option "timeout": expected a duration'],
    [
      "maxAttempts of 0",
      { maxAttempts: 0 },
      RangeError,
      'option "maxAttempts": expected an integer from 1 to 1000, received 0',
    ],
    [
      "pollInterval below 10ms",
      { pollInterval: 1 },
      RangeError,
      'option "pollInterval": expected a duration from 10 ms to 24 h',
    ],
    [
      "lease below 100ms",
      { lease: "10ms" },
      RangeError,
      'option "lease": expected a duration from 100 ms to 24 h',
    ],
    [
      "backoff of the wrong type",
      { backoff: true },
      TypeError,
      'option "backoff": expected a duration (milliseconds or a string such as "500ms", "30s", "5m", "1h" or "2d") or a function, received true',
    ],
    [
      "empty name",
      { name: "" },
      TypeError,
      'option "name": expected a name of 1 to 200 characters',
    ],
    [
      "name with a newline",
      { name: "a\nb" },
      TypeError,
      'option "name": expected a name of 1 to 200 characters without control characters or outer spaces, received "a\\nb"',
    ],
    ["name with outer spaces", { name: " mail " }, TypeError, 'option "name"'],
    [
      "schema that is not valibot",
      { schema: { parse() {} } },
      TypeError,
      'option "schema": expected a valibot schema, received an object',
    ],
    [
      "success that is not a function",
      { success: "yes" },
      TypeError,
      'option "success": expected a function, received "yes"',
    ],
    [
      "misspelled option",
      { batchsize: 5 },
      TypeError,
      'Unknown task option "batchsize": check its spelling',
    ],
  ];

  test.each(invalid)("rejects %s", (_, options, errorClass, message) => {
    const define = () =>
      // deno-lint-ignore no-explicit-any
      defineDatabaseTask(database, { name: "bad", process() {}, ...options } as any);
    expect(define).toThrow(errorClass);
    expect(define).toThrow(message);
  });

  test("rejects a missing process function", () => {
    // deno-lint-ignore no-explicit-any
    expect(() => defineDatabaseTask(database, { name: "no-process" } as any)).toThrow(
      'Missing task option "process"',
    );
  });

  test("rejects a definition that is not an object", () => {
    // deno-lint-ignore no-explicit-any
    expect(() => defineDatabaseTask(database, null as any)).toThrow(
      "Invalid task options: expected an object, received null",
    );
  });

  test("rejects a database that openDatabase() did not return", () => {
    // deno-lint-ignore no-explicit-any
    expect(() => defineDatabaseTask({} as any, { name: "x", process() {} })).toThrow(
      "Invalid database for defineDatabaseTask(): expected the result of openDatabase(), received an object",
    );
  });

  test("throws when no name can be derived", () => {
    // Without stack frames there is no calling module to take a name from.
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    try {
      expect(() => defineDatabaseTask(database, { process() {} })).toThrow(
        'Cannot derive a task name from the calling module\'s file name (unknown): pass the "name" option to defineDatabaseTask()',
      );
    } finally {
      Error.stackTraceLimit = limit;
    }
  });
});

describe("two copies of tasklite", () => {
  test("a task from another copy gets an error that says so", async () => {
    // A query string makes the runtime load mod.ts a second time, as a second copy.
    const other = await import(`../mod.ts?copy=${Date.now()}`);
    const database = other.openDatabase(":memory:");
    const foreign = other.defineDatabaseTask(database, { name: "foreign", process() {} });
    const ours = await import("../mod.ts");
    expect(other.perform).not.toBe(ours.perform);

    await expect(ours.perform(foreign, 1)).rejects.toThrow(
      "Invalid task for perform(): it comes from another copy of tasklite",
    );
    expect(() => ours.defineDatabaseTask(database, { name: "x", process() {} })).toThrow(
      "Invalid database for defineDatabaseTask(): it comes from another copy of tasklite",
    );
    database.close();
  });
});
