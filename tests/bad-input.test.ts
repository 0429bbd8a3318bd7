import { describe, expect, test } from "bun:test";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as v from "valibot";
import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  performMany,
  runTasks,
  type Task,
  TaskDataError,
} from "../mod.ts";
import { captureLogger, taskRows, temporaryDirectory, useResources, waitFor } from "./helpers.ts";

const { keep } = useResources();

interface Context {
  database: Database;
  /** A task whose data must be `{ email }` with a valid address. */
  mail: Task<{ email: string }>;
  /** A task without a schema. */
  plain: Task<unknown>;
  directory: string;
}

/** Opens a database with one pending row, so that a call that loses rows shows up too. */
async function setup(): Promise<Context> {
  const directory = temporaryDirectory();
  const database = openDatabase(`file:${join(directory, "tasks.db")}`);
  keep(database);
  const mail = defineDatabaseTask(database, {
    name: "mail",
    schema: v.object({ email: v.pipe(v.string(), v.email()) }),
    process() {},
  });
  const plain = defineDatabaseTask<unknown>(database, { name: "plain", process() {} });
  await perform(mail, { email: "ada@example.com" });
  return { database, mail, plain, directory };
}

type ErrorClass = typeof Error | typeof TypeError | typeof RangeError | typeof TaskDataError;

interface BadInput {
  call(context: Context): unknown;
  error: ErrorClass;
  /** Texts that the message contains: the option or path, and the value. */
  mentions: string[];
}

const circular: Record<string, unknown> = { name: "loop" };
circular.self = circular;

// deno-lint-ignore no-explicit-any
const loose = (value: unknown) => value as any;

