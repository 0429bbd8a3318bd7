/**
 * tasklite is a durable task queue that keeps its tasks in the application's own SQLite
 * database through libSQL, and runs the same code under Node.js, Bun and Deno.
 *
 * A task is a definition: a name, a `process` function and options. `perform` writes a row to
 * the `tasks` table. A runner claims due rows under a lease, runs them, and deletes the row of
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
  type Transaction,
} from "@libsql/client";
import { Cron } from "croner";
import * as v from "valibot";
import { type FSWatcher, realpathSync, statSync, watch } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { basename, dirname, extname, join, resolve as resolvePath } from "node:path";
import { setImmediate } from "node:timers";
import { fileURLToPath, pathToFileURL } from "node:url";

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/**
 * A length of time: milliseconds as a number, or a number followed by a unit: `"500ms"`,
 * `"30s"`, `"5m"`, `"1h"` or `"2d"`. Options take up to 100 years unless they name a smaller
 * range.
 *
 * @example Two ways to write 90 seconds
 * ```ts
 * import type { Duration } from "tasklite";
 *
 * const asNumber: Duration = 90_000;
 * const asString: Duration = "1.5m";
 * ```
 */
export type Duration = number | `${number}${"ms" | "s" | "m" | "h" | "d"}`;

/**
 * A logger with the four methods of `console`. Each call gets a readable message and an object
 * with the fields it mentions (task name, id, attempt, duration in ms).
 *
 * @example Log one JSON object per line
 * ```ts
 * import { type Logger, runTasks } from "tasklite";
 *
 * const write = (level: string) => (message: string, fields?: Record<string, unknown>) =>
 *   console.log(JSON.stringify({ level, message, ...fields }));
 * const logger: Logger = {
 *   debug: write("debug"),
 *   info: write("info"),
 *   warn: write("warn"),
 *   error: write("error"),
 * };
 * await runTasks("app/tasks", { logger });
 * ```
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

/**
 * Options of {@linkcode openDatabase}.
 *
 * @example Wait longer for locks held by other processes
 * ```ts
 * import { openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db", { busyTimeout: "10s" });
 * ```
 */
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
   * `PRAGMA data_version`, when the runtime cannot watch the file's WAL for changes (on some
   * network file systems). Where it can, a commit of another process is seen at once and this
   * check runs once a second as a backup. Lower values pick up tasks sooner without file events
   * and cost a little more CPU while idle.
   *
   * @default {"40ms"}
   */
  watchInterval?: Duration;
  /**
   * Whether to create what is missing: the database file, and the `tasks` and `schedules`
   * tables. With `false`, `openDatabase` throws when a local file does not exist, and the first
   * operation rejects when the database has no `tasks` table, so that a tool which inspects a
   * queue never creates one at a mistyped path. An older tasklite schema is still upgraded.
   *
   * @default {true}
   */
  create?: boolean;
}

/**
 * A tasklite database: a libSQL client with the `tasks` table in place. Create it with
 * {@linkcode openDatabase}.
 *
 * @example Count the failed tasks with the same client
 * ```ts
 * import { openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * await database.ready();
 * const result = await database.client.execute(
 *   "SELECT count(*) AS failed FROM tasks WHERE state = 'failed'",
 * );
 * console.log(result.rows[0].failed);
 * database.close();
 * ```
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

/**
 * The context that {@linkcode TaskDefinition.process} receives for one attempt.
 *
 * @example A process function declared on its own
 * ```ts
 * import { defineDatabaseTask, openDatabase, type TaskContext } from "tasklite";
 *
 * async function download({ data, attempt, signal }: TaskContext<{ url: string }>) {
 *   console.log(`attempt ${attempt}: ${data.url}`);
 *   await fetch(data.url, { signal });
 * }
 *
 * const downloadTask = defineDatabaseTask(openDatabase("file:app.db"), {
 *   name: "download",
 *   process: download,
 * });
 * ```
 */
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
  /**
   * The tick of the schedule that enqueued this run: the instant its cron pattern fired, which
   * stays the same across retries. `undefined` for runs enqueued by {@linkcode perform}.
   */
  readonly scheduledFor?: Date;
}

/**
 * The context that {@linkcode TaskDefinition.success} receives after a recorded success.
 *
 * @example Report the attempt that succeeded
 * ```ts
 * import { defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const welcome = defineDatabaseTask<{ email: string }>(openDatabase("file:app.db"), {
 *   name: "welcome",
 *   async process({ data }) {
 *     await fetch("https://mail.example/send", { method: "POST", body: data.email });
 *   },
 *   success({ id, attempt }) {
 *     console.log(`task ${id} succeeded on attempt ${attempt}`);
 *   },
 * });
 * ```
 */
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

/**
 * The context that {@linkcode TaskDefinition.failed} receives after the last attempt failed.
 *
 * @example Report a task that used up its attempts
 * ```ts
 * import { defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const welcome = defineDatabaseTask<{ email: string }>(openDatabase("file:app.db"), {
 *   name: "welcome",
 *   async process({ data }) {
 *     await fetch("https://mail.example/send", { method: "POST", body: data.email });
 *   },
 *   failed({ id, attempts, error }) {
 *     console.error(`task ${id} failed after ${attempts} attempts: ${error.message}`);
 *   },
 * });
 * ```
 */
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
 *
 * @example Wait 10 s more after each failed attempt
 * ```ts
 * import { type BackoffFunction, defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const linear: BackoffFunction = (attempt) => attempt * 10_000;
 *
 * const sync = defineDatabaseTask(openDatabase("file:app.db"), {
 *   name: "sync",
 *   backoff: linear,
 *   async process() {},
 * });
 * ```
 */
export type BackoffFunction = (attempt: number, error: Error) => Duration;

/**
 * A valibot schema for a task's data, synchronous or asynchronous.
 *
 * @example A schema kept beside the task
 * ```ts
 * import * as v from "valibot";
 * import type { DataSchema } from "tasklite";
 *
 * const invoiceSchema: DataSchema = v.object({
 *   invoiceId: v.pipe(v.number(), v.integer()),
 *   email: v.pipe(v.string(), v.email()),
 * });
 * ```
 */
// deno-lint-ignore no-explicit-any
export type DataSchema<TInput = any, TOutput = TInput> =
  | v.GenericSchema<TInput, TOutput>
  | v.GenericSchemaAsync<TInput, TOutput>;

/**
 * The definition of a task, passed to {@linkcode defineDatabaseTask}.
 *
 * @example A definition with retries spaced one minute apart
 * ```ts
 * import { defineDatabaseTask, openDatabase, type TaskDefinition } from "tasklite";
 *
 * const shipOrder: TaskDefinition<{ orderId: number }> = {
 *   name: "ship-order",
 *   maxAttempts: 10,
 *   backoff: "1m",
 *   async process({ data }) {
 *     console.log(`shipping order ${data.orderId}`);
 *   },
 * };
 *
 * const task = defineDatabaseTask(openDatabase("file:app.db"), shipOrder);
 * ```
 */
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
   * lease after its last renewal. Keep it well above the database's `busyTimeout` and the
   * longest synchronous work of `process`: both block the event loop, and with it the renewals.
   *
   * @default {"30s"}
   */
  lease?: Duration;
  /**
   * A schedule that {@linkcode runTasks} stores and enqueues: a cron pattern such as
   * `"0 3 * * *"` (UTC), or a {@linkcode CronDefinition} with data and options. The schedule is
   * named after the task unless `name` is given. It is checked here, so an invalid pattern, time
   * zone or option throws from `defineDatabaseTask`. When a task no longer defines it, the next
   * `runTasks` removes the stored schedule.
   */
  cron?: string | CronDefinition<T>;
  /**
   * How long the row of a successful run stays in the table as `completed`. With 0 the row is
   * deleted when the success is recorded. A runner of this task deletes older rows every
   * `cleanupInterval` (see {@linkcode RunTasksOptions}).
   *
   * @default {0}
   */
  keepCompleted?: Duration;
  /**
   * How long the row of a `failed` or `cancelled` task stays in the table, counted from when it
   * reached that state. A runner of this task deletes older rows every `cleanupInterval`.
   *
   * @default {"30d"}
   */
  keepFailed?: Duration;
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
 *
 * @example A function that accepts any task whose data is an email address
 * ```ts
 * import { perform, type Task } from "tasklite";
 *
 * async function enqueueFor(task: Task<{ email: string }>, email: string): Promise<string> {
 *   return await perform(task, { email });
 * }
 * ```
 */
export interface Task<T> {
  /** The task's name. */
  readonly name: string;
  /** The database that stores the task's rows. */
  readonly database: Database;
  /** Phantom field that carries the data type; it has no value at run time. */
  readonly __data?: T;
}

/**
 * Options of {@linkcode perform} and {@linkcode performMany}.
 *
 * @example Run at a fixed time, before other due tasks of the same name
 * ```ts
 * import { perform } from "tasklite";
 * import monthlyReport from "./tasks/monthly-report.ts";
 *
 * await perform(monthlyReport, { month: "2025-01" }, {
 *   runAt: new Date("2025-02-01T06:00:00Z"),
 *   priority: 10,
 * });
 * ```
 */
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
  /**
   * A deduplication key. While a task of the same name with this key waits (`scheduled` or
   * `pending`) or runs (`running`), `perform` enqueues nothing and resolves to that task's id.
   * The key is free again once the task completes, fails, or is cancelled. Only
   * {@linkcode perform} and {@linkcode performDetailed} take it. It has 1 to 1000 UTF-16
   * code units, and no NUL character or lone surrogate.
   */
  key?: string;
  /**
   * The action of a `perform` with a `key` when a live task of the same name already has the
   * key. `"ignore"` leaves the existing task as it is. `"replace"` gives a waiting task
   * (`scheduled` or `pending`) this call's data, due time and priority, and keeps its id and
   * attempt count. A `running` task is never replaced.
   *
   * @default {"ignore"}
   */
  onConflict?: "ignore" | "replace";
  /**
   * An open `@libsql/client` write transaction on the task's database. The task is inserted
   * inside it, so it is committed or rolled back together with the application's own writes,
   * and runners in this process are woken after the commit. For a local file opened by
   * {@linkcode openDatabase}, use `database.client.transaction("write")`. The client has one
   * connection, so other tasklite statements wait until the transaction ends: keep it short,
   * and call {@linkcode Database.ready} before opening it. Do not open the transaction on a
   * second client of the same file in the same process: a tasklite write that waits for its
   * lock blocks the event loop, so the transaction cannot commit until the busy timeout.
   * A transaction on another database is rejected; for a client passed to `openDatabase`,
   * only once {@linkcode Database.ready} has resolved (before that, tasklite cannot ask the
   * client for its file while the transaction may hold its one connection).
   */
  transaction?: Transaction;
}

/**
 * The result of {@linkcode performDetailed}.
 *
 * @example Learn whether a keyed perform created a task
 * ```ts
 * import { defineDatabaseTask, openDatabase, performDetailed } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const invoice = defineDatabaseTask<{ orderId: number }>(database, {
 *   name: "send-invoice",
 *   process() {},
 * });
 *
 * const result = await performDetailed(invoice, { orderId: 42 }, { key: "order-42" });
 * if (result.status === "duplicate") console.log(`task ${result.id} already covers order 42`);
 * ```
 */
export interface PerformResult {
  /** The id of the new task, or of the existing task on a duplicate. */
  readonly id: string;
  /**
   * `"created"` when a new task was inserted. `"duplicate"` when a live task with the same key
   * exists and was left as it is. `"replaced"` when `onConflict: "replace"` updated a pending
   * task with the same key.
   */
  readonly status: "created" | "duplicate" | "replaced";
}

/**
 * Options of {@linkcode Runner.stop}.
 *
 * @example Give running attempts 10 seconds to finish
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * // ... when the process shuts down:
 * await runner.stop({ timeout: "10s" });
 * ```
 */
export interface StopOptions {
  /**
   * How long to wait for running attempts. After it, their signals fire and their leases are
   * released, so another runner can claim them at once. A released attempt does not count
   * against `maxAttempts`. Success and failed hooks still running at this time are not waited
   * for.
   *
   * @default {"30s"}
   */
  timeout?: Duration;
}

/**
 * Options of {@linkcode runTasks}.
 *
 * @example Stop the runners with an AbortSignal
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const controller = new AbortController();
 * await runTasks("app/tasks", { debug: true, signal: controller.signal, stopTimeout: "10s" });
 * // ... later, to stop:
 * controller.abort();
 * ```
 */
export interface RunTasksOptions {
  /**
   * Log each claim, success and failure at debug level, with task name and id.
   *
   * @default {false}
   */
  debug?: boolean;
  /**
   * The logger that receives log lines. Warnings and errors are always logged, and starts and
   * stops at info level. Claims and results are logged only with `debug`.
   *
   * @default {console}
   */
  logger?: Logger;
  /** Stops the runners when it aborts, as {@linkcode Runner.stop} does. */
  signal?: AbortSignal;
  /**
   * Stop gracefully on SIGINT and SIGTERM, then exit with status 0. A second signal ends the
   * process at once, with status 130 (SIGINT) or 143 (SIGTERM), and leaves the running tasks to
   * be taken up again when their leases expire.
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
  /**
   * Receives every lifecycle event of the runners. It is called synchronously; an error it
   * throws is logged and does not affect the runner. See {@linkcode Runner.on} for one type.
   */
  onEvent?: (event: TaskEvent) => void;
  /**
   * How often the runners delete rows whose retention (`keepCompleted`, `keepFailed`) ran out.
   * The first cleanup runs when the runners start.
   *
   * @default {"1m"}
   */
  cleanupInterval?: Duration;
}

/**
 * The runners that {@linkcode runTasks} started, one for each task.
 *
 * @example List the tasks, then stop
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * console.log(`running ${runner.tasks.join(", ")}`);
 * await runner.stop();
 * ```
 */
export interface Runner {
  /** The names of the tasks that are being run. */
  readonly tasks: readonly string[];
  /**
   * Stops claiming, waits for running attempts (up to `timeout`), records their results, and
   * resolves when every attempt is settled. Calling it again returns the same promise.
   */
  stop(options?: StopOptions): Promise<void>;
  /** Resolves when the runners have stopped, after `stop()`, the `signal` option or a signal. */
  readonly stopped: Promise<void>;
  /**
   * Calls `listener` for each event of one type, synchronously. An error it throws is logged
   * and does not affect the runner.
   *
   * @returns A function that removes the listener.
   * @throws {TypeError} When the type is not an event type or the listener is not a function.
   */
  on<TType extends TaskEvent["type"]>(
    type: TType,
    listener: (event: Extract<TaskEvent, { type: TType }>) => void,
  ): () => void;
  /**
   * Deletes the rows of this runner's tasks whose retention ran out at `now`, as the runner
   * does every `cleanupInterval`, and resolves to the number of rows deleted.
   *
   * @param now The time to measure retention against, in milliseconds since the epoch or as a
   *   `Date`. Defaults to the database's clock.
   */
  cleanup(now?: Date | number): Promise<number>;
  /** The scheduler that enqueues the stored schedules of these tasks. */
  readonly scheduler: Scheduler;
}

/**
 * The policy for ticks that passed while no scheduler ran (after downtime):
 * - `"none"`: skip them and wait for the next tick. The latest of them is still enqueued when
 *   a scheduler handles it within one minute of its time, so a late timer or a restart within
 *   that minute does not lose it.
 * - `"latest"`: enqueue the most recent missed tick once, and skip the older ones.
 * - `"all"`: enqueue every missed tick, at most `maxCatchUp` of them (the most recent ones).
 *
 * @example Run each hour missed during downtime, at most the last 24
 * ```ts
 * import { type CatchUp, defineDatabaseTask, openDatabase, schedule } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const rollup = defineDatabaseTask(database, { name: "hourly-rollup", process() {} });
 *
 * const catchUp: CatchUp = "all";
 * await schedule(rollup, "0 * * * *", undefined, { catchUp, maxCatchUp: 24 });
 * ```
 */
export type CatchUp = "none" | "latest" | "all";

/**
 * Options of {@linkcode schedule} and of a {@linkcode CronDefinition}.
 *
 * @example Back up at 02:30 Berlin time, skipping a tick while a backup still runs
 * ```ts
 * import { defineDatabaseTask, openDatabase, schedule } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const backup = defineDatabaseTask(database, { name: "backup", process() {} });
 *
 * await schedule(backup, "30 2 * * *", undefined, {
 *   name: "nightly-backup",
 *   timezone: "Europe/Berlin",
 *   overlap: false,
 * });
 * ```
 */
export interface ScheduleOptions {
  /**
   * The schedule's name, unique per database. Registering another pattern or other data under
   * the same name replaces the stored schedule.
   *
   * @default {the task's name}
   */
  name?: string;
  /**
   * The IANA time zone in which the pattern is read, such as `"Europe/Berlin"`.
   *
   * On a daylight-saving change, a fixed-time pattern runs once. Such a pattern has no `*` or
   * step in its second, minute and hour fields, such as `"30 2 * * *"`. When its local time
   * does not exist that day, it runs right after the change. When its local time happens
   * twice, it runs at the first occurrence. Other patterns, such as every 5 minutes, run at
   * every local time that exists, so their runs stay the same real time apart. A step in the
   * hour field, such as every 2 hours, follows the local clock, so across a change two of its
   * runs are 1 hour further apart or closer together.
   *
   * @default {"UTC"}
   */
  timezone?: string;
  /**
   * The policy for ticks missed during downtime: see {@linkcode CatchUp}.
   *
   * @default {"none"}
   */
  catchUp?: CatchUp;
  /**
   * With `catchUp: "all"`, the maximum number of missed ticks that one pass of the scheduler
   * enqueues. Older missed ticks are skipped. Only allowed with `catchUp: "all"`.
   *
   * @default {100}
   */
  maxCatchUp?: number;
  /**
   * Whether a tick is enqueued while the previous run of this schedule is still pending or
   * running. With `false`, such a tick is skipped.
   *
   * @default {true}
   */
  overlap?: boolean;
}

/**
 * A schedule carried by a {@linkcode TaskDefinition} as its `cron` option.
 *
 * @example A weekly digest with data and a time zone
 * ```ts
 * import { defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const digest = defineDatabaseTask<{ audience: string }>(openDatabase("file:app.db"), {
 *   name: "weekly-digest",
 *   cron: { pattern: "0 8 * * 1", data: { audience: "all" }, timezone: "America/New_York" },
 *   async process({ data }) {
 *     console.log(`sending the weekly digest to ${data.audience}`);
 *   },
 * });
 * ```
 */
export interface CronDefinition<T> extends ScheduleOptions {
  /**
   * A cron pattern: five fields (minute, hour, day of month, month, day of week), optionally a
   * leading seconds field and a trailing year field, or a nickname such as `"@daily"`.
   */
  pattern: string;
  /** The data of each run. It must pass the task's schema. */
  data?: T;
}

/**
 * A schedule registered by {@linkcode schedule}.
 *
 * @example Print the next run, then stop enqueueing in this process
 * ```ts
 * import { defineDatabaseTask, openDatabase, schedule } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const sync = defineDatabaseTask(database, { name: "sync", process() {} });
 *
 * const handle = await schedule(sync, "0 6 * * *");
 * console.log(`${handle.name}: next run at ${handle.nextRun()?.toISOString()}`);
 * handle.stop();
 * ```
 */
export interface ScheduleHandle {
  /** The schedule's name. */
  readonly name: string;
  /** The name of the task that the schedule enqueues. */
  readonly task: string;
  /** The cron pattern. */
  readonly pattern: string;
  /** The IANA time zone of the pattern. */
  readonly timezone: string;
  /**
   * Computes the first tick after `after`.
   *
   * @param after The instant to start from.
   * @default {the database's clock}
   * @returns The tick, or `null` when the pattern has no tick after `after`.
   */
  nextRun(after?: Date | number): Date | null;
  /**
   * Stops enqueueing this schedule in this process, until {@linkcode schedule} registers it
   * again. The stored schedule stays, and schedulers in other processes keep enqueueing it;
   * {@linkcode unschedule} removes it everywhere.
   */
  stop(): void;
}

/**
 * A stored schedule, as {@linkcode listSchedules} returns it.
 *
 * @example Show when each schedule fired last
 * ```ts
 * import { listSchedules, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * for (const info of await listSchedules(database)) {
 *   const last = info.lastFiredAt?.toISOString() ?? "never";
 *   console.log(`${info.name} (${info.pattern}, ${info.timezone}): last fired ${last}`);
 * }
 * ```
 */
export interface ScheduleInfo {
  /** The schedule's name. */
  readonly name: string;
  /** The name of the task that the schedule enqueues. */
  readonly task: string;
  /** The cron pattern. */
  readonly pattern: string;
  /** The IANA time zone of the pattern. */
  readonly timezone: string;
  /** The data of each run. */
  readonly data: unknown;
  /** The catch-up policy. */
  readonly catchUp: CatchUp;
  /** The catch-up limit, set only with `catchUp: "all"`. */
  readonly maxCatchUp?: number;
  /** Whether ticks are enqueued while the previous run still waits or runs. */
  readonly overlap: boolean;
  /**
   * The latest tick that a scheduler handled: enqueued, or skipped by the catch-up or overlap
   * rule. `null` before the first tick.
   */
  readonly lastFiredAt: Date | null;
  /** The next tick after now and after `lastFiredAt`, or `null` when the pattern has none. */
  readonly nextFireAt: Date | null;
  /** Whether the schedule came from a task's `cron` option rather than a `schedule()` call. */
  readonly fromDefinition: boolean;
}

/**
 * A run that a scheduler enqueued for a tick.
 *
 * @example Check the run that a daily schedule enqueued
 * ```ts
 * import { defineDatabaseTask, openDatabase, runTasks } from "tasklite";
 *
 * let now = Date.parse("2025-01-01T00:00:00Z");
 * const database = openDatabase(":memory:", { now: () => now });
 * const report = defineDatabaseTask(database, { name: "report", cron: "0 6 * * *", process() {} });
 *
 * const runner = await runTasks([report]);
 * now = Date.parse("2025-01-01T06:00:00Z");
 * const [occurrence] = await runner.scheduler.runOnce();
 * console.log(occurrence.schedule, occurrence.id, occurrence.scheduledFor.toISOString());
 * await runner.stop();
 * ```
 */
export interface Occurrence {
  /** The name of the schedule. */
  readonly schedule: string;
  /** The name of the task. */
  readonly task: string;
  /** The id of the new run, as {@linkcode perform} would return it. */
  readonly id: string;
  /** The tick, which the run receives as {@linkcode TaskContext.scheduledFor}. */
  readonly scheduledFor: Date;
}

/**
 * The scheduler of a {@linkcode Runner}. It sleeps until the next tick of the stored schedules
 * of the runner's tasks, then enqueues each due tick exactly once, however many processes run
 * a scheduler on the same database.
 *
 * @example Test a schedule with a fake clock
 * ```ts
 * import { defineDatabaseTask, openDatabase, runTasks } from "tasklite";
 *
 * let now = Date.parse("2025-01-01T00:00:00Z");
 * const database = openDatabase(":memory:", { now: () => now });
 * const hourly = defineDatabaseTask(database, { name: "hourly", cron: "0 * * * *", process() {} });
 *
 * const runner = await runTasks([hourly]);
 * now += 3_600_000;
 * console.log((await runner.scheduler.runOnce()).length); // 1: the tick at 01:00
 * await runner.stop();
 * ```
 */
