import { afterEach, describe, expect, test } from "bun:test";
import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  type Runner,
  runTasks,
} from "../mod.ts";
import { captureLogger, taskRows, temporaryDatabaseUrl, waitFor } from "./helpers.ts";

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
        lease: 300,
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
    await sleep(1_000);

    await database.client.execute("DROP TRIGGER keep_rows");
    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(runs).toBe(1);
    expect(logger.messages("error")[0]).toStartWith('Task "kept": database error, retrying in');
    expect(logger.messages("error")[0]).toEndWith("deletes are blocked");
    expect(rescuerLogger.messages("warn")).toEqual([]);
  });
});
