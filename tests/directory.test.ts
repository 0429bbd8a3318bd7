import { afterEach, describe, expect, test } from "bun:test";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { openDatabase, perform, type Runner, runTasks } from "../mod.ts";
import { captureLogger, taskRows, temporaryDirectory, waitFor } from "./helpers.ts";

const library = new URL("../mod.ts", import.meta.url).href;
const runners: Runner[] = [];

afterEach(async () => {
  for (const runner of runners.splice(0)) await runner.stop({ timeout: 100 });
});

/**
 * Writes a task directory whose modules share `_database.ts` and append each run's data to a
 * `runs` table, and returns its path and database URL.
 */
function taskDirectory(files: Record<string, string>): { directory: string; url: string } {
  const root = temporaryDirectory();
  const directory = join(root, "tasks");
  mkdirSync(directory);
  const url = `file:${join(root, "app.db")}`;
  writeFileSync(
    join(directory, "_database.ts"),
    `import { openDatabase } from ${JSON.stringify(library)};\n` +
      `export const database = openDatabase(${JSON.stringify(url)});\n`,
  );
  for (const [name, source] of Object.entries(files)) writeFileSync(join(directory, name), source);
  return { directory, url };
}

const recordingTask = (name?: string) =>
  `import { defineDatabaseTask } from ${JSON.stringify(library)};
import { database } from "./_database.ts";
export default defineDatabaseTask(database, {
  ${name ? `name: ${JSON.stringify(name)},` : ""}
  async process({ name, data }) {
    await database.client.execute("CREATE TABLE IF NOT EXISTS runs (task TEXT, data TEXT)");
    await database.client.execute({ sql: "INSERT INTO runs VALUES (?, ?)", args: [name, JSON.stringify(data)] });
  },
});
`;

