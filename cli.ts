#!/usr/bin/env node
/**
 * The `tasklite` command: runs a directory of task modules, and inspects and changes the queue
 * of a database. Run `tasklite --help` for the commands.
 *
 * It uses only the public API of `mod.ts`, and the `process` global that Node.js, Bun and
 * Deno 2 all provide.
 *
 * @module
 */

import {
  cancel,
  type Database,
  type Duration,
  listSchedules,
  listTasks,
  openDatabase,
  purge,
  type QueueStats,
  retry,
  retryFailed,
  runTasks,
  type ScheduleInfo,
  stats,
  type TaskInfo,
  type TaskState,
} from "./mod.ts";

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/** An option of a command. Options without `value` are flags. */
interface OptionSpec {
  name: string;
  value?: string;
  help: string;
}

/** Parsed command-line arguments: positionals in order, options by name. */
interface Arguments {
  positionals: string[];
  options: Map<string, string | true>;
}

interface Command {
  name: string;
  usage: string;
  summary: string;
  description: string;
  options: OptionSpec[];
  /** The names of the positional arguments, for errors about extra ones. */
  positionals: string[];
  run(args: Arguments): Promise<void>;
}

const dbOption: OptionSpec = {
  name: "db",
  value: "URL",
  help: 'The database: a "file:" URL or a libsql:// URL. Default: $TASKLITE_DB, or file:tasks.db.',
};
const jsonOption: OptionSpec = {
  name: "json",
  help: "Print JSON instead of a table, for scripts.",
};
const helpOption: OptionSpec = { name: "help", help: "Show this help." };

const taskStates: TaskState[] = [
  "scheduled",
  "pending",
  "running",
  "completed",
  "failed",
  "cancelled",
];
const endStates = ["completed", "failed", "cancelled"] as const;

const commands: Command[] = [
  {
    name: "run",
    usage: "tasklite run <dir> [--db URL] [--debug] [--stop-timeout DURATION]",
    summary: "Run the task modules of a directory until SIGINT or SIGTERM",
    description:
      "Imports every task module of <dir> and runs its tasks until SIGINT or SIGTERM. On the\n" +
      "first signal the runners stop claiming, wait for running attempts up to --stop-timeout,\n" +
      "and exit with status 0; a second signal exits at once, with status 130 or 143. The\n" +
      "task modules open their own database:\n" +
      "--db sets TASKLITE_DB for them, so a module can call openDatabase(process.env.TASKLITE_DB).\n" +
      "Node.js imports .ts modules only with a loader such as tsx; Bun and Deno import them as\n" +
      "they are.",
    options: [
      dbOption,
      { name: "debug", help: "Log each claim, success and failure." },
      {
        name: "stop-timeout",
        value: "DURATION",
        help: 'How long a graceful stop waits for running attempts, such as "30s". Default: 30s.',
      },
      helpOption,
    ],
    positionals: ["dir"],
    run: runCommand,
  },
  {
    name: "status",
    usage: "tasklite status [--db URL] [--json]",
    summary: "Count the tasks per name and state",
    description:
      "Counts the tasks of each name in each state, and shows how long the oldest due task\n" +
      "has waited. A growing wait means the runners fall behind.",
    options: [dbOption, jsonOption, helpOption],
    positionals: [],
    run: statusCommand,
  },
  {
    name: "list",
    usage: "tasklite list [--state STATE] [--name NAME] [--limit N] [--db URL] [--json]",
    summary: "List tasks, newest first",
    description: "Lists tasks, newest first, with their state, attempts, due time and last error.",
    options: [
      {
        name: "state",
        value: "STATE",
        help: `Only tasks in this state: ${taskStates.join(", ")}.`,
      },
      { name: "name", value: "NAME", help: "Only tasks of this name." },
      { name: "limit", value: "N", help: "The maximum number of tasks, 1 to 10000. Default: 100." },
      dbOption,
      jsonOption,
      helpOption,
    ],
    positionals: [],
    run: listCommand,
  },
  {
    name: "retry",
    usage: "tasklite retry <id> | tasklite retry --failed [--name NAME] [--db URL] [--json]",
    summary: "Run a failed or cancelled task again",
    description:
      "Moves a failed or cancelled task back to pending, due now, with a fresh attempt budget.\n" +
      "With --failed, retries every failed task, or those of --name. A failed task whose key a\n" +
      "scheduled, pending or running task has stays failed and is counted as skipped.",
    options: [
      { name: "failed", help: "Retry every failed task instead of one id." },
      { name: "name", value: "NAME", help: "With --failed: only the tasks of this name." },
      dbOption,
      jsonOption,
      helpOption,
    ],
    positionals: ["id"],
    run: retryCommand,
  },
  {
    name: "cancel",
    usage: "tasklite cancel <id> [--db URL] [--json]",
    summary: "Cancel a waiting or running task",
    description:
      "Cancels a task. A scheduled or pending task becomes cancelled at once. A running task's\n" +
      "runner aborts the attempt when it next renews its lease, and then marks the task\n" +
      "cancelled.",
    options: [dbOption, jsonOption, helpOption],
    positionals: ["id"],
    run: cancelCommand,
  },
  {
    name: "purge",
    usage: "tasklite purge --state STATE --older-than DURATION [--name NAME] [--db URL] [--json]",
    summary: "Delete finished tasks older than a duration",
    description:
      "Deletes the tasks in one end state that reached it at least --older-than ago, as the\n" +
      "retention cleanup of a runner does.",
    options: [
      { name: "state", value: "STATE", help: `The end state: ${endStates.join(", ")}.` },
      {
        name: "older-than",
        value: "DURATION",
        help: 'The minimum age, such as "7d", "12h" or "0" for all.',
      },
      { name: "name", value: "NAME", help: "Only tasks of this name." },
      dbOption,
      jsonOption,
      helpOption,
    ],
    positionals: [],
    run: purgeCommand,
  },
  {
    name: "schedules",
    usage: "tasklite schedules [--db URL] [--json]",
    summary: "List the cron schedules",
    description: "Lists the rows of the database's schedules table.",
    options: [dbOption, jsonOption, helpOption],
    positionals: [],
    run: schedulesCommand,
  },
];

