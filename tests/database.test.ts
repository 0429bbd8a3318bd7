import { describe, expect, test } from "bun:test";
import { createClient } from "@libsql/client";
import { existsSync, readdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { defineDatabaseTask, listTasks, openDatabase, perform } from "../mod.ts";
import { taskRows, temporaryDatabaseUrl, temporaryDirectory } from "./helpers.ts";

describe("openDatabase()", () => {
  test("creates the tasks table and its claim index", async () => {
    const database = openDatabase(temporaryDatabaseUrl());
    await database.ready();

    const columns = await database.client.execute("SELECT name FROM pragma_table_info('tasks')");
    expect(columns.rows.map((row) => row.name)).toEqual([
      "id",
      "name",
      "data",
      "created",
      "failed_last",
      "failed_nr",
      "failed_error",
      "run_at",
      "state",
      "attempts",
      "locked_until",
      "locked_by",
      "priority",
      "key",
      "schedule",
      "scheduled_for",
      "finished_at",
      "cancelled_at",
    ]);
    const indexes = await database.client.execute("SELECT name FROM pragma_index_list('tasks')");
    expect(indexes.rows.map((row) => row.name)).toContain("tasks_claim");
    expect(indexes.rows.map((row) => row.name)).toContain("tasks_key");
    expect(indexes.rows.map((row) => row.name)).toContain("tasks_schedule");
    const schedules = await database.client.execute(
      "SELECT name FROM pragma_table_info('schedules')",
    );
    expect(schedules.rows.map((row) => row.name)).toEqual([
      "name",
      "task",
      "pattern",
      "timezone",
      "data",
      "options",
      "source",
      "revision",
      "last_fired_at",
      "created",
      "updated",
    ]);
    expect(indexes.rows.map((row) => row.name)).toContain("tasks_finished");
    const version = await database.client.execute("PRAGMA user_version");
    expect(version.rows[0].user_version).toBe(1);
    database.close();
  });

  test("sets WAL, synchronous NORMAL and the busy timeout on a local file", async () => {
    const database = openDatabase(temporaryDatabaseUrl(), { busyTimeout: "2s" });
    await database.ready();

    const state = await database.client.execute(
      "SELECT journal_mode, synchronous, timeout FROM pragma_journal_mode, pragma_synchronous, pragma_busy_timeout",
    );
    expect(state.rows[0].journal_mode).toBe("wal");
    expect(state.rows[0].synchronous).toBe(1);
    expect(state.rows[0].timeout).toBe(2_000);
    database.close();
  });

  test("defaults the busy timeout to 5 seconds", async () => {
    const database = openDatabase(temporaryDatabaseUrl());
    await database.ready();
    const state = await database.client.execute("SELECT timeout FROM pragma_busy_timeout");
    expect(state.rows[0].timeout).toBe(5_000);
    database.close();
  });

  test("opening an existing database keeps its rows", async () => {
    const url = temporaryDatabaseUrl();
    const first = openDatabase(url);
    const task = defineDatabaseTask(first, { name: "keep", process() {} });
    const id = await perform(task, { kept: true });
    first.close();

    const second = openDatabase(url);
    await second.ready();
    const rows = await taskRows(second);
    expect(rows.map((row) => row.id)).toEqual([id]);
    expect(rows[0].data).toBe('{"kept":true}');
    second.close();
  });

  test("create: false rejects a missing file or tables", async () => {
    const directory = temporaryDirectory();
    const missing = join(directory, "missing.db");
    expect(() => openDatabase(`file:${missing}`, { create: false })).toThrow(
      `No database file at ${missing} (from "file:${missing}"): check the path`,
    );
    expect(existsSync(missing)).toBe(false);

    const url = `file:${join(directory, "app.db")}`;
    const client = createClient({ url });
    await client.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)");
    client.close();
    const bare = openDatabase(url, { create: false });
    expect(bare.ready()).rejects.toThrow(`No tasklite tables in ${url}: it has no "tasks" table`);
    await bare.ready().catch(() => {});
    const tables = await bare.client.execute("SELECT name FROM sqlite_master WHERE type = 'table'");
    expect(tables.rows.map((row) => row.name)).toEqual(["users"]);
    bare.close();

    // An application table named "tasks" is not tasklite's: nothing is written, not even WAL.
    const other = `file:${join(directory, "other.db")}`;
    const otherClient = createClient({ url: other });
    await otherClient.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)");
    otherClient.close();
    const foreign = openDatabase(other, { create: false });
    expect(foreign.ready()).rejects.toThrow(`The "tasks" table in ${other} is not tasklite's`);
    await foreign.ready().catch(() => {});
    const mode = await foreign.client.execute("PRAGMA journal_mode");
    expect(mode.rows[0].journal_mode).toBe("delete");
    foreign.close();
    expect(existsSync(join(directory, "other.db-wal"))).toBe(false);

    const created = openDatabase(url);
    const task = defineDatabaseTask(created, { name: "mail", process() {} });
    const id = await perform(task, 1);
    created.close();
    const existing = openDatabase(url, { create: false });
    expect((await listTasks(existing)).map((task) => task.id)).toEqual([id]);
    existing.close();
  });

  test("decodes percent escapes in a file: URL, as libSQL does", async () => {
    const directory = temporaryDirectory();
    const database = openDatabase(`file:${join(directory, "my%20tasks.db")}`);
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    await perform(task, 1);
    expect((await listTasks(database)).length).toBe(1);
    database.close();
    expect(readdirSync(directory).filter((name) => name.endsWith(".db"))).toEqual([
      "my tasks.db",
    ]);

    expect(() => openDatabase(`file:${join(directory, "bad%zz.db")}`)).toThrow(
      'its path has an invalid percent escape; write "%25" for a "%" in a file name',
    );
    expect(() => openDatabase("file://example.com/tmp/tasks.db")).toThrow(
      'a file: URL cannot name a host ("example.com")',
    );
  });

  test("a symbolic link to the file shares its connection", async () => {
    const directory = temporaryDirectory();
    const path = join(directory, "real.db");
    const first = openDatabase(`file:${path}`);
    await first.ready();
    symlinkSync(path, join(directory, "link.db"));
    const second = openDatabase(`file:${join(directory, "link.db")}`);
    expect(second.client).toBe(first.client);
    second.close();
    first.close();
  });

  test("a file that is not SQLite is named in the error", async () => {
    const path = join(temporaryDirectory(), "notes.db");
    writeFileSync(path, "plain text, not a database; ".repeat(10));
    const database = openDatabase(`file:${path}`);
    await expect(database.ready()).rejects.toThrow(
      `"file:${path}" is not a SQLite database file (SQLITE_NOTADB: file is not a database)`,
    );
    database.close();
  });

  test("file::memory: with query parameters is in memory, not a file", async () => {
    const directory = temporaryDirectory();
    const previous = process.cwd();
    process.chdir(directory);
    try {
      const database = openDatabase("file::memory:?cache=shared");
      const task = defineDatabaseTask(database, { name: "mail", process() {} });
      await perform(task, 1);
      expect((await listTasks(database)).length).toBe(1);
      database.close();
      // No file is looked for: with create: false, a missing file would throw here.
      openDatabase("file::memory:?cache=private", { create: false }).close();
      expect(readdirSync(directory)).toEqual([]);
    } finally {
      process.chdir(previous);
    }
  });

  test("works on :memory:", async () => {
    const database = openDatabase(":memory:");
    const task = defineDatabaseTask(database, { name: "memory", process() {} });
    await perform(task, 1);
    expect(await taskRows(database)).toHaveLength(1);
    database.close();
  });

  test("accepts an existing libSQL client and leaves it open", async () => {
    const directory = temporaryDirectory();
    const client = createClient({ url: `file:${join(directory, "app.db")}`, timeout: 1_000 });
    const database = openDatabase(client);
    expect(database.url).toBeUndefined();
    const task = defineDatabaseTask(database, { name: "shared", process() {} });
    await perform(task, "hello");
    database.close();

    const result = await client.execute("SELECT data FROM tasks");
    expect(result.rows[0].data).toBe('"hello"');
    client.close();
  });

  test("migrates a plainweb task table and keeps its rows", async () => {
    const url = temporaryDatabaseUrl();
    const client = createClient({ url });
    await client.execute(
      "CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL, data TEXT, created INTEGER NOT NULL, failed_last INTEGER, failed_nr INTEGER, failed_error TEXT)",
    );
    await client.execute(
      "INSERT INTO tasks VALUES ('a', 'mail', '{\"to\":\"x\"}', 1000, NULL, NULL, NULL), ('b', 'mail', 'null', 2000, 5000, 2, 'boom')",
    );
    client.close();

    const database = openDatabase(url);
    await database.ready();
    const rows = await taskRows(database);
    expect(rows.map((row) => [row.id, row.state, row.run_at, row.attempts])).toEqual([
      ["a", "pending", 1000, 0],
      ["b", "pending", 5000, 2],
    ]);
    database.close();
  });

  test("rejects an application table named tasks that is not a task table", async () => {
    const url = temporaryDatabaseUrl();
    const client = createClient({ url });
    await client.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)");
    client.close();

    const database = openDatabase(url);
    await expect(database.ready()).rejects.toThrow(
      'already has a table "tasks" that is not a task table (it lacks the columns name, data, created',
    );
    database.close();
  });

  test("raises user_version but never lowers it", async () => {
    const url = temporaryDatabaseUrl();
    const client = createClient({ url });
    await client.execute("PRAGMA user_version = 7");
    client.close();

    const database = openDatabase(url);
    await database.ready();
    const version = await database.client.execute("PRAGMA user_version");
    expect(version.rows[0].user_version).toBe(7);
    const columns = await database.client.execute(
      "SELECT count(*) AS n FROM pragma_table_info('tasks')",
    );
    expect(columns.rows[0].n).toBe(18);
    database.close();
  });

  test("throws when the directory does not exist", () => {
    const missing = join(temporaryDirectory(), "missing", "tasks.db");
    expect(() => openDatabase(`file:${missing}`)).toThrow(
      `Cannot open database "file:${missing}"`,
    );
  });

  test("perform() after close() rejects and writes nothing", async () => {
    const url = temporaryDatabaseUrl();
    const database = openDatabase(url);
    const task = defineDatabaseTask(database, { name: "late", process() {} });
    await database.ready();
    database.close();
    expect(database.closed).toBe(true);
    await expect(perform(task, 1)).rejects.toThrow("The database is closed");

    const reopened = openDatabase(url);
    expect(await taskRows(reopened)).toEqual([]);
    reopened.close();
  });

  test.each([
    ["tasks.db", 'Invalid database URL "tasks.db": use "file:"'],
    ["postgres://localhost/db", 'Invalid database URL "postgres://localhost/db"'],
    ["", 'Invalid database URL ""'],
  ])("rejects the URL %p", (url, message) => {
    expect(() => openDatabase(url)).toThrow(message);
  });

  test("rejects a URL with a NUL byte before the driver sees it", () => {
    expect(() => openDatabase("file:/tmp/a\u0000b.db")).toThrow(
      'Invalid database URL "file:/tmp/a\\u0000b.db": it contains a control character',
    );
  });

  test("rejects a file URL with an empty path", () => {
    expect(() => openDatabase("file:")).toThrow(
      'Invalid database URL "file:": the path is empty, which SQLite treats as a temporary database',
    );
  });

  test("databases opened on one file in one process share a connection", async () => {
    const url = temporaryDatabaseUrl();
    const first = openDatabase(url);
    const second = openDatabase(url);
    expect(second.client).toBe(first.client);

    // The application's transaction holds the connection; the perform waits for its commit
    // instead of blocking the event loop on a second connection's lock.
    await first.ready();
    const task = defineDatabaseTask(second, { name: "shared-connection", process() {} });
    const transaction = await first.client.transaction("write");
    await transaction.execute("CREATE TABLE app (value TEXT)");
    const performed = perform(task, 1);
    await transaction.execute("INSERT INTO app VALUES ('x')");
    await transaction.commit();
    await performed;
    expect(await taskRows(second)).toHaveLength(1);

    first.close();
    expect(second.client.closed).toBe(false);
    second.close();
    expect(second.client.closed).toBe(true);
  });

  test("a clock that returns something other than milliseconds fails loudly", async () => {
    // deno-lint-ignore no-explicit-any
    const database = openDatabase(temporaryDatabaseUrl(), { now: () => new Date() as any });
    const task = defineDatabaseTask(database, { name: "date-clock", process() {} });
    await expect(perform(task, 1)).rejects.toThrow(
      'The "now" clock of openDatabase() returned a Date',
    );
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("accepts remote URLs and reports a server it cannot reach", async () => {
    // Port 9 on the loopback address has no libSQL server, so the first statement fails.
    for (const url of ["http://127.0.0.1:9", "libsql://127.0.0.1:9?tls=0"]) {
      const database = openDatabase(url);
      expect(database.url).toBe(url);
      expect(database.client.protocol).toBe("http");
      await expect(database.ready()).rejects.toThrow();
      database.close();
    }
  });

  test("rejects a URL that is not a string or client", () => {
    // deno-lint-ignore no-explicit-any
    expect(() => openDatabase(42 as any)).toThrow(
      'Invalid database URL: expected a string such as "file:tasks.db" or a libSQL Client, received 42',
    );
  });

  test.each([
    [
      { busyTimeout: -1 },
      RangeError,
      'Invalid openDatabase() option "busyTimeout": expected a duration from 0 ms to 1 h',
    ],
    [{ busyTimeout: "5 seconds" }, TypeError, 'received "5 seconds"'],
    [
      { watchInterval: 0 },
      RangeError,
      'Invalid openDatabase() option "watchInterval": expected a duration from 1 ms to 1 min',
    ],
    [{ now: 5 }, TypeError, 'Invalid openDatabase() option "now": expected a function, received 5'],
    [{ busytimeout: 5 }, TypeError, 'Unknown openDatabase() option "busytimeout"'],
  ])("rejects the option %p", (options, errorClass, message) => {
    // deno-lint-ignore no-explicit-any
    const open = () => openDatabase(temporaryDatabaseUrl(), options as any);
    expect(open).toThrow(errorClass);
    expect(open).toThrow(message);
  });
});