export interface Scheduler {
  /**
   * Enqueues every due tick now instead of waiting for the next timer. Tests call it after
   * moving the database's clock.
   *
   * @param now The current time.
   * @default {the database's clock}
   * @returns The runs that this call enqueued. Ticks that another process enqueued first are
   *   not included.
   * @throws {Error} When the database cannot be read or written.
   */
  runOnce(now?: Date | number): Promise<Occurrence[]>;
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

/**
 * Creates a valibot schema that accepts a {@linkcode Duration} from `minimum` to `maximum`
 * milliseconds and outputs milliseconds. A value that is not a duration fails as a type; a
 * number out of range (negative, `Infinity`) fails as a range.
 */
function durationSchema(minimum = 0, maximum = maxDuration) {
  const upTo = maximum === maxDuration ? "100 years" : formatDuration(maximum);
  let range: string;
  if (minimum > 0 && maximum < Infinity) {
    range = `from ${formatDuration(minimum)} to ${upTo}`;
  } else if (minimum > 0) {
    range = `of at least ${formatDuration(minimum)}`;
  } else if (maximum < Infinity) {
    range = `from 0 ms to ${upTo}`;
  } else {
    range = "of 0 or more";
  }
  const expected = `a duration ${range} (${durationHint})`;
  return v.pipe(
    v.custom<Duration>(
      (value) =>
        (typeof value === "number" && !Number.isNaN(value)) ||
        (typeof value === "string" && durationPattern.test(value)),
      `a duration (${durationHint})`,
    ),
    v.transform((value) => typeof value === "number" ? value : toMilliseconds(value) as number),
    v.minValue(minimum, expected),
    v.maxValue(maximum, expected),
  );
}

/**
 * The maximum duration of an option that names no smaller range: 100 years. A
 * delay stays far inside the range of `Date`, and a typo such as microseconds is caught.
 */
const maxDuration = 100 * 365.25 * 86_400_000;

/** The latest time that a `Date` can hold, in milliseconds since the epoch. */
const maxTime = 8.64e15;

/** Creates a valibot schema that accepts a valid `Date` or epoch milliseconds and outputs ms. */
function timeSchema() {
  return v.pipe(
    v.union(
      [
        v.pipe(v.date(), v.check((date) => !Number.isNaN(date.getTime()))),
        v.pipe(v.number(), v.finite(), v.safeInteger()),
      ],
      "a valid Date or milliseconds since the epoch",
    ),
    v.transform((value) => value instanceof Date ? value.getTime() : value),
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

  // A misspelled option also shows up as a missing one; the spelling is the cause to report.
  const issue =
    result.issues.find((candidate) =>
      candidate.type.endsWith("object") && candidate.expected === "never"
    ) ?? result.issues[0];
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
 *
 * @example Tell invalid data apart from other errors
 * ```ts
 * import { perform, TaskDataError } from "tasklite";
 * import doubleOptIn from "./tasks/double-opt-in.ts";
 *
 * try {
 *   await perform(doubleOptIn, { email: "not an address" });
 * } catch (error) {
 *   if (!(error instanceof TaskDataError)) throw error;
 *   console.error(error.message); // Invalid data for task "double-opt-in": data.email: ...
 * }
 * ```
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

/** The deepest nesting of objects and arrays that task data may have. */
const maxDataDepth = 1_000;

/**
 * Returns why a value does not survive a JSON round trip unchanged, or `undefined` when it does.
 * `undefined` at the top level is allowed and stored as SQL NULL.
 *
 * The text names no path: on a problem, `keys` is left holding the property names and array
 * indexes down to the value at fault, for {@linkcode pathOf}. Building the path only then keeps
 * the walk over valid data free of string building.
 */
function findJsonProblem(
  value: unknown,
  ancestors: object[],
  keys: Array<string | number>,
): string | undefined {
  if (ancestors.length >= maxDataDepth) {
    return `is nested more than ${maxDataDepth} levels deep; flatten the data`;
  }
  switch (typeof value) {
    case "string":
    case "boolean":
      return undefined;
    case "number":
      return Number.isFinite(value)
        ? undefined
        : `is ${value}, which JSON stores as null; use a finite number or null`;
    case "undefined":
      return "is undefined, which JSON drops; omit the property or use null";
    case "bigint":
      return "is a BigInt, which JSON cannot store; convert it to a string or a number";
    case "function":
      return "is a function, which JSON cannot store; pass only data";
    case "symbol":
      return "is a symbol, which JSON cannot store; use a string";
  }
  if (value === null) return undefined;

  const object = value as object;
  if (ancestors.includes(object)) {
    return "refers back to one of its parents (a circular structure), which JSON cannot store";
  }
  if (Array.isArray(object)) {
    for (let index = 0; index < object.length; index++) {
      if (!(index in object)) {
        keys.push(index);
        return "is an empty array slot, which JSON stores as null; fill it";
      }
    }
    return findItemProblem(object, object.keys(), ancestors, keys);
  }

  const prototype = Object.getPrototypeOf(object);
  if (object instanceof Date) {
    return "is a Date, which JSON turns into a string; pass date.toISOString() or date.getTime()";
  }
  if (prototype !== Object.prototype && prototype !== null) {
    return `is ${
      describeValue(object)
    }, which JSON cannot store without losing its type; convert it to plain objects and arrays`;
  }
  if (Object.getOwnPropertySymbols(object).length > 0) {
    return "has symbol keys, which JSON drops; use string keys";
  }
  return findItemProblem(object, Object.keys(object), ancestors, keys);
}

/** Checks the items of an array or object under the given keys, as {@linkcode findJsonProblem}. */
function findItemProblem(
  object: object,
  itemKeys: Iterable<string | number>,
  ancestors: object[],
  keys: Array<string | number>,
): string | undefined {
  ancestors.push(object);
  for (const key of itemKeys) {
    keys.push(key);
    const item = (object as Record<string | number, unknown>)[key];
    const problem = findJsonProblem(item, ancestors, keys);
    if (problem !== undefined) return problem;
    keys.pop();
  }
  ancestors.pop();
  return undefined;
}

/** Returns `where` followed by each key: `.name` for an identifier, `[0]` or `["a b"]` otherwise. */
function pathOf(where: string, keys: ReadonlyArray<string | number>): string {
  let path = where;
  for (const key of keys) {
    if (typeof key === "number") path += `[${key}]`;
    else path += isIdentifier(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
  }
  return path;
}

/**
 * Serialises task data to JSON, or to `null` for `undefined`.
 *
 * @throws {TypeError} When the data would not survive the round trip unchanged.
 */
function serializeData(data: unknown, task: string, where = "data"): string | null {
  if (data === undefined) return null;
  const keys: Array<string | number> = [];
  const problem = findJsonProblem(data, [], keys);
  if (problem !== undefined) {
    throw new TypeError(`Invalid data for task "${task}": ${pathOf(where, keys)} ${problem}`);
  }
  const json = JSON.stringify(data);
  // A UTF-8 byte takes at least a third of a UTF-16 unit, so only long strings need counting.
  if (json.length * 3 > maxValueBytes) {
    const bytes = new TextEncoder().encode(json).length;
    if (bytes > maxValueBytes) {
      throw new RangeError(
        `Invalid data for task "${task}": ${where} is ${bytes} bytes of JSON, above SQLite's ` +
          `limit of ${maxValueBytes} bytes for one value. Store large payloads elsewhere (a ` +
          `file or a table of your own) and pass a reference.`,
      );
    }
  }
  return json;
}

/**
 * SQLite's default limit on the size of one value (SQLITE_MAX_LENGTH). libSQL stores a longer
 * string as NULL without an error, so tasklite checks it before writing.
 */
const maxValueBytes = 1_000_000_000;

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
  const error = new Error(`Non-error value thrown: ${safeText(thrown)}`, { cause: thrown });
  // The stack would point into this module, not to where the value was thrown.
  error.stack = `Error: ${error.message}`;
  wrappedThrows.add(error);
  return error;
}

/** Errors that toError() made for thrown values, whose message already shows their cause. */
const wrappedThrows = new WeakSet<Error>();

/**
 * Renders any value as text without throwing: JSON when possible, otherwise `String()`, and
 * the value's type tag for objects that refuse both (no prototype, a throwing `toString`).
 */
function safeText(value: unknown): string {
  if (typeof value === "string") return value;
  try {
    const json = JSON.stringify(value);
    if (json !== undefined) return json;
  } catch {
    // Circular, BigInt inside, or a throwing toJSON: fall through.
  }
  try {
    return String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}

/** The maximum length of the error text stored in `failed_error`, in characters. */
const maxErrorText = 65_536;

/**
 * Formats an error for `failed_error`: its stack, which starts with the message, and its
 * causes. Never throws, even for errors whose fields are not strings or throw when read.
 */
function describeError(error: Error): string {
  let text: string;
  try {
    text = describeOne(error);
    // Errors chain through `cause`. A cause that is not an Error ends the chain, and is left out
    // when toError() made the Error for it, because its message already shows it.
    let current = error;
    for (let depth = 0; current.cause instanceof Error && depth < 3; depth++) {
      current = current.cause;
      text += `\nCaused by: ${describeOne(current)}`;
    }
    if (current.cause !== undefined && !(current.cause instanceof Error)) {
      if (!wrappedThrows.has(current)) text += `\nCaused by: ${safeText(current.cause)}`;
    }
  } catch {
    text = `${safeText(error)} (its message and stack could not be read)`;
  }
  if (text.length > maxErrorText) {
    text = `${text.slice(0, maxErrorText)}... (truncated, ${text.length} characters in all)`;
  }
  return text;
}

function describeOne(error: Error): string {
  const message = safeText(error.message);
  const stack = typeof error.stack === "string" ? error.stack : undefined;
  if (stack !== undefined && stack.includes(message)) return stack;
  const head = `${safeText(error.name)}: ${message}`;
  return stack === undefined ? head : `${head}\n${stack}`;
}

/** Shortens an error message for a log line; the full text is stored in `failed_error`. */
function logText(error: Error): string {
  const message = safeText(error.message);
  return message.length > 2_000 ? `${message.slice(0, 2_000)}... (truncated)` : message;
}

// ---------------------------------------------------------------------------------------------
// Database and schema
// ---------------------------------------------------------------------------------------------

/*
 * States of a row in `tasks`:
 * - `scheduled`: waiting for a `run_at` in the future. `perform` with a `delay` or a later
 *   `runAt` inserts rows in this state, and a failed attempt with attempts left moves its row
 *   here for its backoff. A runner of the task moves due rows to `pending` before it claims.
 *   Rows also leave it through `cancel`.
 * - `pending`: due, waiting for a runner. `perform` inserts rows in this state when they are
 *   due at once, and a runner moves a row back here when it stops before the attempt ends and
 *   releases the lease, and when it finds an expired lease. `retry` and `retryFailed` move
 *   `failed` and `cancelled` rows here with `attempts = 0`. Rows leave it through a claim or
 *   through `cancel`.
 * - `running`: claimed by the runner named in `locked_by` until `locked_until`. Only a claim
 *   moves a row here. The runner that holds the lease deletes the row after a success, or
 *   moves it to `completed`, `failed` or back to `pending`. `cancel` sets `cancelled_at` on a
 *   running row, and the runner that has its lease aborts the attempt and moves it to `cancelled`.
 * - `completed`: succeeded, kept because the task's `keepCompleted` is above zero. The runner
 *   sets `finished_at`.
 * - `failed`: the last attempt failed, or the stored data could not be decoded. The row keeps
 *   its error in `failed_error` and is not run again unless `retry` moves it.
 * - `cancelled`: `cancel` moved it here from `pending`, or the runner did after a cancel of a
 *   running row. A released or rescued row with `cancelled_at` set also ends here.
 *
 * `completed`, `failed` and `cancelled` are end states: they free the row's `key`, get
 * `finished_at`, and the cleanup of a runner of the task (or `purge`) deletes them once the
 * task's retention has passed.
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
  // A run that a schedule enqueued records the schedule's name and its tick in milliseconds,
  // which the run receives as `scheduledFor`. Both are NULL for other runs. Its `key` is the
  // schedule's name, "@" and the tick as an ISO string, so a tick has one live run.
  schedule: "TEXT",
  scheduled_for: "INTEGER",
  finished_at: "INTEGER",
  cancelled_at: "INTEGER",
};

/*
 * A row in `schedules` is a cron schedule. `schedule()` and `runTasks` (for a task's `cron`
 * option) insert it, or replace it when its definition changed, which raises `revision`. A
 * scheduler moves `last_fired_at` forward to each tick it handles, in the same transaction
 * that enqueues the tick's run. It does so only when `revision` and `last_fired_at` still have
 * the values it read, and this condition makes each tick enqueue exactly once across
 * processes. `unschedule()` deletes the row.
 */
const scheduleColumns = `name TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    pattern TEXT NOT NULL,
    timezone TEXT NOT NULL,
    data TEXT,
    options TEXT NOT NULL,
    source TEXT NOT NULL,
    revision INTEGER NOT NULL,
    last_fired_at INTEGER,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL`;

/** The indexes that `migrate` creates on `tasks`. */
const taskIndexes = [
  "tasks_claim",
  "tasks_scheduled",
  "tasks_key",
  "tasks_schedule",
  "tasks_finished",
];

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
  // The claim walks this index in claim order: name and state fixed, then priority, run_at and
  // rowid (every index entry ends with the rowid). Every pending row is due, because rows that
  // wait for a later time are `scheduled`, so the claim reads only the rows it takes.
  createClaimIndex:
    "CREATE INDEX IF NOT EXISTS tasks_claim ON tasks (name, state, priority DESC, run_at)",
  // Only scheduled rows are in this index: inserts of due rows never touch it. It finds the next
  // scheduled time, and the scheduled rows that are due, without reading the others.
  createScheduledIndex: `CREATE INDEX IF NOT EXISTS tasks_scheduled ON tasks (name, run_at)
    WHERE state = 'scheduled'`,
  // A key is unique per task name among live rows (scheduled, pending and running) only, so it
  // is released when the row reaches an end state.
  createKeyIndex: `CREATE UNIQUE INDEX IF NOT EXISTS tasks_key ON tasks (name, key)
    WHERE key IS NOT NULL AND state IN ('scheduled', 'pending', 'running')`,
  createSchedules: `CREATE TABLE IF NOT EXISTS schedules (${scheduleColumns})`,
  // Only runs enqueued by a schedule are in this index, so it stays small.
  createScheduleIndex: `CREATE INDEX IF NOT EXISTS tasks_schedule ON tasks (schedule, state)
    WHERE schedule IS NOT NULL`,
  schedulesTable: "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schedules'",
  // Only rows in an end state have `finished_at`, so the retention cleanup reads just the rows
  // it deletes, and inserts of pending rows never touch this index.
  createFinishedIndex: `CREATE INDEX IF NOT EXISTS tasks_finished
    ON tasks (name, state, finished_at) WHERE finished_at IS NOT NULL`,
  // Rows that failed before `finished_at` existed get their failure time.
  backfillFinishedAt:
    "UPDATE tasks SET finished_at = failed_last WHERE state = 'failed' AND finished_at IS NULL",
  tableColumns: "SELECT name FROM pragma_table_info('tasks')",
  tableIndexes: "SELECT name FROM pragma_index_list('tasks')",
  userVersion: "PRAGMA user_version",
  setUserVersion: "PRAGMA user_version = 1",
  journalModeWal: "PRAGMA journal_mode = WAL",
  synchronousNormal: "PRAGMA synchronous = NORMAL",
  dataVersion: "PRAGMA data_version",
  // The path of the main database file, or "" in memory: identifies the file of a transaction.
  mainFile: "SELECT file FROM pragma_database_list WHERE name = 'main'",
  // An in-memory database has no file, so its one connection gets a mark in a temporary table:
  // one mark for each Database opened on it.
  createConnectionMark: "CREATE TEMP TABLE IF NOT EXISTS tasklite_connection (mark TEXT NOT NULL)",
  insertConnectionMark: "INSERT INTO temp.tasklite_connection (mark) VALUES (?)",
  hasConnectionMark:
    "SELECT EXISTS (SELECT 1 FROM temp.tasklite_connection WHERE mark = ?) AS found",
  connectionState:
    "SELECT data_version, synchronous, timeout FROM pragma_data_version, pragma_synchronous, pragma_busy_timeout",

  // A row is `scheduled` when its run_at is after its creation, and `pending` otherwise.
  insertOne: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?5 > ?4 THEN 'scheduled' ELSE 'pending' END)`,
  // A row that an idle runner of this process takes at once is inserted already claimed by it,
  // in the state a claim would leave it: this saves the claim, about 0.3 ms of the time from a
  // perform to the start of its attempt.
  insertClaimed: `INSERT INTO tasks
      (id, name, data, created, run_at, priority, state, attempts, locked_until, locked_by)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', 1, ?7, ?8)`,
  // One statement for many rows of one task, due at one time: each element of the JSON array is
  // [id, data], with `data` the JSON text of the task's data or null. Passing the shared
  // columns as parameters instead of in every element: 167k rows/s against 118k (Bun).
  insertUniform: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
    SELECT value ->> 0, ?1, value ->> 1, ?2, ?3, ?4,
      CASE WHEN ?3 > ?2 THEN 'scheduled' ELSE 'pending' END
    FROM json_each(?5)`,
  // One statement for any rows: each element of the JSON array is [id, name, data, created,
  // run_at, priority], and `data` is the JSON text of the task's data or null.
  insertMany: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
      CASE WHEN value ->> 4 > value ->> 3 THEN 'scheduled' ELSE 'pending' END
    FROM json_each(?)`,

  // A keyed insert names the partial unique index `tasks_key` as its conflict target. A live
  // row with the same name and key then turns the insert into nothing. For `replaceKeyed`, it
  // turns it into an update of that row while the row waits (scheduled or pending).
  insertKeyed: `INSERT INTO tasks (id, name, data, created, run_at, priority, key, state)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?5 > ?4 THEN 'scheduled' ELSE 'pending' END)
    ON CONFLICT (name, key)
      WHERE key IS NOT NULL AND state IN ('scheduled', 'pending', 'running')
    DO NOTHING
    RETURNING id`,
  replaceKeyed: `INSERT INTO tasks (id, name, data, created, run_at, priority, key, state)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?5 > ?4 THEN 'scheduled' ELSE 'pending' END)
    ON CONFLICT (name, key)
      WHERE key IS NOT NULL AND state IN ('scheduled', 'pending', 'running')
    DO UPDATE SET data = excluded.data, run_at = excluded.run_at, priority = excluded.priority,
      state = excluded.state
      WHERE state IN ('scheduled', 'pending')
    RETURNING id`,
  liveKeyed: `SELECT id FROM tasks
    WHERE name = ? AND key = ? AND state IN ('scheduled', 'pending', 'running')`,

  // One statement claims up to `limit` pending rows and returns them. The subquery is
  // materialised before the update, so the rows are chosen and locked atomically. RETURNING
  // lists the rows in rowid order, not in claim order; the attempts of one claim start
  // together, so their order does not matter. Each row comes back as one JSON array
  // [id, attempts, scheduled_for, data], because @libsql/client 0.18 defines a property per
  // returned column. Four columns cost 8.6 microseconds per row under Node.js 20, and one JSON
  // column with JSON.parse costs 4.1. Under Bun both cost 2.
  claim: `UPDATE tasks
    SET state = 'running', attempts = attempts + 1, locked_until = ?1, locked_by = ?2
    WHERE rowid IN (
      SELECT rowid FROM tasks
      WHERE name = ?3 AND state = 'pending'
      ORDER BY priority DESC, run_at, rowid
      LIMIT ?4)
    RETURNING json_array(id, attempts, scheduled_for, data) AS claimed`,
  // Moves scheduled rows that are due to pending, earliest first, through `tasks_scheduled`.
  promote: `UPDATE tasks SET state = 'pending'
    WHERE rowid IN (
      SELECT rowid FROM tasks
      WHERE name = ?1 AND state = 'scheduled' AND run_at <= ?2
      ORDER BY run_at
      LIMIT ?3)`,
  // Whether a pending row exists, and the earliest run_at of scheduled rows: two index seeks.
  queueState: `SELECT
      EXISTS (SELECT 1 FROM tasks WHERE name = ?1 AND state = 'pending') AS has_pending,
      (SELECT min(run_at) FROM tasks WHERE name = ?1 AND state = 'scheduled') AS next_scheduled`,
  // The statements that record results report how many rows they changed, not which: RETURNING
  // costs about 25 microseconds to prepare and a JavaScript object per row, about 3.5
  // microseconds per task at batch size 100. `settle` looks up which ids did not apply only
  // when the count falls short.
  complete: `DELETE FROM tasks
    WHERE locked_by = ? AND state = 'running' AND id IN (SELECT value FROM json_each(?))`,
  // One id, as at batch size 1: a primary key lookup without json_each took 131 to 151
  // microseconds per task against 158 (Bun, 2 cores).
  completeOne: "DELETE FROM tasks WHERE id = ?2 AND locked_by = ?1 AND state = 'running'",
  existingIds: "SELECT id FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
  // The success of a task with `keepCompleted` keeps its row.
  markCompleted: `UPDATE tasks
    SET state = 'completed', finished_at = ?1, locked_until = NULL, locked_by = NULL
    WHERE locked_by = ?2 AND state = 'running' AND id IN (SELECT value FROM json_each(?3))
    RETURNING id`,
  markCancelled: `UPDATE tasks
    SET state = 'cancelled', finished_at = ?1, locked_until = NULL, locked_by = NULL
    WHERE id = ?2 AND locked_by = ?3 AND state = 'running'`,
  // A row whose cancel was requested while it ran ends `cancelled` instead of being retried. A
  // retry with a backoff waits as `scheduled`.
  retry: `UPDATE tasks
    SET state = CASE WHEN cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN ?1 > ?2 THEN 'scheduled' ELSE 'pending' END,
      finished_at = CASE WHEN cancelled_at IS NULL THEN NULL ELSE ?2 END,
      run_at = ?1, failed_last = ?2, failed_nr = coalesce(failed_nr, 0) + 1,
      failed_error = ?3, locked_until = NULL, locked_by = NULL
    WHERE id = ?4 AND locked_by = ?5 AND state = 'running'`,
  fail: `UPDATE tasks
    SET state = 'failed', failed_last = ?1, failed_nr = coalesce(failed_nr, 0) + 1,
      failed_error = ?2, locked_until = NULL, locked_by = NULL, finished_at = ?1
    WHERE id = ?3 AND locked_by = ?4 AND state = 'running'`,
  // Looked up by id: there is no index on locked_by, and without the id list this scans the
  // whole table. `cancel_requested` is true when `cancel` was called on a row that the runner
  // is running.
  renew: `UPDATE tasks SET locked_until = ?1
    WHERE locked_by = ?2 AND state = 'running' AND id IN (SELECT value FROM json_each(?3))
    RETURNING id, cancelled_at IS NOT NULL AS cancel_requested`,
  // A released attempt gives its attempt back: it ended because the runner stopped, not because
  // the task failed. A row whose cancel was requested ends `cancelled`, finished when the
  // cancel was requested.
  release: `UPDATE tasks
    SET state = CASE WHEN cancelled_at IS NULL THEN 'pending' ELSE 'cancelled' END,
      finished_at = cancelled_at,
      attempts = max(attempts - 1, 0), locked_until = NULL, locked_by = NULL
    WHERE locked_by = ? AND state = 'running' AND id IN (SELECT value FROM json_each(?))
    RETURNING id`,
  // Running rows are few (at most the batch sizes of live runners), so scanning them through
  // the claim index is cheap.
  hasExpiredLease: `SELECT 1 FROM tasks
    WHERE name = ? AND state = 'running' AND locked_until < ? LIMIT 1`,
  rescue: `UPDATE tasks
    SET state = CASE WHEN cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN attempts >= ?1 THEN 'failed' ELSE 'pending' END,
      finished_at = CASE WHEN cancelled_at IS NOT NULL OR attempts >= ?1 THEN ?2 END,
      run_at = ?2, failed_last = ?2, failed_nr = coalesce(failed_nr, 0) + 1, failed_error = ?3,
      locked_until = NULL, locked_by = NULL
    WHERE name = ?4 AND state = 'running' AND locked_until < ?2
    RETURNING id, data, state, attempts`,
  // The distinct names of waiting (pending or scheduled) rows, one index seek per name.
  pendingNames: `WITH RECURSIVE names(name) AS (
      SELECT min(name) FROM tasks WHERE state IN ('pending', 'scheduled')
      UNION ALL
      SELECT (SELECT min(name) FROM tasks
              WHERE state IN ('pending', 'scheduled') AND name > names.name)
      FROM names WHERE names.name IS NOT NULL)
    SELECT name FROM names WHERE name IS NOT NULL`,

  // Inserts a schedule, or replaces a stored one whose definition differs. An unchanged
  // schedule is left as it is and returns no row. `last_fired_at` is kept on a replacement,
  // and ticks before `updated` are never enqueued, so the new pattern starts from now.
  saveSchedule: `INSERT INTO schedules
      (name, task, pattern, timezone, data, options, source, revision, created, updated)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8)
    ON CONFLICT (name) DO UPDATE SET
      task = excluded.task, pattern = excluded.pattern, timezone = excluded.timezone,
      data = excluded.data, options = excluded.options, source = excluded.source,
      revision = schedules.revision + 1, updated = excluded.updated
    WHERE schedules.task IS NOT excluded.task OR schedules.pattern IS NOT excluded.pattern
      OR schedules.timezone IS NOT excluded.timezone OR schedules.data IS NOT excluded.data
      OR schedules.options IS NOT excluded.options OR schedules.source IS NOT excluded.source
    RETURNING revision`,
  // Runs in the transaction of saveSchedule, right after it: changes() is 1 only when the
  // schedule was inserted or replaced. A run that has started (attempts > 0) is kept.
  deleteReplacedOccurrences: `DELETE FROM tasks
    WHERE schedule = ?1 AND state IN ('scheduled', 'pending') AND attempts = 0 AND changes() = 1
    RETURNING id`,
  deleteOccurrences: `DELETE FROM tasks
    WHERE schedule = ?1 AND state IN ('scheduled', 'pending') AND attempts = 0
    RETURNING id`,
  deleteSchedule: "DELETE FROM schedules WHERE name = ?1 RETURNING name",
  // Schedules that came from a task's `cron` option, other than the one it defines now. Each
  // element of the JSON array is [task name, name of its cron schedule or null].
  deleteStaleOccurrences: `DELETE FROM tasks
    WHERE state IN ('scheduled', 'pending') AND attempts = 0 AND schedule IN (
      SELECT name FROM schedules
      WHERE source = 'definition' AND EXISTS (
        SELECT 1 FROM json_each(?1) AS kept
        WHERE kept.value ->> 0 = schedules.task AND schedules.name IS NOT kept.value ->> 1))
    RETURNING id`,
  deleteStaleSchedules: `DELETE FROM schedules
    WHERE source = 'definition' AND EXISTS (
      SELECT 1 FROM json_each(?1) AS kept
      WHERE kept.value ->> 0 = schedules.task AND schedules.name IS NOT kept.value ->> 1)
    RETURNING name, task`,
  selectSchedules: `SELECT * FROM schedules
    WHERE task IN (SELECT value FROM json_each(?1))
    ORDER BY name`,
  selectAllSchedules: "SELECT * FROM schedules ORDER BY name",
  // The compare-and-set that makes a tick enqueue once: it changes the row only when no other
  // scheduler handled a tick and the schedule was not replaced since this one read it.
  advanceSchedule: `UPDATE schedules SET last_fired_at = ?1
    WHERE name = ?2 AND revision = ?3 AND last_fired_at IS ?4`,
  // Runs in the transaction of advanceSchedule, right after it, and inserts only when that
  // update changed the row (changes() = 1). Each element of the JSON array is [id, tick, key].
  // With overlap off (?6 = 0), it inserts nothing while a run of the schedule is waiting or
  // running. A live row with the same key makes the insert of that tick a no-op.
  insertOccurrences: `INSERT INTO tasks
      (id, name, data, created, run_at, priority, state, key, schedule, scheduled_for)
    SELECT value ->> 0, ?1, ?2, ?3, value ->> 1, 0, 'pending', value ->> 2, ?4, value ->> 1
    FROM json_each(?5)
    WHERE changes() = 1 AND (?6 OR NOT EXISTS (
      SELECT 1 FROM tasks
      WHERE schedule = ?4 AND state IN ('scheduled', 'pending', 'running')))
    ON CONFLICT DO NOTHING
    RETURNING id, scheduled_for`,
  // `cancel` runs these three in one transaction. A pending row, or a running row whose lease
  // expired, is cancelled at once. A live running row only gets `cancelled_at`, and its runner
  // ends it. The last statement returns the state of a row that neither update matched.
  cancelNow: `UPDATE tasks
    SET state = 'cancelled', finished_at = ?1, cancelled_at = coalesce(cancelled_at, ?1),
      locked_until = NULL, locked_by = NULL
    WHERE id = ?2
      AND (state IN ('scheduled', 'pending') OR (state = 'running' AND locked_until < ?1))
    RETURNING id`,
  requestCancel: `UPDATE tasks SET cancelled_at = coalesce(cancelled_at, ?1)
    WHERE id = ?2 AND state = 'running'
    RETURNING id`,
  taskState: "SELECT name, state, key FROM tasks WHERE id = ?",

  // A retried row gets a fresh attempt budget and keeps its failure history (failed_nr,
  // failed_error, failed_last). OR IGNORE skips a row whose key a live row holds, because
  // un-failing it would break the unique index `tasks_key`.
  retryTask: `UPDATE OR IGNORE tasks
    SET state = 'pending', attempts = 0, run_at = ?1, finished_at = NULL, cancelled_at = NULL,
      locked_until = NULL, locked_by = NULL
    WHERE id = ?2 AND state IN ('failed', 'cancelled')
    RETURNING name`,
  retryFailed: `UPDATE OR IGNORE tasks
    SET state = 'pending', attempts = 0, run_at = ?1, finished_at = NULL, cancelled_at = NULL,
      locked_until = NULL, locked_by = NULL
    WHERE state = 'failed'`,
  retryFailedByName: `UPDATE OR IGNORE tasks
    SET state = 'pending', attempts = 0, run_at = ?1, finished_at = NULL, cancelled_at = NULL,
      locked_until = NULL, locked_by = NULL
    WHERE state = 'failed' AND name = ?2`,
  changes: "SELECT changes() AS count",
  countFailed: "SELECT count(*) AS count FROM tasks WHERE state = 'failed'",
  countFailedByName: "SELECT count(*) AS count FROM tasks WHERE state = 'failed' AND name = ?",

  // Retention cleanup and purge delete in chunks, so that no statement holds the write lock
  // for long. With a name, the subquery reads the partial index `tasks_finished`.
  deleteFinished: `DELETE FROM tasks WHERE rowid IN (
      SELECT rowid FROM tasks WHERE name = ?1 AND state = ?2 AND finished_at <= ?3 LIMIT ?4)`,
  deleteFinishedOfAllNames: `DELETE FROM tasks WHERE rowid IN (
      SELECT rowid FROM tasks WHERE state = ?1 AND finished_at <= ?2 LIMIT ?3)`,

  // Reads the claim index only: name, state and run_at are all in it.
  stats: `SELECT name, state, count(*) AS count,
      min(CASE WHEN state IN ('pending', 'scheduled') AND run_at <= ?1 THEN run_at END)
        AS oldest_due
    FROM tasks GROUP BY name, state ORDER BY name`,
  // Newest first. A NULL filter matches every row.
  listTasks: `SELECT id, name, state, data, key, priority, attempts, created, run_at,
      locked_until, locked_by, failed_nr, failed_last, failed_error, finished_at, cancelled_at
    FROM tasks
    WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR name = ?2)
    ORDER BY rowid DESC LIMIT ?3`,
} as const;

/** A row to insert. `data` is JSON text or null. */
interface NewTaskRow {
  id: string;
  name: string;
  data: string | null;
  created: number;
  runAt: number;
  priority: number;
  /** A lease to insert the row with, already claimed by an idle runner of this process. */
  claim?: { token: string; lockedUntil: number };
}

/** A row that a claim returned. */
interface ClaimedRow {
  id: string;
  data: string | null;
  attempts: number;
  /** The tick of the schedule that enqueued the row, or null. */
  scheduledFor: number | null;
}

/** A row of `schedules`. `data` and `options` are JSON text. */
interface StoredSchedule {
  name: string;
  task: string;
  pattern: string;
  timezone: string;
  data: string | null;
  options: string;
  source: "definition" | "schedule";
  revision: number;
  lastFiredAt: number | null;
  created: number;
  updated: number;
}

/** A schedule to store, with the time of the call. */
type NewSchedule = Omit<StoredSchedule, "revision" | "lastFiredAt" | "created" | "updated"> & {
  now: number;
};

/** The ticks of a schedule to record, and the runs to insert for them. */
interface Firing {
  /** The schedule as the scheduler read it; the write applies only if it is unchanged. */
  schedule: StoredSchedule;
  /** The new `last_fired_at`: the latest tick handled, whether enqueued or skipped. */
  lastFiredAt: number;
  /** The ticks to enqueue, oldest first. */
  ticks: number[];
  overlap: boolean;
  now: number;
}

/**
 * A result to record for a running row, fenced by the claim's token. `complete` deletes the
 * row; `keep` records the success and keeps the row as `completed`.
 */
type Settlement =
  | { kind: "complete"; id: string; token: string }
  | { kind: "keep"; id: string; token: string; now: number }
  | { kind: "retry"; id: string; token: string; runAt: number; now: number; error: string }
  | { kind: "fail"; id: string; token: string; now: number; error: string }
  | { kind: "cancel"; id: string; token: string; now: number };

/** A row that the lease rescue moved, with the state it moved to. */
interface RescuedRow {
  id: string;
  data: string | null;
  state: "pending" | "failed" | "cancelled";
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

/** How long `SqliteStorage.run` keeps retrying a busy error before it throws it. */
const busyRetryTime = 10_000;

const sleep = (milliseconds: number) =>
  new Promise<void>((resolve) => setTimeout(resolve, milliseconds));

/**
 * The SQLite statements of the queue. Every statement of the runner and of `perform` goes
 * through this class, so a second engine needs a second implementation of it and nothing else.
 */
class SqliteStorage {
  readonly #client: Client;
  /** Whether tasklite created the client, so it may reopen its connection. */
  readonly #ownsClient: boolean;
  /** The error that every statement fails with while the database must not be used. */
  #unavailable: Error | undefined;

  constructor(client: Client, ownsClient: boolean) {
    this.#client = client;
    this.#ownsClient = ownsClient;
  }

  /**
   * Reopens the connection after SQLITE_BUSY reached the caller. With @libsql/client 0.18 and
   * libsql 0.5, a connection whose write failed that way could later commit a row that only it
   * could see: its writes went to a WAL file that another process had checkpointed and removed.
   * Of 8 runs with a 20 ms busy timeout against another process's 1.5 s write lock, 6 lost the
   * row; with the connection reopened after each busy error, 0 of 20 did. A client passed in by
   * the application may have other connections in use, so only tasklite's own is reopened.
   */
  #afterBusy(error: unknown): void {
    if (!this.#ownsClient || !isBusyError(error)) return;
    this.#client.reconnect();
    // The new connection has SQLite's default synchronous = FULL until it is set again.
    this.#settingsLost = this.#client.protocol === "file";
  }

  /** Whether the connection was reopened and needs `synchronous = NORMAL` again. */
  #settingsLost = false;

  /**
   * Makes every later statement, including the next try of a statement that is waiting to be
   * retried, fail with `error`. `undefined` lets statements run again.
   */
  setUnavailable(error: Error | undefined): void {
    this.#unavailable = error;
  }

  /**
   * Runs statements, as one immediate ("write") transaction when there are several. A busy
   * error, or a transaction that another caller of a single-connection client holds, is
   * retried after delays that double from about 2 ms to 500 ms, each ±50 %, until
   * `busyRetryTime` has passed since the first try. Each try can itself wait up to the
   * connection's busy timeout.
   */
  async run(statements: InStatement[]): Promise<ResultSet[]> {
    const started = Date.now();
    for (let attempt = 1;; attempt++) {
      if (this.#unavailable !== undefined) throw this.#unavailable;
      try {
        if (this.#settingsLost) {
          await this.#client.execute(sql.synchronousNormal);
          this.#settingsLost = false;
        }
        if (statements.length === 1) return [await this.#client.execute(statements[0])];
        return await this.#client.batch(statements, "write");
      } catch (error) {
        const retriable = isBusyError(error) || isTransactionActiveError(error);
        this.#afterBusy(error);
        if (!retriable || Date.now() - started >= busyRetryTime) throw error;
        await sleep(Math.min(500, 2 ** attempt) * (0.5 + Math.random()));
      }
    }
  }

  async execute(statement: InStatement): Promise<ResultSet> {
    const [result] = await this.run([statement]);
    return result;
  }

  /** Runs statements in `transaction` when one is given, and as {@linkcode run} does if not. */
  #runIn(transaction: Transaction | undefined, statements: InStatement[]): Promise<ResultSet[]> {
    return transaction === undefined ? this.run(statements) : transaction.batch(statements);
  }

  async insert(rows: NewTaskRow[], transaction?: Transaction): Promise<void> {
    const claimed = rows.filter((row) => row.claim !== undefined);
    if (claimed.length > 0) {
      // Few rows (at most the free slots of idle runners), so one statement each.
      const statements: InStatement[] = claimed.map((row) => ({
        sql: sql.insertClaimed,
        args: [
          row.id,
          row.name,
          row.data,
          row.created,
          row.runAt,
          row.priority,
          row.claim!.lockedUntil,
          row.claim!.token,
        ],
      }));
      const others = rows.filter((row) => row.claim === undefined);
      if (others.length > 0) statements.push(...this.#insertStatements(others));
      await this.#runIn(transaction, statements);
      return;
    }
    await this.#runIn(transaction, this.#insertStatements(rows));
  }

  /** The statements that insert unclaimed rows: one for a single row or for each chunk. */
  #insertStatements(rows: NewTaskRow[]): InStatement[] {
    if (rows.length === 1) {
      const row = rows[0];
      return [{
        sql: sql.insertOne,
        args: [row.id, row.name, row.data, row.created, row.runAt, row.priority],
      }];
    }
    // SQLite's string limit is far above this, but one huge JSON argument keeps the whole batch
    // in memory twice, so large batches are split into statements of one transaction.
    const chunkSize = 10_000;
    const first = rows[0];
    const uniform = rows.every((row) =>
      row.name === first.name && row.created === first.created && row.runAt === first.runAt &&
      row.priority === first.priority
    );
    const statements: InStatement[] = [];
    for (let start = 0; start < rows.length; start += chunkSize) {
      const chunk = rows.slice(start, start + chunkSize);
      if (uniform) {
        statements.push({
          sql: sql.insertUniform,
          args: [
            first.name,
            first.created,
            first.runAt,
            first.priority,
            JSON.stringify(chunk.map((row) => [row.id, row.data])),
          ],
        });
      } else {
        const elements = chunk.map((row) => [
          row.id,
          row.name,
          row.data,
          row.created,
          row.runAt,
          row.priority,
        ]);
        statements.push({ sql: sql.insertMany, args: [JSON.stringify(elements)] });
      }
    }
    return statements;
  }

  /**
   * Inserts a row with a deduplication key unless a live row of the same name has the key.
   * With `replace`, such a row gets the new row's data, due time and priority while it waits.
   */
  async insertKeyed(
    row: NewTaskRow,
    key: string,
    replace: boolean,
    transaction?: Transaction,
  ): Promise<{ id: string; status: "created" | "duplicate" | "replaced" }> {
    const [inserted, live] = await this.#runIn(transaction, [
      {
        sql: replace ? sql.replaceKeyed : sql.insertKeyed,
        args: [row.id, row.name, row.data, row.created, row.runAt, row.priority, key],
      },
      { sql: sql.liveKeyed, args: [row.name, key] },
    ]);
    const returned = inserted.rows[0]?.id as string | undefined;
    if (returned === row.id) return { id: row.id, status: "created" };
    if (returned !== undefined) return { id: returned, status: "replaced" };
    // Both statements ran in one transaction, so the row that blocked the insert is still live.
    return { id: live.rows[0].id as string, status: "duplicate" };
  }

  /** The path of the main database file of the client, or of `transaction` when given. */
  async mainFile(transaction?: Transaction): Promise<string> {
    const result = transaction === undefined
      ? await this.execute(sql.mainFile)
      : await transaction.execute(sql.mainFile);
    return String(result.rows[0]?.file ?? "");
  }

  /** Adds a mark that identifies the connection of an in-memory database. */
  async markConnection(mark: string): Promise<void> {
    await this.run([
      { sql: sql.createConnectionMark, args: [] },
      { sql: sql.insertConnectionMark, args: [mark] },
    ]);
  }

  /** Returns whether the connection of `transaction` has the mark. */
  async hasConnectionMark(transaction: Transaction, mark: string): Promise<boolean> {
    try {
      const result = await transaction.execute({ sql: sql.hasConnectionMark, args: [mark] });
      return Boolean(result.rows[0].found);
    } catch {
      // No mark table: the connection is not one that tasklite marked.
      return false;
    }
  }

  /** Checks through `transaction` whether the `tasks` table has every column. */
  async hasCurrentSchema(transaction: Transaction): Promise<boolean> {
    const columns = await transaction.execute(sql.tableColumns);
    const present = new Set(columns.rows.map((row) => row.name as string));
    return Object.keys(taskColumns).every((column) => present.has(column));
  }

  async claim(
    name: string,
    limit: number,
    lockedUntil: number,
    token: string,
  ): Promise<ClaimedRow[]> {
    const result = await this.execute({
      sql: sql.claim,
      args: [lockedUntil, token, name, limit],
    });
    return result.rows.map((row): ClaimedRow => {
      const [id, attempts, scheduledFor, data] = JSON.parse(row.claimed as string);
      return { id, data, attempts, scheduledFor };
    });
  }

  /** Returns whether a row of the task is pending, and when its earliest scheduled row is due. */
  async queueState(name: string): Promise<{ hasPending: boolean; nextScheduled: number | null }> {
    const result = await this.execute({ sql: sql.queueState, args: [name] });
    const row = result.rows[0];
    return {
      hasPending: row?.has_pending === 1,
      nextScheduled: typeof row?.next_scheduled === "number" ? row.next_scheduled : null,
    };
  }

  /** Moves up to `limit` scheduled rows that are due at `now` to pending; returns how many. */
  async promote(name: string, now: number, limit: number): Promise<number> {
    const result = await this.execute({ sql: sql.promote, args: [name, now, limit] });
    return result.rowsAffected;
  }

  /** Records results and returns the ids whose lease was still held, so the write applied. */
  async settle(settlements: Settlement[]): Promise<Set<string>> {
    const completedByToken = new Map<string, string[]>();
    const keptByTokenAndTime = new Map<string, { token: string; now: number; ids: string[] }>();
    const statements: InStatement[] = [];
    // The ids that each statement writes; `markCompleted` returns its ids instead.
    const written: Array<string[] | "returned"> = [];
    for (const settlement of settlements) {
      if (settlement.kind === "complete") {
        const ids = completedByToken.get(settlement.token);
        if (ids) ids.push(settlement.id);
        else completedByToken.set(settlement.token, [settlement.id]);
      } else if (settlement.kind === "keep") {
        const group = `${settlement.token} ${settlement.now}`;
        const kept = keptByTokenAndTime.get(group);
        if (kept) kept.ids.push(settlement.id);
        else {
          keptByTokenAndTime.set(group, {
            token: settlement.token,
            now: settlement.now,
            ids: [settlement.id],
          });
        }
      } else if (settlement.kind === "cancel") {
        statements.push({
          sql: sql.markCancelled,
          args: [settlement.now, settlement.id, settlement.token],
        });
        written.push([settlement.id]);
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
        written.push([settlement.id]);
      } else {
        statements.push({
          sql: sql.fail,
          args: [settlement.now, settlement.error, settlement.id, settlement.token],
        });
        written.push([settlement.id]);
      }
    }
    for (const [token, ids] of completedByToken) {
      statements.push(
        ids.length === 1
          ? { sql: sql.completeOne, args: [token, ids[0]] }
          : { sql: sql.complete, args: [token, JSON.stringify(ids)] },
      );
      written.push(ids);
    }
    for (const { token, now, ids } of keptByTokenAndTime.values()) {
      statements.push({ sql: sql.markCompleted, args: [now, token, JSON.stringify(ids)] });
      written.push("returned");
    }
    const results = await this.run(statements);

    const applied = new Set<string>();
    const uncertain: string[] = [];
    results.forEach((result, index) => {
      const ids = written[index];
      if (ids === "returned") {
        for (const row of result.rows) applied.add(row.id as string);
      } else if (result.rowsAffected === ids.length) {
        for (const id of ids) applied.add(id);
      } else if (ids.length > 1) {
        uncertain.push(...ids);
      }
    });
    if (uncertain.length > 0) {
      // Some rows of a deletion were not ours any more; the ones still present are those.
      // NOTE: a row whose new runner deletes it before this read counts as applied here, so its
      // success hook can run in both runners. Both runs did succeed.
      const present = await this.execute({
        sql: sql.existingIds,
        args: [JSON.stringify(uncertain)],
      });
      const notApplied = new Set(present.rows.map((row) => row.id as string));
      for (const id of uncertain) if (!notApplied.has(id)) applied.add(id);
    }
    return applied;
  }

  /**
   * Extends the leases of a claim's rows. Returns the ids whose lease was still held, each
   * mapped to whether `cancel` was called on it.
   */
  async renew(token: string, ids: string[], lockedUntil: number): Promise<Map<string, boolean>> {
    const result = await this.execute({
      sql: sql.renew,
      args: [lockedUntil, token, JSON.stringify(ids)],
    });
    return new Map(result.rows.map((row) => [row.id as string, Boolean(row.cancel_requested)]));
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
      state: row.state as RescuedRow["state"],
      attempts: row.attempts as number,
    }));
  }

  async pendingNames(): Promise<string[]> {
    const result = await this.execute(sql.pendingNames);
    return result.rows.map((row) => row.name as string);
  }

  /** Reads `data_version`, which changes when another connection commits to the file. */
  async dataVersion(): Promise<number> {
    const result = await this.execute(sql.dataVersion);
    return result.rows[0].data_version as number;
  }

  /**
   * Stores a schedule in one transaction with the removal of the pending runs of the schedule
   * it replaces. Returns whether the schedule was created, replaced or already stored as it
   * is, and the ids of the removed runs.
   */
  async saveSchedule(
    schedule: NewSchedule,
  ): Promise<{ change: "created" | "replaced" | "unchanged"; removed: string[] }> {
    const [saved, deleted] = await this.run([
      {
        sql: sql.saveSchedule,
        args: [
          schedule.name,
          schedule.task,
          schedule.pattern,
          schedule.timezone,
          schedule.data,
          schedule.options,
          schedule.source,
          schedule.now,
        ],
      },
      { sql: sql.deleteReplacedOccurrences, args: [schedule.name] },
    ]);
    const removed = deleted.rows.map((row) => row.id as string);
    const revision = saved.rows[0]?.revision;
    if (revision === undefined) return { change: "unchanged", removed };
    return { change: revision === 1 ? "created" : "replaced", removed };
  }

  /** Deletes a schedule and its runs that have not started, in one transaction. */
  async deleteSchedule(name: string): Promise<{ deleted: boolean; removed: string[] }> {
    const [occurrences, schedules] = await this.run([
      { sql: sql.deleteOccurrences, args: [name] },
      { sql: sql.deleteSchedule, args: [name] },
    ]);
    return {
      deleted: schedules.rows.length > 0,
      removed: occurrences.rows.map((row) => row.id as string),
    };
  }

  /**
   * Deletes the schedules that came from the `cron` option of the given tasks, except the one
   * that each task defines now, with their runs that have not started.
   *
   * @param kept Pairs of a task name and the name of its `cron` schedule, or null.
   * @returns The deleted schedules.
   */
  async deleteStaleSchedules(
    kept: ReadonlyArray<[string, string | null]>,
  ): Promise<Array<{ name: string; task: string }>> {
    const json = JSON.stringify(kept);
    const [, schedules] = await this.run([
      { sql: sql.deleteStaleOccurrences, args: [json] },
      { sql: sql.deleteStaleSchedules, args: [json] },
    ]);
    return schedules.rows.map((row) => ({ name: row.name as string, task: row.task as string }));
  }

  /** Reads the schedules of the given tasks, or every schedule. */
  async schedules(tasks?: readonly string[]): Promise<StoredSchedule[]> {
    const result = tasks === undefined
      ? await this.execute(sql.selectAllSchedules)
      : await this.execute({ sql: sql.selectSchedules, args: [JSON.stringify(tasks)] });
    return result.rows.map((row): StoredSchedule => ({
      name: row.name as string,
      task: row.task as string,
      pattern: row.pattern as string,
      timezone: row.timezone as string,
      data: row.data as string | null,
      options: row.options as string,
      source: row.source as StoredSchedule["source"],
      revision: row.revision as number,
      lastFiredAt: row.last_fired_at as number | null,
      created: row.created as number,
      updated: row.updated as number,
    }));
  }

  /**
   * Records the ticks of a schedule and inserts their runs, in one transaction. Returns whether
   * this call recorded them (false when another scheduler did first, or the schedule was
   * replaced or deleted since it was read) and the runs it inserted.
   */
  async fire(
    firing: Firing,
  ): Promise<{ advanced: boolean; inserted: Array<{ id: string; scheduledFor: number }> }> {
    const { schedule } = firing;
    const rows = firing.ticks.map((tick) => [
      createTaskId(firing.now),
      tick,
      `${schedule.name}@${new Date(tick).toISOString()}`,
    ]);
    const [advanced, inserted] = await this.run([
      {
        sql: sql.advanceSchedule,
        args: [firing.lastFiredAt, schedule.name, schedule.revision, schedule.lastFiredAt],
      },
      {
        sql: sql.insertOccurrences,
        args: [
          schedule.task,
          schedule.data,
          firing.now,
          schedule.name,
          JSON.stringify(rows),
          firing.overlap ? 1 : 0,
        ],
      },
    ]);
    return {
      advanced: advanced.rowsAffected === 1,
      inserted: inserted.rows.map((row) => ({
        id: row.id as string,
        scheduledFor: row.scheduled_for as number,
      })),
    };
  }

  /**
   * Cancels a pending row, or a running row whose lease expired, and requests a cancel from
   * the runner of a live running row. Returns the outcome, and the row's name and state.
   */
  async cancel(id: string, now: number): Promise<
    { outcome: "cancelled" | "requested" | "unchanged" | "missing"; name?: string; state?: string }
  > {
    const [cancelled, requested, found] = await this.run([
      { sql: sql.cancelNow, args: [now, id] },
      { sql: sql.requestCancel, args: [now, id] },
      { sql: sql.taskState, args: [id] },
    ]);
    const row = found.rows[0];
    if (row === undefined) return { outcome: "missing" };
    const name = row.name as string;
    const state = row.state as string;
    if (cancelled.rows.length > 0) return { outcome: "cancelled", name, state };
    if (requested.rows.length > 0) return { outcome: "requested", name, state };
    return { outcome: "unchanged", name, state };
  }

  /**
   * Moves a failed or cancelled row back to pending. When nothing moved, returns the row's
   * state, and the id of the live row that has its key if there is one.
   */
  async retry(id: string, now: number): Promise<
    { retried: true; name: string } | {
      retried: false;
      state: string | undefined;
      keyHolder: string | undefined;
    }
  > {
    const [retried, found] = await this.run([
      { sql: sql.retryTask, args: [now, id] },
      { sql: sql.taskState, args: [id] },
    ]);
    if (retried.rows.length > 0) return { retried: true, name: retried.rows[0].name as string };
    const row = found.rows[0];
    let keyHolder: string | undefined;
    const ended = row?.state === "failed" || row?.state === "cancelled";
    if (ended && row.key !== null) {
      const live = await this.execute({ sql: sql.liveKeyed, args: [row.name, row.key] });
      keyHolder = live.rows[0]?.id as string | undefined;
    }
    return { retried: false, state: row?.state as string | undefined, keyHolder };
  }

  /**
   * Moves every failed row, or those of one task, back to pending. Returns how many moved and
   * how many stayed failed because a live row has their key.
   */
  async retryFailed(
    name: string | undefined,
    now: number,
  ): Promise<{ retried: number; skipped: number }> {
    const statements: InStatement[] = name === undefined
      ? [{ sql: sql.retryFailed, args: [now] }, sql.changes, sql.countFailed]
      : [{ sql: sql.retryFailedByName, args: [now, name] }, sql.changes];
    if (name !== undefined) statements.push({ sql: sql.countFailedByName, args: [name] });
    const [, changes, left] = await this.run(statements);
    return { retried: changes.rows[0].count as number, skipped: left.rows[0].count as number };
  }

  /**
   * Deletes rows in `state` that finished at or before `before`, of one task or of all, in
   * chunks of `chunkSize` rows. Returns the number deleted.
   */
  async deleteFinished(
    name: string | undefined,
    state: string,
    before: number,
    chunkSize = 1_000,
  ): Promise<number> {
    let deleted = 0;
    for (;;) {
      const result = await this.execute(
        name === undefined
          ? { sql: sql.deleteFinishedOfAllNames, args: [state, before, chunkSize] }
          : { sql: sql.deleteFinished, args: [name, state, before, chunkSize] },
      );
      deleted += result.rowsAffected;
      if (result.rowsAffected < chunkSize) return deleted;
    }
  }

  async stats(now: number): Promise<Row[]> {
    const result = await this.execute({ sql: sql.stats, args: [now] });
    return result.rows;
  }

  async listTasks(
    state: string | undefined,
    name: string | undefined,
    limit: number,
  ): Promise<Row[]> {
    const result = await this.execute({
      sql: sql.listTasks,
      args: [state ?? null, name ?? null, limit],
    });
    return result.rows;
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
  async migrate(
    local: boolean,
    create: boolean,
    url: string,
  ): Promise<{ busyTimeout: number } | undefined> {
    if (!create) {
      // Checked before anything is written, the journal mode included.
      const columns = await this.execute(sql.tableColumns);
      if (columns.rows.length === 0) {
        throw new Error(
          `No tasklite tables in ${url}: it has no "tasks" table; check that this is the ` +
            `application's database (with create: false, tasklite creates no tables)`,
        );
      }
      const present = new Set(columns.rows.map((row) => row.name as string));
      if (!present.has("state") || !present.has("run_at")) {
        throw new Error(
          `The "tasks" table in ${url} is not tasklite's (it has no "state" and "run_at" ` +
            `columns); check that this is the application's database, or open it once without ` +
            `create: false to migrate a plainweb task table`,
        );
      }
    }
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
        this.#afterBusy(error);
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
    if (!Object.keys(taskColumns).every((column) => present.has(column))) return false;
    const indexes = await this.execute(sql.tableIndexes);
    const indexNames = new Set(indexes.rows.map((row) => row.name as string));
    if (!taskIndexes.every((index) => indexNames.has(index))) return false;
    const schedules = await this.execute(sql.schedulesTable);
    return schedules.rows.length > 0;
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
      if (present.size > 0 && !present.has("finished_at")) {
        await transaction.execute(sql.backfillFinishedAt);
      }
      if (upgradingPlainweb) {
        // plainweb retried a row after its last failure; its failure count is the attempts made.
        await transaction.execute(
          "UPDATE tasks SET run_at = coalesce(failed_last, created), attempts = coalesce(failed_nr, 0)",
        );
      }
      await transaction.execute(sql.createClaimIndex);
      await transaction.execute(sql.createScheduledIndex);
      await transaction.execute(sql.createKeyIndex);
      await transaction.execute(sql.createScheduleIndex);
      await transaction.execute(sql.createSchedules);
      await transaction.execute(sql.createFinishedIndex);

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

/**
 * Brands that mark databases and tasks across copies of this module. Two copies (for example
 * `tasklite` from node_modules and a relative import of mod.ts) keep separate registries, so a
 * value from the other copy is recognised only to explain the error.
 */
const databaseBrand = Symbol.for("tasklite.database");
const taskBrand = Symbol.for("tasklite.task");

function hasBrand(value: unknown, brand: symbol): boolean {
  return typeof value === "object" && value !== null && brand in value;
}

const twoCopiesHint =
  "it comes from another copy of tasklite (imported from two paths, such as a package and a " +
  "relative path): import tasklite from one place";

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
  /** Closes the client when tasklite created it; undefined for a client passed in. */
  readonly #closeClient: (() => void) | undefined;
  readonly #local: boolean;
  /** The `create` option: whether `ready()` may create the tables. */
  readonly #create: boolean;
  /** Whether other connections can write to the database, so `data_version` is worth watching. */
  readonly #shared: boolean;
  readonly #watchInterval: number;
  #ready: Promise<void> | undefined;
  #isReady = false;
  #mainFile: string | undefined;
  #closed = false;
  #pendingInserts: Array<{ row: NewTaskRow; resolve: () => void; reject: (e: unknown) => void }> =
    [];
  #insertScheduled = false;
  #watchTimer: ReturnType<typeof setInterval> | undefined;
  #dataVersion: number | undefined;
  #watching = false;
  #connectionCheckedAt = 0;
  #walWatcher: { close(): void } | undefined;
  #checkTimer: ReturnType<typeof setTimeout> | undefined;
  /** When the last check of `data_version` started, on the monotonic clock. */
  #lastCheck = -Infinity;
  #busyTimeoutWarned = false;
  /** The identity check of a local file that tasklite opened itself. */
  readonly #file: DatabaseFile | undefined;
  logger: Logger = consoleLogger;
  readonly [databaseBrand] = true;

  constructor(
    client: Client,
    url: string | undefined,
    options: ParsedDatabaseOptions,
    identity: string,
    closeClient: (() => void) | undefined,
    path?: string,
  ) {
    this.client = client;
    this.url = url;
    this.#closeClient = closeClient;
    this.#local = client.protocol === "file";
    this.#create = options.create;
    this.#shared = this.#local && !identity.startsWith("memory:");
    this.now = options.now === Date.now ? Date.now : checkedClock(options.now);
    this.#watchInterval = options.watchInterval;
    this.storage = new SqliteStorage(client, closeClient !== undefined);
    this.identity = identity;
    if (this.#shared && path !== undefined) this.#file = new DatabaseFile(path);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Whether `ready()` has created or checked the schema. */
  get migrated(): boolean {
    return this.#isReady;
  }

  /** The absolute path of a local file that tasklite opened; undefined for other databases. */
  get localPath(): string | undefined {
    return this.#file?.path;
  }

  /** The path of the main database file, known once `ready()` resolved; "" in memory. */
  get mainFile(): string | undefined {
    return this.#mainFile;
  }

  ready(): Promise<void> {
    if (this.#closed) return Promise.reject(closedError());
    this.#ready ??= this.storage.migrate(
      this.#local,
      this.#create,
      this.url ?? "the client passed to openDatabase()",
    ).then(
      async (connection) => {
        this.#mainFile = await this.storage.mainFile();
        if (this.#mainFile === "") await this.storage.markConnection(this.identity);
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
        if ((error as { code?: unknown })?.code === "SQLITE_NOTADB") {
          const name = this.url === undefined ? "The client's database" : JSON.stringify(this.url);
          const message = logText(toError(error));
          throw new Error(
            `${name} is not a SQLite database file (${message}); check the path, or move that ` +
              `file aside`,
            { cause: error },
          );
        }
        throw error;
      },
    );
    return this.#ready;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const runner of [...(runnersByDatabase.get(this.identity) ?? [])]) {
      if (runner.database === this) runner.onDatabaseClosed();
    }
    this.storage.setUnavailable(closedError());
    this.#stopWatching();
    for (const pending of this.#pendingInserts.splice(0)) pending.reject(closedError());
    this.#closeClient?.();
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
    try {
      if (!this.#isReady) await this.ready();
      while (this.#pendingInserts.length > 0) {
        const batch = this.#pendingInserts.splice(0);
        const rows = batch.map((pending) => pending.row);
        const handed = this.#reserveIdleRunners(rows);
        try {
          await this.storage.insert(rows);
        } catch (error) {
          for (const { runner } of handed) runner.cancelReservation();
          for (const row of rows) delete row.claim;
          for (const pending of batch) pending.reject(error);
          continue;
        }
        for (const pending of batch) pending.resolve();
        for (const { runner, row } of handed) runner.startInserted(row);
        this.notify(rows.filter((row) => row.claim === undefined));
      }
    } catch (error) {
      // Only ready() gets here: every waiting perform gets its error.
      for (const pending of this.#pendingInserts.splice(0)) pending.reject(error);
    } finally {
      this.#insertScheduled = false;
    }
  }

  /**
   * Gives due rows to idle runners of their task in this process, which then run them without
   * a claim: each such row gets a `claim` to be inserted with.
   */
  #reserveIdleRunners(rows: NewTaskRow[]): Array<{ runner: TaskRunner; row: NewTaskRow }> {
    const runners = runnersByDatabase.get(this.identity);
    if (runners === undefined) return [];
    const handed: Array<{ runner: TaskRunner; row: NewTaskRow }> = [];
    const now = this.now();
    for (const row of rows) {
      if (row.runAt > now) continue;
      for (const runner of runners) {
        if (runner.name !== row.name) continue;
        const claim = runner.reserveIdleSlot(now);
        if (claim === undefined) continue;
        row.claim = claim;
        handed.push({ runner, row });
        break;
      }
    }
    return handed;
  }

  /** Tells the runners of this database in this process about new rows. */
  notify(rows: ReadonlyArray<{ name: string; runAt: number }>): void {
    const runners = runnersByDatabase.get(this.identity);
    if (runners === undefined) return;
    for (const runner of runners) {
      for (const row of rows) {
        if (row.name !== runner.name) continue;
        try {
          runner.onInsert(row.runAt);
        } catch (error) {
          // The row is committed; the runner finds it at its next poll.
          this.logger.error(
            `Waking the runner of task "${row.name}" failed: ${logText(toError(error))}`,
            {
              task: row.name,
              error: toError(error),
            },
          );
        }
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
    this.#watchWal();
    // Read the first version now, before the runner's first claim: a commit between that claim
    // and a later first read would set the baseline without waking the runner.
    void this.#checkDataVersion();
  }

  /**
   * Checks after every change of the WAL file, which each commit writes, when the runtime can
   * watch the file; the timer then only backs the events up once a second, for file systems
   * (network mounts) that send none. Without events, the timer polls every `watchInterval`.
   * Idle, a timer every 40 ms cost about 0.5 % of a core under Node.js 20.
   */
  #watchWal(): void {
    clearInterval(this.#watchTimer);
    this.#walWatcher?.close();
    this.#walWatcher = this.#file === undefined
      ? undefined
      : watchFileChanges(`${this.#file.path}-wal`, () => this.#onWalChange(), () => {
        // The file went away or the runtime stopped the watch: poll instead.
        this.#walWatcher = undefined;
        this.#watchWal();
      });
    const interval = this.#walWatcher === undefined ? this.#watchInterval : walEventBackupInterval;
    this.#watchTimer = setInterval(() => void this.#checkDataVersion(), interval);
    unrefTimer(this.#watchTimer);
  }

  /**
   * Checks after a change of the WAL file at once, but at most once per `walEventMinimumGap`.
   * This runner's own commits change the file too, so under load the gap bounds the checks
   * (each a `data_version` query of about 50 microseconds) to 200 a second.
   */
  #onWalChange(): void {
    if (this.#checkTimer !== undefined || this.#closed) return;
    const wait = Math.max(0, this.#lastCheck + walEventMinimumGap - performance.now());
    this.#checkTimer = setTimeout(() => {
      this.#checkTimer = undefined;
      void this.#checkDataVersion();
    }, wait);
    unrefTimer(this.#checkTimer);
  }

  #stopWatching(): void {
    clearInterval(this.#watchTimer);
    clearTimeout(this.#checkTimer);
    this.#walWatcher?.close();
    this.#watchTimer = undefined;
    this.#checkTimer = undefined;
    this.#walWatcher = undefined;
    this.#dataVersion = undefined;
  }

  async #checkDataVersion(): Promise<void> {
    if (this.#watching || this.#closed) return;
    this.#watching = true;
    this.#lastCheck = performance.now();
    try {
      if (this.#file?.due()) await this.#checkFile(this.#file);
      // A query costs about ten times a stat of the WAL file (350 against 30 microseconds of CPU
      // under Bun 1.4.5 on Linux), and another connection's commit changes the WAL file's size
      // or time. The query runs once a
      // second anyway, in case a commit left both unchanged, and then also checks the
      // connection's settings, because a new pooled connection without them is only slower.
      const now = Date.now();
      const checkConnection = now - this.#connectionCheckedAt >= connectionCheckInterval;
      if (!checkConnection && this.#file?.walChanged() === false) return;
      if (checkConnection) this.#connectionCheckedAt = now;
      const version = checkConnection
        ? await this.storage.watchConnection()
        : await this.storage.dataVersion();
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

  /**
   * Stops using the connection when its file was deleted or replaced, because SQLite would go on
   * writing to the old file where no other process reads the rows. A replaced file, or a file
   * that appears again after a deletion, is reopened and migrated.
   */
  async #checkFile(file: DatabaseFile): Promise<void> {
    const change = file.check();
    if (change === "deleted") {
      this.storage.setUnavailable(
        new Error(
          `The database file ${JSON.stringify(file.path)} was deleted while tasklite had it ` +
            `open, so tasklite stopped using it: restore the file, and tasklite reopens it`,
        ),
      );
      return;
    }
    if (change !== "replaced") return;

    this.storage.setUnavailable(undefined);
    await this.client.reconnect();
    this.#ready = undefined;
    this.#isReady = false;
    try {
      await this.ready();
    } catch (error) {
      file.reopenFailed();
      this.storage.setUnavailable(toError(error));
      return;
    }
    this.logger.warn(
      `The database file ${JSON.stringify(file.path)} was replaced or restored while tasklite ` +
        `had it open; tasklite reopened it`,
      { file: file.path },
    );
    // The new file has a new WAL file to watch.
    if (this.#watchTimer !== undefined) this.#watchWal();
    for (const runner of runnersByDatabase.get(this.identity) ?? []) {
      if (runner.database === this) runner.onReopen();
    }
  }
}

/** How often the watcher checks anyway while events of the WAL file trigger its checks, in ms. */
const walEventBackupInterval = 1_000;

/** The shortest time between two checks that events of the WAL file trigger, in ms. */
const walEventMinimumGap = 5;

/** How often the watcher checks the connection's settings instead of only `data_version`. */
const connectionCheckInterval = 1_000;

/** How often a runner's database compares its file with the one at the file's path. */
const fileCheckInterval = 1_000;

/**
 * A check of the identity (device and inode) of a local database file. An open SQLite
 * connection keeps using its file after the file is deleted or renamed, and SQLite in WAL mode
 * reports no error for that, so only a comparison with the file at the path shows it.
 */
class DatabaseFile {
  readonly path: string;
  #identity: string | undefined;
  #checkedAt = 0;
  #deleted = false;
  #reopenFailed = false;
  #walState: string | undefined;

  constructor(path: string) {
    this.path = path;
    try {
      this.#identity = fileIdentity(path);
    } catch {
      // The first check that can read the file records its identity.
    }
  }

  /** Whether a check is due, at most once per `fileCheckInterval`. */
  due(): boolean {
    return Date.now() - this.#checkedAt >= fileCheckInterval;
  }

  /**
   * Compares the file at the path with the open one. Returns "deleted" once when no file is
   * there, and "replaced" when another file is there or a file is back after a deletion.
   */
  check(): "deleted" | "replaced" | undefined {
    this.#checkedAt = Date.now();
    let current: string | undefined;
    try {
      current = fileIdentity(this.path);
    } catch {
      // A file that cannot be read now (permissions, I/O) says nothing about its identity.
      return undefined;
    }
    if (current === undefined) {
      if (this.#deleted) return undefined;
      this.#deleted = true;
      return "deleted";
    }

    const previous = this.#identity;
    this.#identity = current;
    const replaced = this.#deleted || this.#reopenFailed ||
      (previous !== undefined && previous !== current);
    this.#deleted = false;
    this.#reopenFailed = false;
    return replaced ? "replaced" : undefined;
  }

  /** Makes the next check report the file as replaced again, so reopening is retried. */
  reopenFailed(): void {
    this.#reopenFailed = true;
  }

  /**
   * Returns whether the size or modification time of the WAL file changed since the last call,
   * or `undefined` when it cannot tell, for example because the database does not use WAL.
   */
  walChanged(): boolean | undefined {
    let state: string;
    try {
      const info = statSync(`${this.path}-wal`, { bigint: true });
      state = `${info.size}:${info.mtimeNs}`;
    } catch {
      this.#walState = undefined;
      return undefined;
    }
    const changed = state !== this.#walState;
    this.#walState = state;
    return changed;
  }
}

/**
 * Returns "device:inode" of a file, or `undefined` when no file is at the path.
 *
 * @throws {Error} When the file cannot be read for another reason.
 */
function fileIdentity(path: string): string | undefined {
  try {
    const info = statSync(path);
    return `${info.dev}:${info.ino}`;
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === "ENOENT" || code === "ENOTDIR") return undefined;
    throw error;
  }
}

/**
 * Wraps an injected clock so that a wrong return value (a `Date`, a string, NaN) fails loudly
 * instead of being stored as `run_at`.
 */
function checkedClock(clock: () => number): () => number {
  return () => {
    const time = clock();
    if (typeof time !== "number" || !Number.isFinite(time)) {
      throw new TypeError(
        `The "now" clock of openDatabase() returned ${describeValue(time)}: it must return ` +
          `milliseconds since the epoch as a finite number, as Date.now() does`,
      );
    }
    return time;
  };
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
  create: boolean;
}

const databaseOptionsSchema = v.strictObject({
  busyTimeout: v.optional(durationSchema(0, 3_600_000), 5_000),
  authToken: v.optional(v.string("a string")),
  now: v.optional(
    v.custom<() => number>((value) => typeof value === "function", "a function"),
    () => Date.now,
  ),
  watchInterval: v.optional(durationSchema(1, 60_000), 40),
  create: v.optional(v.boolean("true or false"), true),
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
 * the first one needs to commit. For the same reason, every `openDatabase()` of one file in one
 * process shares that connection (the first call's `busyTimeout` applies), and the application
 * should run its own queries through {@linkcode Database.client} rather than a second client.
 * A path through a symbolic link counts as the file it points to. Percent escapes in the path
 * are decoded, as the libSQL client does: `"file:my%20tasks.db"` opens `my tasks.db`.
 *
 * @param url A `file:` URL (`"file:tasks.db"`, `"file:/var/data/app.db"`), `":memory:"`, a
 *   remote `libsql://`, `http(s)://` or `ws(s)://` URL, or an existing libSQL `Client` (for
 *   drizzle, `db.$client`), which tasklite uses as it is and does not close.
 * @param options See {@linkcode DatabaseOptions}.
 * @returns The database.
 * @throws {TypeError} When the URL or an option is invalid.
 * @throws {Error} With `create: false`, when no file exists at a local path.
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
    return new TaskDatabase(url, undefined, parsed, identity, undefined);
  }
  if (typeof url !== "string") {
    throw new TypeError(
      `Invalid database URL: expected a string such as "file:tasks.db" or a libSQL Client, ` +
        `received ${describeValue(url)}`,
    );
  }

  // The native driver aborts the whole process on a NUL byte in a path, so reject control
  // characters before it gets them.
  if (/\p{Cc}/u.test(url)) {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: it contains a control character; ` +
        `check how the URL was built`,
    );
  }
  const scheme = /^[a-z][a-z0-9+.-]*:/i.exec(url)?.[0].toLowerCase();
  // "file::memory:" with query parameters such as "?cache=shared" is in memory too.
  const memory = url === ":memory:" || (scheme === "file:" && filePathOf(url) === ":memory:");
  if (!memory && scheme !== "file:" && !remoteSchemes.includes(scheme ?? "")) {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: use "file:" followed by a path for a ` +
        `local file (for example "file:tasks.db"), ":memory:", or a libsql://, http(s):// ` +
        `or ws(s):// URL for a remote server`,
    );
  }

  if (memory || scheme !== "file:") {
    const client = createDatabaseClient(url, memory, parsed);
    const identity = `${memory ? "memory" : "remote"}:${++databaseCounter}`;
    return new TaskDatabase(client, url, parsed, identity, () => client.close());
  }

  const path = filePathOf(url);
  if (path === "") {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: the path is empty, which SQLite treats ` +
        `as a temporary database that is lost on close; use "file:" followed by a path, such ` +
        `as "file:tasks.db"`,
    );
  }
  const absolute = resolvePath(path);
  if (!parsed.create && fileIdentity(absolute) === undefined) {
    throw new Error(
      `No database file at ${absolute} (from ${JSON.stringify(url)}): check the path; with ` +
        `create: false, tasklite opens only a database that exists`,
    );
  }
  // A symbolic link to the file or its folder is the same file, so it gets the same connection.
  const identity = `file:${realPathOf(absolute)}`;

  // Databases opened on one file in one process share one connection. Two connections would
  // deadlock: one waiting for the other's write lock blocks the event loop that the other
  // needs to commit.
  let shared = sharedClients.get(identity);
  if (shared === undefined || shared.client.closed) {
    shared = { client: createDatabaseClient(url, false, parsed), users: 0 };
    sharedClients.set(identity, shared);
  }
  shared.users++;
  const entry = shared;
  // The file check watches the path as given, so a symbolic link that is pointed at another
  // file counts as the file being replaced.
  return new TaskDatabase(entry.client, url, parsed, identity, () => {
    entry.users--;
    if (entry.users > 0) return;
    entry.client.close();
    if (sharedClients.get(identity) === entry) sharedClients.delete(identity);
  }, absolute);
}

/**
 * Returns the path of a `file:` URL as the libSQL client reads it: after an empty or
 * `localhost` authority, before any query or fragment, with percent escapes decoded.
 *
 * @throws {TypeError} When the URL names another host or has an invalid percent escape.
 */
function filePathOf(url: string): string {
  const [, authority, encoded] = /^file:(?:\/\/([^/?#]*))?([^?#]*)/i.exec(url)!;
  if (authority !== undefined && authority !== "" && authority.toLowerCase() !== "localhost") {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: a file: URL cannot name a host ` +
        `(${JSON.stringify(authority)}); write "file:/absolute/path.db" or ` +
        `"file:///absolute/path.db"`,
    );
  }
  try {
    return decodeURIComponent(encoded);
  } catch {
    throw new TypeError(
      `Invalid database URL ${JSON.stringify(url)}: its path has an invalid percent escape; ` +
        `write "%25" for a "%" in a file name`,
    );
  }
}

/**
 * Returns the path with symbolic links resolved, as SQLite opens it. For a file that does not
 * exist yet, resolves its folder instead; returns the path unchanged when neither exists.
 */
function realPathOf(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    try {
      return join(realpathSync(dirname(path)), basename(path));
    } catch {
      return path;
    }
  }
}

/** The clients of local files opened in this process, by absolute path, with their users. */
const sharedClients = new Map<string, { client: Client; users: number }>();

function createDatabaseClient(
  url: string,
  memory: boolean,
  options: ParsedDatabaseOptions,
): Client {
  try {
    return createClient({
      url: memory ? ":memory:" : url,
      authToken: options.authToken,
      timeout: options.busyTimeout,
      // One connection for local files: see the documentation of openDatabase().
      concurrency: memory || url.toLowerCase().startsWith("file:") ? 1 : undefined,
    });
  } catch (error) {
    const message = logText(toError(error));
    const cannotOpen = /unable to open|CANTOPEN/i.test(message);
    throw new TypeError(
      `Cannot open database ${JSON.stringify(url)}: ${message}` +
        (cannotOpen
          ? ". Check that the path's directory exists and is writable, and that the path is " +
            "shorter than 512 bytes (SQLite's limit on Unix)."
          : ""),
      { cause: error },
    );
  }
}

function toTaskDatabase(database: unknown, context: string): TaskDatabase {
  if (database instanceof TaskDatabase) return database;
  if (hasBrand(database, databaseBrand)) {
    throw new TypeError(`Invalid database for ${context}: ${twoCopiesHint}`);
  }
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
  keepCompleted: number;
  keepFailed: number;
  process: TaskDefinition<unknown>["process"];
  success: TaskDefinition<unknown>["success"];
  failed: TaskDefinition<unknown>["failed"];
  /** The schedule of the `cron` option, validated but not yet stored. */
  cron: ScheduleDefinition | undefined;
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
  pollInterval: v.optional(durationSchema(10, 86_400_000), 1_000),
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
  timeout: v.optional(durationSchema(1), 300_000),
  lease: v.optional(durationSchema(100, 86_400_000), 30_000),
  keepCompleted: v.optional(durationSchema(), 0),
  keepFailed: v.optional(durationSchema(), 30 * 86_400_000),
  process: v.custom<TaskDefinition<unknown>["process"]>(
    (value) => typeof value === "function",
    "a function",
  ),
  success: optionalFunction("a function"),
  failed: optionalFunction("a function"),
  cron: v.optional(
    v.custom<string | CronDefinition<unknown>>(
      (value) => typeof value === "string" || (typeof value === "object" && value !== null),
      'a cron pattern such as "0 3 * * *" or an object with a "pattern"',
    ),
  ),
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
/**
 * Defines a task without a schema that stores its runs in `database`. The data type `T` is
 * given as a type argument, or inferred from `process`; {@linkcode perform} then checks only
 * that the data survives a JSON round trip.
 *
 * The definition is validated here, as in the overload with a schema.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param definition See {@linkcode TaskDefinition}.
 * @returns The task, for {@linkcode perform} and {@linkcode runTasks}.
 * @throws {TypeError} When an option has the wrong type, or no name is given and none can be
 *   derived from the calling module's file name.
 * @throws {RangeError} When an option is out of range.
 *
 * @example A task with a data type and no schema
 * ```ts
 * import { defineDatabaseTask, openDatabase } from "tasklite";
 *
 * const deleteAccount = defineDatabaseTask<{ userId: number }>(openDatabase("file:app.db"), {
 *   name: "delete-account",
 *   async process({ data }) {
 *     console.log(`deleting account ${data.userId}`);
 *   },
 * });
 * ```
 */
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
  const cron = parsed.cron === undefined
    ? undefined
    : defineCronOption(parsed.cron, { name, database: taskDatabase });

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
    keepCompleted: parsed.keepCompleted,
    keepFailed: parsed.keepFailed,
    process: parsed.process as TaskDefinition<unknown>["process"],
    success: parsed.success as TaskDefinition<unknown>["success"],
    failed: parsed.failed as TaskDefinition<unknown>["failed"],
    cron,
    file,
  };
  const task: Task<T> = Object.freeze({ name, database: taskDatabase, [taskBrand]: true });
  taskInternals.set(task, internals);
  return task;
}

function toTaskInternals(task: unknown, context: string): TaskInternals {
  const internals = typeof task === "object" && task !== null ? taskInternals.get(task) : undefined;
  if (internals === undefined) {
    throw new TypeError(
      hasBrand(task, taskBrand)
        ? `Invalid task for ${context}: ${twoCopiesHint}`
        : `Invalid task for ${context}: expected the result of defineDatabaseTask(), received ${
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
    v.pipe(
      v.union([v.date(), v.number()], "a Date or milliseconds since the epoch"),
      v.check(
        (value) => {
          const time = value instanceof Date ? value.getTime() : value;
          return Number.isSafeInteger(time) && time >= 0 && time <= maxTime;
        },
        "a valid Date or a whole number of milliseconds since the epoch, from 1970 to the " +
          "year 275760 (the last valid Date)",
      ),
    ),
  ),
  priority: v.optional(integerSchema(-1_000_000, 1_000_000), 0),
  key: v.optional(
    v.pipe(
      v.string("a string of 1 to 1000 UTF-16 code units (an emoji is 2)"),
      v.minLength(1, "a string of 1 to 1000 UTF-16 code units (an emoji is 2)"),
      v.maxLength(1_000, "a string of 1 to 1000 UTF-16 code units (an emoji is 2)"),
      // libSQL returns text only up to its first NUL, so such a key would read back cut short.
      v.check((key) => !key.includes("\0"), "a string without NUL characters (\\u0000)"),
      // SQLite stores text as UTF-8, where a lone surrogate becomes U+FFFD, so such keys collide.
      v.check(
        (key) => !/\p{Cs}/u.test(key),
        "well-formed text, without a lone surrogate such as half of an emoji that slice() cut",
      ),
    ),
  ),
  onConflict: v.optional(v.picklist(["ignore", "replace"], '"ignore" or "replace"')),
  transaction: v.optional(
    v.custom<Transaction>(isTransaction, "an open @libsql/client Transaction"),
  ),
});

type ParsedPerformOptions = v.InferOutput<typeof performOptionsSchema>;

function isTransaction(value: unknown): value is Transaction {
  return typeof value === "object" && value !== null &&
    ["execute", "batch", "commit", "rollback", "close"].every((method) =>
      typeof (value as Record<string, unknown>)[method] === "function"
    );
}

/** The parsed form of no options, computed once: most calls of `perform` pass none. */
let defaultPerformOptions: ParsedPerformOptions | undefined;

function parsePerformOptions(
  options: PerformOptions | undefined,
  caller = "perform()",
): ParsedPerformOptions {
  if (options === undefined) {
    defaultPerformOptions ??= parseOptions(performOptionsSchema, {}, caller);
    return defaultPerformOptions;
  }
  const parsed = parseOptions(performOptionsSchema, options, caller);
  if (parsed.delay !== undefined && parsed.runAt !== undefined) {
    throw new TypeError(
      `Invalid ${caller} options: pass either "delay" or "runAt", not both (received delay ${
        describeValue(options?.delay)
      } and runAt ${describeValue(options?.runAt)})`,
    );
  }
  if (parsed.onConflict !== undefined && parsed.key === undefined) {
    throw new TypeError(
      `Invalid ${caller} option "onConflict": it applies to a task with a "key", and no key ` +
        `was passed (received onConflict ${describeValue(parsed.onConflict)})`,
    );
  }
  if (parsed.transaction?.closed) {
    throw new TypeError(
      `Invalid ${caller} option "transaction": the transaction is already committed, rolled ` +
        "back or closed; pass an open one",
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
 * Random bytes drawn from `crypto.getRandomValues` 4 KiB at a time: one call per id cost about
 * 4 % of an awaited `perform` under Node.js 20.
 */
const randomPool = new Uint8Array(4_096);
let randomPoolOffset = randomPool.length;

/** The millisecond and the sequence number of the last id this process created. */
let lastIdTime = 0;
let idSequence = 0;
/** The start of every id created in the millisecond `lastIdTime`, from {@linkcode timeHexOf}. */
let idTimeHex = "";
const maxIdSequence = 2 ** 26;

/**
 * Creates a UUID version 7 whose ids increase within this process: 48 bits of milliseconds, a
 * 26-bit sequence number, then 48 random bits. The sequence starts at a random value in each
 * millisecond and counts up, as RFC 9562 (section 6.2, method 2) allows. When it runs out, the
 * millisecond moves one ahead. So a batch of rows lands at the end of the primary key index,
 * side by side: with random bits in place of the sequence, each deleted row of a batch wrote
 * its own index page, and deletes took twice as long (26 against 14 microseconds per row at
 * batch size 100, Bun on a 2-core machine).
 */
function createTaskId(now: number): string {
  let time = Math.max(0, Math.floor(now), lastIdTime);
  if (time === lastIdTime) {
    idSequence++;
    if (idSequence >= maxIdSequence) {
      time++;
      idSequence = Math.floor(Math.random() * (maxIdSequence / 2));
    }
  } else {
    idSequence = Math.floor(Math.random() * (maxIdSequence / 2));
  }
  if (time !== lastIdTime || idTimeHex === "") idTimeHex = timeHexOf(time);
  lastIdTime = time;

  if (randomPoolOffset + 6 > randomPool.length) {
    crypto.getRandomValues(randomPool);
    randomPoolOffset = 0;
  }
  const random = randomPoolOffset;
  randomPoolOffset += 6;
  // Version 7 in the high nibble of byte 6, the variant (binary 10) in the high bits of byte 8,
  // and the 26 sequence bits around them.
  return idTimeHex + hex[0x70 | (idSequence >>> 22)] + hex[(idSequence >>> 14) & 0xff] + "-" +
    hex[0x80 | ((idSequence >>> 8) & 0x3f)] + hex[idSequence & 0xff] + "-" +
    hex[randomPool[random]] + hex[randomPool[random + 1]] + hex[randomPool[random + 2]] +
    hex[randomPool[random + 3]] + hex[randomPool[random + 4]] + hex[randomPool[random + 5]];
}

/** Formats the first 6 bytes of an id, the milliseconds, as hex with dashes: `0190a1b2-c3d4-`. */
function timeHexOf(time: number): string {
  let text = "";
  for (let index = 5; index >= 0; index--) {
    text = hex[time % 256] + text;
    time = Math.floor(time / 256);
    if (index === 4) text = "-" + text;
  }
  return `${text}-`;
}

/**
 * Enqueues one run of a task and resolves to its id once the row is committed.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param data The task's data. It must survive a JSON round trip unchanged: `undefined` inside
 *   objects, `NaN`, `BigInt`, functions, `Date`s, class instances and circular structures are
 *   rejected. `undefined` as the whole value is allowed.
 * @param options See {@linkcode PerformOptions}.
 * @returns The id of the new task, a time-ordered UUID. With a `key` that a live task already
 *   has, the id of that task. {@linkcode performDetailed} also returns which case happened.
 * @throws {TaskDataError} When the data fails the task's schema. Nothing is written.
 * @throws {TypeError} When the data is not JSON-serialisable or an option is invalid.
 * @throws {Error} When the database write fails, or when `transaction` is given and the
 *   schema is not in place yet.
 *
 * @example Enqueue now and later
 * ```ts
 * import { perform } from "tasklite";
 * import doubleOptIn from "./tasks/double-opt-in.ts";
 *
 * const id = await perform(doubleOptIn, { email: "ada@example.com" });
 * await perform(doubleOptIn, { email: "alan@example.com" }, { delay: "10m", priority: 5 });
 * ```
 *
 * @example Enqueue in the same transaction as the application's write
 * ```ts
 * import { perform } from "tasklite";
 * import doubleOptIn, { database } from "./tasks/double-opt-in.ts";
 *
 * await database.ready();
 * const transaction = await database.client.transaction("write");
 * try {
 *   await transaction.execute({
 *     sql: "INSERT INTO contacts (email) VALUES (?)",
 *     args: ["ada@example.com"],
 *   });
 *   await perform(doubleOptIn, { email: "ada@example.com" }, { transaction });
 *   await transaction.commit();
 * } finally {
 *   transaction.close();
 * }
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
  const row = buildRow(internals, data, parsed);

  if (parsed.key !== undefined || parsed.transaction !== undefined) {
    const result = await insertWithOptions(internals.database, row, parsed, "perform()");
    return result.id;
  }
  await internals.database.insert(row);
  return row.id;
}

/**
 * Enqueues one run of a task, as {@linkcode perform} does, and resolves to its id and whether
 * a new task was created. Use it with a deduplication `key` to learn whether the run was a
 * duplicate.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param data The task's data, with the same rules as for {@linkcode perform}.
 * @param options See {@linkcode PerformOptions}.
 * @returns The task's id and `status`: `"created"`, `"duplicate"` or `"replaced"`.
 * @throws {TaskDataError} When the data fails the task's schema. Nothing is written.
 * @throws {TypeError} When the data is not JSON-serialisable or an option is invalid.
 * @throws {Error} When the database write fails.
 *
 * @example Enqueue a report once per day
 * ```ts
 * import { performDetailed } from "tasklite";
 * import dailyReport from "./tasks/daily-report.ts";
 *
 * const { id, status } = await performDetailed(dailyReport, { day: "2025-03-01" }, {
 *   key: "2025-03-01",
 * });
 * if (status === "duplicate") console.log(`Task ${id} already covers this day`);
 * ```
 */
export async function performDetailed<T>(
  task: Task<T>,
  data: NoInfer<T>,
  options?: PerformOptions,
): Promise<PerformResult> {
  const internals = toTaskInternals(task, "performDetailed()");
  const parsed = parsePerformOptions(options, "performDetailed()");
  if (internals.schema !== undefined) await validateData(internals, data, "data");
  const row = buildRow(internals, data, parsed);

  if (parsed.key !== undefined || parsed.transaction !== undefined) {
    return await insertWithOptions(internals.database, row, parsed, "performDetailed()");
  }
  await internals.database.insert(row);
  return { id: row.id, status: "created" };
}

/**
 * Serialises the data and builds the row that `perform` inserts. Synchronous, so that the
 * performs of one tick still reach the insert queue in the same tick.
 */
function buildRow(
  internals: TaskInternals,
  data: unknown,
  options: ParsedPerformOptions,
): NewTaskRow {
  const json = serializeData(data, internals.name);
  const now = internals.database.now();
  return {
    id: createTaskId(now),
    name: internals.name,
    data: json,
    created: now,
    runAt: runAtOf(options, now),
    priority: options.priority,
  };
}

/**
 * Inserts a row with a deduplication key, inside a transaction, or both, and wakes runners
 * once the row is committed.
 */
async function insertWithOptions(
  database: TaskDatabase,
  row: NewTaskRow,
  options: ParsedPerformOptions,
  caller: string,
): Promise<PerformResult> {
  const { key, transaction } = options;
  if (transaction === undefined) await database.ready();
  else await checkTransaction(database, transaction, caller);
  if (database.closed) throw closedError();

  let result: PerformResult;
  if (key === undefined) {
    await database.storage.insert([row], transaction);
    result = { id: row.id, status: "created" };
  } else {
    const replace = options.onConflict === "replace";
    result = await database.storage.insertKeyed(row, key, replace, transaction);
  }
  if (result.status !== "duplicate") notifyOnCommit(database, transaction, [row]);
  return result;
}

/**
 * Checks that `transaction` is on the task's database and, before `ready()`, that the tables
 * are in place. `ready()` cannot create them there: its statements would wait for the
 * transaction, which waits for `perform`. Each transaction is checked once per database.
 *
 * @throws {Error} When the transaction is on another database, or the `tasks` table is missing
 *   or lacks columns.
 */
async function checkTransaction(
  database: TaskDatabase,
  transaction: Transaction,
  caller: string,
): Promise<void> {
  let checked = checkedTransactions.get(transaction);
  if (checked?.has(database.identity)) return;

  const file = await database.storage.mainFile(transaction);
  // Undefined when neither is known: a remote database, or a client passed in, before ready().
  let same: boolean | undefined;
  if (database.mainFile === "") {
    same = file === "" && await database.storage.hasConnectionMark(transaction, database.identity);
  } else if (database.mainFile !== undefined) {
    same = file === database.mainFile;
  } else if (database.localPath !== undefined) {
    same = file !== "" && isSameFile(file, database.localPath);
  }
  if (same === false) {
    const expected = database.mainFile ?? database.localPath ?? "";
    const where = file === "" && expected === ""
      ? "another in-memory database than the task's"
      : `${describeDatabaseFile(file)}, but the task's database is ${
        describeDatabaseFile(expected)
      }`;
    throw new Error(
      `Invalid ${caller} option "transaction": it is on ${where}; open the transaction with ` +
        `the task's database.client.transaction("write")`,
    );
  }
  if (database.mainFile === undefined && !(await database.storage.hasCurrentSchema(transaction))) {
    throw new Error(
      "Cannot enqueue inside the transaction: the tasks table is not set up yet, and tasklite " +
        "cannot create it while the transaction holds the connection. Call " +
        "`await database.ready()` before opening the transaction.",
    );
  }
  if (checked === undefined) {
    checked = new Set();
    checkedTransactions.set(transaction, checked);
  }
  checked.add(database.identity);
}

/** "the database file "/path"", or "an in-memory database" for an empty path. */
function describeDatabaseFile(path: string): string {
  return path === "" ? "an in-memory database" : `the database file ${JSON.stringify(path)}`;
}

/** Returns whether two paths name one file: the same text, or the same device and inode. */
function isSameFile(first: string, second: string): boolean {
  if (first === second) return true;
  try {
    const identity = fileIdentity(first);
    return identity !== undefined && identity === fileIdentity(second);
  } catch {
    // A path that cannot be read is not known to be the same file.
    return false;
  }
}

/** The identities of the databases that each transaction was checked against. */
const checkedTransactions = new WeakMap<Transaction, Set<string>>();

/** Callbacks to run after a transaction commits, by transaction. */
const commitCallbacks = new WeakMap<Transaction, Array<() => void>>();

/**
 * Wakes this process's runners for `rows`: at once without a transaction, and after the
 * commit with one. A rolled-back transaction wakes nothing.
 */
function notifyOnCommit(
  database: TaskDatabase,
  transaction: Transaction | undefined,
  rows: ReadonlyArray<{ name: string; runAt: number }>,
): void {
  if (transaction === undefined) {
    database.notify(rows);
    return;
  }
  let callbacks = commitCallbacks.get(transaction);
  if (callbacks === undefined) {
    const pending: Array<() => void> = [];
    callbacks = pending;
    commitCallbacks.set(transaction, pending);
    // NOTE: libSQL transactions have no commit event, so this wraps the commit() of this one
    // transaction object. A runner in another process detects the commit through data_version.
    const commit = transaction.commit;
    transaction.commit = async function (this: Transaction) {
      await commit.call(this);
      for (const callback of pending.splice(0)) callback();
    };
  }
  callbacks.push(() => database.notify(rows));
}

/**
 * Enqueues many runs of a task in one transaction and resolves to their ids, in the order of
 * `items`. Every item is checked first; if one is invalid, nothing is written.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param items The data of each run.
 * @param options Options that apply to every run. See {@linkcode PerformOptions}; `key` and
 *   `onConflict` are not accepted, because a key belongs to one run. With `transaction`, the
 *   rows are inserted inside it.
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
  const parsed = parsePerformOptions(options, "performMany()");
  if (parsed.key !== undefined) {
    throw new TypeError(
      `Invalid performMany() option "key": a key belongs to one run, so pass it to perform() ` +
        `for each run (received key ${describeValue(parsed.key)})`,
    );
  }
  const transaction = parsed.transaction;

  const serialized: Array<string | null> = [];
  for (let index = 0; index < items.length; index++) {
    const where = `items[${index}]`;
    if (!(index in items)) {
      throw new TypeError(
        `Invalid data for task "${internals.name}": ${where} is an empty array slot; fill it, ` +
          `or pass undefined explicitly for a task without data`,
      );
    }
    if (internals.schema !== undefined) await validateData(internals, items[index], where);
    serialized.push(serializeData(items[index], internals.name, where));
  }
  if (items.length === 0) return [];

  const database = internals.database;
  if (transaction === undefined) await database.ready();
  else await checkTransaction(database, transaction, "performMany()");
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
  await database.storage.insert(rows, transaction);
  notifyOnCommit(database, transaction, [{ name: internals.name, runAt }]);
  return rows.map((row) => row.id);
}

// ---------------------------------------------------------------------------------------------
// Claim, execute and settle: one runner per task
// ---------------------------------------------------------------------------------------------

/** Returns the default backoff: 1 s doubling per attempt, capped at 1 h, with ±25 % jitter. */
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
  /** When the attempt times out, on the monotonic clock (`performance.now()`). */
  readonly deadline: number;
  /** When the attempt started, on the monotonic clock. */
  readonly startedAt: number;
  /** Created on first use: most tasks never read their signal. */
  controller: AbortController | undefined;
  data: unknown;
  settled = false;
  /** Real time, unaffected by the database clock, for the `duration` of events. */
  readonly startedTime = performance.now();
  /** Milliseconds from the claim to the end of the attempt, set when it ends. */
  duration = 0;

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

  // NOTE: an abort listener that throws is reported by the runtime as an uncaught exception,
  // which ends a Node.js, Bun or Deno process, and the runner cannot catch it.
  abort(reason: Error): void {
    this.controller ??= new AbortController();
    if (!this.controller.signal.aborted) this.controller.abort(reason);
  }
}

/** A finished attempt and the result to write for it. */
interface SettlementEntry {
  settlement: Settlement | undefined;
  after?: AfterSettle;
  attempt: Attempt;
  /** The error of a failed attempt, for its event. */
  error?: Error;
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
  readonly #events: EventBus | undefined;
  #claimCount = 0;

  /** `draining`: `runDue` claims rows itself, so the pump only writes results. */
  #state: "running" | "draining" | "stopping" | "stopped" = "running";
  readonly #inFlight = new Map<string, Attempt>();
  /** Attempts in start order, which is also deadline order because the timeout is fixed. */
  #deadlines: Attempt[] = [];
  #settlements: SettlementEntry[] = [];
  /** Results that `#flush` is writing now. Their leases are renewed until the write ends. */
  #writing: SettlementEntry[] = [];
  readonly #hooks = new Set<Promise<void>>();

  /** Whether due rows may be waiting: set by wake-ups, cleared when a claim comes back short. */
  #maybeDue = true;
  /** Whether the runner should read the queue's state (pending rows, next scheduled time). */
  #checkNext = true;
  /** Whether scheduled rows may be due: they move to pending before the next claim. */
  #promoteDue = false;
  /** Slots promised to rows that a `perform` in this process is inserting already claimed. */
  #reserved = 0;
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
  readonly #renewErrors = new RepeatLimiter();
  #idleWaiters: Array<() => void> = [];
  #stopping: Promise<void> | undefined;
  #resolveStopped!: () => void;
  /** Resolves when the runner has stopped, through `stop()` or a closed database. */
  readonly stopped: Promise<void> = new Promise((resolve) => (this.#resolveStopped = resolve));

  constructor(task: TaskInternals, log: Logger, debug: boolean, events?: EventBus) {
    this.name = task.name;
    this.database = task.database;
    this.#task = task;
    this.#log = log;
    this.#debug = debug;
    this.#worker = `${workerId}-${++workerCounter}`;
    this.#events = events;
  }

  start(): void {
    this.database.register(this);
    this.#pollTimer = setInterval(() => this.#poll(), this.#task.pollInterval);
    this.#schedulePump();
  }

  /**
   * Promises a free slot to a row that is about to be inserted, when this runner is idle: it
   * runs, has a free slot, and knows of no waiting row that a claim would take first. Returns
   * the claim to insert the row with, or undefined.
   */
  reserveIdleSlot(now: number): NewTaskRow["claim"] {
    const idle = this.#state === "running" && !this.#maybeDue && !this.#checkNext &&
      !this.#promoteDue && this.#retryTimer === undefined && !this.database.closed;
    if (!idle || this.#inFlight.size + this.#reserved >= this.#task.batchSize) return undefined;
    this.#reserved++;
    return {
      token: `${this.#worker}-${++this.#claimCount}`,
      lockedUntil: now + this.#task.lease,
    };
  }

  /** Gives back a slot that `reserveIdleSlot` promised, because the insert failed. */
  cancelReservation(): void {
    this.#reserved--;
  }

  /** Starts the attempt of a row that was inserted already claimed by this runner. */
  startInserted(row: NewTaskRow): void {
    this.#reserved--;
    const claim = row.claim!;
    if (this.#state !== "running") {
      // stop() began meanwhile: hand the row back, as a claim in flight does.
      void this.#releaseRows(claim.token, [row.id]);
      return;
    }
    this.#startAttempt(
      { id: row.id, data: row.data, attempts: 1, scheduledFor: null },
      claim.token,
    );
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

  /** Called when the database reopened its file: ends a database error's backoff early. */
  onReopen(): void {
    if (this.#state !== "running") return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#errorDelay = 0;
    this.#maybeDue = true;
    this.#schedulePump();
  }

  #poll(): void {
    if (this.#state !== "running") return;
    this.#checkNext = true;
    this.#schedulePump();
    void this.#renewThenRescue();
  }

  /**
   * Renews this runner's own leases before looking for expired ones. After the event loop was
   * blocked for longer than a lease, the poll and the heartbeat are both overdue. Renewing
   * first keeps the runner from rescuing an attempt that is still alive and running it twice.
   */
  async #renewThenRescue(): Promise<void> {
    if (this.#inFlight.size > 0) await this.#renewLeases();
    await this.#rescue();
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
      this.#promoteDue = true;
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

      const free = this.#task.batchSize - this.#inFlight.size - this.#reserved;
      if (free <= 0) return;

      // Two index seeks: are rows pending, and when is the earliest scheduled row due?
      if (this.#checkNext) {
        this.#checkNext = false;
        const { hasPending, nextScheduled } = await this.database.storage.queueState(this.name);
        if (hasPending) this.#maybeDue = true;
        if (nextScheduled !== null) {
          if (nextScheduled <= this.database.now()) this.#promoteDue = true;
          else this.#wakeAtTime(nextScheduled);
        }
      }
      if (this.#promoteDue) {
        const promoted = await this.database.storage.promote(
          this.name,
          this.database.now(),
          promoteBatch,
        );
        // A full batch may leave more due rows; otherwise look up the next scheduled time.
        this.#promoteDue = promoted === promoteBatch;
        if (!this.#promoteDue) this.#checkNext = true;
        if (promoted > 0) this.#maybeDue = true;
      }
      if (!this.#maybeDue) return;

      const now = this.database.now();
      const token = `${this.#worker}-${++this.#claimCount}`;
      const rows = await this.database.storage.claim(
        this.name,
        free,
        now + this.#task.lease,
        token,
      );
      if (this.#state !== "running") {
        // stop() began while the claim was in flight: hand the rows straight back.
        if (rows.length > 0) await this.#releaseRows(token, rows.map((row) => row.id));
        return;
      }
      for (const row of rows) this.#startAttempt(row, token);
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
    const message = logText(toError(error));
    const { log, repeats } = this.#errors.shouldLog(message, Date.now());
    const fields = { task: this.name, error: toError(error), retryInMs: Math.round(wait) };
    if (log) {
      this.#log.error(
        `Task "${this.name}": database error, retrying in ${formatDuration(wait)}: ${message}${
          repeats > 0 ? ` (repeated ${repeats} times)` : ""
        }`,
        fields,
      );
    } else if (this.#debug) {
      this.#log.debug(
        `Task "${this.name}": database error again, retrying in ${formatDuration(wait)}`,
        fields,
      );
    }
    // The rescue and the pump can both fail at once: keep one retry.
    clearTimeout(this.#retryTimer);
    this.#emitError(toError(error));
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      this.#maybeDue = true;
      this.#schedulePump();
    }, wait);
  }

  #startAttempt(row: ClaimedRow, token: string): void {
    // Timeouts measure elapsed time, so they use the monotonic clock: a step of the wall clock
    // (or of an injected clock) must not lengthen or shorten an attempt.
    const started = performance.now();
    const attempt = new Attempt(row, token, started, started + this.#task.timeout);
    this.#inFlight.set(row.id, attempt);
    this.#deadlines.push(attempt);
    if (this.#deadlineTimer === undefined) this.#armDeadline();
    if (this.#heartbeatTimer === undefined) this.#startHeartbeat();
    if (this.#debug) {
      this.#log.debug(
        `Task "${this.name}" ${row.id}: attempt ${row.attempts} of ${this.#task.maxAttempts} started`,
        { task: this.name, id: row.id, attempt: row.attempts },
      );
    }
    this.#events?.emit({ type: "claimed", task: this.name, id: row.id, attempt: row.attempts });

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
      scheduledFor: attempt.row.scheduledFor === null
        ? undefined
        : new Date(attempt.row.scheduledFor),
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
      // Promise.resolve turns a thenable whose `then` throws into a rejection.
      Promise.resolve(result).then(
        () => this.#succeed(attempt),
        (error) => this.#fail(attempt, toError(error)),
      );
    } else {
      this.#succeed(attempt);
    }
  }

  #succeed(attempt: Attempt): void {
    if (!this.#finish(attempt)) return;
    const { id } = attempt.row;
    this.#settlements.push({
      settlement: this.#task.keepCompleted > 0
        ? { kind: "keep", id, token: attempt.token, now: this.database.now() }
        : { kind: "complete", id, token: attempt.token },
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
            logText(toError(backoffError))
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
        error,
      });
      this.#log.warn(
        `Task "${this.name}" ${attempt.row.id}: attempt ${number} of ${this.#task.maxAttempts} failed, retrying in ${
          formatDuration(wait)
        }: ${logText(error)}`,
        { task: this.name, id: attempt.row.id, attempt: number, error },
      );
    } else {
      this.#settlements.push({
        settlement: { kind: "fail", id: attempt.row.id, token: attempt.token, now, error: text },
        after: { kind: "failed", attempt, error },
        attempt,
        error,
      });
      this.#log.error(
        `Task "${this.name}" ${attempt.row.id}: attempt ${number} of ${this.#task.maxAttempts} failed, no attempts left: ${
          logText(error)
        }`,
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
      error,
    });
    this.#log.error(
      `Task "${this.name}" ${attempt.row.id}: failed without retry: ${logText(error)}`,
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
    attempt.duration = performance.now() - attempt.startedTime;
    this.#inFlight.delete(attempt.row.id);
    this.#trimDeadlines();
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
    this.#writing = entries;
    try {
      applied = settlements.length > 0
        ? await this.database.storage.settle(settlements)
        : new Set();
    } catch (error) {
      // Keep the results for the next try. The heartbeat renews their leases meanwhile.
      this.#settlements = entries.concat(this.#settlements);
      throw error;
    } finally {
      this.#writing = [];
    }

    for (const entry of entries) {
      const { attempt } = entry;
      const id = attempt.row.id;
      if (entry.settlement !== undefined && !applied.has(id)) {
        attempt.abort(this.#leaseLostError(id));
        this.#log.warn(
          `Task "${this.name}" ${id}: lease lost before the result was recorded; the runner ` +
            `that holds it now decides the outcome`,
          { task: this.name, id, attempt: attempt.row.attempts },
        );
        this.#emitLeaseLost(attempt);
        continue;
      }
      // A retried task is due again at its backoff: wake up for it without waiting for a poll.
      if (entry.settlement?.kind === "retry") {
        if (entry.settlement.runAt <= entry.settlement.now) this.#maybeDue = true;
        else this.#wakeAtTime(entry.settlement.runAt);
      }
      if (entry.settlement !== undefined) this.#emitSettled(entry.settlement, attempt, entry.error);
      if (this.#debug && entry.settlement?.kind === "complete") {
        this.#log.debug(
          `Task "${this.name}" ${id}: attempt ${attempt.row.attempts} succeeded in ${
            formatDuration(performance.now() - attempt.startedAt)
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
            logText(toError(error))
          }`,
          { task: this.name, id: attempt.row.id, error: toError(error) },
        );
        this.#emitError(toError(error), attempt);
      }
    })();
    this.#hooks.add(promise);
    promise.finally(() => this.#hooks.delete(promise));
  }

  /**
   * Drops ended attempts from the deadline queue, which otherwise keeps every attempt until the
   * oldest one's timeout passes (5 minutes by default), however many attempts end meanwhile.
   */
  #trimDeadlines(): void {
    while (this.#deadlines.length > 0 && this.#deadlines[0].settled) this.#deadlines.shift();
    // Attempts that end behind a long-running head are removed once they outnumber the running.
    if (this.#deadlines.length > 2 * this.#inFlight.size + 64) {
      this.#deadlines = this.#deadlines.filter((attempt) => !attempt.settled);
    }
  }

  #armDeadline(): void {
    while (this.#deadlines.length > 0 && this.#deadlines[0].settled) this.#deadlines.shift();
    const head = this.#deadlines[0];
    if (head === undefined) {
      this.#deadlineTimer = undefined;
      return;
    }
    const wait = Math.max(0, head.deadline - performance.now());
    this.#deadlineTimer = setTimeout(() => this.#expireDeadlines(), Math.min(wait, 2_147_483_647));
  }

  #expireDeadlines(): void {
    const now = performance.now();
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

  /**
   * Extends the leases of running attempts and of finished attempts whose results are not
   * written yet, so a result that waits for the database is not run again elsewhere. A running
   * attempt whose lease is gone is aborted.
   */
  async #renewLeases(): Promise<void> {
    // Running attempts, and finished ones whose result is not written yet: until it is, their
    // row is still running under this runner's lease.
    const byToken = new Map<string, { running: Attempt[]; ids: string[] }>();
    const add = (attempt: Attempt, running: boolean) => {
      let entry = byToken.get(attempt.token);
      if (entry === undefined) {
        entry = { running: [], ids: [] };
        byToken.set(attempt.token, entry);
      }
      if (running) entry.running.push(attempt);
      entry.ids.push(attempt.row.id);
    };
    for (const attempt of this.#inFlight.values()) add(attempt, true);
    for (const { attempt } of [...this.#settlements, ...this.#writing]) add(attempt, false);
    if (byToken.size === 0) {
      clearInterval(this.#heartbeatTimer);
      this.#heartbeatTimer = undefined;
      return;
    }
    if (this.database.closed) return;
    for (const [token, { running: attempts, ids }] of byToken) {
      let held: Map<string, boolean>;
      try {
        held = await this.database.storage.renew(
          token,
          ids,
          this.database.now() + this.#task.lease,
        );
      } catch (error) {
        const message = logText(toError(error));
        const { log, repeats } = this.#renewErrors.shouldLog(message, Date.now());
        if (log) {
          this.#log.error(
            `Task "${this.name}": renewing leases failed: ${message}${
              repeats > 0 ? ` (repeated ${repeats} times)` : ""
            }`,
            { task: this.name, error: toError(error) },
          );
        }
        continue;
      }
      this.#renewErrors.reset();
      for (const attempt of attempts) {
        if (held.get(attempt.row.id) === true) this.cancelAttempt(attempt.row.id);
        if (attempt.settled || held.has(attempt.row.id)) continue;
        this.#loseLease(attempt);
      }
    }
  }

  /** The abort reason of an attempt whose lease another runner may hold now. */
  #leaseLostError(id: string): DOMException {
    return new DOMException(
      `Task "${this.name}" ${id}: lease lost, another runner may be running it`,
      "AbortError",
    );
  }

  #loseLease(attempt: Attempt): void {
    if (!this.#finish(attempt)) return;
    attempt.abort(this.#leaseLostError(attempt.row.id));
    this.#log.warn(
      `Task "${this.name}" ${attempt.row.id}: lease lost while running (the process may have ` +
        `been paused or its event loop blocked for longer than the lease); the attempt was aborted`,
      { task: this.name, id: attempt.row.id, attempt: attempt.row.attempts },
    );
    this.#emitLeaseLost(attempt);
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
      } else if (row.state === "cancelled") {
        this.#log.info(
          `Task "${this.name}" ${row.id}: lease expired during attempt ${row.attempts} after a cancel; the task is cancelled`,
          fields,
        );
      } else {
        this.#log.error(
          `Task "${this.name}" ${row.id}: lease expired during attempt ${row.attempts} of ${this.#task.maxAttempts}; no attempts left, the task failed`,
          fields,
        );
        void this.#runRescuedFailedHook(row);
      }
      this.#emitRescued(row);
    }
    if (rescued.length > 0) this.#schedulePump();
  }

  async #runRescuedFailedHook(row: RescuedRow): Promise<void> {
    if (this.#task.failed === undefined) return;
    const attempt = new Attempt(
      {
        id: row.id,
        data: row.data,
        attempts: row.attempts,
        scheduledFor: null,
      },
      "",
      0,
      0,
    );
    let error: Error | undefined;
    try {
      error = await this.#decode(attempt);
    } catch (thrown) {
      error = toError(thrown);
    }
    // The failed hook receives the decoded data, so a row whose data cannot be decoded gets no
    // hook, as in `#reject`.
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
        }: ${logText(toError(error))}`,
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

  /**
   * Stops claiming, waits up to `timeout` ms for running attempts, then aborts and releases the
   * rest, records what finished, and waits for hooks for what is left of `timeout`.
   */
  stop(timeout: number): Promise<void> {
    this.#stopping ??= this.#stop(timeout);
    return this.#stopping;
  }

  async #stop(timeout: number): Promise<void> {
    if (this.#state === "stopped") return;
    this.#state = "stopping";
    const deadline = performance.now() + timeout;
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
            `stopping; those tasks run again after their lease expires: ${logText(toError(error))}`,
          { task: this.name, error: toError(error) },
        );
      }
    }

    // A hook that never settles must not hold the stop beyond its timeout.
    const hooksDone = await this.#waitHooks(Math.max(0, deadline - performance.now()));
    if (!hooksDone) {
      this.#log.warn(
        `Task "${this.name}": stopped with ${
          countOf(this.#hooks.size, "success or failed hook")
        } still running after the stop timeout of ${formatDuration(timeout)}`,
        { task: this.name },
      );
    }
    this.#end();
  }

  /** Resolves to whether every running hook settled within `timeout` ms. */
  async #waitHooks(timeout: number): Promise<boolean> {
    if (this.#hooks.size === 0) return true;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), Math.min(timeout, 2_147_483_647));
    });
    const settled = Promise.all(this.#hooks).then(() => true as const);
    const result = await Promise.race([settled, timedOut]);
    clearTimeout(timer);
    return result;
  }

  /**
   * Stops at once because the database was closed under the runner: nothing can be written, so
   * running attempts are aborted and finished results are dropped. Their rows keep their lease
   * and run again after it expires.
   */
  onDatabaseClosed(): void {
    if (this.#state === "stopped") return;
    const running = this.#inFlight.size;
    const unrecorded = this.#settlements.length;
    for (const attempt of [...this.#inFlight.values()]) {
      this.#finish(attempt);
      attempt.abort(
        new DOMException(
          `Task "${this.name}" ${attempt.row.id}: the database was closed during the attempt`,
          "AbortError",
        ),
      );
    }
    this.#settlements = [];
    this.#log.warn(
      `Task "${this.name}": the database was closed while its runner was running` +
        (running + unrecorded > 0
          ? `; ${countOf(running, "running attempt")} and ${
            countOf(unrecorded, "finished result")
          } were not recorded, so those tasks run again after their lease expires`
          : "") +
        ". Call runner.stop() before database.close().",
      { task: this.name },
    );
    this.#end();
  }

  /** Clears every timer and leaves the database's registry, so the process can exit. */
  #end(): void {
    this.#state = "stopped";
    clearInterval(this.#pollTimer);
    clearTimeout(this.#wakeTimer);
    clearTimeout(this.#retryTimer);
    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#deadlineTimer);
    this.#wakeTimer = undefined;
    this.#wakeAt = -Infinity;
    this.#retryTimer = undefined;
    this.#heartbeatTimer = undefined;
    this.#deadlineTimer = undefined;
    this.database.unregister(this);
    this.#resolveStopped();
  }

  /** Emits the event of a row that the rescue moved. The lost attempt's duration is unknown. */
  #emitRescued(row: RescuedRow): void {
    if (!this.#events?.listening) return;
    const base = { task: this.name, id: row.id, attempt: row.attempts, duration: undefined };
    if (row.state === "cancelled") {
      this.#events.emit({ type: "cancelled", ...base });
      return;
    }
    const error = new Error(
      "The worker stopped responding: its lease expired before the attempt ended",
    );
    if (row.state === "failed") this.#events.emit({ type: "failed", ...base, error });
    else this.#events.emit({ type: "retried", ...base, error, runAt: this.database.now() });
  }

  /** Emits the event of a result that was just recorded. */
  #emitSettled(settlement: Settlement, attempt: Attempt, error: Error | undefined): void {
    if (!this.#events?.listening) return;
    const base = {
      task: this.name,
      id: attempt.row.id,
      attempt: attempt.row.attempts,
      duration: attempt.duration,
    };
    switch (settlement.kind) {
      case "complete":
      case "keep":
        this.#events.emit({ type: "succeeded", ...base });
        break;
      case "cancel":
        this.#events.emit({ type: "cancelled", ...base });
        break;
      case "retry":
        this.#events.emit({
          type: "retried",
          ...base,
          error: error ?? new Error(settlement.error),
          runAt: settlement.runAt,
        });
        break;
      case "fail":
        this.#events.emit({ type: "failed", ...base, error: error ?? new Error(settlement.error) });
        break;
    }
  }

  #emitLeaseLost(attempt: Attempt): void {
    this.#events?.emit({
      type: "lease-lost",
      task: this.name,
      id: attempt.row.id,
      attempt: attempt.row.attempts,
      duration: attempt.duration,
    });
  }

  #emitError(error: Error, attempt?: Attempt): void {
    this.#events?.emit({
      type: "error",
      task: this.name,
      id: attempt?.row.id,
      attempt: attempt?.row.attempts,
      error,
    });
  }

  /**
   * Aborts this runner's attempt of task `id`, if it runs one, and records the task as
   * `cancelled`. Returns whether it ran the attempt.
   */
  cancelAttempt(id: string): boolean {
    const attempt = this.#inFlight.get(id);
    if (attempt === undefined || !this.#finish(attempt)) return false;
    attempt.abort(new DOMException(`Task "${this.name}" ${id} was cancelled`, "AbortError"));
    this.#settlements.push({
      settlement: { kind: "cancel", id, token: attempt.token, now: this.database.now() },
      attempt,
    });
    this.#log.info(
      `Task "${this.name}" ${id}: cancelled during attempt ${attempt.row.attempts}; the attempt was aborted`,
      { task: this.name, id, attempt: attempt.row.attempts },
    );
    this.#schedulePump();
    return true;
  }

  /**
   * Claims up to `batchSize` rows due at `dueAt`, runs them, and resolves to the number claimed
   * once every result is recorded and every hook has run. For `drain()`, on a runner that was
   * never started: it sets no poll timer and leaves no timer behind.
   */
  async runDue(dueAt: number): Promise<number> {
    // The pump now only writes results, so every claim happens here.
    this.#state = "draining";
    const now = this.database.now();
    // Every scheduled row due at `dueAt` becomes pending first, so a delay or a backoff that a
    // test's clock has passed runs now.
    while (
      await this.database.storage.promote(this.name, dueAt, promoteBatch) === promoteBatch
    );
    const token = `${this.#worker}-${++this.#claimCount}`;
    const rows = await this.database.storage.claim(
      this.name,
      this.#task.batchSize,
      now + this.#task.lease,
      token,
    );
    for (const row of rows) this.#startAttempt(row, token);

    await this.#waitIdle(Infinity);
    while (this.#pumping) await sleep(1);
    if (this.#settlements.length > 0) await this.#flush();
    await Promise.all(this.#hooks);

    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#deadlineTimer);
    this.#heartbeatTimer = undefined;
    this.#deadlineTimer = undefined;
    this.#deadlines = [];
    return rows.length;
  }
}

// ---------------------------------------------------------------------------------------------
// Events and retention cleanup, beside the runners
// ---------------------------------------------------------------------------------------------

/**
 * The fields that every event of one task's attempt has.
 *
 * @example One listener for the start and end of each attempt
 * ```ts
 * import { runTasks, type TaskEventBase } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * const trace = (label: string) => (event: TaskEventBase) => {
 *   console.log(`${label} ${event.task} ${event.id}, attempt ${event.attempt}`);
 * };
 * runner.on("claimed", trace("started"));
 * runner.on("succeeded", trace("finished"));
 * ```
 */
export interface TaskEventBase {
  /** The task's name. */
  readonly task: string;
  /** The task's id. */
  readonly id: string;
  /** The number of the attempt, starting at 1. */
  readonly attempt: number;
}

/**
 * A runner claimed a due task and starts an attempt.
 *
 * @example Log each attempt as it starts
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("claimed", (event) => {
 *   console.log(`${event.task} ${event.id}: attempt ${event.attempt} started`);
 * });
 * ```
 */
export interface ClaimedEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "claimed";
}

/**
 * An attempt succeeded and the result was recorded.
 *
 * @example Report slow runs
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("succeeded", (event) => {
 *   if (event.duration > 10_000) {
 *     console.warn(`${event.task} ${event.id} took ${event.duration} ms`);
 *   }
 * });
 * ```
 */
export interface SucceededEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "succeeded";
  /** Milliseconds from the claim to the end of the attempt. */
  readonly duration: number;
}

/**
 * A task failed for good and its row became `failed`: its last attempt failed, its stored
 * data could not be decoded, or its lease expired with no attempts left.
 *
 * @example Alert on tasks that failed for good
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("failed", (event) => {
 *   console.error(`${event.task} ${event.id} failed on attempt ${event.attempt}`, event.error);
 * });
 * ```
 */
export interface FailedEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "failed";
  /**
   * Milliseconds from the claim to the end of the attempt, or `undefined` when this runner
   * found the expired lease of an attempt that ran elsewhere.
   */
  readonly duration: number | undefined;
  /** The error of the last attempt. */
  readonly error: Error;
}

/**
 * An attempt failed, or its lease expired, and the task is due again at `runAt`.
 *
 * @example Log each retry with its due time
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("retried", (event) => {
 *   const next = new Date(event.runAt).toISOString();
 *   console.warn(`${event.task} ${event.id} attempt ${event.attempt} failed, next at ${next}`);
 *   console.warn(event.error);
 * });
 * ```
 */
export interface RetriedEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "retried";
  /**
   * Milliseconds from the claim to the end of the attempt, or `undefined` when this runner
   * found the expired lease of an attempt that ran elsewhere.
   */
  readonly duration: number | undefined;
  /** The error of the attempt. */
  readonly error: Error;
  /** When the next attempt is due, in milliseconds since the epoch. */
  readonly runAt: number;
}

/**
 * A running task was cancelled with {@linkcode cancel} and its row became `cancelled`.
 *
 * @example Confirm that a running attempt was aborted
 * ```ts
 * import { cancel, openDatabase, runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("cancelled", (event) => {
 *   console.log(`${event.task} ${event.id} cancelled during attempt ${event.attempt}`);
 * });
 * await cancel(openDatabase("file:app.db"), "0195e3a2-7c4e-7f00-8c1a-2b3c4d5e6f70");
 * ```
 */
export interface CancelledEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "cancelled";
  /**
   * Milliseconds from the claim to the abort, or `undefined` when this runner found the
   * expired lease of an attempt that ran elsewhere.
   */
  readonly duration: number | undefined;
}

/**
 * This runner lost the lease of a running attempt, so another runner may run the task. The
 * attempt was aborted, or its result was not recorded.
 *
 * @example Warn that a task may run again elsewhere
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("lease-lost", (event) => {
 *   console.warn(`${event.task} ${event.id}: lease lost after ${event.duration} ms`);
 * });
 * ```
 */
export interface LeaseLostEvent extends TaskEventBase {
  /** The event type. */
  readonly type: "lease-lost";
  /** Milliseconds from the claim until the runner found the lease gone. */
  readonly duration: number;
}

/**
 * The runner caught an error: a database error, or an error thrown by a hook.
 *
 * @example Log caught errors with the task they belong to
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("error", (event) => {
 *   const source = event.id === undefined ? event.task : `${event.task} ${event.id}`;
 *   console.error(`${source}: ${event.error.message}`);
 * });
 * ```
 */
export interface ErrorEvent {
  /** The event type. */
  readonly type: "error";
  /** The name of the task whose runner caught the error. */
  readonly task: string;
  /** The task's id, when the error belongs to one task. */
  readonly id: string | undefined;
  /** The attempt's number, when the error belongs to one attempt. */
  readonly attempt: number | undefined;
  /** The error. */
  readonly error: Error;
}

/**
 * A lifecycle event of a runner. Switch on `type` to narrow it.
 *
 * @example Count the events of each type
 * ```ts
 * import { runTasks, type TaskEvent } from "tasklite";
 *
 * const counts = new Map<TaskEvent["type"], number>();
 * await runTasks("app/tasks", {
 *   onEvent(event) {
 *     counts.set(event.type, (counts.get(event.type) ?? 0) + 1);
 *     if (event.type === "failed") console.error(`${event.task} ${event.id}`, event.error);
 *   },
 * });
 * ```
 */
export type TaskEvent =
  | ClaimedEvent
  | SucceededEvent
  | FailedEvent
  | RetriedEvent
  | CancelledEvent
  | LeaseLostEvent
  | ErrorEvent;

const taskEventTypes: ReadonlyArray<TaskEvent["type"]> = [
  "claimed",
  "succeeded",
  "failed",
  "retried",
  "cancelled",
  "lease-lost",
  "error",
];

type EventListener = (event: TaskEvent) => void;

/** Delivers runner events to listeners, and logs what a listener throws. */
class EventBus {
  readonly #log: Logger;
  readonly #byType = new Map<TaskEvent["type"], Set<EventListener>>();
  readonly #all = new Set<EventListener>();
  #count = 0;

  constructor(log: Logger) {
    this.#log = log;
  }

  /** Whether any listener is registered, so callers can skip building an event. */
  get listening(): boolean {
    return this.#count > 0;
  }

  /** Adds a listener for one type of event and returns a function that removes it. */
  on(type: TaskEvent["type"], listener: EventListener): () => void {
    if (!taskEventTypes.includes(type)) {
      throw new TypeError(
        `Invalid event type ${describeValue(type)}: expected one of ${
          taskEventTypes.map((name) => JSON.stringify(name)).join(", ")
        }`,
      );
    }
    if (typeof listener !== "function") {
      throw new TypeError(
        `Invalid listener for the "${type}" event: expected a function, received ${
          describeValue(listener)
        }`,
      );
    }
    const listeners = this.#byType.get(type) ?? new Set();
    this.#byType.set(type, listeners);
    return this.#add(listeners, listener);
  }

  /** Adds a listener for every event and returns a function that removes it. */
  onEvery(listener: EventListener): () => void {
    return this.#add(this.#all, listener);
  }

  #add(listeners: Set<EventListener>, listener: EventListener): () => void {
    // A wrapper per call, so that one function added twice runs twice and needs two removals.
    const entry: EventListener = (event) => listener(event);
    listeners.add(entry);
    this.#count++;
    return () => {
      if (listeners.delete(entry)) this.#count--;
    };
  }

  emit(event: TaskEvent): void {
    if (this.#count === 0) return;
    for (const listener of this.#byType.get(event.type) ?? []) this.#call(listener, event);
    for (const listener of this.#all) this.#call(listener, event);
  }

  #call(listener: EventListener, event: TaskEvent): void {
    try {
      const result: unknown = listener(event);
      if (result instanceof Promise) result.catch((error) => this.#report(error, event));
    } catch (error) {
      this.#report(error, event);
    }
  }

  #report(thrown: unknown, event: TaskEvent): void {
    const error = toError(thrown);
    this.#log.error(
      `Task "${event.task}"${event.id ? ` ${event.id}` : ""}: a listener of the "${event.type}" ` +
        `event threw: ${error.message}`,
      { task: event.task, id: event.id, event: event.type, error },
    );
  }
}

/**
 * Deletes the rows of one task whose retention ran out: `completed` rows after the task's
 * `keepCompleted`, and `failed` and `cancelled` rows after its `keepFailed`, each counted from
 * `finished_at`. `runTasks` starts one beside each task's runner.
 */
class CleanupService {
  readonly #task: TaskInternals;
  readonly #log: Logger;
  readonly #debug: boolean;
  readonly #events: EventBus;
  #timer: ReturnType<typeof setInterval> | undefined;
  #interval = 0;
  #running: Promise<number> | undefined;

  constructor(task: TaskInternals, log: Logger, debug: boolean, events: EventBus) {
    this.#task = task;
    this.#log = log;
    this.#debug = debug;
    this.#events = events;
  }

  /**
   * Deletes every row whose retention ran out at `now` (by default the database clock's time)
   * and returns how many it deleted.
   */
  async runOnce(now = this.#task.database.now()): Promise<number> {
    const { name, database, keepCompleted, keepFailed } = this.#task;
    const storage = database.storage;
    let deleted = await storage.deleteFinished(name, "completed", now - keepCompleted);
    deleted += await storage.deleteFinished(name, "failed", now - keepFailed);
    deleted += await storage.deleteFinished(name, "cancelled", now - keepFailed);
    if (this.#debug && deleted > 0) {
      this.#log.debug(
        `Task "${name}": cleanup deleted ${countOf(deleted, "finished row")}`,
        { task: name, deleted },
      );
    }
    return deleted;
  }

  /** Runs the cleanup now and then every `interval` ms, until `stop()`. */
  start(interval: number): void {
    this.#interval = interval;
    void this.#tick();
    this.#timer = setInterval(() => void this.#tick(), interval);
    unrefTimer(this.#timer);
  }

  /** Stops the timer and waits for a cleanup in progress. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    this.#timer = undefined;
    await this.#running?.catch(() => {});
  }

  async #tick(): Promise<void> {
    const { name, database } = this.#task;
    if (this.#running !== undefined || database.closed) return;
    this.#running = this.runOnce();
    try {
      await this.#running;
    } catch (thrown) {
      const error = toError(thrown);
      this.#log.error(
        `Task "${name}": retention cleanup failed, trying again in ${
          formatDuration(this.#interval)
        }: ${error.message}`,
        { task: name, error },
      );
      this.#events.emit({ type: "error", task: name, id: undefined, attempt: undefined, error });
    } finally {
      this.#running = undefined;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Schedules (cron)
// ---------------------------------------------------------------------------------------------

/**
 * With `catchUp: "none"`, the latest due tick is still enqueued when a scheduler handles it
 * this long after its time, so a late timer or a quick restart does not skip it.
 */
const onTimeWindow = 60_000;

/**
 * The maximum time a scheduler sleeps between two reads of the stored schedules, so it finds
 * schedules that another process stored, replaced or deleted within this time.
 */
const scheduleRefreshInterval = 60_000;

const defaultMaxCatchUp = 100;

const patternHint = 'A pattern has five fields, "minute hour day-of-month month day-of-week" ' +
  '(for example "0 3 * * *"), optionally with a leading seconds field.';

/** The options of a schedule that decide which ticks it enqueues, stored as JSON. */
interface ScheduleRules {
  catchUp: CatchUp;
  maxCatchUp?: number;
  overlap: boolean;
}

/** A validated schedule, ready to store. */
interface ScheduleDefinition {
  name: string;
  task: string;
  pattern: string;
  timezone: string;
  data: unknown;
  /** The data as JSON text, or null for `undefined`. */
  json: string | null;
  rules: ScheduleRules;
  source: StoredSchedule["source"];
  cron: Cron;
}

const scheduleOptionEntries = {
  name: v.optional(v.pipe(v.string(nameExpected), v.regex(namePattern, nameExpected))),
  timezone: v.optional(v.string('an IANA time zone name such as "Europe/Berlin"'), "UTC"),
  catchUp: v.optional(
    v.picklist(["none", "latest", "all"], '"none", "latest" or "all"'),
    "none",
  ),
  maxCatchUp: v.optional(integerSchema(1, 10_000)),
  overlap: v.optional(v.boolean("true or false"), true),
};

const scheduleOptionsSchema = v.strictObject(scheduleOptionEntries);

const cronDefinitionSchema = v.strictObject({
  pattern: v.string('a cron pattern such as "0 3 * * *"'),
  data: v.optional(v.unknown()),
  ...scheduleOptionEntries,
});

/** The schedules of this process by database identity, so `schedule()` wakes them at once. */
const schedulersByDatabase = new Map<string, Set<CronScheduler>>();

/** The schedules that `ScheduleHandle.stop()` stopped in this process, by database identity. */
const stoppedSchedules = new Map<string, Set<string>>();

/**
 * Parses a cron pattern in a time zone.
 *
 * Fixed-time patterns follow Vixie cron on daylight-saving changes: croner's default counts
 * only a single value in each of the second, minute and hour fields as fixed, so `0 2,14 * * *`
 * would skip its 02:00 run on a spring-forward day. "no-wildcard" counts every pattern without
 * `*` or a step in those fields as fixed.
 *
 * @throws {TypeError} When the pattern cannot be parsed, naming the schedule.
 * @throws {RangeError} When a field is out of range.
 */
function createCron(pattern: string, timezone: string, name: string): Cron {
  const described = `${JSON.stringify(pattern)} for schedule ${JSON.stringify(name)}`;
  // croner reads a string that contains a colon as a date and time to run once.
  if (pattern.includes(":")) {
    throw new TypeError(
      `Invalid cron pattern ${described}: a date and time runs once, so enqueue it with ` +
        `perform(task, data, { runAt }) instead. ${patternHint}`,
    );
  }
  try {
    return new Cron(pattern, { timezone, paused: true, fixedTimeRule: "no-wildcard" });
  } catch (error) {
    const message = toError(error).message.replace(/^CronPattern: /, "").replace(/\.$/, "");
    const ErrorClass = error instanceof RangeError ? RangeError : TypeError;
    throw new ErrorClass(`Invalid cron pattern ${described}: ${message}. ${patternHint}`, {
      cause: error,
    });
  }
}

/** @throws {RangeError} When the runtime does not know the time zone. */
function checkTimeZone(timezone: string, name: string): void {
  try {
    new Intl.DateTimeFormat("en-US", { timeZone: timezone });
  } catch (error) {
    throw new RangeError(
      `Invalid time zone ${JSON.stringify(timezone)} for schedule ${JSON.stringify(name)}: ` +
        `expected an IANA time zone name such as "Europe/Berlin" or "UTC"`,
      { cause: error },
    );
  }
}

/** Returns the first tick after `after`, in milliseconds, or null when there is none. */
function nextTick(cron: Cron, after: number): number | null {
  return cron.nextRun(new Date(after))?.getTime() ?? null;
}

/**
 * Validates a schedule: its options, time zone, pattern and data. Writes nothing.
 *
 * @param task The task's name and database; the task may still be being defined.
 */
function defineSchedule(
  task: { name: string; database: TaskDatabase },
  pattern: unknown,
  data: unknown,
  options: unknown,
  source: StoredSchedule["source"],
): ScheduleDefinition {
  const givenName = (options as { name?: unknown } | undefined)?.name;
  const displayName = typeof givenName === "string" && namePattern.test(givenName)
    ? givenName
    : task.name;
  const parsed = parseOptions(
    scheduleOptionsSchema,
    options ?? {},
    `schedule ${JSON.stringify(displayName)}`,
  );
  const name = parsed.name ?? task.name;
  if (parsed.maxCatchUp !== undefined && parsed.catchUp !== "all") {
    throw new TypeError(
      `Invalid schedule ${JSON.stringify(name)} options: "maxCatchUp" only applies with ` +
        `catchUp "all", received catchUp ${JSON.stringify(parsed.catchUp)}`,
    );
  }
  if (typeof pattern !== "string") {
    throw new TypeError(
      `Invalid cron pattern for schedule ${JSON.stringify(name)}: expected a string such as ` +
        `"0 3 * * *", received ${describeValue(pattern)}`,
    );
  }

  checkTimeZone(parsed.timezone, name);
  const cron = createCron(pattern, parsed.timezone, name);
  const now = task.database.now();
  if (nextTick(cron, now) === null) {
    throw new RangeError(
      `Cron pattern ${JSON.stringify(pattern)} for schedule ${JSON.stringify(name)} has no ` +
        `tick after ${new Date(now).toISOString()}: check its day, month and year fields`,
    );
  }

  const json = serializeData(data, task.name);
  const rules: ScheduleRules = parsed.catchUp === "all"
    ? {
      catchUp: "all",
      maxCatchUp: parsed.maxCatchUp ?? defaultMaxCatchUp,
      overlap: parsed.overlap,
    }
    : { catchUp: parsed.catchUp, overlap: parsed.overlap };
  return {
    name,
    task: task.name,
    pattern,
    timezone: parsed.timezone,
    data,
    json,
    rules,
    source,
    cron,
  };
}

/**
 * Validates the `cron` option of a task definition.
 *
 * @throws {TypeError} When it is neither a pattern nor an object with a `pattern`.
 */
function defineCronOption(
  cron: unknown,
  task: { name: string; database: TaskDatabase },
): ScheduleDefinition {
  if (typeof cron === "string") return defineSchedule(task, cron, undefined, {}, "definition");

  const context = `cron of task ${JSON.stringify(task.name)}`;
  const { pattern, data, ...options } = parseOptions(cronDefinitionSchema, cron, context);
  return defineSchedule(task, pattern, data, options, "definition");
}

/** Reads stored rules, falling back to the defaults for anything missing. */
function parseRules(options: string): ScheduleRules {
  const stored = JSON.parse(options) as Partial<ScheduleRules>;
  const catchUp = stored.catchUp === "latest" || stored.catchUp === "all" ? stored.catchUp : "none";
  return {
    catchUp,
    maxCatchUp: catchUp === "all" ? stored.maxCatchUp ?? defaultMaxCatchUp : undefined,
    overlap: stored.overlap !== false,
  };
}

/** Stores a validated schedule and wakes the schedulers of this process. */
async function storeSchedule(
  database: TaskDatabase,
  definition: ScheduleDefinition,
): Promise<{ change: "created" | "replaced" | "unchanged"; removed: string[] }> {
  await database.ready();
  if (database.closed) throw closedError();
  const result = await database.storage.saveSchedule({
    name: definition.name,
    task: definition.task,
    pattern: definition.pattern,
    timezone: definition.timezone,
    data: definition.json,
    options: JSON.stringify(definition.rules),
    source: definition.source,
    now: database.now(),
  });
  stoppedSchedules.get(database.identity)?.delete(definition.name);
  wakeSchedulers(database);
  return result;
}

function wakeSchedulers(database: TaskDatabase): void {
  for (const scheduler of schedulersByDatabase.get(database.identity) ?? []) scheduler.wake();
}

function toMillisecondsSinceEpoch(value: unknown, context: string): number {
  const time = value instanceof Date ? value.getTime() : value;
  if (typeof time !== "number" || !Number.isFinite(time)) {
    throw new TypeError(
      `Invalid time for ${context}: expected a valid Date or milliseconds since the epoch, ` +
        `received ${describeValue(value)}`,
    );
  }
  return time;
}

/** The plan of a scheduler pass for the due ticks of one schedule. */
interface TickPlan {
  /** The latest due tick, which becomes `last_fired_at`, or undefined when none is due. */
  latest: number | undefined;
  /** The ticks to enqueue, oldest first. */
  enqueue: number[];
  /** The number of due ticks left out, and whether older ones may exist beyond it. */
  skipped: number;
  more: boolean;
}

/**
 * Decides which ticks after `from` and up to `now` to enqueue.
 *
 * It walks forward from `from` with `nextRun`, the same computation that sets the timer, and
 * stops after one tick more than it may enqueue. Only when more ticks are due does it ask croner
 * for the most recent ones, so a long downtime of a frequent schedule costs no more than a short
 * one.
 */
function planTicks(cron: Cron, rules: ScheduleRules, from: number, now: number): TickPlan {
  const limit = rules.catchUp === "all" ? rules.maxCatchUp ?? defaultMaxCatchUp : 1;
  let due: number[] = [];
  for (let tick = nextTick(cron, from); tick !== null && tick <= now; tick = nextTick(cron, tick)) {
    due.push(tick);
    if (due.length > limit) break;
  }
  const more = due.length > limit;
  if (more) {
    // previousRuns includes a tick in the same second as its reference, so `now + 1` includes
    // a tick at exactly `now`.
    due = cron.previousRuns(limit + 1, new Date(now + 1))
      .map((date) => date.getTime())
      .filter((tick) => tick > from && tick <= now)
      .reverse();
  }
  if (due.length === 0) return { latest: undefined, enqueue: [], skipped: 0, more: false };

  const latest = due[due.length - 1];
  let enqueue: number[];
  if (rules.catchUp === "none") enqueue = now - latest <= onTimeWindow ? [latest] : [];
  else enqueue = due.slice(-limit);
  if (!rules.overlap) enqueue = enqueue.slice(-1);
  return { latest, enqueue, skipped: due.length - enqueue.length, more };
}

/**
 * Enqueues the ticks of the stored schedules of some tasks of one database. It reads the
 * schedules, enqueues what is due, and sleeps until the next tick (at most
 * `scheduleRefreshInterval`). Several schedulers, in this process or others, may run on one
 * database: `SqliteStorage.fire` lets exactly one of them record and enqueue each tick.
 */
class CronScheduler {
  readonly database: TaskDatabase;
  readonly #tasks: readonly string[];
  readonly #log: Logger;
  readonly #debug: boolean;
  #state: "idle" | "running" | "stopped" = "idle";
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** The passes run one after another; this is the latest one. */
  #chain: Promise<unknown> = Promise.resolve();
  #errorDelay = 0;
  readonly #errors = new RepeatLimiter();
  /** Parsed patterns by schedule name, valid for one revision. */
  readonly #crons = new Map<string, { revision: number; cron: Cron }>();
  /** Schedules whose stored pattern failed to parse, logged once per revision. */
  readonly #broken = new Set<string>();

  constructor(database: TaskDatabase, tasks: readonly string[], log: Logger, debug: boolean) {
    this.database = database;
    this.#tasks = tasks;
    this.#log = log;
    this.#debug = debug;
  }

  /**
   * Registers the scheduler in this process and runs its first pass, which enqueues the ticks
   * due at the start. A database error is logged and retried, not thrown.
   */
  async start(): Promise<void> {
    if (this.#state !== "idle") return;
    this.#state = "running";
    let schedulers = schedulersByDatabase.get(this.database.identity);
    if (schedulers === undefined) {
      schedulers = new Set();
      schedulersByDatabase.set(this.database.identity, schedulers);
    }
    schedulers.add(this);
    await this.#runTimedPass();
  }

  /** Runs a pass soon, for a schedule that this process stored or deleted. */
  wake(): void {
    if (this.#state !== "running") return;
    this.#arm(0);
  }

  runOnce(now?: Date | number): Promise<Occurrence[]> {
    const time = now === undefined
      ? undefined
      : toMillisecondsSinceEpoch(now, "Scheduler.runOnce()");
    const pass = this.#chain.then(() => this.#pass(time ?? this.database.now()));
    this.#chain = pass.catch(() => {});
    return pass;
  }

  async stop(): Promise<void> {
    if (this.#state === "stopped") return;
    this.#state = "stopped";
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#chain;
    const schedulers = schedulersByDatabase.get(this.database.identity);
    schedulers?.delete(this);
    if (schedulers?.size === 0) schedulersByDatabase.delete(this.database.identity);
  }

  #arm(wait: number): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => void this.#runTimedPass(), Math.max(0, Math.round(wait)));
    unrefTimer(this.#timer);
  }

  /** Runs a pass for the timer or the start, and retries with a growing delay on errors. */
  async #runTimedPass(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#state !== "running" || this.database.closed) return;
    try {
      await this.runOnce();
      this.#errorDelay = 0;
      this.#errors.reset();
    } catch (error) {
      if (this.#state !== "running" || this.database.closed) return;
      this.#errorDelay = Math.min(30_000, Math.max(100, this.#errorDelay * 2));
      const wait = this.#errorDelay * (0.75 + Math.random() * 0.5);
      const message = toError(error).message;
      const { log, repeats } = this.#errors.shouldLog(message, Date.now());
      if (log) {
        this.#log.error(
          `Scheduler: database error, retrying in ${formatDuration(wait)}: ${message}${
            repeats > 0 ? ` (repeated ${repeats} times)` : ""
          }`,
          { tasks: this.#tasks, error: toError(error), retryInMs: Math.round(wait) },
        );
      }
      if (this.#timer === undefined) this.#arm(wait);
    }
  }

  /** Enqueues the due ticks of every schedule, then sleeps until the next tick. */
  async #pass(now: number): Promise<Occurrence[]> {
    if (this.database.closed || this.#state === "stopped") return [];
    const schedules = await this.database.storage.schedules(this.#tasks);
    const stopped = stoppedSchedules.get(this.database.identity);
    const occurrences: Occurrence[] = [];
    let nextAt = Infinity;

    for (const schedule of schedules) {
      if (stopped?.has(schedule.name)) continue;
      const cron = this.#cronOf(schedule);
      if (cron === undefined) continue;

      // Ticks at or before `updated` belong to the definition that the schedule replaced.
      const from = Math.max(schedule.lastFiredAt ?? -Infinity, schedule.updated);
      let next = nextTick(cron, from);
      if (next !== null && next <= now) {
        const handled = await this.#fire(schedule, cron, from, now, occurrences);
        next = nextTick(cron, Math.max(now, handled ?? from));
      }
      if (next !== null) nextAt = Math.min(nextAt, next);
    }

    const names = new Set(schedules.map((schedule) => schedule.name));
    for (const name of this.#crons.keys()) {
      if (!names.has(name)) this.#crons.delete(name);
    }
    if (this.#state === "running" && !this.database.closed) {
      // Timers may fire a little early; one millisecond more makes the tick due when it fires.
      const wait = Math.min(nextAt - this.database.now() + 1, scheduleRefreshInterval);
      this.#arm(wait);
    }
    return occurrences;
  }

  /**
   * Enqueues the due ticks of one schedule. Returns the latest due tick, which this or another
   * scheduler has handled, or undefined when none was due.
   */
  async #fire(
    schedule: StoredSchedule,
    cron: Cron,
    from: number,
    now: number,
    occurrences: Occurrence[],
  ): Promise<number | undefined> {
    let rules: ScheduleRules;
    try {
      rules = parseRules(schedule.options);
    } catch (error) {
      this.#reportBroken(schedule, `its stored options are not valid JSON`, error);
      return undefined;
    }
    const plan = planTicks(cron, rules, from, now);
    if (plan.latest === undefined) return undefined;

    const { advanced, inserted } = await this.database.storage.fire({
      schedule,
      lastFiredAt: plan.latest,
      ticks: plan.enqueue,
      overlap: rules.overlap,
      now,
    });
    const fields = { schedule: schedule.name, task: schedule.task };
    if (!advanced) {
      if (this.#debug) {
        this.#log.debug(
          `Schedule "${schedule.name}": the tick at ${
            new Date(plan.latest).toISOString()
          } was handled by another scheduler`,
          fields,
        );
      }
      return plan.latest;
    }

    for (const row of inserted) {
      const occurrence: Occurrence = Object.freeze({
        schedule: schedule.name,
        task: schedule.task,
        id: row.id,
        scheduledFor: new Date(row.scheduledFor),
      });
      occurrences.push(occurrence);
      if (this.#debug) {
        this.#log.debug(
          `Schedule "${schedule.name}": enqueued task "${schedule.task}" ${row.id} for the tick at ${occurrence.scheduledFor.toISOString()}`,
          { ...fields, id: row.id, scheduledFor: row.scheduledFor },
        );
      }
    }
    if (inserted.length > 0) {
      this.database.notify(
        inserted.map((row) => ({ name: schedule.task, runAt: row.scheduledFor })),
      );
    }
    this.#reportSkipped(schedule, rules, plan, inserted.length, from);
    return plan.latest;
  }

  #reportSkipped(
    schedule: StoredSchedule,
    rules: ScheduleRules,
    plan: TickPlan,
    inserted: number,
    from: number,
  ): void {
    const fields = { schedule: schedule.name, task: schedule.task };
    if (inserted < plan.enqueue.length) {
      const tick = new Date(plan.enqueue[plan.enqueue.length - 1]).toISOString();
      this.#log.info(
        `Schedule "${schedule.name}": skipped the tick at ${tick} because its previous run is ` +
          `still waiting or running (overlap is off)`,
        fields,
      );
    }
    if (plan.skipped === 0) return;

    let reason = `catchUp is "${rules.catchUp}"`;
    if (!rules.overlap && rules.catchUp === "all") reason = "overlap is off";
    else if (rules.catchUp === "all") reason = `maxCatchUp is ${rules.maxCatchUp}`;
    const count = plan.more
      ? `${plan.skipped} or more missed ticks`
      : plan.skipped === 1
      ? "1 missed tick"
      : `${plan.skipped} missed ticks`;
    this.#log.info(
      `Schedule "${schedule.name}": skipped ${count} since ${
        new Date(from).toISOString()
      } because ${reason}; enqueued ${countOf(plan.enqueue.length, "tick")}`,
      { ...fields, skipped: plan.skipped },
    );
  }

  /** Returns the parsed pattern of a stored schedule, or undefined (logged once) if invalid. */
  #cronOf(schedule: StoredSchedule): Cron | undefined {
    const cached = this.#crons.get(schedule.name);
    if (cached !== undefined && cached.revision === schedule.revision) return cached.cron;
    try {
      checkTimeZone(schedule.timezone, schedule.name);
      const cron = createCron(schedule.pattern, schedule.timezone, schedule.name);
      this.#crons.set(schedule.name, { revision: schedule.revision, cron });
      return cron;
    } catch (error) {
      this.#reportBroken(schedule, "it cannot be parsed here", error);
      return undefined;
    }
  }

  #reportBroken(schedule: StoredSchedule, problem: string, error: unknown): void {
    const key = `${schedule.name}\n${schedule.revision}`;
    if (this.#broken.has(key)) return;
    this.#broken.add(key);
    this.#log.error(
      `Schedule "${schedule.name}" is not enqueued because ${problem}: ${
        toError(error).message
      }. Register it again with schedule() or remove it with unschedule().`,
      { schedule: schedule.name, task: schedule.task, error: toError(error) },
    );
  }
}

