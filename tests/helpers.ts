import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach } from "bun:test";
import type { Client } from "@libsql/client";
import {
  type Database,
  type DatabaseOptions,
  type Logger,
  openDatabase,
  type Runner,
  runTasks,
} from "../mod.ts";

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

/** A child process whose standard output is collected line by line. */
export interface ChildProcess {
  readonly process: import("node:child_process").ChildProcess;
  /** Every line printed so far. */
  readonly lines: string[];
  /** Resolves with the first printed line that contains `text`. */
  waitForLine(text: string, timeout?: number): Promise<string>;
  /** Resolves with the exit code (or the signal) once the process has ended. */
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
}

const fixtures = new URL("./fixtures/", import.meta.url);

/** Starts `tests/fixtures/child-runner.ts` in its own process, with the current runtime. */
export function startChildRunner(url: string, options: Record<string, unknown>): ChildProcess {
  const child = spawn(
    process.execPath,
    [fileURLToPath(new URL("child-runner.ts", fixtures)), url, JSON.stringify(options)],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines: string[] = [];
  let buffer = "";
  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (chunk: string) => {
    buffer += chunk;
    const parts = buffer.split("\n");
    buffer = parts.pop()!;
    lines.push(...parts);
  });
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) =>
    child.on("exit", (code, signal) => resolve({ code, signal }))
  );
  children.push(child);
  return {
    process: child,
    lines,
    waitForLine: (text, timeout = 10_000) =>
      waitFor(() => lines.find((line) => line.includes(text)), {
        timeout,
        message: `a line containing ${JSON.stringify(text)} (got ${JSON.stringify(lines)})`,
      }),
    exited,
  };
}

const children: import("node:child_process").ChildProcess[] = [];

/**
 * Kills every child runner that is still alive. Call it in `afterEach`: bun runs every test
 * file in one process, so an `afterAll` here would only apply to the first file that imports
 * this module. A child whose parent died also ends, when its standard input closes.
 */
export function killChildRunners(): void {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
}

/**
 * Returns `open` and `start` functions whose databases and runners are closed and stopped
 * after each test of the calling file, together with its child runners, so that a failing test
 * still cleans up, and `keep`, which does the same for a database or runner made elsewhere.
 * Call it at the top level of a test file.
 */
export function useResources(): {
  open(url?: string | Client, options?: DatabaseOptions): Database;
  start(...args: Parameters<typeof runTasks>): Promise<Runner>;
  keep<T extends Database | Runner>(resource: T): T;
} {
  const runners: Runner[] = [];
  const databases: Database[] = [];
  afterEach(async () => {
    killChildRunners();
    for (const runner of runners.splice(0)) await runner.stop({ timeout: 100 });
    for (const database of databases.splice(0)) database.close();
  });
  const keep = <T extends Database | Runner>(resource: T): T => {
    if ("stop" in resource) runners.push(resource);
    else databases.push(resource);
    return resource;
  };
  return {
    open(url = temporaryDatabaseUrl(), options = {}) {
      return keep(openDatabase(url, options));
    },
    async start(tasks, options) {
      return keep(await runTasks(tasks, { logger: captureLogger(), ...options }));
    },
    keep,
  };
}
