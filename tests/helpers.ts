import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Database, Logger } from "../mod.ts";

const directories: string[] = [];

/** Removes the directories that `temporaryDirectory` created. tests/setup.ts calls it once. */
export function removeTemporaryDirectories(): void {
  for (const directory of directories.splice(0)) {
    rmSync(directory, { recursive: true, force: true });
  }
}

/** Creates a temporary directory that is removed after the test file. */
export function temporaryDirectory(prefix = "tasklite-"): string {
  const directory = mkdtempSync(join(tmpdir(), prefix));
  directories.push(directory);
  return directory;
}

/** A `file:` URL of a new database file in a temporary directory. */
export function temporaryDatabaseUrl(): string {
  return `file:${join(temporaryDirectory(), "tasks.db")}`;
}

/** Polls `condition` every few milliseconds until it returns a truthy value or time runs out. */
export async function waitFor<T>(
  condition: () => T | Promise<T>,
  { timeout = 5_000, interval = 5, message = "condition" } = {},
): Promise<T> {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${timeout} ms waiting for ${message}`);
    }
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

export interface LogLine {
  level: "debug" | "info" | "warn" | "error";
  message: string;
  fields?: Record<string, unknown>;
}

/** A logger that records every line instead of printing it. */
export function captureLogger(): Logger & {
  lines: LogLine[];
  messages(level?: LogLine["level"]): string[];
} {
  const lines: LogLine[] = [];
  const record = (level: LogLine["level"]) => (message: string, fields?: Record<string, unknown>) =>
    void lines.push({ level, message, fields });
  return {
    lines,
    debug: record("debug"),
    info: record("info"),
    warn: record("warn"),
    error: record("error"),
    messages: (level) =>
      lines.filter((line) => !level || line.level === level).map((line) => line.message),
  };
}

/** Every row of the tasks table, oldest first. */
export async function taskRows(database: Database): Promise<Array<Record<string, unknown>>> {
  await database.ready();
  const result = await database.client.execute("SELECT * FROM tasks ORDER BY rowid");
  return result.rows.map((row) => ({ ...row }));
}

/** The number of rows per state. */
export async function countByState(database: Database): Promise<Record<string, number>> {
  await database.ready();
  const result = await database.client.execute(
    "SELECT state, count(*) AS n FROM tasks GROUP BY state",
  );
  return Object.fromEntries(result.rows.map((row) => [row.state as string, row.n as number]));
}