/**
 * Stores the `cron` schedules of task definitions, and deletes the stored schedules that came
 * from a `cron` option the tasks no longer have.
 *
 * @throws {TaskDataError} When a schedule's data fails its task's schema. Nothing is stored.
 */
async function storeDefinedSchedules(
  definitions: readonly TaskInternals[],
  logger: Logger,
): Promise<void> {
  for (const definition of definitions) {
    const cron = definition.cron;
    if (cron !== undefined && definition.schema !== undefined) {
      await validateData(definition, cron.data, "cron.data");
    }
  }

  for (const definition of definitions) {
    const cron = definition.cron;
    if (cron === undefined) continue;
    const { change, removed } = await storeSchedule(definition.database, cron);
    if (change === "unchanged") continue;
    logger.info(
      `tasklite: ${change === "created" ? "stored" : "replaced"} schedule "${cron.name}" of ` +
        `task "${cron.task}": ${JSON.stringify(cron.pattern)} in ${cron.timezone}${
          removed.length > 0 ? `; removed ${countOf(removed.length, "pending run")}` : ""
        }`,
      { schedule: cron.name, task: cron.task },
    );
  }

  const databases = new Set(definitions.map((definition) => definition.database));
  for (const database of databases) {
    const kept = definitions
      .filter((definition) => definition.database === database)
      .map((definition): [string, string | null] => [
        definition.name,
        definition.cron?.name ?? null,
      ]);
    const deleted = await database.storage.deleteStaleSchedules(kept);
    for (const { name, task } of deleted) {
      logger.info(
        `tasklite: removed schedule "${name}": task "${task}" no longer defines it`,
        { schedule: name, task },
      );
    }
  }
}