const badInputs: Record<string, BadInput> = {
  "perform() data that fails the schema's type": {
    call: ({ mail }) => perform(mail, loose({ email: 42 })),
    error: TaskDataError,
    mentions: ['task "mail"', "data.email", "42"],
  },
  "perform() data that fails the schema's check": {
    call: ({ mail }) => perform(mail, { email: "not-an-address" }),
    error: TaskDataError,
    mentions: ["data.email", '"not-an-address"'],
  },
  "perform() data with an undefined property": {
    call: ({ plain }) => perform(plain, { note: undefined }),
    error: TypeError,
    mentions: ["data.note is undefined"],
  },
  "perform() data with NaN": {
    call: ({ plain }) => perform(plain, { count: Number.NaN }),
    error: TypeError,
    mentions: ["data.count is NaN"],
  },
  "perform() data with a BigInt": {
    call: ({ plain }) => perform(plain, { count: 10n }),
    error: TypeError,
    mentions: ["data.count is a BigInt"],
  },
  "perform() data with a circular reference": {
    call: ({ plain }) => perform(plain, circular),
    error: TypeError,
    mentions: ["data.self", "circular"],
  },
  "perform() data with a Date": {
    call: ({ plain }) => perform(plain, { at: new Date(0) }),
    error: TypeError,
    mentions: ["data.at is a Date", "toISOString()"],
  },
  "perform() data with a Map": {
    call: ({ plain }) => perform(plain, { seen: new Map() }),
    error: TypeError,
    mentions: ["data.seen is a Map"],
  },
  "perform() data with a function": {
    call: ({ plain }) => perform(plain, { callback() {} }),
    error: TypeError,
    mentions: ["data.callback is a function"],
  },
  "perform() delay that is not a duration": {
    call: ({ plain }) => perform(plain, null, { delay: loose("soon") }),
    error: TypeError,
    mentions: ['option "delay"', 'received "soon"'],
  },
  "perform() priority out of range": {
    call: ({ plain }) => perform(plain, null, { priority: 2_000_000 }),
    error: RangeError,
    mentions: ['option "priority"', "received 2000000"],
  },
  "perform() runAt that is an invalid Date": {
    call: ({ plain }) => perform(plain, null, { runAt: new Date("not a date") }),
    error: TypeError,
    mentions: ['option "runAt"', "Invalid Date"],
  },
  "perform() with both delay and runAt": {
    call: ({ plain }) => perform(plain, null, { delay: "1s", runAt: 0 }),
    error: TypeError,
    mentions: ['"delay" or "runAt"', 'delay "1s"', "runAt 0"],
  },
  "perform() option with a typo": {
    call: ({ plain }) => perform(plain, null, loose({ dealy: "1s" })),
    error: TypeError,
    mentions: ['Unknown perform() option "dealy"'],
  },
  "performMany() items that are not an array": {
    call: ({ plain }) => performMany(plain, loose("abc")),
    error: TypeError,
    mentions: ["performMany()", 'received "abc"'],
  },
  "performMany() with one item that fails the schema": {
    call: ({ mail }) =>
      performMany(mail, [
        { email: "a@example.com" },
        { email: "b@example.com" },
        { email: "c" },
      ]),
    error: TaskDataError,
    mentions: ["items[2].email", '"c"'],
  },
  "performMany() with one item that JSON cannot store": {
    call: ({ plain }) => performMany(plain, [{ count: 1 }, { count: Infinity }]),
    error: TypeError,
    mentions: ["items[1].count is Infinity"],
  },
  "task timeout that is not a duration": {
    call: ({ database }) =>
      defineDatabaseTask(database, { name: "t", timeout: loose("5 minutes"), process() {} }),
    error: TypeError,
    mentions: ['option "timeout"', 'received "5 minutes"'],
  },
  "task lease below its minimum": {
    call: ({ database }) => defineDatabaseTask(database, { name: "t", lease: 50, process() {} }),
    error: RangeError,
    mentions: ['option "lease"', "from 100 ms", "received 50"],
  },
  "task pollInterval of zero": {
    call: ({ database }) =>
      defineDatabaseTask(database, { name: "t", pollInterval: "0ms", process() {} }),
    error: RangeError,
    mentions: ['option "pollInterval"', 'received "0ms"'],
  },
  "task batchSize of zero": {
    call: ({ database }) => defineDatabaseTask(database, { name: "t", batchSize: 0, process() {} }),
    error: RangeError,
    mentions: ['option "batchSize"', "received 0"],
  },
  "task maxAttempts as a string": {
    call: ({ database }) =>
      defineDatabaseTask(database, { name: "t", maxAttempts: loose("3"), process() {} }),
    error: TypeError,
    mentions: ['option "maxAttempts"', 'received "3"'],
  },
  "openDatabase() busyTimeout that is not a duration": {
    call: ({ directory }) =>
      openDatabase(`file:${join(directory, "other.db")}`, { busyTimeout: loose("forever") }),
    error: TypeError,
    mentions: ['option "busyTimeout"', 'received "forever"'],
  },
  "openDatabase() URL of another database system": {
    call: () => openDatabase("postgres://localhost/tasks"),
    error: TypeError,
    mentions: ['"postgres://localhost/tasks"', '"file:"'],
  },
  "openDatabase() URL in a missing directory": {
    call: ({ directory }) => openDatabase(`file:${join(directory, "missing", "tasks.db")}`),
    error: TypeError,
    mentions: ["missing/tasks.db", "directory exists"],
  },
  "openDatabase() URL that is a number": {
    call: () => openDatabase(loose(42)),
    error: TypeError,
    mentions: ["Invalid database URL", "received 42"],
  },
  "runTasks() directory that does not exist": {
    call: ({ directory }) => runTasks(join(directory, "no-such-tasks")),
    error: Error,
    mentions: ["no-such-tasks", "not found"],
  },
  "runTasks() directory that is a file": {
    call: ({ directory }) => {
      writeFileSync(join(directory, "tasks.ts"), "");
      return runTasks(join(directory, "tasks.ts"));
    },
    error: Error,
    mentions: ["tasks.ts", "is a file"],
  },
  "runTasks() directory without task modules": {
    call: ({ directory }) => {
      mkdirSync(join(directory, "empty"));
      return runTasks(join(directory, "empty"));
    },
    error: Error,
    mentions: ["empty", "has no task modules"],
  },
  "runTasks() stopTimeout that is not a duration": {
    call: ({ mail }) => runTasks([mail], { stopTimeout: loose("later") }),
    error: TypeError,
    mentions: ['option "stopTimeout"', 'received "later"'],
  },
};

