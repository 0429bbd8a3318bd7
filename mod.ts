/**
 * tasklite is a durable task queue that keeps its tasks in the application's own SQLite
 * database through libSQL, and runs the same code under Node.js, Bun and Deno.
 *
 * A task is a definition: a name, a `process` function and options. `perform` writes a row to
 * the `tasks` table; a runner claims due rows under a lease, runs them, and deletes the row of
 * each successful run. A failed run is retried with backoff until `maxAttempts` is reached, and
 * then the row stays with `state = 'failed'` and its last error.
 *
 * @example Define, perform and run a task
 * ```ts
 * import { defineDatabaseTask, openDatabase, perform, runTasks } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const greet = defineDatabaseTask<{ name: string }>(database, {
 *   name: "greet",
 *   async process({ data }) {
 *     console.log(`Hello, ${data.name}`);
 *   },
 * });
 *
 * await perform(greet, { name: "Ada" }, { delay: "1s" });
 * const runner = await runTasks([greet]);
 * // ... later, before the process ends:
 * await runner.stop();
 * database.close();
 * ```
 *
 * @module
 */

import {
  type Client,
  createClient,
  type InStatement,
  LibsqlError,
  type ResultSet,
  type Row,
} from "@libsql/client";
import * as v from "valibot";
import { readdir, stat } from "node:fs/promises";
import { basename, extname, join, resolve as resolvePath } from "node:path";
import { setImmediate } from "node:timers";
import { fileURLToPath, pathToFileURL } from "node:url";

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/**
 * A length of time: milliseconds as a number, or a number followed by a unit: `"500ms"`,
 * `"30s"`, `"5m"`, `"1h"` or `"2d"`.
 */
export type Duration = number | `${number}${"ms" | "s" | "m" | "h" | "d"}`;

/**
 * A logger with the four methods of `console`. Each call gets a readable message and an object
 * with the fields it mentions (task name, id, attempt, duration in ms).
 */
export interface Logger {
  /** Logs a message that is only useful while debugging. */
  debug(message: string, fields?: Record<string, unknown>): void;
  /** Logs a start, stop or another normal event. */
  info(message: string, fields?: Record<string, unknown>): void;
  /** Logs a problem that the queue works around, such as a lost lease. */
  warn(message: string, fields?: Record<string, unknown>): void;
  /** Logs an error that the queue caught and did not rethrow. */
  error(message: string, fields?: Record<string, unknown>): void;
}

/** Options of {@linkcode openDatabase}. */
export interface DatabaseOptions {
  /**
   * How long a statement waits for another connection's write lock before it fails with
   * `SQLITE_BUSY`. Applies to local files that tasklite opens itself; for a client you pass in,
   * create it with `createClient({ url, timeout })`.
   *
   * @default {"5s"}
   */
  busyTimeout?: Duration;
  /** Authentication token for a remote libSQL server (`libsql://`, `http(s)://`). */
  authToken?: string;
  /**
   * The clock that timestamps rows, decides when tasks are due and computes backoff, in
   * milliseconds since the epoch. Tests pass a fake clock; timers still use real time.
   *
   * @default {Date.now}
   */
  now?: () => number;
  /**
   * How often a runner checks a local database file for rows written by other processes, using
   * `PRAGMA data_version`. Lower values pick up tasks from other processes sooner and cost a
   * little more CPU while idle.
   *
   * @default {"25ms"}
   */
  watchInterval?: Duration;
}

/**
 * A tasklite database: a libSQL client with the `tasks` table in place. Create it with
 * {@linkcode openDatabase}.
 */
export interface Database {
  /** The libSQL client. Use it for the application's own queries on the same database. */
  readonly client: Client;
  /** The URL that the database was opened with, or `undefined` when a client was passed in. */
  readonly url: string | undefined;
  /** Whether {@linkcode Database.close} was called. */
  readonly closed: boolean;
  /**
   * Creates or migrates the schema on first use and resolves when it is in place. Every other
   * operation calls it, so calling it directly is only needed to surface errors early.
   *
   * @throws {Error} When the database cannot be opened or migrated.
   */
  ready(): Promise<void>;
  /**
   * Closes the client if tasklite created it. A client passed to {@linkcode openDatabase} stays
   * open. Stop runners with {@linkcode Runner.stop} first: nothing is written after `close()`.
   */
  close(): void;
}

/** What {@linkcode TaskDefinition.process} receives for one attempt. */
export interface TaskContext<T> {
  /** The task's name. */
  readonly name: string;
  /** The task's id, as returned by {@linkcode perform}. */
  readonly id: string;
  /** The data passed to {@linkcode perform}, after the task's `schema` parsed it. */
  readonly data: T;
  /** The number of this attempt, starting at 1. */
  readonly attempt: number;
  /** The attempt budget of the task. */
  readonly maxAttempts: number;
  /**
   * Fires when the attempt must end: at its `timeout` (reason: a `TimeoutError`), when the
   * runner lost the task's lease, or when {@linkcode Runner.stop} gave up waiting (reason: an
   * `AbortError`). Pass it to `fetch` and other cancellable calls.
   */
  readonly signal: AbortSignal;
}

/** What {@linkcode TaskDefinition.success} receives after a successful attempt was recorded. */
export interface SuccessContext<T> {
  /** The task's name. */
  readonly name: string;
  /** The task's id. */
  readonly id: string;
  /** The task's data, after the task's `schema` parsed it. */
  readonly data: T;
  /** The attempt that succeeded, starting at 1. */
  readonly attempt: number;
}

/** What {@linkcode TaskDefinition.failed} receives after the last attempt failed. */
export interface FailedContext<T> {
  /** The task's name. */
  readonly name: string;
  /** The task's id. Its row stays in the table with `state = 'failed'`. */
  readonly id: string;
  /** The task's data, after the task's `schema` parsed it. */
  readonly data: T;
  /** The error of the last attempt. */
  readonly error: Error;
  /** The number of attempts made. */
  readonly attempts: number;
}

/**
 * A function that returns how long to wait before the next attempt, given the number of the
 * attempt that just failed (starting at 1) and its error.
 */
export type BackoffFunction = (attempt: number, error: Error) => Duration;

/** A valibot schema for a task's data, synchronous or asynchronous. */
// deno-lint-ignore no-explicit-any
export type DataSchema<TInput = any, TOutput = TInput> =
  | v.GenericSchema<TInput, TOutput>
  | v.GenericSchemaAsync<TInput, TOutput>;

/** The definition of a task, passed to {@linkcode defineDatabaseTask}. */
export interface TaskDefinition<T> {
  /**
   * The task's name, which is stored in each row. Defaults to the file name, without extension,
   * of the module that calls `defineDatabaseTask`: `app/tasks/double-opt-in.ts` defines
   * `double-opt-in`.
   */
  name?: string;
  /**
   * A valibot schema for the data. {@linkcode perform} rejects data that fails it and writes
   * nothing; the runner parses the stored data with it again before `process`.
   */
  schema?: DataSchema<unknown, T>;
  /**
   * The maximum number of this task's attempts that one runner claims and runs at a time.
   *
   * @default {5}
   */
  batchSize?: number;
  /**
   * How often an idle runner looks for due tasks and expired leases. A `perform` in the same
   * process, a write by another process to a local file and the due time of a delayed task wake
   * the runner sooner.
   *
   * @default {"1s"}
   */
  pollInterval?: Duration;
  /**
   * The number of attempts before the task becomes `failed`.
   *
   * @default {5}
   */
  maxAttempts?: number;
  /**
   * The wait before a retry: a fixed duration or a {@linkcode BackoffFunction}. The default
   * doubles from 1 second (1 s, 2 s, 4 s, ...) up to 1 hour, with ±25 % random jitter.
   */
  backoff?: Duration | BackoffFunction;
  /**
   * The maximum duration of one attempt. At the deadline the attempt's `signal` fires and the
   * attempt fails with a `TimeoutError`.
   *
   * @default {"5m"}
   */
  timeout?: Duration;
  /**
   * How long a claim stays valid without renewal. A runner renews the lease of each running
   * attempt every third of this, so a task whose process died becomes claimable again about one
   * lease after its last renewal.
   *
   * @default {"30s"}
   */
  lease?: Duration;
  /** Runs one attempt. A thrown error or a rejected promise fails the attempt. */
  process(context: TaskContext<T>): void | Promise<void>;
  /**
   * Runs after a successful attempt was recorded (and the row deleted). An error it throws is
   * logged, and the task is not run again.
   */
  success?(context: SuccessContext<T>): void | Promise<void>;
  /**
   * Runs once, after the last attempt failed and the row became `failed`. An error it throws
   * is logged. It does not run for rows whose stored data cannot be decoded.
   */
  failed?(context: FailedContext<T>): void | Promise<void>;
}

/**
 * A task: the value that {@linkcode defineDatabaseTask} returns and that {@linkcode perform}
 * and {@linkcode runTasks} take.
 */
export interface Task<T> {
  /** The task's name. */
  readonly name: string;
  /** The database that stores the task's rows. */
  readonly database: Database;
  /** Phantom field that carries the data type; it has no value at run time. */
  readonly __data?: T;
}

/** Options of {@linkcode perform} and {@linkcode performMany}. */
export interface PerformOptions {
  /** Wait this long before the task becomes due. Cannot be combined with `runAt`. */
  delay?: Duration;
  /** When the task becomes due, as a `Date` or milliseconds since the epoch. */
  runAt?: Date | number;
  /**
   * Higher runs first among due tasks of the same name.
   *
   * @default {0}
   */
  priority?: number;
}

/** Options of {@linkcode Runner.stop}. */
export interface StopOptions {
  /**
   * How long to wait for running attempts. After it, their signals fire and their leases are
   * released, so another runner can claim them at once; a released attempt does not count
   * against `maxAttempts`.
   *
   * @default {"30s"}
   */
  timeout?: Duration;
}

/** Options of {@linkcode runTasks}. */
export interface RunTasksOptions {
  /**
   * Log each claim, success and failure at debug level, with task name and id.
   *
   * @default {false}
   */
  debug?: boolean;
  /**
   * Where log lines go. Warnings and errors are always logged; starts and stops at info level;
   * claims and results only with `debug`.
   *
   * @default {console}
   */
  logger?: Logger;
  /** Stops the runners when it aborts, as {@linkcode Runner.stop} does. */
  signal?: AbortSignal;
  /**
   * Stop gracefully on SIGINT and SIGTERM. A second signal ends the process at once.
   *
   * @default {false}
   */
  handleSignals?: boolean;
  /**
   * The timeout of the stop that `signal` or `handleSignals` starts.
   *
   * @default {"30s"}
   */
  stopTimeout?: Duration;
}