async function runCommand(args: Arguments): Promise<void> {
  const directory = requirePositional(args, "dir", "run");
  const stopTimeout = optionalDuration(args, "stop-timeout") ?? "30s";
  const url = args.options.get("db");
  if (typeof url === "string") process.env.TASKLITE_DB = url;

  const runner = await runTasks(directory, {
    debug: args.options.has("debug"),
    handleSignals: true,
    stopTimeout,
  });
  await runner.stopped;
}

async function statusCommand(args: Arguments): Promise<void> {
  await withDatabase(args, async (database, url) => {
    const result = await stats(database);
    if (args.options.has("json")) return printJson(result);
    if (result.tasks.length === 0) return print(`No tasks in ${url}`);
    print(renderTable(statusRows(result), [1, 2, 3, 4, 5, 6]));
  });
}

function statusRows(result: QueueStats): string[][] {
  const header = [
    "TASK",
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "OLDEST DUE",
  ];
  const rows = result.tasks.map((task) => [
    task.name,
    ...countsOf(task),
    task.oldestPendingAge === null ? "-" : formatAge(task.oldestPendingAge),
  ]);
  const { totals } = result;
  const total = [
    "(all)",
    ...countsOf(totals),
    totals.oldestPendingAge === null ? "-" : formatAge(totals.oldestPendingAge),
  ];
  return [header, ...rows, total];
}

function countsOf(counts: Record<TaskState, number>): string[] {
  return taskStates.map((state) => String(counts[state]));
}

async function listCommand(args: Arguments): Promise<void> {
  const state = optionalChoice(args, "state", taskStates);
  const name = optionalString(args, "name");
  const limit = optionalInteger(args, "limit", 1, 10_000);
  await withDatabase(args, async (database, url) => {
    const tasks = await listTasks(database, { state, name, limit });
    if (args.options.has("json")) return printJson(tasks);
    if (tasks.length === 0) return print(`No matching tasks in ${url}`);
    print(renderTable(listRows(tasks), [3]));
  });
}

