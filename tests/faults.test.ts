import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@libsql/client";
import * as v from "valibot";
import {
  type Database,
  defineDatabaseTask,
  type Duration,
  openDatabase,
  perform,
  runTasks,
  type TaskDefinition,
} from "../mod.ts";
import {
  captureLogger,
  taskRows,
  temporaryDatabaseUrl,
  temporaryDirectory,
  useResources,
  waitFor,
} from "./helpers.ts";

// Several tests wait out a fault for seconds, and one starts a second process.
setDefaultTimeout(20_000);

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

const { open, start } = useResources();

/** Defines a task that polls every 50 ms and records the data of each run in `runs`. */
function recordingTask(on: Database, name: string, runs: number[]) {
  return defineDatabaseTask<number>(on, {
    name,
    pollInterval: 50,
    process({ data }) {
      runs.push(data);
    },
  });
}

describe("database faults", () => {
  test("unwritten result keeps its lease", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    let runs = 0;
    const define = (on: Database) =>
      defineDatabaseTask(on, {
        name: "kept",
        lease: 600,
        pollInterval: 50,
        process() {
          runs++;
        },
      });
    const task = define(database);
    await perform(task, null);
    // A trigger makes the deletion of a completed row fail while updates, such as lease
    // renewals, still succeed.
    await database.client.execute(
      "CREATE TRIGGER keep_rows BEFORE DELETE ON tasks BEGIN SELECT RAISE(ABORT, 'deletes are blocked'); END",
    );
    const logger = captureLogger();
    await start([task], { logger });
    await waitFor(() => logger.messages("error").length > 0);
    // A second runner on its own connection rescues any lease that expires meanwhile.
    const rescuerLogger = captureLogger();
    await start([define(open(createClient({ url, timeout: 5_000 })))], { logger: rescuerLogger });
    await sleep(1_500);

    await database.client.execute("DROP TRIGGER keep_rows");
    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(runs).toBe(1);
    expect(logger.messages("error")[0]).toStartWith('Task "kept": database error, retrying in');
    expect(logger.messages("error")[0]).toEndWith("deletes are blocked");
    expect(rescuerLogger.messages("warn")).toEqual([]);
  });

  test("deleted file pauses runners until restored", async () => {
    const path = join(temporaryDirectory(), "tasks.db");
    const url = `file:${path}`;
    const database = open(url);
    const runs: number[] = [];
    const define = (on: Database) => recordingTask(on, "moved", runs);
    await perform(define(database), 1);
    const logger = captureLogger();
    await start([define(database)], { logger });
    await waitFor(() => runs.length === 1);

    for (const suffix of ["", "-wal", "-shm"]) rmSync(path + suffix, { force: true });
    await waitFor(() => logger.messages("error").length === 1);
    expect(logger.messages("error")[0]).toContain(
      `The database file ${JSON.stringify(path)} was deleted while tasklite had it open`,
    );

    // A new file at the path, written through another connection as another process would.
    // (openDatabase() would share this process's connection to the deleted file.)
    await perform(define(open(createClient({ url, timeout: 5_000 }))), 2);
    await waitFor(() => runs.length === 2, { timeout: 10_000 });
    expect(runs).toEqual([1, 2]);
    expect(logger.messages("warn")).toEqual([
      `The database file ${JSON.stringify(path)} was replaced or restored while tasklite had ` +
      "it open; tasklite reopened it",
    ]);
    expect(await taskRows(database)).toEqual([]);
    // The reopened connection has the settings of the first one.
    const settings = await database.client.execute(
      "SELECT journal_mode, synchronous, timeout FROM pragma_journal_mode, pragma_synchronous, pragma_busy_timeout",
    );
    expect({ ...settings.rows[0] }).toEqual({
      journal_mode: "wal",
      synchronous: 1,
      timeout: 5_000,
    });
  });

  test("a switched symbolic link reopens the database", async () => {
    const directory = temporaryDirectory();
    mkdirSync(join(directory, "v1"));
    mkdirSync(join(directory, "v2"));
    symlinkSync(join(directory, "v1"), join(directory, "current"));
    const path = join(directory, "current", "tasks.db");
    const database = open(`file:${path}`);
    const runs: number[] = [];
    const define = (on: Database) => recordingTask(on, "switched", runs);
    await perform(define(database), 1);
    const logger = captureLogger();
    await start([define(database)], { logger });
    await waitFor(() => runs.length === 1);

    // A deploy switches the link to a new folder, whose database another process fills.
    const next = createClient({ url: `file:${join(directory, "v2", "tasks.db")}`, timeout: 5_000 });
    await perform(define(open(next)), 2);
    symlinkSync(join(directory, "v2"), join(directory, "next"));
    renameSync(join(directory, "next"), join(directory, "current"));

    await waitFor(() => runs.length === 2, { timeout: 10_000 });
    expect(runs).toEqual([1, 2]);
    expect(logger.messages("warn")).toEqual([
      `The database file ${JSON.stringify(path)} was replaced or restored while tasklite had ` +
      "it open; tasklite reopened it",
    ]);
  });

  test("read-only database pauses runners", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url);
    const runs: number[] = [];
    const define = (on: Database) =>
      defineDatabaseTask<number>(on, {
        name: "read-only",
        pollInterval: 50,
        process({ data }) {
          runs.push(data);
        },
      });
    const task = define(database);
    const logger = captureLogger();
    await start([task], { logger, debug: true });
    // tasklite has one connection per local file, so this makes the runner's writes fail as
    // they would on a read-only file.
    await database.client.execute("PRAGMA query_only = ON");

    await expect(perform(task, 1)).rejects.toThrow("attempt to write a readonly database");
    // Another connection, as another process would have, can still write.
    await perform(define(open(createClient({ url, timeout: 5_000 }))), 2);
    await waitFor(() => logger.messages("error").length === 1);
    await sleep(2_000);
    expect(logger.messages("error")[0]).toStartWith(
      'Task "read-only": database error, retrying in',
    );
    // Growing delays from 100 ms: about five tries in two seconds, where a busy loop makes
    // thousands.
    const retries = logger.messages("debug").filter((line) => line.includes("database error"));
    expect(retries.length).toBeLessThan(10);
    expect(runs).toEqual([]);

    await database.client.execute("PRAGMA query_only = OFF");
    await waitFor(() => runs.length === 1, { timeout: 10_000 });
    expect(runs).toEqual([2]);
    expect(logger.messages("error")).toHaveLength(1);
    expect(await taskRows(database)).toEqual([]);
  });

  test("long write lock is waited out", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(url, { busyTimeout: "20ms" });
    const runs: number[] = [];
    const task = defineDatabaseTask<number>(database, {
      name: "busy",
      process({ data }) {
        runs.push(data);
      },
    });
    const logger = captureLogger();
    await start([task], { logger });

    // Another process keeps a write transaction open for 1.5 s, and creates a file just before
    // it commits.
    const released = join(temporaryDirectory(), "released");
    const locker = spawn(process.execPath, [
      "-e",
      `import { writeFileSync } from "node:fs";
      import { createClient } from "@libsql/client";
      const client = createClient({ url: ${JSON.stringify(url)} });
      const transaction = await client.transaction("write");
      await transaction.execute("UPDATE tasks SET priority = priority");
      console.log("locked");
      setTimeout(async () => {
        writeFileSync(${JSON.stringify(released)}, "");
        await transaction.commit();
        client.close();
      }, 1_500);`,
    ], {
      cwd: fileURLToPath(new URL("..", import.meta.url)),
      stdio: ["ignore", "pipe", "inherit"],
    });
    let output = "";
    locker.stdout.setEncoding("utf8");
    locker.stdout.on("data", (chunk: string) => void (output += chunk));
    await waitFor(() => output.includes("locked"), { timeout: 15_000 });

    const id = await perform(task, 1);
    expect(existsSync(released)).toBe(true);
    await waitFor(() => runs.length === 1);
    // The run's result is written just after it ends.
    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(typeof id).toBe("string");
    expect(logger.messages("error")).toEqual([]);
    expect(logger.messages("warn")).toEqual([]);
  });
});