/** The runners that {@linkcode runTasks} started, one for each task. */
export interface Runner {
  /** The names of the tasks that are being run. */
  readonly tasks: readonly string[];
  /**
   * Stops claiming, waits for running attempts (up to `timeout`), records their results, and
   * resolves when every attempt is settled. Calling it again returns the same promise.
   */
  stop(options?: StopOptions): Promise<void>;
  /** Resolves when the runners have stopped, whoever stopped them. */
  readonly stopped: Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Durations and validation
// ---------------------------------------------------------------------------------------------

const durationPattern = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;
const unitMilliseconds: Record<string, number> = {
  ms: 1,
  s: 1_000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};
const durationHint = 'milliseconds or a string such as "500ms", "30s", "5m", "1h" or "2d"';

/** Returns the milliseconds of a valid duration, or `undefined` for anything else. */
function toMilliseconds(value: unknown): number | undefined {
  if (typeof value === "number") {
    return Number.isFinite(value) && value >= 0 ? value : undefined;
  }
  if (typeof value !== "string") return undefined;
  const match = durationPattern.exec(value);
  if (match === null) return undefined;
  return Number(match[1]) * unitMilliseconds[match[2]];
}

/** A valibot schema that accepts a {@linkcode Duration} and outputs milliseconds. */
function durationSchema(maximum = Number.MAX_SAFE_INTEGER) {
  const expected = maximum === Number.MAX_SAFE_INTEGER
    ? `a duration (${durationHint})`
    : `a duration up to ${formatDuration(maximum)} (${durationHint})`;
  return v.pipe(
    v.custom<Duration>((value) => {
      const milliseconds = toMilliseconds(value);
      return milliseconds !== undefined && milliseconds <= maximum;
    }, expected),
    v.transform((value) => toMilliseconds(value) as number),
  );
}

/** Renders milliseconds for a message: "250 ms", "1.5 s", "5 min", "1 h", "2 d". */
function formatDuration(milliseconds: number): string {
  if (milliseconds < 1_000) return `${Math.round(milliseconds)} ms`;
  if (milliseconds < 60_000) return `${+(milliseconds / 1_000).toFixed(1)} s`;
  if (milliseconds < 3_600_000) return `${+(milliseconds / 60_000).toFixed(1)} min`;
  if (milliseconds < 172_800_000) return `${+(milliseconds / 3_600_000).toFixed(1)} h`;
  return `${+(milliseconds / 86_400_000).toFixed(1)} d`;
}

function integerSchema(minimum: number, maximum: number) {
  const expected = `an integer from ${minimum} to ${maximum}`;
  return v.pipe(
    v.number(expected),
    v.integer(expected),
    v.minValue(minimum, expected),
    v.maxValue(maximum, expected),
  );
}

/** Renders a value for an error message: strings quoted, objects as their kind. */
function describeValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "function") return "a function";
  if (typeof value === "symbol") return value.toString();
  if (value === null || typeof value !== "object") return String(value);
  if (Array.isArray(value)) return "an array";
  if (value instanceof Date) return `a Date (${value.toString()})`;
  const constructorName = Object.getPrototypeOf(value)?.constructor?.name;
  return constructorName && constructorName !== "Object" ? `a ${constructorName}` : "an object";
}

/**
 * Parses options with a valibot schema and throws an error that names the first invalid option,
 * its value and what is expected. A value of the wrong type throws a `TypeError`; a value of the
 * right type outside the allowed range throws a `RangeError`.
 */
function parseOptions<TSchema extends v.GenericSchema>(
  schema: TSchema,
  input: unknown,
  context: string,
): v.InferOutput<TSchema> {
  const result = v.safeParse(schema, input);
  if (result.success) return result.output;

  const issue = result.issues[0];
  const key = issue.path?.map((item) => String(item.key)).join(".");
  if (key === undefined) {
    throw new TypeError(
      `Invalid ${context} options: expected an object, received ${describeValue(input)}`,
    );
  }
  if (issue.type === "strict_object" || issue.type === "object") {
    // valibot reports an unknown key as expecting "never", and a missing key as expecting it.
    throw new TypeError(
      issue.expected === "never"
        ? `Unknown ${context} option "${key}": check its spelling`
        : `Missing ${context} option "${key}"`,
    );
  }
  // A number outside its range is a RangeError; a value of the wrong type or form a TypeError.
  const ErrorClass = issue.kind === "validation" && typeof issue.input === "number"
    ? RangeError
    : TypeError;
  const received = issue.path?.at(-1)?.value;
  throw new ErrorClass(
    `Invalid ${context} option "${key}": expected ${issue.message}, received ${
      describeValue(received)
    }`,
  );
}

/**
 * The error that {@linkcode perform} and {@linkcode performMany} throw when data fails the
 * task's schema. It is a valibot `ValiError`, so `issues` lists every problem with its path,
 * and the message names each one.
 */
export class TaskDataError extends v.ValiError<DataSchema> {
  /** The name of the task that rejected the data. */
  readonly task: string;

  /**
   * Creates the error from valibot issues.
   *
   * @param task The task's name.
   * @param issues The issues that valibot reported.
   * @param where Where the data was found, such as `data` or `items[3]`.
   */
  constructor(task: string, issues: v.ValiError<DataSchema>["issues"], where = "data") {
    super(issues);
    this.name = "TaskDataError";
    this.task = task;
    const problems = issues.map((issue) => {
      const path = v.getDotPath(issue);
      return `${path ? `${where}.${path}` : where}: ${issue.message}`;
    });
    this.message = `Invalid data for task "${task}": ${problems.join("; ")}`;
  }
}

function isIdentifier(key: string): boolean {
  return /^[A-Za-z_$][\w$]*$/.test(key);
}

/**
 * Returns why a value does not survive a JSON round trip unchanged, or `undefined` when it does.
 * `undefined` at the top level is allowed and stored as SQL NULL.
 */
function findJsonProblem(value: unknown, path: string, ancestors: object[]): string | undefined {
  switch (typeof value) {
    case "string":
    case "boolean":
      return undefined;
    case "number":
      return Number.isFinite(value)
        ? undefined
        : `${path} is ${value}, which JSON stores as null; use a finite number or null`;
    case "undefined":
      return `${path} is undefined, which JSON drops; omit the property or use null`;
    case "bigint":
      return `${path} is a BigInt, which JSON cannot store; convert it to a string or a number`;
    case "function":
      return `${path} is a function, which JSON cannot store; pass only data`;
    case "symbol":
      return `${path} is a symbol, which JSON cannot store; use a string`;
  }
  if (value === null) return undefined;

  const object = value as object;
  if (ancestors.includes(object)) {
    return `${path} refers back to one of its parents (a circular structure), which JSON cannot store`;
  }
  if (Array.isArray(object)) {
    ancestors.push(object);
    for (let index = 0; index < object.length; index++) {
      if (!(index in object)) {
        ancestors.pop();
        return `${path}[${index}] is an empty array slot, which JSON stores as null; fill it`;
      }
      const problem = findJsonProblem(object[index], `${path}[${index}]`, ancestors);
      if (problem !== undefined) {
        ancestors.pop();
        return problem;
      }
    }
    ancestors.pop();
    return undefined;
  }

  const prototype = Object.getPrototypeOf(object);
  if (object instanceof Date) {
    return `${path} is a Date, which JSON turns into a string; pass date.toISOString() or date.getTime()`;
  }
  if (prototype !== Object.prototype && prototype !== null) {
    return `${path} is ${
      describeValue(object)
    }, which JSON cannot store without losing its type; convert it to plain objects and arrays`;
  }
  if (Object.getOwnPropertySymbols(object).length > 0) {
    return `${path} has symbol keys, which JSON drops; use string keys`;
  }
  ancestors.push(object);
  for (const [key, item] of Object.entries(object)) {
    const itemPath = isIdentifier(key) ? `${path}.${key}` : `${path}[${JSON.stringify(key)}]`;
    const problem = findJsonProblem(item, itemPath, ancestors);
    if (problem !== undefined) {
      ancestors.pop();
      return problem;
    }
  }
  ancestors.pop();
  return undefined;
}

/**
 * Serialises task data to JSON, or to `null` for `undefined`.
 *
 * @throws {TypeError} When the data would not survive the round trip unchanged.
 */
function serializeData(data: unknown, task: string, where = "data"): string | null {
  if (data === undefined) return null;
  const problem = findJsonProblem(data, where, []);
  if (problem !== undefined) {
    throw new TypeError(`Invalid data for task "${task}": ${problem}`);
  }
  return JSON.stringify(data);
}