/**
 * Registers a cron schedule that enqueues a task with `data` at every tick of `pattern`.
 *
 * The schedule is stored in the database, so it outlives the process: every
 * {@linkcode runTasks} that runs the task enqueues its ticks, and each tick is enqueued exactly
 * once however many processes run it. Calling `schedule()` again with the same arguments, for
 * example at every start, changes nothing. Calling it with another pattern, time zone, data or
 * options under the same name replaces the stored schedule and deletes its runs that have not
 * started, in one transaction.
 *
 * Each run receives the tick as {@linkcode TaskContext.scheduledFor}. The schedulers of this
 * process see a new, replaced or removed schedule at once; schedulers in other processes read
 * the stored schedules again at least once a minute.
 *
 * @param task A task from {@linkcode defineDatabaseTask}.
 * @param pattern A cron pattern: five fields (minute, hour, day of month, month, day of week),
 *   optionally a leading seconds field and a trailing year field, or a nickname such as
 *   `"@daily"`. Read in the `timezone` option's time zone.
 * @param data The data of each run. It must pass the task's schema and survive a JSON round
 *   trip, as for {@linkcode perform}.
 * @param options See {@linkcode ScheduleOptions}.
 * @returns A {@linkcode ScheduleHandle}, once the schedule is stored.
 * @throws {TypeError} When the pattern cannot be parsed, an option is invalid, or the data is
 *   not JSON-serialisable. The message names the schedule. Nothing is stored.
 * @throws {RangeError} When the time zone is unknown, a pattern field or `maxCatchUp` is out of
 *   range, or the pattern has no tick in the future. Nothing is stored.
 * @throws {TaskDataError} When the data fails the task's schema. Nothing is stored.
 *
 * @example Send a report every day at 03:00 in Berlin
 * ```ts
 * import { schedule } from "tasklite";
 * import report from "./tasks/report.ts";
 *
 * const nightly = await schedule(report, "0 3 * * *", { format: "pdf" }, {
 *   name: "nightly-report",
 *   timezone: "Europe/Berlin",
 *   catchUp: "latest",
 * });
 * console.log(`next report at ${nightly.nextRun()?.toISOString()}`);
 * ```
 */
