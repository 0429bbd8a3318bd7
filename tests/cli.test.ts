import { describe, expect, test } from "bun:test";
import { spawn, spawnSync } from "node:child_process";
import { createClient } from "@libsql/client";
import { mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type Database, defineDatabaseTask, listSchedules, perform, schedule } from "../mod.ts";
import { taskRows, temporaryDirectory, useResources, waitFor } from "./helpers.ts";

const cli = fileURLToPath(new URL("../cli.ts", import.meta.url));
const library = new URL("../mod.ts", import.meta.url).href;

const { open } = useResources();

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI in a child process with the current runtime, in `cwd`. */
function tasklite(args: string[], options: { cwd?: string; env?: Record<string, string> } = {}) {
  const env: Record<string, string | undefined> = { ...process.env, ...options.env };
  if (options.env?.TASKLITE_DB === undefined) delete env.TASKLITE_DB;
  const result = spawnSync(process.execPath, [cli, ...args], {
    cwd: options.cwd ?? temporaryDirectory(),
    env,
    encoding: "utf8",
    timeout: 4_000,
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr } as CliResult;
}

/** Opens a database in a new directory and returns it with its URL. */
function seededDatabase(): { database: Database; url: string; directory: string } {
  const directory = temporaryDirectory();
  const url = `file:${join(directory, "tasks.db")}`;
  return { database: open(url), url, directory };
}

async function insertFailed(
  database: Database,
  id: string,
  name: string,
  finishedAt = 1,
): Promise<void> {
  await database.ready();
  await database.client.execute({
    sql: `INSERT INTO tasks (id, name, data, created, run_at, state, attempts, failed_nr,
      failed_last, failed_error, finished_at)
      VALUES (?, ?, 'null', 0, 0, 'failed', 5, 5, ?, 'Error: boom\n    at somewhere', ?)`,
    args: [id, name, finishedAt, finishedAt],
  });
}

/** Expects a usage error: status 2 and one line on stderr that contains `text`. */
function expectUsageError(result: CliResult, text: string): void {
  expect(result.status).toBe(2);
  expect(result.stderr).toContain(text);
  expect(result.stderr.trimEnd().split("\n")).toHaveLength(1);
  expect(result.stdout).toBe("");
}

describe("tasklite CLI", () => {
  test.each(["run", "status", "list", "retry", "cancel", "purge", "schedules"])(
    "%s --help prints its usage",
    (command) => {
      const result = tasklite([command, "--help"]);

      expect(result.status).toBe(0);
      expect(result.stdout).toStartWith(`Usage: tasklite ${command}`);
      expect(result.stdout).toContain("--help");
    },
  );

  test("--help lists every command", () => {
    const result = tasklite(["--help"]);

    expect(result.status).toBe(0);
    for (const command of ["run", "status", "list", "retry", "cancel", "purge", "schedules"]) {
      expect(result.stdout).toContain(`  ${command}`);
    }
  });

  test("a missing or unknown command exits with status 2", () => {
    const missing = tasklite([]);
    expect(missing.status).toBe(2);
    expect(missing.stderr).toStartWith("tasklite: missing command");

    const unknown = tasklite(["stats"]);
    expectUsageError(unknown, 'tasklite: unknown command "stats": expected one of run, status');
  });

  test.each([
    [["list", "--limit", "abc"], 'invalid --limit "abc": expected an integer from 1 to 10000'],
    [["list", "--limit", "0"], 'invalid --limit "0": expected an integer from 1 to 10000'],
    [
      ["list", "--state", "done"],
      'invalid --state "done": expected one of scheduled, pending, running',
    ],
    [["list", "--verbose"], "unknown option --verbose"],
    [["list", "--name"], "missing value for --name (NAME)"],
    [["list", "extra"], 'unexpected argument "extra"'],
    [["status", "--json=yes"], "option --json takes no value"],
    [["cancel"], 'missing <id>: usage is "tasklite cancel <id>"'],
    [["retry"], "missing <id>: pass a task id or --failed"],
    [
      ["retry", "abc", "--failed"],
      'pass either a task id or --failed, not both (received id "abc")',
    ],
    [["retry", "abc", "--name", "mail"], "--name applies only with --failed"],
    [["purge", "--older-than", "1d"], "missing --state: pass one of completed, failed, cancelled"],
    [["purge", "--state", "pending", "--older-than", "1d"], 'invalid --state "pending"'],
    [["purge", "--state", "failed"], "missing --older-than"],
    [["purge", "--state", "failed", "--older-than", "a week"], 'invalid --older-than "a week"'],
    [["status", "--db", "tasks.db"], 'invalid database from --db: Invalid database URL "tasks.db"'],
    [["run"], 'missing <dir>: usage is "tasklite run <dir>"'],
  ])("%p is rejected with one line naming the argument", (args, message) => {
    const result = tasklite(args);

    expectUsageError(result, message);
    expect(result.stderr).toContain(`(see "tasklite ${args[0]} --help")`);
  });

  test("status prints counts per task as a table and as JSON", async () => {
    const { database, url } = seededDatabase();
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    await perform(mail, 1);
    await perform(mail, 2, { delay: "1h" });
    await insertFailed(database, "f1", "report");

    const table = tasklite(["status", "--db", url]);
    expect(table.status).toBe(0);
    const lines = table.stdout.trimEnd().split("\n");
    expect(lines[0].split(/\s{2,}/)).toEqual([
      "TASK",
      "SCHEDULED",
      "PENDING",
      "RUNNING",
      "COMPLETED",
      "FAILED",
      "CANCELLED",
      "OLDEST DUE",
    ]);
    expect(lines[1].split(/\s+/).slice(0, 7)).toEqual(["mail", "1", "1", "0", "0", "0", "0"]);
    expect(lines[2].split(/\s+/)).toEqual(["report", "0", "0", "0", "0", "1", "0", "-"]);
    expect(lines[3].split(/\s+/).slice(0, 7)).toEqual(["(all)", "1", "1", "0", "0", "1", "0"]);

    const json = JSON.parse(tasklite(["status", "--db", url, "--json"]).stdout);
    expect(json.totals).toMatchObject({ scheduled: 1, pending: 1, failed: 1 });
    expect(json.tasks.map((task: { name: string }) => task.name)).toEqual(["mail", "report"]);
  });

  test("the database defaults to TASKLITE_DB, then file:tasks.db in the directory", async () => {
    const { database, url, directory } = seededDatabase();
    await insertFailed(database, "f1", "report");

    const fromEnvironment = tasklite(["list", "--json"], { env: { TASKLITE_DB: url } });
    expect(JSON.parse(fromEnvironment.stdout).map((task: { id: string }) => task.id)).toEqual([
      "f1",
    ]);
    const fromDirectory = tasklite(["list", "--json"], { cwd: directory });
    expect(JSON.parse(fromDirectory.stdout)).toHaveLength(1);
  });

  test("an empty queue says so and names the database", async () => {
    const { database, directory } = seededDatabase();
    await database.ready();
    const result = tasklite(["status"], { cwd: directory });

    expect(result.status).toBe(0);
    expect(result.stdout).toBe("No tasks in file:tasks.db\n");
  });

  for (const command of ["status", "list", "schedules", "retry --failed", "purge"]) {
    test(`${command} at a path with no file fails and creates nothing`, () => {
      const directory = temporaryDirectory();
      const args = [...command.split(" "), "--db", "file:typo.db"];
      if (command === "purge") args.push("--state", "failed", "--older-than", "0");
      const result = tasklite(args, { cwd: directory });

      expectUsageError(
        result,
        `invalid database from --db: No database file at ${join(directory, "typo.db")}`,
      );
      expect(readdirSync(directory)).toEqual([]);
    });
  }

  test("a missing database names where its URL came from", () => {
    const directory = temporaryDirectory();

    const fromVariable = tasklite(["status"], {
      cwd: directory,
      env: { TASKLITE_DB: "file:nope.db" },
    });
    expectUsageError(
      fromVariable,
      `invalid database from TASKLITE_DB: No database file at ${join(directory, "nope.db")}`,
    );

    const fromDefault = tasklite(["list"], { cwd: directory, env: { TASKLITE_DB: "" } });
    expectUsageError(
      fromDefault,
      `invalid database from the default "file:tasks.db" (no --db, TASKLITE_DB empty): No ` +
        `database file at ${join(directory, "tasks.db")}`,
    );
    expect(readdirSync(directory)).toEqual([]);
  });

  test("status on a database without tasklite's tables fails and adds none", async () => {
    const { directory, url } = seededDatabase();
    const client = createClient({ url });
    await client.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)");
    client.close();

    const result = tasklite(["status", "--db", url]);
    expect(result.status).toBe(1);
    expect(result.stderr).toBe(
      `tasklite status: database from --db: No tasklite tables in ${url}: it has no "tasks" ` +
        `table; check that ` +
        `this is the application's database (with create: false, tasklite creates no tables)\n`,
    );
    const check = createClient({ url: `file:${join(directory, "tasks.db")}` });
    const tables = await check.execute("SELECT name FROM sqlite_master WHERE type = 'table'");
    check.close();
    expect(tables.rows.map((row) => row.name)).toEqual(["users"]);
  });

  test("list filters tasks and shows the first line of the last error", async () => {
    const { database, url } = seededDatabase();
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    const pending = await perform(mail, 1, { key: "weekly" });
    await insertFailed(database, "f1", "report");

    const failed = tasklite(["list", "--db", url, "--state", "failed"]);
    expect(failed.status).toBe(0);
    const lines = failed.stdout.trimEnd().split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toStartWith("ID");
    expect(lines[1]).toStartWith("f1");
    expect(lines[1]).toEndWith("Error: boom");
    expect(lines[1]).not.toContain("somewhere");

    const json = JSON.parse(tasklite(["list", "--db", url, "--name", "mail", "--json"]).stdout);
    expect(json).toHaveLength(1);
    expect(json[0]).toMatchObject({ id: pending, name: "mail", state: "pending", key: "weekly" });

    const limited = JSON.parse(tasklite(["list", "--db", url, "--limit", "1", "--json"]).stdout);
    expect(limited).toHaveLength(1);
  });

  test("retry moves one failed task, or all of them, back to pending", async () => {
    const { database, url } = seededDatabase();
    await insertFailed(database, "a1", "a");
    await insertFailed(database, "a2", "a");
    await insertFailed(database, "b1", "b");

    const one = tasklite(["retry", "a1", "--db", url]);
    expect(one).toMatchObject({ status: 0, stdout: "Task a1 is pending again\n" });
    const named = tasklite(["retry", "--failed", "--name", "b", "--db", url]);
    expect(named).toMatchObject({ status: 0, stdout: "Retried 1 failed task\n" });
    const all = tasklite(["retry", "--failed", "--db", url, "--json"]);
    expect(JSON.parse(all.stdout)).toEqual({ retried: 1, skipped: 0 });

    const states = (await taskRows(database)).map((row) => row.state);
    expect(states).toEqual(["pending", "pending", "pending"]);
  });

  test("retry of a pending task fails with status 1 and one line", async () => {
    const { database, url } = seededDatabase();
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    const id = await perform(mail, 1);

    const result = tasklite(["retry", id, "--db", url]);

    expect(result.status).toBe(1);
    expect(result.stderr).toBe(
      `tasklite retry: Cannot retry task "${id}": it is pending, and only failed or cancelled tasks can be retried\n`,
    );
  });

  test("cancel cancels a pending task and rejects an unknown id", async () => {
    const { database, url } = seededDatabase();
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    const id = await perform(mail, 1, { delay: "1h" });

    const result = tasklite(["cancel", id, "--db", url]);
    expect(result).toMatchObject({ status: 0, stdout: `Task ${id} is cancelled\n` });
    expect((await taskRows(database))[0].state).toBe("cancelled");

    const unknown = tasklite(["cancel", "nope", "--db", url]);
    expect(unknown.status).toBe(1);
    expect(unknown.stderr).toBe(
      'tasklite cancel: Cannot cancel task "nope": no task has this id\n',
    );
  });

  test("purge deletes finished tasks older than the duration", async () => {
    const { database, url } = seededDatabase();
    await insertFailed(database, "day-old", "a", Date.now() - 86_400_000);
    const mail = defineDatabaseTask(database, { name: "mail", process() {} });
    const pending = await perform(mail, 1);

    const kept = tasklite(["purge", "--state", "failed", "--older-than", "2d", "--db", url]);
    expect(kept).toMatchObject({ status: 0, stdout: "Deleted 0 failed tasks\n" });
    const deleted = tasklite(["purge", "--state=failed", "--older-than=1h", "--db", url, "--json"]);
    expect(JSON.parse(deleted.stdout)).toEqual({ deleted: 1 });

    expect((await taskRows(database)).map((row) => row.id)).toEqual([pending]);
  });

  test("schedules reports a database without schedules", async () => {
    const { database, directory } = seededDatabase();
    await database.ready();
    const result = tasklite(["schedules"], { cwd: directory });

    expect(result.status).toBe(0);
    expect(result.stdout).toBe("No schedules in file:tasks.db\n");
  });

  test("schedules lists the stored schedules", async () => {
    const { database, url } = seededDatabase();
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await schedule(report, "0 3 * * *", undefined, {
      name: "nightly-report",
      timezone: "Europe/Berlin",
      catchUp: "all",
      maxCatchUp: 5,
    });
    const [stored] = await listSchedules(database);

    const table = tasklite(["schedules", "--db", url]);
    expect(table.status).toBe(0);
    const lines = table.stdout.trimEnd().split("\n");
    expect(lines[0].split(/\s{2,}/)).toEqual([
      "NAME",
      "TASK",
      "PATTERN",
      "TIME ZONE",
      "LAST TICK",
      "NEXT TICK",
      "CATCH-UP",
    ]);
    const nextTick = `${stored.nextFireAt!.toISOString().slice(0, 19).replace("T", " ")}Z`;
    // The last tick is empty before the first one, so the row has one column fewer.
    expect(lines[1].split(/\s{2,}/)).toEqual([
      "nightly-report",
      "report",
      "0 3 * * *",
      "Europe/Berlin",
      nextTick,
      "all (up to 5)",
    ]);

    const json = JSON.parse(tasklite(["schedules", "--db", url, "--json"]).stdout);
    expect(json).toEqual([JSON.parse(JSON.stringify(stored))]);
  });

  test("run runs a task directory and stops gracefully on SIGTERM", async () => {
    const root = temporaryDirectory();
    const directory = join(root, "tasks");
    mkdirSync(directory);
    const url = `file:${join(root, "app.db")}`;
    writeFileSync(
      join(directory, "slow.ts"),
      `import { defineDatabaseTask, openDatabase } from ${JSON.stringify(library)};
const database = openDatabase(process.env.TASKLITE_DB);
export default defineDatabaseTask<number>(database, {
  async process({ data }) {
    console.log("started " + data);
    await new Promise((resolve) => setTimeout(resolve, data));
    console.log("finished " + data);
  },
});
`,
    );
    const child = spawn(process.execPath, [cli, "run", directory, "--db", url], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));

    try {
      const database = open(url);
      const slow = defineDatabaseTask<number>(database, { name: "slow", process() {} });
      await waitFor(() => output.includes("tasklite: running 1 task: slow"));
      await perform(slow, 10);
      await waitFor(() => output.includes("finished 10"));
      await perform(slow, 300);
      await waitFor(() => output.includes("started 300"));

      child.kill("SIGTERM");

      expect(await exited).toBe(0);
      expect(output).toContain("received SIGTERM, stopping");
      expect(output).toContain("finished 300");
      expect(await taskRows(database)).toEqual([]);
    } finally {
      child.kill("SIGKILL");
    }
  });

  test("run names a directory that does not exist", () => {
    const result = tasklite(["run", "no-such-dir"]);

    expect(result.status).toBe(1);
    expect(result.stderr).toStartWith("tasklite run: Task directory ");
    expect(result.stderr).toContain("not found");
    expect(result.stderr.trimEnd().split("\n")).toHaveLength(1);
  });
});