describe("durability after a busy database", () => {
  test("rows written after the busy timeout ran out are seen by other connections", async () => {
    // A 20 ms busy timeout against another process's 1.5 s write lock makes tasklite's insert
    // fail with SQLITE_BUSY and retry. The row must then be committed where other connections
    // see it, not only on tasklite's own connection. Three rounds, because the failure this
    // guards against showed in about three of four.
    for (let round = 0; round < 3; round++) {
      const url = temporaryDatabaseUrl();
      const database = open(url, { busyTimeout: "20ms" });
      const task = defineDatabaseTask(database, { name: "durable", process() {} });
      await database.ready();
      const locker = spawn(process.execPath, [
        "-e",
        `import { createClient } from "@libsql/client";
        const client = createClient({ url: ${JSON.stringify(url)} });
        const transaction = await client.transaction("write");
        await transaction.execute("UPDATE tasks SET priority = priority");
        console.log("locked");
        setTimeout(async () => {
          await transaction.commit();
          client.close();
        }, 1_500);`,
      ], {
        cwd: fileURLToPath(new URL("..", import.meta.url)),
        stdio: ["ignore", "pipe", "inherit"],
      });
      let output = "";
      locker.stdout.setEncoding("utf8");
      locker.stdout.on("data", (chunk: string) => void (output += chunk));
      const exited = new Promise((resolve) => locker.on("exit", resolve));
      await waitFor(() => output.includes("locked"), { timeout: 15_000 });

      const id = await perform(task, round);
      await exited;
      const other = createClient({ url });
      const seen = await other.execute({ sql: "SELECT id FROM tasks WHERE id = ?", args: [id] });
      other.close();
      expect(seen.rows.map((row) => row.id)).toEqual([id]);
    }
  });
});

