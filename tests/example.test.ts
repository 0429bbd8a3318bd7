import { describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { cpSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { openDatabase } from "../mod.ts";
import { temporaryDirectory } from "./helpers.ts";

const root = fileURLToPath(new URL("../", import.meta.url));

/** Copies the newsletter example into a new folder, so that it writes its own database there. */
function copyExample(): string {
  const directory = temporaryDirectory("tasklite-example-");
  cpSync(join(root, "mod.ts"), join(directory, "mod.ts"));
  symlinkSync(join(root, "node_modules"), join(directory, "node_modules"), "dir");
  cpSync(join(root, "examples", "newsletter"), join(directory, "examples", "newsletter"), {
    recursive: true,
    filter: (source) => !/newsletter\.db|outbox/.test(source),
  });
  return directory;
}

function runExample(directory: string): string {
  const result = spawnSync(process.execPath, [join(directory, "examples/newsletter/main.ts")], {
    encoding: "utf8",
    timeout: 30_000,
  });
  expect(result.status).toBe(0);
  return result.stdout;
}

describe("the newsletter example", () => {
  test("runs every task, then adds none on a second run", async () => {
    const directory = copyExample();

    const first = runExample(directory);
    expect(first).toContain("Imported 240 contacts from contacts.csv");
    expect(first).toContain("Performed 236 double opt-ins and reminders; rejected 4 contacts:");
    expect(first).toContain("Opt-ins sent:    230 (all runs)");
    expect(first).toMatch(/Reminders sent: {2}[1-9]\d* \(all runs\)/);
    expect(first).toContain("Failed tasks:    6 double-opt-in (6 addresses bounced)");

    const second = runExample(directory);
    expect(second).toContain("Performed 0 double opt-ins and reminders; rejected 4 contacts:");
    expect(second).toContain("Failed tasks:    6 double-opt-in (6 addresses bounced)");

    const database = openDatabase(`file:${join(directory, "examples/newsletter/newsletter.db")}`);
    const rows = await database.client.execute(
      "SELECT name, state, count(*) AS count FROM tasks GROUP BY name, state",
    );
    database.close();
    expect(rows.rows.map((row) => [row.name, row.state, row.count])).toEqual([
      ["double-opt-in", "failed", 6],
    ]);
  });
});
