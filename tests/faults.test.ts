import { afterEach, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@libsql/client";
import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  type Runner,
  runTasks,
} from "../mod.ts";
import {
  captureLogger,
  taskRows,
  temporaryDatabaseUrl,
  temporaryDirectory,
  waitFor,
} from "./helpers.ts";

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

const runners: Runner[] = [];
const databases: Database[] = [];

afterEach(async () => {
  for (const runner of runners.splice(0)) await runner.stop({ timeout: 100 });
  for (const database of databases.splice(0)) database.close();
});

function open(url = temporaryDatabaseUrl(), options?: Parameters<typeof openDatabase>[1]) {
  const database = openDatabase(url, options);
  databases.push(database);
  return database;
}

async function start(...args: Parameters<typeof runTasks>): Promise<Runner> {
  const runner = await runTasks(args[0], { logger: captureLogger(), ...args[1] });
  runners.push(runner);
  return runner;
}

describe("database faults", () => {
  test("a result that cannot be written yet keeps its lease", async () => {
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
    await start([define(open(url))], { logger: rescuerLogger });
    await sleep(1_500);

    await database.client.execute("DROP TRIGGER keep_rows");
    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(runs).toBe(1);
    expect(logger.messages("error")[0]).toStartWith('Task "kept": database error, retrying in');
    expect(logger.messages("error")[0]).toEndWith("deletes are blocked");
    expect(rescuerLogger.messages("warn")).toEqual([]);
  });

  test("a deleted file pauses runners until it is back", async () => {
    const path = join(temporaryDirectory(), "tasks.db");
    const url = `file:${path}`;
    const database = open(url);
    const runs: number[] = [];
    const define = (on: Database) =>
      defineDatabaseTask<number>(on, {
        name: "moved",
        pollInterval: 50,
        process({ data }) {
          runs.push(data);
        },
      });
    await perform(define(database), 1);
    const logger = captureLogger();
    await start([define(database)], { logger });
    await waitFor(() => runs.length === 1);

    for (const suffix of ["", "-wal", "-shm"]) rmSync(path + suffix, { force: true });
    await waitFor(() => logger.messages("error").length === 1, { timeout: 3_000 });
    expect(logger.messages("error")[0]).toContain(
      `The database file ${JSON.stringify(path)} was deleted while tasklite had it open`,
    );

    // A new file at the path, written through another connection as another process would.
    await perform(define(open(url)), 2);
    await waitFor(() => runs.length === 2, { timeout: 5_000 });
    expect(runs).toEqual([1, 2]);
    expect(logger.messages("warn")).toEqual([
      `The database file ${JSON.stringify(path)} was replaced or restored while tasklite had ` +
      "it open; tasklite reopened it",
    ]);
    expect(await taskRows(database)).toEqual([]);
  });

  test("a database that rejects writes pauses runners", async () => {
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
    await perform(define(open(url)), 2);
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
    await waitFor(() => runs.length === 1, { timeout: 5_000 });
    expect(runs).toEqual([2]);
    expect(logger.messages("error")).toHaveLength(1);
    expect(await taskRows(database)).toEqual([]);
  });

  test("a write lock held past the busy timeout is waited out", async () => {
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

    // Another process holds a write transaction for 1.5 s, and creates a file just before it
    // commits.
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
    await waitFor(() => output.includes("locked"));

    const id = await perform(task, 1);
    expect(existsSync(released)).toBe(true);
    await waitFor(() => runs.length === 1);
    expect(await taskRows(database)).toEqual([]);
    expect(typeof id).toBe("string");
    expect(logger.messages("error")).toEqual([]);
    expect(logger.messages("warn")).toEqual([]);
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