/** "1 task", "2 tasks". */
function countOf(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

/**
 * The default logger: the message alone on the matching `console` method. A logger passed in
 * also gets the fields object.
 */
const consoleLogger: Logger = {
  debug: (message) => console.debug(message),
  info: (message) => console.info(message),
  warn: (message) => console.warn(message),
  error: (message) => console.error(message),
};

/** Turns any thrown value into an `Error`, keeping the original as `cause`. */
function toError(thrown: unknown): Error {
  if (thrown instanceof Error) return thrown;
  let text: string;
  try {
    text = typeof thrown === "string" ? thrown : JSON.stringify(thrown) ?? String(thrown);
  } catch {
    text = String(thrown);
  }
  return new Error(`Non-error value thrown: ${text}`, { cause: thrown });
}

/** The text stored in `failed_error`: the stack (which starts with the message) and causes. */
function describeError(error: Error): string {
  let text = error.stack && error.stack.includes(error.message)
    ? error.stack
    : `${error.name}: ${error.message}${error.stack ? `\n${error.stack}` : ""}`;
  let cause = error.cause;
  for (let depth = 0; cause !== undefined && depth < 3; depth++) {
    const causeError = toError(cause);
    text += `\nCaused by: ${causeError.stack ?? `${causeError.name}: ${causeError.message}`}`;
    cause = causeError.cause;
  }
  return text;
}

// ---------------------------------------------------------------------------------------------
// Database and schema
// ---------------------------------------------------------------------------------------------

/*
 * States of a row in `tasks`:
 * - `pending`: waiting until `run_at`. `perform` inserts rows in this state; a runner moves a
 *   row back here after a failed attempt that has attempts left, when it stops before the
 *   attempt ends (releasing the lease), and when it finds a `running` row whose lease expired.
 * - `running`: claimed by the runner named in `locked_by` until `locked_until`. Only a claim
 *   moves a row here. The runner that holds the lease deletes the row after a success.
 * - `failed`: the last attempt failed, or the stored data could not be decoded. The row keeps
 *   its error in `failed_error` and is not run again.
 */

/** The schema version written to `PRAGMA user_version`. */
const schemaVersion = 1;

const taskColumns: Record<string, string> = {
  id: "TEXT PRIMARY KEY",
  name: "TEXT NOT NULL",
  data: "TEXT",
  created: "INTEGER NOT NULL",
  failed_last: "INTEGER",
  failed_nr: "INTEGER NOT NULL DEFAULT 0",
  failed_error: "TEXT",
  run_at: "INTEGER NOT NULL DEFAULT 0",
  state: "TEXT NOT NULL DEFAULT 'pending'",
  attempts: "INTEGER NOT NULL DEFAULT 0",
  locked_until: "INTEGER",
  locked_by: "TEXT",
  priority: "INTEGER NOT NULL DEFAULT 0",
  key: "TEXT",
};

/** The columns that plainweb's task table already has. */
const plainwebColumns = [
  "id",
  "name",
  "data",
  "created",
  "failed_last",
  "failed_nr",
  "failed_error",
];

const sql = {
  createTasks: `CREATE TABLE IF NOT EXISTS tasks (${
    Object.entries(taskColumns).map(([column, type]) => `${column} ${type}`).join(", ")
  })`,
  // The claim walks this index in claim order (name and state fixed, then priority, then
  // run_at, then rowid, which every index entry ends with), so it reads only the rows it takes
  // plus any higher-priority rows that are not yet due.
  createClaimIndex:
    "CREATE INDEX IF NOT EXISTS tasks_claim ON tasks (name, state, priority DESC, run_at)",
  // A key is unique per task name among pending and running rows only, so it is released when
  // the row reaches an end state.
  createKeyIndex: `CREATE UNIQUE INDEX IF NOT EXISTS tasks_key ON tasks (name, key)
    WHERE key IS NOT NULL AND state IN ('pending', 'running')`,
  tableColumns: "SELECT name FROM pragma_table_info('tasks')",
  userVersion: "PRAGMA user_version",
  setUserVersion: "PRAGMA user_version = 1",
  journalModeWal: "PRAGMA journal_mode = WAL",
  synchronousNormal: "PRAGMA synchronous = NORMAL",
  connectionState:
    "SELECT data_version, synchronous, timeout FROM pragma_data_version, pragma_synchronous, pragma_busy_timeout",

  insertOne: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
    VALUES (?, ?, ?, ?, ?, ?, 'pending')`,
  // One statement for many rows: each element of the JSON array is [id, name, data, created,
  // run_at, priority], and `data` is the JSON text of the task's data or null.
  insertMany: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, 'pending'
    FROM json_each(?)`,

  // One statement claims up to `limit` due rows and returns them. The subquery is materialised
  // before the update, so the rows are chosen and locked atomically.
  claim: `UPDATE tasks
    SET state = 'running', attempts = attempts + 1, locked_until = ?1, locked_by = ?2
    WHERE rowid IN (
      SELECT rowid FROM tasks
      WHERE name = ?3 AND state = 'pending' AND run_at <= ?4
      ORDER BY priority DESC, run_at, rowid
      LIMIT ?5)
    RETURNING id, data, attempts, run_at, priority, created`,
  // The earliest `run_at` of pending rows. The claim index is ordered by priority first, so the
  // query takes the minimum within each priority: one index seek per distinct priority instead
  // of a scan of every pending row.
  nextRunAt: `WITH RECURSIVE levels(priority) AS (
      SELECT max(priority) FROM tasks WHERE name = ?1 AND state = 'pending'
      UNION ALL
      SELECT (SELECT max(priority) FROM tasks
              WHERE name = ?1 AND state = 'pending' AND priority < levels.priority)
      FROM levels WHERE levels.priority IS NOT NULL)
    SELECT min((SELECT min(run_at) FROM tasks
                WHERE name = ?1 AND state = 'pending' AND priority = levels.priority)) AS run_at
    FROM levels WHERE levels.priority IS NOT NULL`,
  complete: `DELETE FROM tasks
    WHERE locked_by = ? AND state = 'running' AND id IN (SELECT value FROM json_each(?))
    RETURNING id`,
  retry: `UPDATE tasks
    SET state = 'pending', run_at = ?1, failed_last = ?2, failed_nr = coalesce(failed_nr, 0) + 1,
      failed_error = ?3, locked_until = NULL, locked_by = NULL
    WHERE id = ?4 AND locked_by = ?5 AND state = 'running'
    RETURNING id`,
  fail: `UPDATE tasks
    SET state = 'failed', failed_last = ?1, failed_nr = coalesce(failed_nr, 0) + 1,
      failed_error = ?2, locked_until = NULL, locked_by = NULL
    WHERE id = ?3 AND locked_by = ?4 AND state = 'running'
    RETURNING id`,
  renew: `UPDATE tasks SET locked_until = ?1
    WHERE locked_by = ?2 AND state = 'running'
    RETURNING id`,
  // A released attempt gives its attempt back: it ended because the runner stopped, not because
  // the task failed.
  release: `UPDATE tasks
    SET state = 'pending', attempts = max(attempts - 1, 0), locked_until = NULL, locked_by = NULL
    WHERE locked_by = ? AND state = 'running' AND id IN (SELECT value FROM json_each(?))
    RETURNING id`,
  // Running rows are few (at most the batch sizes of live runners), so scanning them through
  // the claim index is cheap.
  hasExpiredLease: `SELECT 1 FROM tasks
    WHERE name = ? AND state = 'running' AND locked_until < ? LIMIT 1`,
  rescue: `UPDATE tasks
    SET state = CASE WHEN attempts >= ?1 THEN 'failed' ELSE 'pending' END,
      run_at = ?2, failed_last = ?2, failed_nr = coalesce(failed_nr, 0) + 1, failed_error = ?3,
      locked_until = NULL, locked_by = NULL
    WHERE name = ?4 AND state = 'running' AND locked_until < ?2
    RETURNING id, data, state, attempts`,
  // The distinct names of pending rows, one index seek per name.
  pendingNames: `WITH RECURSIVE names(name) AS (
      SELECT min(name) FROM tasks WHERE state = 'pending'
      UNION ALL
      SELECT (SELECT min(name) FROM tasks WHERE state = 'pending' AND name > names.name)
      FROM names WHERE names.name IS NOT NULL)
    SELECT name FROM names WHERE name IS NOT NULL`,
} as const;

/** A row to insert. `data` is JSON text or null. */
interface NewTaskRow {
  id: string;
  name: string;
  data: string | null;
  created: number;
  runAt: number;
  priority: number;
}

/** A row that a claim returned. */
interface ClaimedRow {
  id: string;
  data: string | null;
  attempts: number;
  runAt: number;
  priority: number;
  created: number;
}

/** A result to record for a running row, fenced by the claim's token. */
type Settlement =
  | { kind: "complete"; id: string; token: string }
  | { kind: "retry"; id: string; token: string; runAt: number; now: number; error: string }
  | { kind: "fail"; id: string; token: string; now: number; error: string };

/** A row that the lease rescue moved, with the state it moved to. */
interface RescuedRow {
  id: string;
  data: string | null;
  state: "pending" | "failed";
  attempts: number;
}

const busyCodes = new Set(["SQLITE_BUSY", "SQLITE_LOCKED"]);

function isBusyError(error: unknown): boolean {
  if (!(error instanceof LibsqlError)) return false;
  return busyCodes.has(error.code) ||
    (error.extendedCode !== undefined && /^SQLITE_(BUSY|LOCKED)/.test(error.extendedCode));
}

function isTransactionActiveError(error: unknown): boolean {
  return error instanceof LibsqlError && error.code === "TRANSACTION_ACTIVE";
}

const sleep = (milliseconds: number) =>
  new Promise<void>((resolve) => setTimeout(resolve, milliseconds));

/**
 * The SQLite statements of the queue. Every statement of the runner and of `perform` goes
 * through this class, so a second engine needs a second implementation of it and nothing else.
 */
class SqliteStorage {
  readonly #client: Client;

  constructor(client: Client) {
    this.#client = client;
  }

  /**
   * Runs statements, as one immediate ("write") transaction when there are several, and
   * retries a busy error or a transaction held by another caller of a single-connection client,
   * with jittered backoff, for up to about 10 seconds.
   */
  async run(statements: InStatement[]): Promise<ResultSet[]> {
    for (let attempt = 1;; attempt++) {
      try {
        if (statements.length === 1) return [await this.#client.execute(statements[0])];
        return await this.#client.batch(statements, "write");
      } catch (error) {
        const retriable = isBusyError(error) || isTransactionActiveError(error);
        if (!retriable || attempt >= 40) throw error;
        await sleep(Math.min(500, 2 ** attempt) * (0.5 + Math.random()));
      }
    }
  }

  async execute(statement: InStatement): Promise<ResultSet> {
    const [result] = await this.run([statement]);
    return result;
  }

  async insert(rows: NewTaskRow[]): Promise<void> {
    if (rows.length === 1) {
      const row = rows[0];
      await this.execute({
        sql: sql.insertOne,
        args: [row.id, row.name, row.data, row.created, row.runAt, row.priority],
      });
      return;
    }
    // SQLite's string limit is far above this, but one huge JSON argument holds the whole batch
    // in memory twice, so large batches are split into statements of one transaction.
    const chunkSize = 10_000;
    const statements: InStatement[] = [];
    for (let start = 0; start < rows.length; start += chunkSize) {
      const chunk = rows.slice(start, start + chunkSize).map((row) => [
        row.id,
        row.name,
        row.data,
        row.created,
        row.runAt,
        row.priority,
      ]);
      statements.push({ sql: sql.insertMany, args: [JSON.stringify(chunk)] });
    }
    await this.run(statements);
  }

  async claim(
    name: string,
    limit: number,
    now: number,
    lockedUntil: number,
    token: string,
  ): Promise<ClaimedRow[]> {
    const result = await this.execute({
      sql: sql.claim,
      args: [lockedUntil, token, name, now, limit],
    });
    const rows = result.rows.map((row): ClaimedRow => ({
      id: row.id as string,
      data: row.data as string | null,
      attempts: row.attempts as number,
      runAt: row.run_at as number,
      priority: row.priority as number,
      created: row.created as number,
    }));
    // RETURNING lists rows in the order they were updated, not in claim order.
    rows.sort((a, b) => b.priority - a.priority || a.runAt - b.runAt || a.created - b.created);
    return rows;
  }

  async nextRunAt(name: string): Promise<number | null> {
    const result = await this.execute({ sql: sql.nextRunAt, args: [name] });
    const runAt = result.rows[0]?.run_at;
    return typeof runAt === "number" ? runAt : null;
  }

  /** Records results and returns the ids whose lease was still held, so the write applied. */
  async settle(settlements: Settlement[]): Promise<Set<string>> {
    const completedByToken = new Map<string, string[]>();
    const statements: InStatement[] = [];
    for (const settlement of settlements) {
      if (settlement.kind === "complete") {
        const ids = completedByToken.get(settlement.token);
        if (ids) ids.push(settlement.id);
        else completedByToken.set(settlement.token, [settlement.id]);
      } else if (settlement.kind === "retry") {
        statements.push({
          sql: sql.retry,
          args: [
            settlement.runAt,
            settlement.now,
            settlement.error,
            settlement.id,
            settlement.token,
          ],
        });
      } else {
        statements.push({
          sql: sql.fail,
          args: [settlement.now, settlement.error, settlement.id, settlement.token],
        });
      }
    }
    for (const [token, ids] of completedByToken) {
      statements.push({ sql: sql.complete, args: [token, JSON.stringify(ids)] });
    }
    const results = await this.run(statements);
    const applied = new Set<string>();
    for (const result of results) {
      for (const row of result.rows) applied.add(row.id as string);
    }
    return applied;
  }

  async renew(token: string, lockedUntil: number): Promise<Set<string>> {
    const result = await this.execute({ sql: sql.renew, args: [lockedUntil, token] });
    return new Set(result.rows.map((row) => row.id as string));
  }

  async release(token: string, ids: string[]): Promise<Set<string>> {
    const result = await this.execute({ sql: sql.release, args: [token, JSON.stringify(ids)] });
    return new Set(result.rows.map((row) => row.id as string));
  }

  async rescue(
    name: string,
    now: number,
    maxAttempts: number,
    message: string,
  ): Promise<RescuedRow[]> {
    const expired = await this.execute({ sql: sql.hasExpiredLease, args: [name, now] });
    if (expired.rows.length === 0) return [];
    const result = await this.execute({
      sql: sql.rescue,
      args: [maxAttempts, now, message, name],
    });
    return result.rows.map((row: Row): RescuedRow => ({
      id: row.id as string,
      data: row.data as string | null,
      state: row.state as "pending" | "failed",
      attempts: row.attempts as number,
    }));
  }

  async pendingNames(): Promise<string[]> {
    const result = await this.execute(sql.pendingNames);
    return result.rows.map((row) => row.name as string);
  }

  /**
   * Reads the connection's `data_version` and whether `synchronous = NORMAL` is set, and sets
   * it again when a new pooled connection lacks it.
   */
  async watchConnection(): Promise<number> {
    const result = await this.execute(sql.connectionState);
    const row = result.rows[0];
    if (row.synchronous !== 1) await this.execute(sql.synchronousNormal);
    return row.data_version as number;
  }

  /**
   * Creates or migrates the schema. Safe to run from several processes at once: the check and
   * the changes run in one immediate transaction, so the second process waits and then finds
   * the schema in place.
   */
  async migrate(local: boolean): Promise<{ busyTimeout: number } | undefined> {
    let connection: { busyTimeout: number } | undefined;
    if (local) {
      // WAL lets readers run beside the writer. It is a property of the file, so setting it on
      // one connection is enough; synchronous is per connection, and watchConnection re-applies it.
      await this.execute(sql.journalModeWal);
      await this.execute(sql.synchronousNormal);
      const state = await this.execute(sql.connectionState);
      connection = { busyTimeout: state.rows[0].timeout as number };
    }

    if (await this.#schemaIsCurrent()) return connection;

    for (let attempt = 1;; attempt++) {
      try {
        await this.#migrateInTransaction();
        return connection;
      } catch (error) {
        const retriable = isBusyError(error) || isTransactionActiveError(error);
        if (!retriable || attempt >= 40) throw error;
        await sleep(Math.min(500, 2 ** attempt) * (0.5 + Math.random()));
      }
    }
  }

  async #schemaIsCurrent(): Promise<boolean> {
    const version = await this.execute(sql.userVersion);
    if ((version.rows[0].user_version as number) < schemaVersion) return false;
    const columns = await this.execute(sql.tableColumns);
    const present = new Set(columns.rows.map((row) => row.name as string));
    return Object.keys(taskColumns).every((column) => present.has(column));
  }

  async #migrateInTransaction(): Promise<void> {
    const transaction = await this.#client.transaction("write");
    try {
      const columns = await transaction.execute(sql.tableColumns);
      const present = new Set(columns.rows.map((row) => row.name as string));

      if (present.size > 0) {
        const missing = plainwebColumns.filter((column) => !present.has(column));
        if (missing.length > 0) {
          throw new Error(
            `The database already has a table "tasks" that is not a task table (it lacks the ` +
              `columns ${missing.join(", ")}). tasklite stores its tasks in a table named ` +
              `"tasks": rename the application's table or give tasklite its own database file.`,
          );
        }
      }

      await transaction.execute(sql.createTasks);
      const upgradingPlainweb = present.size > 0 && !present.has("state");
      for (const [column, type] of Object.entries(taskColumns)) {
        if (present.size > 0 && !present.has(column)) {
          // Column names and types come from the constant `taskColumns`, never from input.
          await transaction.execute(`ALTER TABLE tasks ADD COLUMN ${column} ${type}`);
        }
      }
      if (upgradingPlainweb) {
        // plainweb retried a row after its last failure; its failure count is the attempts made.
        await transaction.execute(
          "UPDATE tasks SET run_at = coalesce(failed_last, created), attempts = coalesce(failed_nr, 0)",
        );
      }
      await transaction.execute(sql.createClaimIndex);
      await transaction.execute(sql.createKeyIndex);

      const version = await transaction.execute(sql.userVersion);
      // NOTE: user_version is shared with the application. tasklite only raises it, so an
      // application that stores a higher number of its own keeps it.
      if ((version.rows[0].user_version as number) < schemaVersion) {
        await transaction.execute(sql.setUserVersion);
      }
      await transaction.commit();
    } finally {
      transaction.close();
    }
  }
}

/** A process-wide registry of runners by database file, so a `perform` wakes them at once. */
const runnersByDatabase = new Map<string, Set<TaskRunner>>();

/** The implementation of {@linkcode Database}. */
class TaskDatabase implements Database {
  readonly client: Client;
  readonly url: string | undefined;
  readonly now: () => number;
  readonly storage: SqliteStorage;
  /** The key of this database in `runnersByDatabase`: its absolute file path, or a unique id. */
  readonly identity: string;
  readonly #ownsClient: boolean;
  readonly #local: boolean;
  /** Whether other connections can write to the database, so `data_version` is worth watching. */
  readonly #shared: boolean;
  readonly #watchInterval: number;
  #ready: Promise<void> | undefined;
  #isReady = false;
  #closed = false;
  #pendingInserts: Array<{ row: NewTaskRow; resolve: () => void; reject: (e: unknown) => void }> =
    [];
  #insertScheduled = false;
  #watchTimer: ReturnType<typeof setInterval> | undefined;
  #dataVersion: number | undefined;
  #watching = false;
  #busyTimeoutWarned = false;
  logger: Logger = consoleLogger;

  constructor(
    client: Client,
    url: string | undefined,
    options: ParsedDatabaseOptions,
    identity: string,
  ) {
    this.client = client;
    this.url = url;
    this.#ownsClient = url !== undefined;
    this.#local = client.protocol === "file";
    this.#shared = this.#local && !identity.startsWith("memory:");
    this.now = options.now;
    this.#watchInterval = options.watchInterval;
    this.storage = new SqliteStorage(client);
    this.identity = identity;
  }

  get closed(): boolean {
    return this.#closed;
  }

  ready(): Promise<void> {
    if (this.#closed) return Promise.reject(closedError());
    this.#ready ??= this.storage.migrate(this.#local).then(
      (connection) => {
        this.#isReady = true;
        if (connection && connection.busyTimeout === 0 && !this.#busyTimeoutWarned) {
          this.#busyTimeoutWarned = true;
          this.logger.warn(
            "The libSQL client passed to openDatabase() has no busy timeout, so writes from " +
              "other processes fail at once and are retried. Create it with " +
              "createClient({ url, timeout: 5000 }).",
          );
        }
      },
      (error) => {
        // A failed migration is not cached, so a later call tries again.
        this.#ready = undefined;
        throw error;
      },
    );
    return this.#ready;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#stopWatching();
    for (const pending of this.#pendingInserts.splice(0)) pending.reject(closedError());
    if (this.#ownsClient) this.client.close();
  }

  /**
   * Inserts a row. Rows inserted in the same tick share one statement; the promise resolves
   * once the row is committed.
   */
  insert(row: NewTaskRow): Promise<void> {
    if (this.#closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => {
      this.#pendingInserts.push({ row, resolve, reject });
      if (!this.#insertScheduled) {
        this.#insertScheduled = true;
        queueMicrotask(() => this.#flushInserts());
      }
    });
  }

  async #flushInserts(): Promise<void> {
    if (!this.#isReady) {
      try {
        await this.ready();
      } catch (error) {
        this.#insertScheduled = false;
        for (const pending of this.#pendingInserts.splice(0)) pending.reject(error);
        return;
      }
    }
    while (this.#pendingInserts.length > 0) {
      const batch = this.#pendingInserts.splice(0);
      try {
        await this.storage.insert(batch.map((pending) => pending.row));
      } catch (error) {
        for (const pending of batch) pending.reject(error);
        continue;
      }
      for (const pending of batch) pending.resolve();
      this.notify(batch.map((pending) => pending.row));
    }
    this.#insertScheduled = false;
  }

  /** Tells the runners of this database in this process about new rows. */
  notify(rows: ReadonlyArray<{ name: string; runAt: number }>): void {
    const runners = runnersByDatabase.get(this.identity);
    if (runners === undefined) return;
    for (const runner of runners) {
      for (const row of rows) {
        if (row.name === runner.name) runner.onInsert(row.runAt);
      }
    }
  }

  register(runner: TaskRunner): void {
    let runners = runnersByDatabase.get(this.identity);
    if (runners === undefined) {
      runners = new Set();
      runnersByDatabase.set(this.identity, runners);
    }
    runners.add(runner);
    this.#startWatching();
  }

  unregister(runner: TaskRunner): void {
    const runners = runnersByDatabase.get(this.identity);
    runners?.delete(runner);
    if (runners?.size === 0) runnersByDatabase.delete(this.identity);
    const mine = [...(runners ?? [])].some((other) => other.database === this);
    if (!mine) this.#stopWatching();
  }

  /**
   * Polls `PRAGMA data_version`, which changes when another connection commits, and wakes this
   * database's runners when it does. Only local files have it; remote runners poll instead.
   */
  #startWatching(): void {
    if (!this.#shared || this.#watchTimer !== undefined || this.#closed) return;
    this.#watchTimer = setInterval(() => this.#checkDataVersion(), this.#watchInterval);
    unrefTimer(this.#watchTimer);
    // Read the first version now, before the runner's first claim: a commit between that claim
    // and a later first read would set the baseline without waking the runner.
    void this.#checkDataVersion();
  }

  #stopWatching(): void {
    if (this.#watchTimer !== undefined) clearInterval(this.#watchTimer);
    this.#watchTimer = undefined;
    this.#dataVersion = undefined;
  }

  async #checkDataVersion(): Promise<void> {
    if (this.#watching || this.#closed) return;
    this.#watching = true;
    try {
      const version = await this.storage.watchConnection();
      const changed = this.#dataVersion !== undefined && version !== this.#dataVersion;
      this.#dataVersion = version;
      if (!changed) return;
      for (const runner of runnersByDatabase.get(this.identity) ?? []) {
        if (runner.database === this) runner.onExternalChange();
      }
    } catch {
      // The runners' own queries report database errors; the watcher tries again next tick.
    } finally {
      this.#watching = false;
    }
  }
}

function closedError(): Error {
  return new Error("The database is closed: open a new one with openDatabase()");
}

/** Keeps a timer from holding the process open, in runtimes whose timers have `unref`. */
function unrefTimer(timer: unknown): void {
  if (typeof timer === "object" && timer !== null && "unref" in timer) {
    (timer as { unref(): void }).unref();
  } else if (typeof timer === "number") {
    // Deno timers are numbers; Deno.unrefTimer keeps them from holding the process open.
    const deno = (globalThis as { Deno?: { unrefTimer?(id: number): void } }).Deno;
    deno?.unrefTimer?.(timer);
  }
}

interface ParsedDatabaseOptions {
  busyTimeout: number;
  authToken?: string;
  now: () => number;
  watchInterval: number;
}

const databaseOptionsSchema = v.strictObject({
  busyTimeout: v.optional(durationSchema(3_600_000), 5_000),
  authToken: v.optional(v.string("a string")),
  now: v.optional(
    v.custom<() => number>((value) => typeof value === "function", "a function"),
    () => Date.now,
  ),
  watchInterval: v.optional(
    v.pipe(
      durationSchema(60_000),
      v.minValue(1, `a duration from 1ms to 1 min (${durationHint})`),
    ),
    25,
  ),
});

const remoteSchemes = ["libsql:", "http:", "https:", "ws:", "wss:"];

function isClient(value: unknown): value is Client {
  return typeof value === "object" && value !== null &&
    typeof (value as Client).execute === "function" &&
    typeof (value as Client).batch === "function" &&
    typeof (value as Client).transaction === "function";
}

let databaseCounter = 0;

/**
 * Opens a tasklite database. The schema is created or migrated on first use (see
 * {@linkcode Database.ready}).
 *
 * Local files get WAL journaling, `synchronous = NORMAL` and a busy timeout. tasklite opens a
 * local file with one connection and funnels every statement through it, because the libSQL
 * driver is synchronous: a second connection waiting for a lock would block the event loop that
 * the first one needs to commit.
 *
 * @param url A `file:` URL (`"file:tasks.db"`, `"file:/var/data/app.db"`), `":memory:"`, a
 *   remote `libsql://`, `http(s)://` or `ws(s)://` URL, or an existing libSQL `Client` (for
 *   drizzle, `db.$client`), which tasklite uses as it is and does not close.
 * @param options See {@linkcode DatabaseOptions}.
 * @returns The database.
 * @throws {TypeError} When the URL or an option is invalid.
 *
 * @example Open a local file
 * ```ts
 * import { openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db", { busyTimeout: "10s" });
 * await database.ready();
 * database.close();
 * ```
 */
export function openDatabase(
  url: string | Client = "file:tasks.db",
  options: DatabaseOptions = {},
): Database {
  const parsed = parseOptions(databaseOptionsSchema, options, "openDatabase()");

  if (isClient(url)) {
    const identity = `client:${++databaseCounter}`;
    return new TaskDatabase(url, undefined, parsed, identity);
  }
  if (typeof url !== "string") {
    throw new TypeError(
      `Invalid database URL: expected a string such as "file:tasks.db" or a libSQL Client, ` +
        `received ${describeValue(url)}`,
    );
  }

  const memory = url === ":memory:" || url === "file::memory:";
  const scheme = /^[a-z][a-z0-9+.-]*:/i.exec(url)?.[0].toLowerCase();
  if (!memory && scheme !== "file:" && !remoteSchemes.includes(scheme ?? "")) {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: use "file:" followed by a path for a ` +
        `local file (for example "file:tasks.db"), ":memory:", or a libsql://, http(s):// ` +
        `or ws(s):// URL for a remote server`,
    );
  }

  let client: Client;
  try {
    client = createClient({
      url: memory ? ":memory:" : url,
      authToken: parsed.authToken,
      timeout: parsed.busyTimeout,
      // One connection for local files: see the function's documentation.
      concurrency: scheme === "file:" || memory ? 1 : undefined,
    });
  } catch (error) {
    throw new TypeError(
      `Cannot open database ${JSON.stringify(url)}: ${(error as Error).message}. ` +
        `Check that the path's directory exists and is writable.`,
      { cause: error },
    );
  }

  let identity: string;
  if (scheme === "file:" && !memory) {
    const path = url.slice("file:".length).replace(/\?.*$/, "");
    identity = `file:${resolvePath(path.startsWith("//") ? fileURLToPath(url) : path)}`;
  } else {
    identity = `${memory ? "memory" : "remote"}:${++databaseCounter}`;
  }
  return new TaskDatabase(client, url, parsed, identity);
}

function toTaskDatabase(database: unknown, context: string): TaskDatabase {
  if (database instanceof TaskDatabase) return database;
  throw new TypeError(
    `Invalid database for ${context}: expected the result of openDatabase(), received ${
      describeValue(database)
    }`,
  );
}

// ---------------------------------------------------------------------------------------------
// Defining tasks
// ---------------------------------------------------------------------------------------------

/** The validated definition of a task, as runners and `perform` use it. */
interface TaskInternals {
  name: string;
  database: TaskDatabase;
  schema: DataSchema | undefined;
  batchSize: number;
  pollInterval: number;
  maxAttempts: number;
  backoff: number | BackoffFunction | undefined;
  timeout: number;
  lease: number;
  process: TaskDefinition<unknown>["process"];
  success: TaskDefinition<unknown>["success"];
  failed: TaskDefinition<unknown>["failed"];
  /** The module file that defined the task, when known. */
  file: string | undefined;
}

const taskInternals = new WeakMap<object, TaskInternals>();

const namePattern = /^[^\s\p{Cc}](?:[^\p{Cc}]{0,198}[^\s\p{Cc}])?$/u;
const nameExpected = "a name of 1 to 200 characters without control characters or outer spaces";

const optionalFunction = (expected: string) =>
  v.optional(
    v.custom<(...args: never[]) => unknown>((value) => typeof value === "function", expected),
  );

const taskDefinitionSchema = v.strictObject({
  name: v.optional(v.pipe(v.string(nameExpected), v.regex(namePattern, nameExpected))),
  schema: v.optional(
    v.custom<DataSchema>(
      (value) =>
        typeof value === "object" && value !== null && "~standard" in value && "kind" in value,
      "a valibot schema",
    ),
  ),
  batchSize: v.optional(integerSchema(1, 10_000), 5),
  pollInterval: v.optional(
    v.pipe(
      durationSchema(86_400_000),
      v.minValue(10, `a duration from 10ms to 1d (${durationHint})`),
    ),
    1_000,
  ),
  maxAttempts: v.optional(integerSchema(1, 1_000), 5),
  backoff: v.optional(
    v.union(
      [
        durationSchema(),
        v.custom<BackoffFunction>((value) => typeof value === "function", ""),
      ],
      `a duration (${durationHint}) or a function`,
    ),
  ),
  timeout: v.optional(
    v.pipe(durationSchema(), v.minValue(1, `a positive duration (${durationHint})`)),
    300_000,
  ),
  lease: v.optional(
    v.pipe(
      durationSchema(86_400_000),
      v.minValue(100, `a duration from 100ms to 1d (${durationHint})`),
    ),
    30_000,
  ),
  process: v.custom<TaskDefinition<unknown>["process"]>(
    (value) => typeof value === "function",
    "a function",
  ),
  success: optionalFunction("a function"),
  failed: optionalFunction("a function"),
});

/**
 * Returns the file of the code that called into this module, from the first stack frame
 * outside it, or `undefined` when that frame is not a local file. Runtimes print frames as
 * `at file:///a/b.ts:1:2`, `at /a/b.ts:1:2` or `at name (location:1:2)`.
 */
function callerFile(): string | undefined {
  const stack = new Error().stack;
  if (stack === undefined) return undefined;
  for (const line of stack.split("\n").slice(1)) {
    const match = /^\s*at (?:.*? \()?(.+?):\d+:\d+\)?\s*$/.exec(line);
    if (match === null) continue;
    const location = match[1].startsWith("/") ? pathToFileURL(match[1]).href : match[1];
    if (location === import.meta.url) continue;
    if (!location.startsWith("file:")) return undefined;
    try {
      return fileURLToPath(location);
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/**
 * Defines a task that stores its runs in `database`.
 *
 * The definition is validated here: an unknown option, a negative `batchSize` or a malformed
 * `timeout` throws at once, naming the option and its value.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param definition See {@linkcode TaskDefinition}.
 * @returns The task, for {@linkcode perform} and {@linkcode runTasks}. Export it as the default
 *   export of its module to let `runTasks(dir)` find it.
 * @throws {TypeError} When an option has the wrong type, or no name is given and none can be
 *   derived from the calling module's file name.
 * @throws {RangeError} When an option is out of range.
 *
 * @example A task with a schema, in `app/tasks/double-opt-in.ts`
 * ```ts
 * import * as v from "valibot";
 * import { defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 *
 * export default defineDatabaseTask(database, {
 *   schema: v.object({ email: v.pipe(v.string(), v.email()) }),
 *   batchSize: 10,
 *   timeout: "30s",
 *   async process({ data, signal }) {
 *     await fetch("https://mail.example/send", {
 *       method: "POST",
 *       body: JSON.stringify({ to: data.email }),
 *       signal,
 *     });
 *   },
 * });
 * ```
 */
export function defineDatabaseTask<TSchema extends DataSchema>(
  database: Database,
  definition: TaskDefinition<v.InferOutput<TSchema>> & { schema: TSchema },
): Task<v.InferInput<TSchema>>;
export function defineDatabaseTask<T = unknown>(
  database: Database,
  definition: TaskDefinition<T>,
): Task<T>;
export function defineDatabaseTask<T>(
  database: Database,
  definition: TaskDefinition<T>,
): Task<T> {
  const taskDatabase = toTaskDatabase(database, "defineDatabaseTask()");
  const parsed = parseOptions(taskDefinitionSchema, definition, "task");

  const file = callerFile();
  let name = parsed.name;
  if (name === undefined) {
    const derived = file === undefined ? "" : basename(file, extname(file));
    if (!namePattern.test(derived)) {
      throw new TypeError(
        `Cannot derive a task name from the calling module's file name (${
          file === undefined ? "unknown" : JSON.stringify(file)
        }): pass the "name" option to defineDatabaseTask()`,
      );
    }
    name = derived;
  }

  const internals: TaskInternals = {
    name,
    database: taskDatabase,
    schema: parsed.schema,
    batchSize: parsed.batchSize,
    pollInterval: parsed.pollInterval,
    maxAttempts: parsed.maxAttempts,
    backoff: parsed.backoff as number | BackoffFunction | undefined,
    timeout: parsed.timeout,
    lease: parsed.lease,
    process: parsed.process as TaskDefinition<unknown>["process"],
    success: parsed.success as TaskDefinition<unknown>["success"],
    failed: parsed.failed as TaskDefinition<unknown>["failed"],
    file,
  };
  const task: Task<T> = Object.freeze({ name, database: taskDatabase });
  taskInternals.set(task, internals);
  return task;
}

function toTaskInternals(task: unknown, context: string): TaskInternals {
  const internals = typeof task === "object" && task !== null ? taskInternals.get(task) : undefined;
  if (internals === undefined) {
    throw new TypeError(
      `Invalid task for ${context}: expected the result of defineDatabaseTask(), received ${
        describeValue(task)
      }`,
    );
  }
  return internals;
}

// ---------------------------------------------------------------------------------------------
// Enqueueing
// ---------------------------------------------------------------------------------------------

const performOptionsSchema = v.strictObject({
  delay: v.optional(durationSchema()),
  runAt: v.optional(
    v.union(
      [
        v.pipe(v.date(), v.check((date) => !Number.isNaN(date.getTime()))),
        v.pipe(v.number(), v.finite(), v.safeInteger()),
      ],
      "a valid Date or milliseconds since the epoch",
    ),
  ),
  priority: v.optional(integerSchema(-1_000_000, 1_000_000), 0),
});

type ParsedPerformOptions = v.InferOutput<typeof performOptionsSchema>;

function parsePerformOptions(options: PerformOptions | undefined): ParsedPerformOptions {
  const parsed = parseOptions(performOptionsSchema, options ?? {}, "perform()");
  if (parsed.delay !== undefined && parsed.runAt !== undefined) {
    throw new TypeError(
      `Invalid perform() options: pass either "delay" or "runAt", not both (received delay ${
        describeValue(options?.delay)
      } and runAt ${describeValue(options?.runAt)})`,
    );
  }
  return parsed;
}

function runAtOf(options: ParsedPerformOptions, now: number): number {
  if (options.delay !== undefined) return now + Math.round(options.delay);
  if (options.runAt instanceof Date) return options.runAt.getTime();
  if (options.runAt !== undefined) return options.runAt;
  return now;
}

/** Checks data against the task's schema. */
async function validateData(
  internals: TaskInternals,
  data: unknown,
  where: string,
): Promise<void> {
  if (internals.schema === undefined) return;
  const result = await v.safeParseAsync(internals.schema, data);
  if (!result.success) throw new TaskDataError(internals.name, result.issues, where);
}

const hex = Array.from({ length: 256 }, (_, byte) => byte.toString(16).padStart(2, "0"));

/**
 * Creates a UUID version 7: 48 bits of milliseconds, then random bits, so ids sort by creation
 * time and new rows append to the primary key index instead of landing at random places in it.
 */
function createTaskId(now: number): string {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes.subarray(6));
  let time = Math.max(0, Math.floor(now));
  for (let index = 5; index >= 0; index--) {
    bytes[index] = time % 256;
    time = Math.floor(time / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  let id = "";
  for (let index = 0; index < 16; index++) {
    if (index === 4 || index === 6 || index === 8 || index === 10) id += "-";
    id += hex[bytes[index]];
  }
  return id;
}

/**
 * Enqueues one run of a task and resolves to its id once the row is committed.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param data The task's data. It must survive a JSON round trip unchanged: `undefined` inside
 *   objects, `NaN`, `BigInt`, functions, `Date`s, class instances and circular structures are
 *   rejected. `undefined` as the whole value is allowed.
 * @param options See {@linkcode PerformOptions}.
 * @returns The id of the new task, a time-ordered UUID.
 * @throws {TaskDataError} When the data fails the task's schema. Nothing is written.
 * @throws {TypeError} When the data is not JSON-serialisable or an option is invalid.
 * @throws {Error} When the database write fails.
 *
 * @example Enqueue now and later
 * ```ts
 * import { perform } from "tasklite";
 * import doubleOptIn from "./tasks/double-opt-in.ts";
 *
 * const id = await perform(doubleOptIn, { email: "ada@example.com" });
 * await perform(doubleOptIn, { email: "alan@example.com" }, { delay: "10m", priority: 5 });
 * ```
 */
export async function perform<T>(
  task: Task<T>,
  data: NoInfer<T>,
  options?: PerformOptions,
): Promise<string> {
  const internals = toTaskInternals(task, "perform()");
  const parsed = parsePerformOptions(options);
  if (internals.schema !== undefined) await validateData(internals, data, "data");
  const json = serializeData(data, internals.name);

  const database = internals.database;
  const now = database.now();
  const id = createTaskId(now);
  await database.insert({
    id,
    name: internals.name,
    data: json,
    created: now,
    runAt: runAtOf(parsed, now),
    priority: parsed.priority,
  });
  return id;
}

/**
 * Enqueues many runs of a task in one transaction and resolves to their ids, in the order of
 * `items`. Every item is checked first; if one is invalid, nothing is written.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param items The data of each run.
 * @param options Options that apply to every run. See {@linkcode PerformOptions}.
 * @returns The ids of the new tasks.
 * @throws {TaskDataError} When an item fails the task's schema; the message names its index.
 * @throws {TypeError} When an item is not JSON-serialisable or an option is invalid.
 *
 * @example Enqueue a list
 * ```ts
 * import { performMany } from "tasklite";
 * import doubleOptIn from "./tasks/double-opt-in.ts";
 *
 * const ids = await performMany(doubleOptIn, [
 *   { email: "ada@example.com" },
 *   { email: "alan@example.com" },
 * ]);
 * ```
 */
export async function performMany<T>(
  task: Task<T>,
  items: ReadonlyArray<NoInfer<T>>,
  options?: PerformOptions,
): Promise<string[]> {
  const internals = toTaskInternals(task, "performMany()");
  if (!Array.isArray(items)) {
    throw new TypeError(
      `Invalid items for performMany(): expected an array, received ${describeValue(items)}`,
    );
  }
  const parsed = parsePerformOptions(options);

  const serialized: Array<string | null> = [];
  for (let index = 0; index < items.length; index++) {
    const where = `items[${index}]`;
    if (internals.schema !== undefined) await validateData(internals, items[index], where);
    serialized.push(serializeData(items[index], internals.name, where));
  }
  if (items.length === 0) return [];

  const database = internals.database;
  await database.ready();
  const now = database.now();
  const runAt = runAtOf(parsed, now);
  const rows = serialized.map((data): NewTaskRow => ({
    id: createTaskId(now),
    name: internals.name,
    data,
    created: now,
    runAt,
    priority: parsed.priority,
  }));
  if (database.closed) throw closedError();
  await database.storage.insert(rows);
  database.notify([{ name: internals.name, runAt }]);
  return rows.map((row) => row.id);
}

// ---------------------------------------------------------------------------------------------
// Claim, execute and settle: one runner per task
// ---------------------------------------------------------------------------------------------

/** The default backoff: 1 s doubling per attempt, capped at 1 h, with ±25 % jitter. */
function defaultBackoff(attempt: number): number {
  const base = Math.min(3_600_000, 1_000 * 2 ** Math.min(attempt - 1, 30));
  return base * (0.75 + Math.random() * 0.5);
}

/** Logs a repeated error once, then again at most every 30 seconds with a repeat count. */
class RepeatLimiter {
  #lastMessage = "";
  #lastTime = 0;
  #repeats = 0;

  shouldLog(message: string, now: number): { log: boolean; repeats: number } {
    if (message !== this.#lastMessage || now - this.#lastTime >= 30_000) {
      const repeats = message === this.#lastMessage ? this.#repeats : 0;
      this.#lastMessage = message;
      this.#lastTime = now;
      this.#repeats = 0;
      return { log: true, repeats };
    }
    this.#repeats++;
    return { log: false, repeats: this.#repeats };
  }

  reset(): void {
    this.#lastMessage = "";
    this.#repeats = 0;
  }
}

/** One attempt of a claimed task. */
class Attempt {
  readonly row: ClaimedRow;
  readonly token: string;
  readonly deadline: number;
  readonly startedAt: number;
  /** Created on first use: most tasks never read their signal. */
  controller: AbortController | undefined;
  data: unknown;
  settled = false;

  constructor(row: ClaimedRow, token: string, startedAt: number, deadline: number) {
    this.row = row;
    this.token = token;
    this.startedAt = startedAt;
    this.deadline = deadline;
  }

  get signal(): AbortSignal {
    this.controller ??= new AbortController();
    return this.controller.signal;
  }

  abort(reason: Error): void {
    this.controller ??= new AbortController();
    if (!this.controller.signal.aborted) this.controller.abort(reason);
  }
}

/** A hook call to make after a settlement was committed. */
type AfterSettle =
  | { kind: "success"; attempt: Attempt }
  | { kind: "failed"; attempt: Attempt; error: Error };

let workerCounter = 0;
const workerId = `${Math.random().toString(36).slice(2, 8)}`;

/**
 * Runs one task: claims due rows under a lease, runs up to `batchSize` attempts at a time,
 * records their results, renews the leases of running attempts, and rescues rows whose lease
 * expired.
 */
class TaskRunner {
  readonly name: string;
  readonly database: TaskDatabase;
  readonly #task: TaskInternals;
  readonly #log: Logger;
  readonly #debug: boolean;
  readonly #worker: string;
  #claimCount = 0;

  #state: "running" | "stopping" | "stopped" = "running";
  readonly #inFlight = new Map<string, Attempt>();
  /** Attempts in start order, which is also deadline order because the timeout is fixed. */
  #deadlines: Attempt[] = [];
  #settlements: Array<
    { settlement: Settlement | undefined; after?: AfterSettle; attempt: Attempt }
  > = [];
  readonly #hooks = new Set<Promise<void>>();

  /** Whether due rows may be waiting: set by wake-ups, cleared when a claim comes back short. */
  #maybeDue = true;
  /** Whether the runner should look up the next due time before claiming. */
  #checkNext = false;
  #pumping = false;
  #pumpAgain = false;
  #pumpScheduled = false;

  #wakeTimer: ReturnType<typeof setTimeout> | undefined;
  #wakeAt = Infinity;
  #pollTimer: ReturnType<typeof setInterval> | undefined;
  #heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  #deadlineTimer: ReturnType<typeof setTimeout> | undefined;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #errorDelay = 0;
  readonly #errors = new RepeatLimiter();
  #idleWaiters: Array<() => void> = [];

  constructor(task: TaskInternals, log: Logger, debug: boolean) {
    this.name = task.name;
    this.database = task.database;
    this.#task = task;
    this.#log = log;
    this.#debug = debug;
    this.#worker = `${workerId}-${++workerCounter}`;
  }

  start(): void {
    this.database.register(this);
    this.#pollTimer = setInterval(() => this.#poll(), this.#task.pollInterval);
    this.#schedulePump();
  }

  /** Called when this process inserted a row of this task. */
  onInsert(runAt: number): void {
    if (this.#state !== "running") return;
    if (runAt <= this.database.now()) {
      this.#maybeDue = true;
      this.#schedulePump();
    } else {
      this.#wakeAtTime(runAt);
    }
  }

  /** Called when another connection committed a change to the database file. */
  onExternalChange(): void {
    if (this.#state !== "running") return;
    this.#checkNext = true;
    this.#schedulePump();
  }

  #poll(): void {
    if (this.#state !== "running") return;
    this.#checkNext = true;
    this.#schedulePump();
    void this.#rescue();
  }

  #wakeAtTime(time: number): void {
    if (time >= this.#wakeAt) return;
    if (this.#wakeTimer !== undefined) clearTimeout(this.#wakeTimer);
    this.#wakeAt = time;
    // Timers may fire a little early; one millisecond more keeps the row due when it fires.
    const wait = Math.max(0, time - this.database.now() + 1);
    this.#wakeTimer = setTimeout(() => {
      this.#wakeTimer = undefined;
      this.#wakeAt = Infinity;
      this.#maybeDue = true;
      this.#schedulePump();
    }, Math.min(wait, 2_147_483_647));
  }

  #schedulePump(): void {
    if (this.#pumpScheduled) return;
    this.#pumpScheduled = true;
    // setImmediate runs after every attempt that finished in this tick has reported, so their
    // results are written in one statement.
    setImmediate(() => {
      this.#pumpScheduled = false;
      void this.#pump();
    });
  }

  async #pump(): Promise<void> {
    if (this.#pumping) {
      this.#pumpAgain = true;
      return;
    }
    this.#pumping = true;
    try {
      do {
        this.#pumpAgain = false;
        await this.#step();
      } while (this.#pumpAgain && this.#retryTimer === undefined);
    } finally {
      this.#pumping = false;
    }
  }

  /** Writes finished results, then claims as many due rows as there are free slots. */
  async #step(): Promise<void> {
    if (this.#retryTimer !== undefined || this.database.closed) return;
    try {
      if (this.#settlements.length > 0) await this.#flush();
      if (this.#state !== "running") return;

      const free = this.#task.batchSize - this.#inFlight.size;
      if (free <= 0) return;

      if (this.#checkNext && !this.#maybeDue) {
        this.#checkNext = false;
        const next = await this.database.storage.nextRunAt(this.name);
        if (next === null) return;
        if (next > this.database.now()) {
          this.#wakeAtTime(next);
          return;
        }
        this.#maybeDue = true;
      }
      if (!this.#maybeDue) return;

      const now = this.database.now();
      const token = `${this.#worker}-${++this.#claimCount}`;
      const rows = await this.database.storage.claim(
        this.name,
        free,
        now,
        now + this.#task.lease,
        token,
      );
      if (this.#state !== "running") {
        // stop() began while the claim was in flight: hand the rows straight back.
        if (rows.length > 0) await this.#releaseRows(token, rows.map((row) => row.id));
        return;
      }
      for (const row of rows) this.#startAttempt(row, token, now);
      if (rows.length < free) {
        this.#maybeDue = false;
        this.#checkNext = true;
        this.#pumpAgain = true;
      }
      this.#errorDelay = 0;
      this.#errors.reset();
    } catch (error) {
      this.#onStorageError(error);
    }
  }

  /** Logs a database error and pauses the runner with growing, jittered delays. */
  #onStorageError(error: unknown): void {
    if (this.database.closed) return;
    this.#errorDelay = Math.min(30_000, Math.max(100, this.#errorDelay * 2));
    const wait = this.#errorDelay * (0.75 + Math.random() * 0.5);
    const message = toError(error).message;
    const { log, repeats } = this.#errors.shouldLog(message, Date.now());
    if (log) {
      this.#log.error(
        `Task "${this.name}": database error, retrying in ${formatDuration(wait)}: ${message}${
          repeats > 0 ? ` (repeated ${repeats} times)` : ""
        }`,
        { task: this.name, error: toError(error), retryInMs: Math.round(wait) },
      );
    }
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      this.#maybeDue = true;
      this.#schedulePump();
    }, wait);
  }

  #startAttempt(row: ClaimedRow, token: string, now: number): void {
    const attempt = new Attempt(row, token, now, now + this.#task.timeout);
    this.#inFlight.set(row.id, attempt);
    this.#deadlines.push(attempt);
    // The deadline timer only fires at the head's deadline, so finished attempts are dropped
    // here too: otherwise a long timeout keeps every attempt of a busy runner in memory.
    if (this.#deadlines.length > 2 * this.#task.batchSize + 64) {
      this.#deadlines = this.#deadlines.filter((pending) => !pending.settled);
    }
    if (this.#deadlineTimer === undefined) this.#armDeadline();
    if (this.#heartbeatTimer === undefined) this.#startHeartbeat();
    if (this.#debug) {
      this.#log.debug(
        `Task "${this.name}" ${row.id}: attempt ${row.attempts} of ${this.#task.maxAttempts} started`,
        { task: this.name, id: row.id, attempt: row.attempts },
      );
    }

    const decoded = this.#decode(attempt);
    if (decoded instanceof Promise) {
      decoded.then(
        (error) => error ? this.#reject(attempt, error) : this.#process(attempt),
        (error) => this.#reject(attempt, toError(error)),
      );
    } else if (decoded !== undefined) {
      this.#reject(attempt, decoded);
    } else {
      this.#process(attempt);
    }
  }

  /**
   * Parses the stored JSON and checks it against the schema. Returns an error for data that can
   * never succeed, which fails the task without retries.
   */
  #decode(attempt: Attempt): Error | undefined | Promise<Error | undefined> {
    const raw = attempt.row.data;
    let data: unknown;
    try {
      data = raw === null ? undefined : JSON.parse(raw);
    } catch (error) {
      return new SyntaxError(
        `Stored data of task "${this.name}" ${attempt.row.id} is not valid JSON: ${
          (error as Error).message
        }`,
      );
    }
    const schema = this.#task.schema;
    if (schema === undefined) {
      attempt.data = data;
      return undefined;
    }
    return v.safeParseAsync(schema, data).then((result) => {
      if (result.success) {
        attempt.data = result.output;
        return undefined;
      }
      return new TaskDataError(this.name, result.issues, "stored data");
    });
  }

  #process(attempt: Attempt): void {
    if (attempt.settled) return;
    const context: TaskContext<unknown> = {
      name: this.name,
      id: attempt.row.id,
      data: attempt.data,
      attempt: attempt.row.attempts,
      maxAttempts: this.#task.maxAttempts,
      get signal() {
        return attempt.signal;
      },
    };
    let result: unknown;
    try {
      result = this.#task.process(context);
    } catch (error) {
      this.#fail(attempt, toError(error));
      return;
    }
    if (
      result instanceof Promise ||
      (typeof result === "object" && result !== null && "then" in result)
    ) {
      (result as Promise<unknown>).then(
        () => this.#succeed(attempt),
        (error) => this.#fail(attempt, toError(error)),
      );
    } else {
      this.#succeed(attempt);
    }
  }

  #succeed(attempt: Attempt): void {
    if (!this.#finish(attempt)) return;
    this.#settlements.push({
      settlement: { kind: "complete", id: attempt.row.id, token: attempt.token },
      after: { kind: "success", attempt },
      attempt,
    });
    this.#schedulePump();
  }

  #fail(attempt: Attempt, error: Error): void {
    if (!this.#finish(attempt)) return;
    const now = this.database.now();
    const number = attempt.row.attempts;
    const text = describeError(error);
    if (number < this.#task.maxAttempts) {
      let wait: number;
      try {
        wait = this.#retryDelay(number, error);
      } catch (backoffError) {
        this.#log.error(
          `Task "${this.name}": the backoff function threw, using the default: ${
            toError(backoffError).message
          }`,
          { task: this.name, error: toError(backoffError) },
        );
        wait = defaultBackoff(number);
      }
      this.#settlements.push({
        settlement: {
          kind: "retry",
          id: attempt.row.id,
          token: attempt.token,
          runAt: now + Math.round(wait),
          now,
          error: text,
        },
        attempt,
      });
      this.#log.warn(
        `Task "${this.name}" ${attempt.row.id}: attempt ${number} of ${this.#task.maxAttempts} failed, retrying in ${
          formatDuration(wait)
        }: ${error.message}`,
        { task: this.name, id: attempt.row.id, attempt: number, error },
      );
    } else {
      this.#settlements.push({
        settlement: { kind: "fail", id: attempt.row.id, token: attempt.token, now, error: text },
        after: { kind: "failed", attempt, error },
        attempt,
      });
      this.#log.error(
        `Task "${this.name}" ${attempt.row.id}: attempt ${number} of ${this.#task.maxAttempts} failed, no attempts left: ${error.message}`,
        { task: this.name, id: attempt.row.id, attempt: number, error },
      );
    }
    this.#schedulePump();
  }

  /** Fails an attempt whose stored data can never be processed, without retries. */
  #reject(attempt: Attempt, error: Error): void {
    if (!this.#finish(attempt)) return;
    this.#settlements.push({
      settlement: {
        kind: "fail",
        id: attempt.row.id,
        token: attempt.token,
        now: this.database.now(),
        error: describeError(error),
      },
      attempt,
    });
    this.#log.error(
      `Task "${this.name}" ${attempt.row.id}: failed without retry: ${error.message}`,
      {
        task: this.name,
        id: attempt.row.id,
        error,
      },
    );
    this.#schedulePump();
  }

  #retryDelay(attempt: number, error: Error): number {
    const backoff = this.#task.backoff;
    if (backoff === undefined) return defaultBackoff(attempt);
    if (typeof backoff === "number") return backoff;
    const value = backoff(attempt, error);
    const milliseconds = toMilliseconds(value);
    if (milliseconds === undefined) {
      throw new TypeError(
        `expected a duration (${durationHint}), received ${describeValue(value)}`,
      );
    }
    return milliseconds;
  }

  /** Marks an attempt as ended and frees its slot. Returns false if it had already ended. */
  #finish(attempt: Attempt): boolean {
    if (attempt.settled) return false;
    attempt.settled = true;
    this.#inFlight.delete(attempt.row.id);
    if (this.#inFlight.size === 0) {
      for (const resolve of this.#idleWaiters.splice(0)) resolve();
    }
    return true;
  }

  /** Writes queued results in one statement or transaction, then runs the hooks. */
  async #flush(): Promise<void> {
    const entries = this.#settlements;
    this.#settlements = [];
    const settlements = entries.flatMap((entry) => entry.settlement ? [entry.settlement] : []);
    let applied: Set<string>;
    try {
      applied = settlements.length > 0
        ? await this.database.storage.settle(settlements)
        : new Set();
    } catch (error) {
      // Keep the results for the next try; the leases stay renewed meanwhile.
      this.#settlements = entries.concat(this.#settlements);
      throw error;
    }

    for (const entry of entries) {
      const { attempt } = entry;
      const id = attempt.row.id;
      if (entry.settlement !== undefined && !applied.has(id)) {
        this.#log.warn(
          `Task "${this.name}" ${id}: lease lost before the result was recorded; the runner ` +
            `that holds it now decides the outcome`,
          { task: this.name, id, attempt: attempt.row.attempts },
        );
        continue;
      }
      if (this.#debug && entry.settlement?.kind === "complete") {
        this.#log.debug(
          `Task "${this.name}" ${id}: attempt ${attempt.row.attempts} succeeded in ${
            formatDuration(Date.now() - attempt.startedAt)
          }`,
          { task: this.name, id, attempt: attempt.row.attempts },
        );
      }
      if (entry.after !== undefined) this.#runHook(entry.after);
    }
  }

  #runHook(after: AfterSettle): void {
    const { attempt } = after;
    const hook = after.kind === "success" ? this.#task.success : this.#task.failed;
    if (hook === undefined) return;
    const context = after.kind === "success"
      ? { name: this.name, id: attempt.row.id, data: attempt.data, attempt: attempt.row.attempts }
      : {
        name: this.name,
        id: attempt.row.id,
        data: attempt.data,
        error: after.error,
        attempts: attempt.row.attempts,
      };
    const promise = (async () => {
      try {
        // deno-lint-ignore no-explicit-any
        await (hook as (context: any) => unknown)(context);
      } catch (error) {
        this.#log.error(
          `Task "${this.name}" ${attempt.row.id}: the ${after.kind} hook threw: ${
            toError(error).message
          }`,
          { task: this.name, id: attempt.row.id, error: toError(error) },
        );
      }
    })();
    this.#hooks.add(promise);
    promise.finally(() => this.#hooks.delete(promise));
  }

  #armDeadline(): void {
    while (this.#deadlines.length > 0 && this.#deadlines[0].settled) this.#deadlines.shift();
    const head = this.#deadlines[0];
    if (head === undefined) {
      this.#deadlineTimer = undefined;
      return;
    }
    const wait = Math.max(0, head.deadline - this.database.now());
    this.#deadlineTimer = setTimeout(() => this.#expireDeadlines(), Math.min(wait, 2_147_483_647));
  }

  #expireDeadlines(): void {
    const now = this.database.now();
    while (this.#deadlines.length > 0) {
      const head = this.#deadlines[0];
      if (!head.settled && head.deadline > now) break;
      this.#deadlines.shift();
      if (head.settled) continue;
      const error = new DOMException(
        `Task "${this.name}" ${head.row.id} timed out after ${formatDuration(this.#task.timeout)}`,
        "TimeoutError",
      );
      head.abort(error);
      this.#fail(head, error);
    }
    // Compact the queue when settled attempts pile up behind a long-running head.
    if (this.#deadlines.length > 64) this.#deadlines = this.#deadlines.filter((a) => !a.settled);
    this.#armDeadline();
  }

  #startHeartbeat(): void {
    this.#heartbeatTimer = setInterval(() => void this.#renewLeases(), this.#task.lease / 3);
  }

  /** Extends the lease of every running attempt; an attempt whose lease is gone is aborted. */
  async #renewLeases(): Promise<void> {
    if (this.#inFlight.size === 0) {
      clearInterval(this.#heartbeatTimer);
      this.#heartbeatTimer = undefined;
      return;
    }
    if (this.database.closed) return;
    const byToken = new Map<string, Attempt[]>();
    for (const attempt of this.#inFlight.values()) {
      const list = byToken.get(attempt.token);
      if (list) list.push(attempt);
      else byToken.set(attempt.token, [attempt]);
    }
    for (const [token, attempts] of byToken) {
      let held: Set<string>;
      try {
        held = await this.database.storage.renew(token, this.database.now() + this.#task.lease);
      } catch (error) {
        this.#log.error(`Task "${this.name}": renewing leases failed: ${toError(error).message}`, {
          task: this.name,
          error: toError(error),
        });
        continue;
      }
      for (const attempt of attempts) {
        if (attempt.settled || held.has(attempt.row.id)) continue;
        this.#loseLease(attempt);
      }
    }
  }

  #loseLease(attempt: Attempt): void {
    if (!this.#finish(attempt)) return;
    attempt.abort(
      new DOMException(
        `Task "${this.name}" ${attempt.row.id}: lease lost, another runner may be running it`,
        "AbortError",
      ),
    );
    this.#log.warn(
      `Task "${this.name}" ${attempt.row.id}: lease lost while running (the process may have ` +
        `been paused or its event loop blocked for longer than the lease); the attempt was aborted`,
      { task: this.name, id: attempt.row.id, attempt: attempt.row.attempts },
    );
    this.#schedulePump();
  }

  /** Moves rows whose lease expired back to pending, or to failed when no attempts are left. */
  async #rescue(): Promise<void> {
    if (this.database.closed || this.#retryTimer !== undefined) return;
    let rescued: RescuedRow[];
    try {
      rescued = await this.database.storage.rescue(
        this.name,
        this.database.now(),
        this.#task.maxAttempts,
        "The worker stopped responding: its lease expired before the attempt ended",
      );
    } catch (error) {
      this.#onStorageError(error);
      return;
    }
    for (const row of rescued) {
      const fields = { task: this.name, id: row.id, attempt: row.attempts };
      if (row.state === "pending") {
        this.#log.warn(
          `Task "${this.name}" ${row.id}: lease expired during attempt ${row.attempts}; the task is due again`,
          fields,
        );
        this.#maybeDue = true;
      } else {
        this.#log.error(
          `Task "${this.name}" ${row.id}: lease expired during attempt ${row.attempts} of ${this.#task.maxAttempts}; no attempts left, the task failed`,
          fields,
        );
        void this.#runRescuedFailedHook(row);
      }
    }
    if (rescued.length > 0) this.#schedulePump();
  }

  async #runRescuedFailedHook(row: RescuedRow): Promise<void> {
    if (this.#task.failed === undefined) return;
    const attempt = new Attempt(
      { id: row.id, data: row.data, attempts: row.attempts, runAt: 0, priority: 0, created: 0 },
      "",
      0,
      0,
    );
    const error = await this.#decode(attempt);
    if (error !== undefined) return;
    this.#runHook({
      kind: "failed",
      attempt,
      error: new Error("The worker stopped responding: its lease expired before the attempt ended"),
    });
  }

  async #releaseRows(token: string, ids: string[]): Promise<void> {
    try {
      await this.database.storage.release(token, ids);
    } catch (error) {
      this.#log.error(
        `Task "${this.name}": releasing ${ids.length} leases failed; they expire in ${
          formatDuration(this.#task.lease)
        }: ${toError(error).message}`,
        { task: this.name, error: toError(error) },
      );
    }
  }

  /** Resolves when no attempt is running, or after `timeout` ms. Returns whether it drained. */
  #waitIdle(timeout: number): Promise<boolean> {
    if (this.#inFlight.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = Number.isFinite(timeout)
        ? setTimeout(() => resolve(false), Math.min(timeout, 2_147_483_647))
        : undefined;
      this.#idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  async stop(timeout: number): Promise<void> {
    if (this.#state !== "running") return;
    this.#state = "stopping";
    clearInterval(this.#pollTimer);
    clearTimeout(this.#wakeTimer);
    this.#wakeTimer = undefined;
    this.#wakeAt = -Infinity;

    const drained = await this.#waitIdle(timeout);
    if (!drained) {
      const byToken = new Map<string, string[]>();
      for (const attempt of [...this.#inFlight.values()]) {
        this.#finish(attempt);
        attempt.abort(
          new DOMException(
            `Task "${this.name}" ${attempt.row.id}: the runner stopped before the attempt ended`,
            "AbortError",
          ),
        );
        const ids = byToken.get(attempt.token);
        if (ids) ids.push(attempt.row.id);
        else byToken.set(attempt.token, [attempt.row.id]);
      }
      if (!this.database.closed) {
        for (const [token, ids] of byToken) await this.#releaseRows(token, ids);
      }
      this.#log.warn(
        `Task "${this.name}": stop timed out after ${formatDuration(timeout)}; released ${
          countOf([...byToken.values()].flat().length, "running attempt")
        } for another runner`,
        { task: this.name },
      );
    }

    // Wait for a pump in progress, then write what is left.
    while (this.#pumping) await sleep(1);
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    if (this.#settlements.length > 0 && !this.database.closed) {
      try {
        await this.#flush();
      } catch (error) {
        this.#log.error(
          `Task "${this.name}": recording ${this.#settlements.length} results failed while ` +
            `stopping; those tasks run again after their lease expires: ${toError(error).message}`,
          { task: this.name, error: toError(error) },
        );
      }
    }
    await Promise.all(this.#hooks);

    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#deadlineTimer);
    this.#heartbeatTimer = undefined;
    this.#deadlineTimer = undefined;
    this.database.unregister(this);
    this.#state = "stopped";
  }
}

// ---------------------------------------------------------------------------------------------
// Loading a directory of task modules
// ---------------------------------------------------------------------------------------------

const taskFileExtensions = new Set([".ts", ".mts", ".js", ".mjs"]);

function isTaskFile(fileName: string): boolean {
  if (fileName.startsWith("_") || fileName.startsWith(".")) return false;
  if (fileName.endsWith(".d.ts") || fileName.endsWith(".d.mts")) return false;
  if (/\.(test|spec)\.[^.]+$/.test(fileName)) return false;
  return taskFileExtensions.has(extname(fileName));
}

function isTypeScriptLoadError(error: unknown, file: string): boolean {
  const code = (error as { code?: string })?.code;
  return (file.endsWith(".ts") || file.endsWith(".mts")) &&
    (code === "ERR_UNKNOWN_FILE_EXTENSION" ||
      code === "ERR_UNSUPPORTED_NODE_MODULES_TYPE_STRIPPING");
}

/**
 * Imports every task module of a directory and returns their default exports.
 *
 * @throws {Error} When the directory is missing or empty, a module fails to load, or a module's
 *   default export is not a task. The message names the file.
 */
async function loadTaskDirectory(directory: string): Promise<Array<Task<unknown>>> {
  const path = resolvePath(directory);
  let entries: string[];
  try {
    const info = await stat(path);
    if (!info.isDirectory()) {
      throw new Error(`Task directory ${JSON.stringify(path)} is a file: pass its directory`);
    }
    entries = await readdir(path);
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") {
      throw new Error(
        `Task directory ${JSON.stringify(path)} does not exist: pass the directory that holds ` +
          `the task modules, relative to ${JSON.stringify(resolvePath("."))} or absolute`,
        { cause: error },
      );
    }
    throw error;
  }

  const files = entries.filter(isTaskFile).sort();
  if (files.length === 0) {
    throw new Error(
      `Task directory ${JSON.stringify(path)} has no task modules (.ts, .mts, .js or .mjs ` +
        `files not starting with "_" or "." and not ending in .test or .d.ts)`,
    );
  }

  const tasks: Array<Task<unknown>> = [];
  for (const fileName of files) {
    const file = join(path, fileName);
    let module: { default?: unknown };
    try {
      module = await import(pathToFileURL(file).href);
    } catch (error) {
      if (isTypeScriptLoadError(error, file)) {
        throw new Error(
          `Cannot load task module ${JSON.stringify(file)}: this runtime cannot import ` +
            `TypeScript. Compile the task modules to JavaScript, run Node.js with a loader ` +
            `such as tsx (node --import tsx), or use Bun or Deno.`,
          { cause: error },
        );
      }
      throw new Error(
        `Cannot load task module ${JSON.stringify(file)}: ${toError(error).message}`,
        { cause: error },
      );
    }
    if (!taskInternals.has(module.default as object)) {
      throw new Error(
        `Task module ${JSON.stringify(file)} does not export a task: its default export is ${
          describeValue(module.default)
        }. Add "export default defineDatabaseTask(database, { ... })".`,
      );
    }
    tasks.push(module.default as Task<unknown>);
  }
  return tasks;
}

// ---------------------------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------------------------

const runTasksOptionsSchema = v.strictObject({
  debug: v.optional(v.boolean("true or false"), false),
  logger: v.optional(
    v.custom<Logger>(
      (value) =>
        typeof value === "object" && value !== null &&
        ["debug", "info", "warn", "error"].every((method) =>
          typeof (value as Record<string, unknown>)[method] === "function"
        ),
      "an object with debug, info, warn and error methods",
    ),
  ),
  signal: v.optional(v.instance(AbortSignal, "an AbortSignal")),
  handleSignals: v.optional(v.boolean("true or false"), false),
  stopTimeout: v.optional(durationSchema(), 30_000),
});

const stopOptionsSchema = v.strictObject({
  timeout: v.optional(durationSchema(), 30_000),
});

/** How often the runner looks for pending rows of tasks that no runner here knows. */
const unknownNamesInterval = 60_000;

/**
 * Loads tasks and starts one runner for each.
 *
 * @param tasks A directory of task modules, or an array of tasks. A directory is read without
 *   recursion: every `.ts`, `.mts`, `.js` and `.mjs` file except `*.test.*`, `*.spec.*`,
 *   `*.d.ts` and names starting with `_` or `.` is imported, and its default export must be a
 *   task. Node.js can import `.ts` files only with a loader.
 * @param options See {@linkcode RunTasksOptions}.
 * @returns The running {@linkcode Runner}, once every database is ready.
 * @throws {Error} When the directory or a module cannot be loaded (the message names the file),
 *   two tasks share a name, or a database cannot be opened.
 *
 * @example Run a directory until SIGTERM
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * await runTasks("app/tasks", { debug: true, handleSignals: true });
 * ```
 */
export async function runTasks(
  tasks: string | ReadonlyArray<Task<unknown>>,
  options: RunTasksOptions = {},
): Promise<Runner> {
  const parsed = parseOptions(runTasksOptionsSchema, options, "runTasks()");
  const logger: Logger = parsed.logger ?? consoleLogger;

  let list: ReadonlyArray<Task<unknown>>;
  if (typeof tasks === "string") {
    list = await loadTaskDirectory(tasks);
  } else if (Array.isArray(tasks)) {
    if (tasks.length === 0) {
      throw new TypeError(
        "Invalid tasks for runTasks(): the array is empty, pass at least one task",
      );
    }
    list = tasks;
  } else {
    throw new TypeError(
      `Invalid tasks for runTasks(): expected a directory path or an array of tasks, received ${
        describeValue(tasks)
      }`,
    );
  }

  const definitions = list.map((task, index) =>
    toTaskInternals(task, `runTasks() (item ${index})`)
  );
  const byName = new Map<string, TaskInternals>();
  for (const definition of definitions) {
    const other = byName.get(definition.name);
    if (other !== undefined && other !== definition) {
      throw new Error(
        `Two tasks are named ${JSON.stringify(definition.name)}${
          other.file && definition.file ? ` (in ${other.file} and ${definition.file})` : ""
        }: give each task its own name`,
      );
    }
    byName.set(definition.name, definition);
  }
  const unique = [...byName.values()];

  const databases = new Set(unique.map((definition) => definition.database));
  for (const database of databases) {
    database.logger = logger;
    await database.ready();
  }

  const runners = unique.map((definition) => new TaskRunner(definition, logger, parsed.debug));
  for (const runner of runners) runner.start();
  logger.info(
    `tasklite: running ${countOf(runners.length, "task")}: ${[...byName.keys()].join(", ")}`,
    {
      tasks: [...byName.keys()],
    },
  );

  let stopPromise: Promise<void> | undefined;
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((resolve) => (resolveStopped = resolve));

  const unknownNames = watchUnknownNames(databases, new Set(byName.keys()), logger);
  let removeSignalHandlers = () => {};

  const stop = (stopOptions?: StopOptions): Promise<void> => {
    if (stopPromise !== undefined) return stopPromise;
    const { timeout } = parseOptions(stopOptionsSchema, stopOptions ?? {}, "stop()");
    stopPromise = (async () => {
      clearInterval(unknownNames);
      removeSignalHandlers();
      await Promise.all(runners.map((runner) => runner.stop(timeout)));
      logger.info(`tasklite: stopped ${countOf(runners.length, "task")}`, {
        tasks: [...byName.keys()],
      });
      resolveStopped();
    })();
    return stopPromise;
  };

  if (parsed.signal !== undefined) {
    if (parsed.signal.aborted) void stop({ timeout: parsed.stopTimeout });
    else {
      parsed.signal.addEventListener("abort", () => void stop({ timeout: parsed.stopTimeout }), {
        once: true,
      });
    }
  }
  if (parsed.handleSignals) {
    removeSignalHandlers = handleSignals(
      (signal) => {
        logger.info(`tasklite: received ${signal}, stopping (a second signal exits at once)`);
        return stop({ timeout: parsed.stopTimeout });
      },
    );
  }

  return { tasks: [...byName.keys()], stop, stopped };
}

/** Warns once per name about pending rows that no task of this runner handles. */
function watchUnknownNames(
  databases: Set<TaskDatabase>,
  known: Set<string>,
  logger: Logger,
): ReturnType<typeof setInterval> {
  const warned = new Set<string>();
  const check = async () => {
    for (const database of databases) {
      if (database.closed) continue;
      let names: string[];
      try {
        names = await database.storage.pendingNames();
      } catch {
        continue; // The task runners report database errors.
      }
      for (const name of names) {
        if (known.has(name) || warned.has(name)) continue;
        warned.add(name);
        logger.warn(
          `Pending tasks named ${JSON.stringify(name)} have no task in this runner; they are ` +
            `left for a runner that defines "${name}"`,
          { task: name },
        );
      }
    }
  };
  void check();
  const timer = setInterval(check, unknownNamesInterval);
  unrefTimer(timer);
  return timer;
}

// ---------------------------------------------------------------------------------------------
// Runtime differences: signals
// ---------------------------------------------------------------------------------------------

type SignalName = "SIGINT" | "SIGTERM";

interface DenoSignals {
  addSignalListener(signal: SignalName, handler: () => void): void;
  removeSignalListener(signal: SignalName, handler: () => void): void;
  exit(code: number): never;
}

interface NodeProcess {
  on(signal: SignalName, handler: () => void): void;
  off(signal: SignalName, handler: () => void): void;
  listenerCount(signal: SignalName): number;
  kill(pid: number, signal: SignalName): void;
  exit(code: number): never;
  pid: number;
}

const signalNumbers: Record<SignalName, number> = { SIGINT: 2, SIGTERM: 15 };

/**
 * Calls `onSignal` on the first SIGINT or SIGTERM and exits at once on a second one. After the
 * graceful stop, the process ends with the signal's exit code unless something else listens for
 * it. Returns a function that removes the handlers.
 */
function handleSignals(onSignal: (signal: SignalName) => Promise<void>): () => void {
  const deno = (globalThis as { Deno?: DenoSignals }).Deno;
  const nodeProcess = (globalThis as { process?: NodeProcess }).process;
  let received: SignalName | undefined;
  const handlers = new Map<SignalName, () => void>();

  const remove = () => {
    for (const [signal, handler] of handlers) {
      if (deno !== undefined) deno.removeSignalListener(signal, handler);
      else nodeProcess?.off(signal, handler);
    }
    handlers.clear();
  };

  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    const handler = () => {
      const exitCode = 128 + signalNumbers[signal];
      if (received !== undefined) {
        if (deno !== undefined) deno.exit(exitCode);
        else nodeProcess?.exit(exitCode);
        return;
      }
      received = signal;
      void onSignal(signal).finally(() => {
        // Keep the handlers until the stop is done, so a second signal still exits at once.
        remove();
        if (deno !== undefined) deno.exit(exitCode);
        else if (nodeProcess !== undefined && nodeProcess.listenerCount(signal) === 0) {
          nodeProcess.exit(exitCode);
        }
      });
    };
    handlers.set(signal, handler);
    if (deno !== undefined) deno.addSignalListener(signal, handler);
    else nodeProcess?.on(signal, handler);
  }
  return remove;
}