export async function schedule<T>(
  task: Task<T>,
  pattern: string,
  data?: NoInfer<T>,
  options?: ScheduleOptions,
): Promise<ScheduleHandle> {
  const internals = toTaskInternals(task, "schedule()");
  const definition = defineSchedule(internals, pattern, data, options, "schedule");
  if (internals.schema !== undefined) await validateData(internals, data, "data");
  await storeSchedule(internals.database, definition);

  const database = internals.database;
  const { cron } = definition;
  return Object.freeze({
    name: definition.name,
    task: definition.task,
    pattern: definition.pattern,
    timezone: definition.timezone,
    nextRun(after?: Date | number): Date | null {
      const start = after === undefined
        ? database.now()
        : toMillisecondsSinceEpoch(after, "ScheduleHandle.nextRun()");
      const tick = nextTick(cron, start);
      return tick === null ? null : new Date(tick);
    },
    stop(): void {
      let stopped = stoppedSchedules.get(database.identity);
      if (stopped === undefined) {
        stopped = new Set();
        stoppedSchedules.set(database.identity, stopped);
      }
      stopped.add(definition.name);
    },
  });
}

/**
 * Removes a stored schedule and its runs that have not started. Runs that are running, or
 * waiting for a retry, finish as usual.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param name The schedule's name.
 * @returns Whether a schedule with this name was stored.
 * @throws {TypeError} When `name` is not a string.
 *
 * @example Remove a schedule
 * ```ts
 * import { openDatabase, unschedule } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * await unschedule(database, "nightly-report");
 * ```
 */