function listRows(tasks: TaskInfo[]): string[][] {
  const header = ["ID", "NAME", "STATE", "ATTEMPTS", "RUN AT", "KEY", "LAST ERROR"];
  const rows = tasks.map((task) => [
    task.id,
    task.name,
    task.state,
    String(task.attempts),
    formatTime(task.runAt),
    task.key ?? "",
    firstLine(task.lastError ?? "", 60),
  ]);
  return [header, ...rows];
}

async function retryCommand(args: Arguments): Promise<void> {
  const id = args.positionals[0];
  const all = args.options.has("failed");
  const name = optionalString(args, "name");
  if (all && id !== undefined) {
    throw new UsageError(`pass either a task id or --failed, not both (received id "${id}")`);
  }
  if (!all && id === undefined) throw new UsageError("missing <id>: pass a task id or --failed");
  if (!all && name !== undefined) throw new UsageError("--name applies only with --failed");

  await withDatabase(args, async (database) => {
    if (id !== undefined) {
      await retry(database, id);
      if (args.options.has("json")) return printJson({ id, state: "pending" });
      return print(`Task ${id} is pending again`);
    }
    const result = await retryFailed(database, { name });
    if (args.options.has("json")) return printJson(result);
    const skipped = result.skipped > 0
      ? ` (${
        countOf(result.skipped, "task")
      } skipped: a scheduled, pending or running task has its key)`
      : "";
    print(`Retried ${countOf(result.retried, "failed task")}${skipped}`);
  });
}

async function cancelCommand(args: Arguments): Promise<void> {
  const id = requirePositional(args, "id", "cancel");
  await withDatabase(args, async (database) => {
    const result = await cancel(database, id);
    if (args.options.has("json")) return printJson({ id, result });
    if (result === "cancelled") return print(`Task ${id} is cancelled`);
    print(`Task ${id} is running: its runner aborts it and marks it cancelled`);
  });
}

async function purgeCommand(args: Arguments): Promise<void> {
  const state = optionalChoice(args, "state", endStates);
  if (state === undefined) {
    throw new UsageError("missing --state: pass one of completed, failed, cancelled");
  }
  const olderThan = optionalDuration(args, "older-than");
  if (olderThan === undefined) {
    throw new UsageError('missing --older-than: pass a duration such as "7d", or "0" for all');
  }
  const name = optionalString(args, "name");
  await withDatabase(args, async (database) => {
    const deleted = await purge(database, { state, olderThan, name });
    if (args.options.has("json")) return printJson({ deleted });
    print(`Deleted ${countOf(deleted, `${state} task`)}`);
  });
}

async function schedulesCommand(args: Arguments): Promise<void> {
  await withDatabase(args, async (database, url) => {
    const schedules = await listSchedules(database);
    if (args.options.has("json")) return printJson(schedules);
    if (schedules.length === 0) return print(`No schedules in ${url}`);
    print(renderTable(scheduleRows(schedules), []));
  });
}