describe("bad input", () => {
  test.each(Object.entries(badInputs))("%s", async (_, input) => {
    const context = await setup();
    const before = await taskRows(context.database);
    expect(before).toHaveLength(1);

    let thrown: unknown;
    try {
      await input.call(context);
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(Error);
    expect((thrown as Error).constructor).toBe(input.error);
    for (const text of input.mentions) expect((thrown as Error).message).toContain(text);
    expect(await taskRows(context.database)).toEqual(before);
  });

  test("runner.stop() timeout that is not a duration", async () => {
    const { database, mail } = await setup();
    const runner = await runTasks([mail], { logger: captureLogger() });
    keep(runner);
    expect(() => runner.stop({ timeout: loose("never") })).toThrow(TypeError);
    expect(() => runner.stop({ timeout: loose("never") })).toThrow(
      'Invalid stop() option "timeout": expected a duration',
    );
    expect(() => runner.stop({ timeout: loose("never") })).toThrow('received "never"');
    await waitFor(async () => (await taskRows(database)).length === 0);
  });
});

describe("bad stored rows", () => {
  async function insertRow(database: Database, id: string, name: string, data: string) {
    await database.client.execute({
      sql: "INSERT INTO tasks (id, name, data, created) VALUES (?, ?, ?, 0)",
      args: [id, name, data],
    });
  }

  test.each([
    [
      "invalid JSON",
      "{not json",
      'SyntaxError: Stored data of task "mail" bad-1 is not valid JSON',
      'Task "mail" bad-1: failed without retry: Stored data of task "mail" bad-1 is not valid JSON',
    ],
    [
      "data that fails the schema",
      '{"email":"nobody"}',
      'TaskDataError: Invalid data for task "mail": stored data.email: Invalid email: Received "nobody"',
      'Task "mail" bad-1: failed without retry: Invalid data for task "mail": stored data.email',
    ],
  ])("row with %s fails at once", async (_, data, storedError, logLine) => {
    const { database, mail } = await setup();
    await insertRow(database, "bad-1", "mail", data);
    await perform(mail, { email: "grace@example.com" });
    const logger = captureLogger();
    keep(await runTasks([mail], { logger }));

    // The good rows before and after it still run.
    await waitFor(async () => (await taskRows(database)).length === 1);
    const [row] = await taskRows(database);
    expect(row).toMatchObject({ id: "bad-1", state: "failed", attempts: 1, failed_nr: 1 });
    expect(row.failed_error).toStartWith(storedError);
    expect(logger.messages("error")).toHaveLength(1);
    expect(logger.messages("error")[0]).toStartWith(logLine);
  });

  test("row of an unknown task is left alone and named once", async () => {
    const { database, mail } = await setup();
    await insertRow(database, "ghost-1", "ghost", "{}");
    await insertRow(database, "ghost-2", "ghost", "{}");
    const logger = captureLogger();
    keep(await runTasks([mail], { logger }));

    await waitFor(async () => (await taskRows(database)).length === 2);
    const rows = await taskRows(database);
    expect(rows.map((row) => [row.id, row.state, row.attempts, row.locked_by])).toEqual([
      ["ghost-1", "pending", 0, null],
      ["ghost-2", "pending", 0, null],
    ]);
    expect(logger.messages("warn")).toEqual([
      'Pending tasks named "ghost" have no task in this runner; they are left for a runner ' +
      'that defines "ghost"',
    ]);
  });
});