describe("runTasks(directory)", () => {
  test("loads .ts, .mts, .js and .mjs modules and names tasks after their files", async () => {
    const { directory } = taskDirectory({
      "double-opt-in.ts": recordingTask(),
      "reminder.mts": recordingTask(),
      "cleanup.js": recordingTask(),
      "report.mjs": recordingTask(),
    });
    const runner = await runTasks(directory, { logger: captureLogger() });
    runners.push(runner);
    expect(runner.tasks).toEqual(["cleanup", "double-opt-in", "reminder", "report"]);
  });

  test("runs tasks performed through the loaded modules", async () => {
    const { directory, url } = taskDirectory({ "welcome.ts": recordingTask() });
    const runner = await runTasks(directory, { logger: captureLogger() });
    runners.push(runner);

    const { default: welcome } = await import(join(directory, "welcome.ts"));
    await perform(welcome, { user: 7 });

    const database = openDatabase(url);
    const runs = await waitFor(async () => {
      const result = await database.client.execute("SELECT * FROM runs").catch(() => undefined);
      return result && result.rows.length > 0 ? result.rows : undefined;
    });
    expect(runs.map((row) => [row.task, row.data])).toEqual([["welcome", '{"user":7}']]);
    await waitFor(async () => (await taskRows(database)).length === 0);
    database.close();
  });

  test("skips tests, declarations, helpers, dotfiles and other extensions", async () => {
    const { directory } = taskDirectory({
      "real.ts": recordingTask(),
      "real.test.ts": "throw new Error('tests must not be loaded');",
      "real.spec.js": "throw new Error('specs must not be loaded');",
      "types.d.ts": "export type X = 1;",
      "_helper.ts": "throw new Error('helpers must not be loaded');",
      ".hidden.ts": "throw new Error('dotfiles must not be loaded');",
      "notes.md": "# not code",
      "data.json": "{}",
    });
    mkdirSync(join(directory, "nested"));
    writeFileSync(join(directory, "nested", "deep.ts"), "throw new Error('no recursion');");
    const runner = await runTasks(directory, { logger: captureLogger() });
    runners.push(runner);
    expect(runner.tasks).toEqual(["real"]);
  });

  test("a module that fails to load is named in the error", async () => {
    const { directory } = taskDirectory({
      "good.ts": recordingTask(),
      "broken.ts": "import './does-not-exist.ts';\nexport default 1;",
    });
    await expect(runTasks(directory)).rejects.toThrow(
      `Cannot load task module ${JSON.stringify(join(directory, "broken.ts"))}:`,
    );
  });

  for (
    const [label, source] of [
      ["one syntax error", "const ok = 1;\nconst x = ;\nexport default x;\n"],
      ["several syntax errors", "const ok = 1;\nexport default {{{\n"],
    ]
  ) {
    test(`reports the position of ${label}`, async () => {
      const { directory } = taskDirectory({ "typo.ts": source });
      const error = await runTasks(directory).catch((error) => error as Error);
      expect(error.message).toStartWith(
        `Cannot load task module ${JSON.stringify(join(directory, "typo.ts"))}: `,
      );
      // Bun gives the position as data; Deno writes it into the message as "typo.ts:2:11".
      if ("Bun" in globalThis) expect(error.message).toMatch(/\(line 2, column \d+\)/);
      else expect(error.message).toMatch(/typo\.ts:2:\d+/);
    });
  }

  test("a module that throws while loading is named in the error", async () => {
    const { directory } = taskDirectory({ "explodes.ts": "throw new Error('config missing');" });
    const error = await runTasks(directory).catch((error) => error as Error);
    expect(error.message).toBe(
      `Cannot load task module ${JSON.stringify(join(directory, "explodes.ts"))}: config missing`,
    );
    expect((error.cause as Error).message).toBe("config missing");
  });

  test("a module without a task as default export is named in the error", async () => {
    const { directory } = taskDirectory({
      "named-export.ts": `import { defineDatabaseTask } from ${JSON.stringify(library)};
import { database } from "./_database.ts";
export const task = defineDatabaseTask(database, { process() {} });`,
    });
    await expect(runTasks(directory)).rejects.toThrow(
      `Task module ${JSON.stringify(join(directory, "named-export.ts"))} does not export a task: ` +
        `its default export is undefined. Add "export default defineDatabaseTask(database, { ... })".`,
    );
  });

  test("two modules defining one name are both named in the error", async () => {
    const { directory } = taskDirectory({
      "a.ts": recordingTask("same"),
      "b.ts": recordingTask("same"),
    });
    await expect(runTasks(directory)).rejects.toThrow(
      `Two tasks are named "same" on one database (in ${join(directory, "a.ts")} and ${
        join(directory, "b.ts")
      })`,
    );
  });

  test("a worker module inside the directory it runs is rejected instead of hanging", async () => {
    // Importing the worker would wait for its own top-level await forever.
    const { directory } = taskDirectory({
      "worker.ts": `import { runTasks } from ${JSON.stringify(library)};
await runTasks(import.meta.dirname);`,
    });
    await expect(import(join(directory, "worker.ts"))).rejects.toThrow(
      `runTasks() was called from ${
        JSON.stringify(join(directory, "worker.ts"))
      }, which is in the task directory it loads`,
    );
  });

  test("a missing directory says where it looked", async () => {
    const missing = join(temporaryDirectory(), "nope");
    await expect(runTasks(missing)).rejects.toThrow(
      `Task directory ${JSON.stringify(missing)} not found`,
    );
  });

  test("a file instead of a directory is rejected", async () => {
    const { directory } = taskDirectory({ "one.ts": recordingTask() });
    await expect(runTasks(join(directory, "one.ts"))).rejects.toThrow(
      "is a file: pass its directory",
    );
  });

  test("a directory without task modules is rejected", async () => {
    const empty = temporaryDirectory();
    writeFileSync(join(empty, "_shared.ts"), "export {};");
    await expect(runTasks(empty)).rejects.toThrow(
      `Task directory ${JSON.stringify(empty)} has no task modules`,
    );
  });
});