function scheduleRows(schedules: ScheduleInfo[]): string[][] {
  const header = ["NAME", "TASK", "PATTERN", "TIME ZONE", "LAST TICK", "NEXT TICK", "CATCH-UP"];
  const rows = schedules.map((schedule) => [
    schedule.name,
    schedule.task,
    schedule.pattern,
    schedule.timezone,
    schedule.lastFiredAt === null ? "" : formatTime(schedule.lastFiredAt),
    schedule.nextFireAt === null ? "" : formatTime(schedule.nextFireAt),
    schedule.catchUp === "all" ? `all (up to ${schedule.maxCatchUp})` : schedule.catchUp,
  ]);
  return [header, ...rows];
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

/** An error in the command line. It exits with status 2 and points to the command's help. */
class UsageError extends Error {
  override name = "UsageError";
}

/** Splits arguments into positionals and the options that `command` defines. */
function parseArguments(command: Command, argv: string[]): Arguments {
  const specs = new Map(command.options.map((option) => [option.name, option]));
  const positionals: string[] = [];
  const options = new Map<string, string | true>();

  for (let index = 0; index < argv.length; index++) {
    const argument = argv[index];
    if (argument === "--") {
      positionals.push(...argv.slice(index + 1));
      break;
    }
    if (argument === "-h") {
      options.set("help", true);
      continue;
    }
    if (!argument.startsWith("--")) {
      positionals.push(argument);
      continue;
    }

    const equals = argument.indexOf("=");
    const name = argument.slice(2, equals === -1 ? undefined : equals);
    const spec = specs.get(name);
    if (spec === undefined) throw new UsageError(`unknown option --${name}`);
    if (spec.value === undefined) {
      if (equals !== -1) throw new UsageError(`option --${name} takes no value`);
      options.set(name, true);
      continue;
    }
    let value: string | undefined;
    if (equals !== -1) value = argument.slice(equals + 1);
    else if (index + 1 < argv.length && !argv[index + 1].startsWith("--")) value = argv[++index];
    if (value === undefined) throw new UsageError(`missing value for --${name} (${spec.value})`);
    options.set(name, value);
  }

  if (!options.has("help") && positionals.length > command.positionals.length) {
    const extra = positionals[command.positionals.length];
    throw new UsageError(`unexpected argument "${extra}"`);
  }
  return { positionals, options };
}

function requirePositional(args: Arguments, name: string, command: string): string {
  const value = args.positionals[0];
  if (value === undefined || value === "") {
    throw new UsageError(`missing <${name}>: usage is "tasklite ${command} <${name}>"`);
  }
  return value;
}

function optionalString(args: Arguments, name: string): string | undefined {
  const value = args.options.get(name);
  if (value === "") throw new UsageError(`invalid --${name} "": expected a non-empty value`);
  return typeof value === "string" ? value : undefined;
}

function optionalChoice<T extends string>(
  args: Arguments,
  name: string,
  choices: readonly T[],
): T | undefined {
  const value = optionalString(args, name);
  if (value === undefined) return undefined;
  if (!(choices as readonly string[]).includes(value)) {
    throw new UsageError(`invalid --${name} "${value}": expected one of ${choices.join(", ")}`);
  }
  return value as T;
}

function optionalInteger(
  args: Arguments,
  name: string,
  minimum: number,
  maximum: number,
): number | undefined {
  const value = optionalString(args, name);
  if (value === undefined) return undefined;
  const number = Number(value);
  if (!/^\d+$/.test(value) || number < minimum || number > maximum) {
    throw new UsageError(
      `invalid --${name} "${value}": expected an integer from ${minimum} to ${maximum}`,
    );
  }
  return number;
}

/** Accepts the durations of the library: milliseconds, or a number with ms, s, m, h or d. */
function optionalDuration(args: Arguments, name: string): Duration | undefined {
  const value = optionalString(args, name);
  if (value === undefined) return undefined;
  if (/^\d+$/.test(value)) return Number(value);
  if (/^\d+(?:\.\d+)?(?:ms|s|m|h|d)$/.test(value)) return value as Duration;
  throw new UsageError(
    `invalid --${name} "${value}": expected a duration such as "500ms", "30s", "5m", "12h" or "7d"`,
  );
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

function print(text: string): void {
  process.stdout.write(`${text}\n`);
}

function printJson(value: unknown): void {
  print(JSON.stringify(value, null, 2));
}

/** Renders rows as columns separated by two spaces. Columns in `numeric` are right-aligned. */
function renderTable(rows: string[][], numeric: number[]): string {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  return rows.map((row) =>
    row.map((cell, column) => {
      if (column === row.length - 1 && !numeric.includes(column)) return cell;
      return numeric.includes(column) ? cell.padStart(widths[column]) : cell.padEnd(widths[column]);
    }).join("  ")
  ).join("\n");
}

/** "2025-03-01 14:05:09Z", in UTC. */
function formatTime(date: Date): string {
  return `${date.toISOString().slice(0, 19).replace("T", " ")}Z`;
}

/** "350 ms", "12 s", "5 min", "3.5 h", "2 d". */
function formatAge(milliseconds: number): string {
  if (milliseconds < 1_000) return `${Math.round(milliseconds)} ms`;
  if (milliseconds < 60_000) return `${Math.round(milliseconds / 1_000)} s`;
  if (milliseconds < 3_600_000) return `${Math.round(milliseconds / 60_000)} min`;
  if (milliseconds < 172_800_000) return `${+(milliseconds / 3_600_000).toFixed(1)} h`;
  return `${+(milliseconds / 86_400_000).toFixed(1)} d`;
}

/** Returns the first line of `text`, cut to `maximum` characters with an ellipsis. */
function firstLine(text: string, maximum: number): string {
  const line = text.split("\n", 1)[0];
  return line.length > maximum ? `${line.slice(0, maximum - 1)}…` : line;
}

function countOf(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function commandHelp(command: Command): string {
  const width = Math.max(...command.options.map((option) => optionLabel(option).length));
  const options = command.options.map((option) =>
    `  ${optionLabel(option).padEnd(width)}  ${option.help}`
  );
  return `Usage: ${command.usage}\n\n${command.description}\n\nOptions:\n${options.join("\n")}`;
}

function optionLabel(option: OptionSpec): string {
  return option.value === undefined ? `--${option.name}` : `--${option.name} ${option.value}`;
}

function mainHelp(): string {
  const width = Math.max(...commands.map((command) => command.name.length));
  const list = commands.map((command) => `  ${command.name.padEnd(width)}  ${command.summary}`);
  return "Usage: tasklite <command> [options]\n\n" +
    "A durable task queue in your application's SQLite database.\n\n" +
    `Commands:\n${list.join("\n")}\n\n` +
    'Run "tasklite <command> --help" for the options of a command.';
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

/** Opens the database of `--db`, `$TASKLITE_DB` or `file:tasks.db`, and closes it after `use`. */
async function withDatabase(
  args: Arguments,
  use: (database: Database, url: string) => Promise<void>,
): Promise<void> {
  const option = optionalString(args, "db");
  // An empty variable counts as unset, as with ${VAR:-default} in a POSIX shell.
  const variable = process.env.TASKLITE_DB || undefined;
  const url = option ?? variable ?? "file:tasks.db";
  let source = "--db";
  if (option === undefined && variable !== undefined) source = "TASKLITE_DB";
  else if (option === undefined) {
    const unset = process.env.TASKLITE_DB === undefined ? "no TASKLITE_DB" : "TASKLITE_DB empty";
    source = `the default "file:tasks.db" (no --db, ${unset})`;
  }
  let database: Database;
  try {
    // These commands inspect and change an existing queue, so none creates one at a mistyped path.
    database = openDatabase(url, { create: false });
  } catch (error) {
    throw new UsageError(`invalid database from ${source}: ${(error as Error).message}`);
  }
  try {
    try {
      await database.ready();
    } catch (error) {
      throw new Error(`database from ${source}: ${(error as Error).message}`, { cause: error });
    }
    await use(database, url);
  } finally {
    database.close();
  }
}

/** Runs the command line `argv` and resolves to the exit status. */
async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    const text = mainHelp();
    if (name === undefined) {
      process.stderr.write(`tasklite: missing command\n\n${text}\n`);
      return 2;
    }
    print(text);
    return 0;
  }

  const command = commands.find((each) => each.name === name);
  if (command === undefined) {
    process.stderr.write(
      `tasklite: unknown command "${name}": expected one of ${
        commands.map((each) => each.name).join(", ")
      } (see "tasklite --help")\n`,
    );
    return 2;
  }

  try {
    const args = parseArguments(command, rest);
    if (args.options.has("help")) {
      print(commandHelp(command));
      return 0;
    }
    await command.run(args);
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(
        `tasklite ${command.name}: ${error.message} (see "tasklite ${command.name} --help")\n`,
      );
      return 2;
    }
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`tasklite ${command.name}: ${message.split("\n", 1)[0]}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