export async function unschedule(database: Database, name: string): Promise<boolean> {
  const taskDatabase = toTaskDatabase(database, "unschedule()");
  if (typeof name !== "string") {
    throw new TypeError(
      `Invalid schedule name for unschedule(): expected a string, received ${describeValue(name)}`,
    );
  }
  await taskDatabase.ready();
  if (taskDatabase.closed) throw closedError();
  const { deleted } = await taskDatabase.storage.deleteSchedule(name);
  wakeSchedulers(taskDatabase);
  return deleted;
}

/**
 * Lists the stored schedules, ordered by name.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @returns Each schedule with its pattern, time zone, options, last and next tick.
 *
 * @example Print every schedule
 * ```ts
 * import { listSchedules, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * for (const entry of await listSchedules(database)) {
 *   console.log(entry.name, entry.pattern, entry.timezone, entry.nextFireAt);
 * }
 * ```
 */
export async function listSchedules(database: Database): Promise<ScheduleInfo[]> {
  const taskDatabase = toTaskDatabase(database, "listSchedules()");
  await taskDatabase.ready();
  const now = taskDatabase.now();
  const schedules = await taskDatabase.storage.schedules();
  return schedules.map((stored) => describeSchedule(stored, now));
}

function describeSchedule(stored: StoredSchedule, now: number): ScheduleInfo {
  let rules: ScheduleRules;
  try {
    rules = parseRules(stored.options);
  } catch {
    rules = { catchUp: "none", overlap: true };
  }
  let data: unknown;
  try {
    data = stored.data === null ? undefined : JSON.parse(stored.data);
  } catch {
    data = stored.data;
  }
  let nextFireAt: Date | null = null;
  try {
    const cron = createCron(stored.pattern, stored.timezone, stored.name);
    const from = Math.max(now, stored.lastFiredAt ?? -Infinity);
    const tick = nextTick(cron, from);
    nextFireAt = tick === null ? null : new Date(tick);
  } catch {
    // A pattern that this runtime cannot parse has no next tick here.
  }
  return Object.freeze({
    name: stored.name,
    task: stored.task,
    pattern: stored.pattern,
    timezone: stored.timezone,
    data,
    catchUp: rules.catchUp,
    ...(rules.maxCatchUp === undefined ? {} : { maxCatchUp: rules.maxCatchUp }),
    overlap: rules.overlap,
    lastFiredAt: stored.lastFiredAt === null ? null : new Date(stored.lastFiredAt),
    nextFireAt,
    fromDefinition: stored.source === "definition",
  });
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
async function loadTaskDirectory(
  directory: string,
  caller: string | undefined,
): Promise<Array<Task<unknown>>> {
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
        `Task directory ${JSON.stringify(path)} not found: pass the directory that contains ` +
          `the task modules, relative to ${JSON.stringify(resolvePath("."))} or absolute`,
        { cause: error },
      );
    }
    throw error;
  }

  const files = entries.filter(isTaskFile).sort();
  // Importing the module that is waiting for runTasks() would wait for itself forever.
  if (caller !== undefined && files.some((fileName) => join(path, fileName) === caller)) {
    throw new Error(
      `runTasks() was called from ${JSON.stringify(caller)}, which is in the task directory ` +
        `it loads: move that module out of the directory, or start its name with "_" so that ` +
        `runTasks() skips it`,
    );
  }
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
        `Cannot load task module ${JSON.stringify(file)}: ${describeLoadError(error)}`,
        { cause: error },
      );
    }
    if (hasBrand(module.default, taskBrand) && !taskInternals.has(module.default as object)) {
      throw new Error(`Task module ${JSON.stringify(file)} exports a task, but ${twoCopiesHint}`);
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

/**
 * Returns the message of an error thrown by `import()`, with the line and column of a syntax
 * error where the error carries them. Bun reports one syntax error as a `BuildMessage` with a
 * `position`, and several as an `AggregateError` whose own message only counts them, so the
 * first three inner messages are added.
 */
function describeLoadError(error: unknown): string {
  const withPosition = (thrown: unknown): string => {
    const message = safeText((thrown as { message?: unknown })?.message ?? thrown);
    const position = (thrown as { position?: { line?: unknown; column?: unknown } })?.position;
    return typeof position?.line === "number" && typeof position.column === "number"
      ? `${message} (line ${position.line}, column ${position.column})`
      : message;
  };
  const inner = (error as { errors?: unknown }).errors;
  if (!(error instanceof AggregateError) || !Array.isArray(inner) || inner.length === 0) {
    return logText(new Error(withPosition(error)));
  }
  const details = inner.slice(0, 3).map(withPosition);
  const more = inner.length > 3 ? `; and ${inner.length - 3} more` : "";
  return logText(new Error(`${logText(toError(error))}: ${details.join("; ")}${more}`));
}

/**
 * Returns each task once, and throws when two different tasks share a name on one database
 * file: one runner per name and file, because two databases on one file share its rows.
 */
function uniqueTasks(definitions: TaskInternals[]): TaskInternals[] {
  const byKey = new Map<string, TaskInternals>();
  for (const definition of definitions) {
    const key = `${definition.database.identity}\n${definition.name}`;
    const other = byKey.get(key);
    if (other !== undefined && other !== definition) {
      let where = "";
      if (other.file !== undefined && other.file === definition.file) {
        where = ` (both defined in ${other.file})`;
      } else if (other.file !== undefined && definition.file !== undefined) {
        where = ` (in ${other.file} and ${definition.file})`;
      }
      throw new Error(
        `Two tasks are named ${JSON.stringify(definition.name)} on one database${where}: give ` +
          `each task its own name`,
      );
    }
    byKey.set(key, definition);
  }
  return [...byKey.values()];
}

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
  stopTimeout: v.optional(durationSchema(0, Infinity), 30_000),
  onEvent: v.optional(
    v.custom<(event: TaskEvent) => void>((value) => typeof value === "function", "a function"),
  ),
  cleanupInterval: v.optional(durationSchema(10, 86_400_000), 60_000),
});