describe("close()", () => {
  test.each(["url", "client"] as const)(
    "nothing is written after close() (%s)",
    async (kind) => {
      const url = temporaryDatabaseUrl();
      const client = kind === "client" ? createClient({ url, timeout: 5_000 }) : undefined;
      const database = openDatabase(client ?? url);
      let release: (() => void) | undefined;
      const task = defineDatabaseTask(database, {
        name: "closing",
        lease: 150,
        pollInterval: 20,
        process() {
          return new Promise<void>((resolve) => (release = resolve));
        },
      });
      await perform(task, null);
      const logger = captureLogger();
      const runner = await runTasks([task], { logger });
      await waitFor(() => release !== undefined);
      const reader = open(url);
      const before = await taskRows(reader);

      database.close();
      release!();
      // Longer than the lease, so a heartbeat or rescue would have written by now.
      await sleep(300);
      expect(await taskRows(reader)).toEqual(before);
      await runner.stop({ timeout: 100 });
      expect(await taskRows(reader)).toEqual(before);
      expect(before).toMatchObject([{ state: "running", attempts: 1 }]);
      await expect(perform(task, null)).rejects.toThrow("The database is closed");
      expect(logger.messages("error")).toEqual([]);
      client?.close();
    },
  );
});

describe("errors in user code", () => {
  const thrower = (message: string) => () => {
    throw new Error(message);
  };
  // Each case breaks one piece of user code. A rejection that escaped the runner would fail the
  // test, because bun test reports unhandled rejections as failures of the running test.
  const cases: Array<[string, Partial<TaskDefinition<unknown>>, "warn" | "error", string]> = [
    [
      "process throws a string",
      {
        process() {
          throw "plain text";
        },
      },
      "error",
      "no attempts left: Non-error value thrown: plain text",
    ],
    [
      "process returns a thenable whose then throws",
      {
        process() {
          return { then: thrower("then exploded") } as unknown as Promise<void>;
        },
      },
      "error",
      "no attempts left: then exploded",
    ],
    [
      "process rejects with undefined",
      {
        process: () => Promise.reject(undefined),
      },
      "error",
      "no attempts left: Non-error value thrown: undefined",
    ],
    [
      "success throws",
      { process() {}, success: thrower("success exploded") },
      "error",
      "the success hook threw: success exploded",
    ],
    [
      "success rejects",
      {
        process() {},
        success: () => Promise.reject(new Error("success rejected")),
      },
      "error",
      "the success hook threw: success rejected",
    ],
    [
      "failed throws",
      {
        process: thrower("run failed"),
        failed: thrower("failed exploded"),
      },
      "error",
      "the failed hook threw: failed exploded",
    ],
    [
      "backoff throws",
      {
        maxAttempts: 2,
        process: thrower("run failed"),
        backoff: thrower("backoff exploded"),
      },
      "error",
      "the backoff function threw, using the default: backoff exploded",
    ],
    [
      "backoff returns a non-duration",
      {
        maxAttempts: 2,
        process: thrower("run failed"),
        backoff: () => "soon" as Duration,
      },
      "error",
      "the backoff function threw, using the default: expected a duration",
    ],
    [
      "schema throws",
      {
        schema: v.pipe(v.unknown(), v.check(thrower("schema exploded"))),
        process() {},
      },
      "error",
      "failed without retry: schema exploded",
    ],
  ];

  test.each(cases)("runner goes on when %s", async (_, definition, level, message) => {
    const database = open();
    const faulty = defineDatabaseTask(
      database,
      { name: "faulty", maxAttempts: 1, ...definition } as TaskDefinition<unknown>,
    );
    let after = 0;
    const next = defineDatabaseTask(database, {
      name: "next",
      process() {
        after++;
      },
    });
    await database.ready();
    // Written with SQL, because perform() would run the schema that throws.
    await database.client.execute({
      sql: "INSERT INTO tasks (id, name, data, created) VALUES ('faulty-1', 'faulty', '1', 0)",
    });
    const logger = captureLogger();
    await start([faulty, next], { logger });

    await waitFor(() => logger.messages(level).some((line) => line.includes(message)), {
      message: `a ${level} line with "${message}"`,
    });
    await perform(next, null);
    await waitFor(() => after === 1);
  });

  test("runner goes on when the logger throws", async () => {
    const database = open();
    let runs = 0;
    const task = defineDatabaseTask(database, {
      name: "logged",
      maxAttempts: 1,
      process() {
        runs++;
        if (runs === 1) throw new Error("first run fails");
      },
    });
    const logger = {
      debug: thrower("logger exploded"),
      info: thrower("logger exploded"),
      warn: thrower("logger exploded"),
      error: thrower("logger exploded"),
    };
    const printed: string[] = [];
    const consoleError = console.error;
    console.error = (line: string) => void printed.push(line);
    try {
      await start([task], { logger, debug: true });
      await perform(task, null);
      await waitFor(() => printed.some((line) => line.includes("first run fails")));
      await perform(task, null);
      await waitFor(() => runs === 2);
    } finally {
      console.error = consoleError;
    }
    expect(printed[0]).toStartWith(
      "tasklite: the logger threw (logger exploded) on this info line",
    );
  });

  test("stop() bounds its wait for hooks", async () => {
    const database = open();
    let called = false;
    const task = defineDatabaseTask(database, {
      name: "hanging",
      process() {},
      success() {
        called = true;
        return new Promise<void>(() => {});
      },
    });
    await perform(task, null);
    const logger = captureLogger();
    const runner = await runTasks([task], { logger });
    await waitFor(() => called);

    await runner.stop({ timeout: 200 });
    expect(logger.messages("warn")).toEqual([
      'Task "hanging": stopped with 1 success or failed hook still running after the stop timeout of 200 ms',
    ]);
  });
});