const stopOptionsSchema = v.strictObject({
  timeout: v.optional(durationSchema(0, Infinity), 30_000),
});

/** The maximum number of scheduled rows that one statement moves to pending. */
const promoteBatch = 1_000;

/** How often a runner looks for pending rows of task names that it does not run, in ms. */
const unknownNamesInterval = 60_000;

/**
 * Loads tasks and starts one runner for each, with a retention cleanup beside it, and a
 * scheduler that enqueues the stored schedules of these tasks (see {@linkcode schedule}). A
 * task's `cron` option is stored first. The returned {@linkcode Runner} emits lifecycle events
 * through `on()` and the `onEvent` option.
 *
 * @param tasks A directory of task modules, or an array of tasks. A directory is read without
 *   recursion: every `.ts`, `.mts`, `.js` and `.mjs` file except `*.test.*`, `*.spec.*`,
 *   `*.d.ts` and names starting with `_` or `.` is imported, and its default export must be a
 *   task. Node.js can import `.ts` files only with a loader.
 * @param options See {@linkcode RunTasksOptions}.
 * @returns The running {@linkcode Runner}, once every database is ready and the scheduler has
 *   enqueued the ticks that were due at the start.
 * @throws {Error} When the directory or a module cannot be loaded (the message names the file),
 *   two tasks share a name, or a database cannot be opened.
 * @throws {TaskDataError} When the data of a task's `cron` option fails the task's schema.
 *
 * @example Run a directory until SIGTERM
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * await runTasks("app/tasks", { debug: true, handleSignals: true });
 * ```
 *
 * @example Count failures
 * ```ts
 * import { runTasks } from "tasklite";
 *
 * const runner = await runTasks("app/tasks");
 * runner.on("failed", ({ task, id, attempt, error }) => {
 *   console.error(`${task} ${id} failed after ${attempt} attempts: ${error.message}`);
 * });
 * ```
 */
export async function runTasks(
  tasks: string | ReadonlyArray<Task<unknown>>,
  options: RunTasksOptions = {},
): Promise<Runner> {
  const parsed = parseOptions(runTasksOptionsSchema, options, "runTasks()");
  const logger = guardLogger(parsed.logger ?? consoleLogger);

  let list: ReadonlyArray<Task<unknown>>;
  if (typeof tasks === "string") {
    if (tasks.trim() === "") {
      throw new TypeError(
        `Invalid tasks for runTasks(): the directory path ${JSON.stringify(tasks)} is empty; ` +
          `pass the directory of the task modules, such as "app/tasks"`,
      );
    }
    list = await loadTaskDirectory(tasks, callerFile());
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
  const unique = uniqueTasks(definitions);
  const names = [...new Set(unique.map((definition) => definition.name))];

  const databases = new Set(unique.map((definition) => definition.database));
  for (const database of databases) {
    database.logger = logger;
    await database.ready();
  }
  await storeDefinedSchedules(unique, logger);

  const events = new EventBus(logger);
  if (parsed.onEvent !== undefined) events.onEvery(parsed.onEvent);
  const runners = unique.map((definition) =>
    new TaskRunner(definition, logger, parsed.debug, events)
  );
  const schedulers = [...databases].map((database) =>
    new CronScheduler(
      database,
      unique.filter((definition) => definition.database === database).map((task) => task.name),
      logger,
      parsed.debug,
    )
  );
  const cleanups = unique.map((definition) =>
    new CleanupService(definition, logger, parsed.debug, events)
  );
  for (const runner of runners) runner.start();
  for (const cleanup of cleanups) cleanup.start(parsed.cleanupInterval);
  await Promise.all(schedulers.map((scheduler) => scheduler.start()));
  logger.info(
    `tasklite: running ${countOf(runners.length, "task")}: ${names.join(", ")}`,
    { tasks: names },
  );

  const unknownNames = watchUnknownNames(unique, logger);
  let removeSignalHandlers = () => {};

  // The runners stop through stop(), the signal option, a signal, or their database closing.
  const stopped = Promise.all(runners.map((runner) => runner.stopped)).then(async () => {
    clearInterval(unknownNames);
    removeSignalHandlers();
    await Promise.all(schedulers.map((scheduler) => scheduler.stop()));
    logger.info(`tasklite: stopped ${countOf(runners.length, "task")}`, { tasks: names });
  });

  let stopPromise: Promise<void> | undefined;
  const stop = (stopOptions?: StopOptions): Promise<void> => {
    if (stopPromise !== undefined) return stopPromise;
    const { timeout } = parseOptions(stopOptionsSchema, stopOptions ?? {}, "stop()");
    stopPromise = (async () => {
      // Schedulers first, so no new occurrence is enqueued while the runners drain.
      await Promise.all(schedulers.map((scheduler) => scheduler.stop()));
      await Promise.all(cleanups.map((cleanup) => cleanup.stop()));
      for (const runner of runners) void runner.stop(timeout);
      await stopped;
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

  const scheduler: Scheduler = {
    async runOnce(now?: Date | number): Promise<Occurrence[]> {
      const passes = await Promise.all(schedulers.map((each) => each.runOnce(now)));
      return passes.flat();
    },
  };
  const cleanup = async (now?: Date | number): Promise<number> => {
    const time = parseOptions(cleanupArgumentsSchema, { now }, "cleanup()").now;
    let deleted = 0;
    for (const service of cleanups) deleted += await service.runOnce(time);
    return deleted;
  };
  return {
    tasks: names,
    stop,
    stopped,
    scheduler,
    on: (type, listener) => events.on(type, listener as EventListener),
    cleanup,
  };
}

/**
 * Wraps a logger so that a method that throws cannot break the runner that calls it. The line
 * and the logger's error go to the console instead.
 */
function guardLogger(logger: Logger): Logger {
  const guard = (level: keyof Logger) => (message: string, fields?: Record<string, unknown>) => {
    try {
      logger[level](message, fields);
    } catch (error) {
      if (logger === consoleLogger) return;
      consoleLogger.error(
        `tasklite: the logger threw (${toError(error).message}) on this ${level} line: ${message}`,
      );
    }
  };
  return {
    debug: guard("debug"),
    info: guard("info"),
    warn: guard("warn"),
    error: guard("error"),
  };
}

const cleanupArgumentsSchema = v.object({ now: v.optional(timeSchema()) });

/** Warns once per name about pending rows that no task of this runner handles. */
function watchUnknownNames(
  definitions: TaskInternals[],
  logger: Logger,
): ReturnType<typeof setInterval> {
  // By file, not by Database object: two Databases opened on one file share its rows.
  const byIdentity = new Map<string, { databases: TaskDatabase[]; known: Set<string> }>();
  for (const definition of definitions) {
    const entry = byIdentity.get(definition.database.identity) ??
      { databases: [], known: new Set<string>() };
    if (!entry.databases.includes(definition.database)) entry.databases.push(definition.database);
    entry.known.add(definition.name);
    byIdentity.set(definition.database.identity, entry);
  }
  const warned = new Set<string>();
  const check = async () => {
    for (const { databases, known } of byIdentity.values()) {
      const database = databases.find((candidate) => !candidate.closed);
      if (database === undefined) continue;
      let pending: string[];
      try {
        pending = await database.storage.pendingNames();
      } catch {
        continue; // The task runners report database errors.
      }
      for (const name of pending) {
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
// Operations: cancel, retry, purge, stats, listTasks
// ---------------------------------------------------------------------------------------------

/**
 * The state of a task's row. See the README for who moves a row into each state.
 *
 * @example List the tasks that need attention
 * ```ts
 * import { listTasks, openDatabase, type TaskState } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const states: TaskState[] = ["failed", "cancelled"];
 * for (const state of states) {
 *   const tasks = await listTasks(database, { state, limit: 10 });
 *   console.log(`${state}: ${tasks.map((task) => task.id).join(", ")}`);
 * }
 * ```
 */
export type TaskState =
  | "scheduled"
  | "pending"
  | "running"
  | "completed"
  | "failed"
  | "cancelled";

const taskStates: ReadonlyArray<TaskState> = [
  "scheduled",
  "pending",
  "running",
  "completed",
  "failed",
  "cancelled",
];

/**
 * The outcome of {@linkcode cancel}: `"cancelled"` when the task is now `cancelled`,
 * `"cancelling"` when it is running and its runner aborts the attempt and then moves it to
 * `cancelled`.
 *
 * @example Tell the user whether the task has stopped yet
 * ```ts
 * import { cancel, type CancelResult, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const result: CancelResult = await cancel(database, "0195e3a2-7c4e-7f00-8c1a-2b3c4d5e6f70");
 * if (result === "cancelling") console.log("The running attempt is being aborted");
 * ```
 */
export type CancelResult = "cancelled" | "cancelling";

/**
 * Options of {@linkcode retryFailed}.
 *
 * @example Retry the failed tasks of every name, or of one
 * ```ts
 * import { openDatabase, retryFailed } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * await retryFailed(database);
 * await retryFailed(database, { name: "send-invoice" });
 * ```
 */
export interface RetryFailedOptions {
  /** Retry only the failed tasks of this name. */
  name?: string;
}

/**
 * The counts that {@linkcode retryFailed} resolves to.
 *
 * @example Report the tasks that stayed failed
 * ```ts
 * import { openDatabase, retryFailed } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const { retried, skipped } = await retryFailed(database, { name: "send-invoice" });
 * console.log(`${retried} retried`);
 * if (skipped > 0) console.warn(`${skipped} stay failed: a live task has the same key`);
 * ```
 */
export interface RetryFailedResult {
  /** The number of failed tasks that became pending. */
  readonly retried: number;
  /**
   * The number of failed tasks left failed because a waiting or running task of the same name
   * holds their `key`.
   */
  readonly skipped: number;
}

/**
 * Options of {@linkcode purge}.
 *
 * @example Delete every cancelled row of one task
 * ```ts
 * import { openDatabase, purge } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * await purge(database, { state: "cancelled", olderThan: 0, name: "send-invoice" });
 * ```
 */
export interface PurgeOptions {
  /** The end state of the rows to delete. */
  state: "completed" | "failed" | "cancelled";
  /** Delete rows that reached `state` at least this long ago. `0` deletes every such row. */
  olderThan: Duration;
  /** Delete only rows of this task. */
  name?: string;
}

/**
 * The number of rows in each state.
 *
 * @example Print the totals
 * ```ts
 * import { openDatabase, type StateCounts, stats } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const waiting = (counts: StateCounts) => counts.scheduled + counts.pending;
 * const { totals } = await stats(database);
 * console.log(`${waiting(totals)} waiting, ${totals.running} running, ${totals.failed} failed`);
 * ```
 */
export interface StateCounts {
  /** Rows waiting for a later `run_at`: a delay, a `runAt` or a retry's backoff. */
  readonly scheduled: number;
  /** Rows that are due and wait for a runner. */
  readonly pending: number;
  /** Rows claimed by a runner. */
  readonly running: number;
  /** Succeeded rows kept by `keepCompleted`. */
  readonly completed: number;
  /** Rows whose last attempt failed or whose stored data could not be decoded. */
  readonly failed: number;
  /** Cancelled rows. */
  readonly cancelled: number;
}

/**
 * The counts of one task, in {@linkcode QueueStats}.
 *
 * @example Find the tasks whose runners fall behind
 * ```ts
 * import { openDatabase, stats } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * for (const task of (await stats(database)).tasks) {
 *   if ((task.oldestPendingAge ?? 0) > 60_000) {
 *     console.warn(`${task.name}: a task has been due for ${task.oldestPendingAge} ms`);
 *   }
 * }
 * ```
 */
export interface TaskStats extends StateCounts {
  /** The task's name. */
  readonly name: string;
  /**
   * Milliseconds that the longest-waiting due task has been due (now minus its `run_at`), or
   * `null` when no task is due. A growing value means the runners fall behind.
   */
  readonly oldestPendingAge: number | null;
}

/**
 * The counts that {@linkcode stats} resolves to.
 *
 * @example Print one line per task, then the totals
 * ```ts
 * import { openDatabase, stats } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const queue = await stats(database);
 * for (const task of queue.tasks) {
 *   console.log(`${task.name}: ${task.pending} pending, ${task.failed} failed`);
 * }
 * console.log(`all: ${queue.totals.pending} pending, ${queue.totals.failed} failed`);
 * ```
 */
export interface QueueStats {
  /** One entry per task name that has rows, sorted by name. */
  readonly tasks: TaskStats[];
  /** The counts and oldest pending age over all task names. */
  readonly totals: StateCounts & { readonly oldestPendingAge: number | null };
}

/**
 * Options of {@linkcode listTasks}.
 *
 * @example List up to 500 pending tasks of one name
 * ```ts
 * import { listTasks, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const tasks = await listTasks(database, { name: "send-invoice", state: "pending", limit: 500 });
 * console.log(`${tasks.length} invoices wait to be sent`);
 * ```
 */
export interface ListTasksOptions {
  /** List only tasks in this state. */
  state?: TaskState;
  /** List only tasks of this name. */
  name?: string;
  /**
   * The maximum number of tasks to list, from 1 to 10000.
   *
   * @default {100}
   */
  limit?: number;
}

/**
 * One task's row, as {@linkcode listTasks} returns it.
 *
 * @example Print the data and last error of failed tasks
 * ```ts
 * import { listTasks, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * for (const task of await listTasks(database, { state: "failed" })) {
 *   console.log(`${task.name} ${task.id}, ${task.attempts} attempts:`, task.data);
 *   console.log(task.lastError);
 * }
 * ```
 */
export interface TaskInfo {
  /** The task's id. */
  readonly id: string;
  /** The task's name. */
  readonly name: string;
  /** The row's state. */
  readonly state: TaskState;
  /**
   * The stored data, parsed from JSON: `undefined` when none was stored, and the raw text when
   * it is not valid JSON.
   */
  readonly data: unknown;
  /** The deduplication key, or `null`. */
  readonly key: string | null;
  /** The priority. */
  readonly priority: number;
  /** The number of attempts started since the task was created or last retried. */
  readonly attempts: number;
  /** When the task was created. */
  readonly createdAt: Date;
  /** When the task is or was due. */
  readonly runAt: Date;
  /** When the lease of a running task runs out, or `null`. */
  readonly lockedUntil: Date | null;
  /** The claim token of the runner that holds the lease, or `null`. */
  readonly lockedBy: string | null;
  /** The number of failed attempts over the task's life, retries included. */
  readonly failures: number;
  /** The error of the last failed attempt, with its stack, or `null`. */
  readonly lastError: string | null;
  /** When the last attempt failed, or `null`. */
  readonly lastFailedAt: Date | null;
  /** When the task reached an end state, or `null` while it waits or runs. */
  readonly finishedAt: Date | null;
  /** When {@linkcode cancel} was called on the task, or `null`. */
  readonly cancelRequestedAt: Date | null;
}

const idExpected = "a task id: a non-empty string";

function checkId(id: unknown, context: string): asserts id is string {
  if (typeof id !== "string" || id.length === 0) {
    throw new TypeError(
      `Invalid task id for ${context}: expected ${idExpected}, received ${describeValue(id)}`,
    );
  }
}

const taskNameSchema = v.pipe(v.string(nameExpected), v.regex(namePattern, nameExpected));

const retryFailedOptionsSchema = v.strictObject({ name: v.optional(taskNameSchema) });

const purgeOptionsSchema = v.strictObject({
  state: v.picklist(["completed", "failed", "cancelled"], '"completed", "failed" or "cancelled"'),
  olderThan: durationSchema(),
  name: v.optional(taskNameSchema),
});

const listTasksOptionsSchema = v.strictObject({
  state: v.optional(
    v.picklist(taskStates, taskStates.map((state) => JSON.stringify(state)).join(", ")),
  ),
  name: v.optional(taskNameSchema),
  limit: v.optional(integerSchema(1, 10_000), 100),
});

/** Wakes the runners in this process of one task name, or of every name, of this database. */
function wakeRunners(database: TaskDatabase, name: string | undefined, runAt: number): void {
  const names = name !== undefined
    ? [name]
    : [...runnersByDatabase.get(database.identity) ?? []].map((runner) => runner.name);
  database.notify(names.map((each) => ({ name: each, runAt })));
}

/**
 * Cancels a task. A waiting (scheduled or pending) task becomes `cancelled` at once. A running
 * task's runner fires the attempt's `signal` (an `AbortError`) and then moves it to
 * `cancelled`: a runner in this process does so at once, a runner in another process when it
 * next renews its lease (every third of the task's `lease`). If the attempt ends first, its
 * result is kept, except that a failed attempt is not retried. Cancelling a cancelled task does nothing.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param id The task's id.
 * @returns `"cancelled"` or `"cancelling"`; see {@linkcode CancelResult}.
 * @throws {TypeError} When the id is not a non-empty string.
 * @throws {Error} When no task has this id, or the task already completed or failed.
 *
 * @example Cancel a task
 * ```ts
 * import { cancel, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const result = await cancel(database, "0195e3a2-7c4e-7f00-8c1a-2b3c4d5e6f70");
 * console.log(result); // "cancelled" or "cancelling"
 * ```
 */
export async function cancel(database: Database, id: string): Promise<CancelResult> {
  const taskDatabase = toTaskDatabase(database, "cancel()");
  checkId(id, "cancel()");
  await taskDatabase.ready();

  const result = await taskDatabase.storage.cancel(id, taskDatabase.now());
  if (result.outcome === "missing") {
    throw new Error(`Cannot cancel task ${JSON.stringify(id)}: no task has this id`);
  }
  if (result.outcome === "cancelled") return "cancelled";
  if (result.outcome === "requested") {
    for (const runner of runnersByDatabase.get(taskDatabase.identity) ?? []) {
      if (runner.name === result.name) runner.cancelAttempt(id);
    }
    return "cancelling";
  }
  if (result.state === "cancelled") return "cancelled";
  throw new Error(
    `Cannot cancel task ${JSON.stringify(id)}: it already ended as "${result.state}"`,
  );
}

/**
 * Moves a `failed` or `cancelled` task back to `pending`, due now, with a fresh attempt budget
 * (`attempts` starts again at 0). The task keeps its id, data and key, and its last error until
 * the next failure.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param id The task's id.
 * @throws {TypeError} When the id is not a non-empty string.
 * @throws {Error} When no task has this id, the task is not failed or cancelled, or a pending
 *   or running task of the same name holds its key.
 *
 * @example Retry one task
 * ```ts
 * import { openDatabase, retry } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * await retry(database, "0195e3a2-7c4e-7f00-8c1a-2b3c4d5e6f70");
 * ```
 */
export async function retry(database: Database, id: string): Promise<void> {
  const taskDatabase = toTaskDatabase(database, "retry()");
  checkId(id, "retry()");
  await taskDatabase.ready();

  const now = taskDatabase.now();
  const result = await taskDatabase.storage.retry(id, now);
  if (result.retried) {
    wakeRunners(taskDatabase, result.name, now);
    return;
  }
  const quoted = JSON.stringify(id);
  if (result.state === undefined) {
    throw new Error(`Cannot retry task ${quoted}: no task has this id`);
  }
  if (result.state === "failed" || result.state === "cancelled") {
    throw new Error(
      `Cannot retry task ${quoted}: ${
        result.keyHolder === undefined ? "another task" : `task ${JSON.stringify(result.keyHolder)}`
      } with the same name and key is scheduled, pending or running; retry it after that task ends`,
    );
  }
  throw new Error(
    `Cannot retry task ${quoted}: it is ${result.state}, and only failed or cancelled tasks ` +
      `can be retried`,
  );
}

/**
 * Moves every `failed` task, or those of one task name, back to `pending`, due now, with a
 * fresh attempt budget. A failed task whose key a waiting or running task holds stays failed
 * and is counted in `skipped`.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param options See {@linkcode RetryFailedOptions}.
 * @returns The number retried and skipped.
 * @throws {TypeError} When an option is invalid.
 *
 * @example Retry the failed runs of one task
 * ```ts
 * import { openDatabase, retryFailed } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const { retried } = await retryFailed(database, { name: "send-welcome" });
 * ```
 */
export async function retryFailed(
  database: Database,
  options: RetryFailedOptions = {},
): Promise<RetryFailedResult> {
  const taskDatabase = toTaskDatabase(database, "retryFailed()");
  const { name } = parseOptions(retryFailedOptionsSchema, options, "retryFailed()");
  await taskDatabase.ready();

  const now = taskDatabase.now();
  const result = await taskDatabase.storage.retryFailed(name, now);
  if (result.retried > 0) wakeRunners(taskDatabase, name, now);
  return result;
}

/**
 * Deletes the rows in one end state that reached it at least `olderThan` ago, as the
 * retention cleanup of a runner does, and resolves to the number deleted. Rows are deleted in
 * chunks of 1000, each in its own transaction.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param options See {@linkcode PurgeOptions}.
 * @returns The number of rows deleted.
 * @throws {TypeError} When an option is missing or invalid.
 *
 * @example Delete failed tasks older than a week
 * ```ts
 * import { openDatabase, purge } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const deleted = await purge(database, { state: "failed", olderThan: "7d" });
 * ```
 */
export async function purge(database: Database, options: PurgeOptions): Promise<number> {
  const taskDatabase = toTaskDatabase(database, "purge()");
  const parsed = parseOptions(purgeOptionsSchema, options, "purge()");
  await taskDatabase.ready();

  const before = taskDatabase.now() - parsed.olderThan;
  return await taskDatabase.storage.deleteFinished(parsed.name, parsed.state, before);
}

/**
 * Counts the rows per task name and state, and measures how long the oldest due task has
 * waited.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @returns The counts per task name and the totals.
 *
 * @example Alert when tasks wait too long
 * ```ts
 * import { openDatabase, stats } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * const { totals } = await stats(database);
 * if ((totals.oldestPendingAge ?? 0) > 60_000) console.warn("The runners fall behind");
 * ```
 */
export async function stats(database: Database): Promise<QueueStats> {
  const taskDatabase = toTaskDatabase(database, "stats()");
  await taskDatabase.ready();

  const now = taskDatabase.now();
  const rows = await taskDatabase.storage.stats(now);
  const byName = new Map<string, Record<string, unknown>>();
  const totals: Record<string, unknown> = { ...emptyCounts(), oldestPendingAge: null };
  for (const row of rows) {
    const name = row.name as string;
    const state = row.state as string;
    if (!taskStates.includes(state as TaskState)) continue;
    let entry = byName.get(name);
    if (entry === undefined) {
      entry = { name, ...emptyCounts(), oldestPendingAge: null };
      byName.set(name, entry);
    }
    entry[state] = row.count as number;
    totals[state] = (totals[state] as number) + (row.count as number);
    if (typeof row.oldest_due === "number") {
      const age = now - row.oldest_due;
      entry.oldestPendingAge = Math.max(age, (entry.oldestPendingAge as number | null) ?? 0);
      totals.oldestPendingAge = Math.max(age, (totals.oldestPendingAge as number | null) ?? 0);
    }
  }
  return {
    tasks: [...byName.values()] as unknown as TaskStats[],
    totals: totals as unknown as QueueStats["totals"],
  };
}

function emptyCounts(): StateCounts {
  return { scheduled: 0, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 };
}

/**
 * Lists tasks, newest first, optionally of one state or name.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param options See {@linkcode ListTasksOptions}.
 * @returns The tasks, newest first.
 * @throws {TypeError} When an option has the wrong type.
 * @throws {RangeError} When `limit` is out of range.
 *
 * @example List the last 10 failures
 * ```ts
 * import { listTasks, openDatabase } from "tasklite";
 *
 * const database = openDatabase("file:app.db");
 * for (const task of await listTasks(database, { state: "failed", limit: 10 })) {
 *   console.log(task.id, task.name, task.lastError);
 * }
 * ```
 */
export async function listTasks(
  database: Database,
  options: ListTasksOptions = {},
): Promise<TaskInfo[]> {
  const taskDatabase = toTaskDatabase(database, "listTasks()");
  const parsed = parseOptions(listTasksOptionsSchema, options, "listTasks()");
  await taskDatabase.ready();

  const rows = await taskDatabase.storage.listTasks(parsed.state, parsed.name, parsed.limit);
  return rows.map(toTaskInfo);
}

function toTaskInfo(row: Row): TaskInfo {
  const date = (value: unknown) => typeof value === "number" ? new Date(value) : null;
  let data: unknown = undefined;
  if (row.data !== null) {
    try {
      data = JSON.parse(row.data as string);
    } catch {
      data = row.data;
    }
  }
  return {
    id: row.id as string,
    name: row.name as string,
    state: row.state as TaskState,
    data,
    key: row.key as string | null,
    priority: row.priority as number,
    attempts: row.attempts as number,
    createdAt: new Date(row.created as number),
    runAt: new Date(row.run_at as number),
    lockedUntil: date(row.locked_until),
    lockedBy: row.locked_by as string | null,
    failures: (row.failed_nr as number | null) ?? 0,
    lastError: row.failed_error as string | null,
    lastFailedAt: date(row.failed_last),
    finishedAt: date(row.finished_at),
    cancelRequestedAt: date(row.cancelled_at),
  };
}

// ---------------------------------------------------------------------------------------------
// Testing: drain the queue in the application's own tests
// ---------------------------------------------------------------------------------------------

/**
 * Options of {@linkcode drain}.
 *
 * @example Run a task and all its retries in a test
 * ```ts
 * import { defineDatabaseTask, drain, openDatabase, perform } from "tasklite";
 *
 * const database = openDatabase(":memory:");
 * const flaky = defineDatabaseTask(database, {
 *   name: "flaky",
 *   process() {
 *     throw new Error("the service is down");
 *   },
 * });
 * await perform(flaky, null);
 * const result = await drain(database, { tasks: [flaky], now: Date.now() + 86_400_000 });
 * console.log(result); // { succeeded: 0, failed: 1, retried: 4, cancelled: 0 }
 * ```
 */
export interface DrainOptions {
  /** The tasks to run. Each must belong to the database passed to `drain`. */
  // deno-lint-ignore no-explicit-any
  tasks: ReadonlyArray<Task<any>>;
  /**
   * Run the tasks that are due at this time, as a `Date` or milliseconds since the epoch. A
   * retry is due at the database clock's time plus its backoff, so a `now` far enough ahead
   * also runs every retry. Defaults to the database's clock, read at each round.
   */
  now?: Date | number;
  /**
   * The logger that receives log lines, as in {@linkcode RunTasksOptions}.
   *
   * @default {console}
   */
  logger?: Logger;
}

/**
 * The number of results of each kind that {@linkcode drain} resolves to.
 *
 * @example Assert that every run succeeded
 * ```ts
 * import { deepStrictEqual } from "node:assert";
 * import { defineDatabaseTask, drain, openDatabase, perform } from "tasklite";
 *
 * const database = openDatabase(":memory:");
 * const welcome = defineDatabaseTask(database, { name: "welcome", process() {} });
 * await perform(welcome, { email: "ada@example.com" });
 * await perform(welcome, { email: "alan@example.com" });
 *
 * const result = await drain(database, { tasks: [welcome] });
 * deepStrictEqual(result, { succeeded: 2, failed: 0, retried: 0, cancelled: 0 });
 * ```
 */
export interface DrainResult {
  /** Attempts that succeeded. */
  readonly succeeded: number;
  /** Tasks that failed for good. */
  readonly failed: number;
  /** Attempts that failed and were scheduled again. */
  readonly retried: number;
  /** Running tasks that were cancelled. */
  readonly cancelled: number;
}

const drainOptionsSchema = v.strictObject({
  // deno-lint-ignore no-explicit-any
  tasks: v.array(v.custom<Task<any>>(() => true), "an array of tasks"),
  now: v.optional(timeSchema()),
  logger: runTasksOptionsSchema.entries.logger,
});

/** A safety limit on the rounds of one drain, so that a task that keeps re-enqueueing ends. */
const maxDrainRounds = 10_000;

/**
 * Runs every due task of `tasks` until none is due, and resolves to the number of results of
 * each kind. Each round claims up to `batchSize` due rows per task and waits until they are
 * recorded and their hooks have run, so tasks that a task performs run in the same drain.
 * It starts no timers: delays and backoff follow the database's clock (`openDatabase(url,
 * { now })`), so tests can move time forward instead of waiting.
 *
 * @param database The database from {@linkcode openDatabase}.
 * @param options See {@linkcode DrainOptions}.
 * @returns The counts of results.
 * @throws {TypeError} When an option is invalid or a task belongs to another database.
 * @throws {Error} When a database statement fails, or after 10000 rounds that each found due
 *   tasks.
 *
 * @example Test a task with a fake clock
 * ```ts
 * import { defineDatabaseTask, drain, openDatabase, perform } from "tasklite";
 *
 * let now = Date.parse("2025-01-01T00:00:00Z");
 * const database = openDatabase(":memory:", { now: () => now });
 * const remind = defineDatabaseTask(database, { name: "remind", process() {} });
 *
 * await perform(remind, null, { delay: "1h" });
 * console.log(await drain(database, { tasks: [remind] })); // nothing due yet
 * now += 3_600_000;
 * console.log(await drain(database, { tasks: [remind] })); // { succeeded: 1, ... }
 * ```
 */
export async function drain(database: Database, options: DrainOptions): Promise<DrainResult> {
  const taskDatabase = toTaskDatabase(database, "drain()");
  const parsed = parseOptions(drainOptionsSchema, options, "drain()");
  const logger: Logger = parsed.logger ?? consoleLogger;
  const definitions = parsed.tasks.map((task, index) => {
    const internals = toTaskInternals(task, `drain() (task ${index})`);
    if (internals.database !== taskDatabase) {
      throw new TypeError(
        `Invalid task for drain(): task "${internals.name}" belongs to another database; ` +
          `drain each database with its own tasks`,
      );
    }
    return internals;
  });
  const unique = uniqueTasks(definitions);
  await taskDatabase.ready();

  const counts = { succeeded: 0, failed: 0, retried: 0, cancelled: 0 };
  const events = new EventBus(logger);
  events.onEvery((event) => {
    if (event.type in counts) counts[event.type as keyof typeof counts]++;
  });
  const runners = unique.map((definition) => new TaskRunner(definition, logger, false, events));

  for (let round = 1;; round++) {
    if (round > maxDrainRounds) {
      throw new Error(
        `drain() stopped after ${maxDrainRounds} rounds that each found due tasks: a task ` +
          `probably performs itself or another drained task every time it runs`,
      );
    }
    const dueAt = parsed.now ?? taskDatabase.now();
    let claimed = 0;
    for (const runner of runners) claimed += await runner.runDue(dueAt);
    if (claimed === 0) return counts;
  }
}

// ---------------------------------------------------------------------------------------------
// Runtime differences: file events and signals
// ---------------------------------------------------------------------------------------------

/**
 * Calls `onChange` when the file at `path` changes, through `fs.watch` (inotify on Linux, which
 * Node.js, Bun and Deno all use). Returns undefined when the file cannot be watched, such as
 * when it does not exist; calls `onError` when a started watch fails later. The watch does not
 * keep the process alive.
 */
function watchFileChanges(
  path: string,
  onChange: () => void,
  onError: () => void,
): { close(): void } | undefined {
  let watcher: FSWatcher;
  try {
    watcher = watch(path, { persistent: false }, onChange);
  } catch {
    return undefined;
  }
  watcher.on("error", () => {
    watcher.close();
    onError();
  });
  watcher.unref?.();
  return watcher;
}

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
 * Calls `onSignal` on the first SIGINT or SIGTERM and exits at once on a second one, with 128
 * plus the signal's number (130, 143). After the graceful stop, the process exits with status 0
 * unless something else listens for the signal: the stop finished what it had to, and service
 * managers such as systemd count any other status as a failure. Returns a function that removes
 * the handlers.
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
      const exit = () => {
        // Keep the handlers until the stop is done, so a second signal still exits at once.
        remove();
        if (deno !== undefined) deno.exit(0);
        else if (nodeProcess !== undefined && nodeProcess.listenerCount(signal) === 0) {
          nodeProcess.exit(0);
        }
      };
      onSignal(signal).then(exit, exit);
    };
    handlers.set(signal, handler);
    if (deno !== undefined) deno.addSignalListener(signal, handler);
    else nodeProcess?.on(signal, handler);
  }
  return remove;
}
