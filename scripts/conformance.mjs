/**
 * Runs the same checks of tasklite's public API under Bun, Deno and Node.js, against real
 * SQLite files in a temporary directory:
 *
 *   bun scripts/conformance.mjs
 *   deno run --allow-read --allow-write --allow-env --allow-ffi --allow-sys --allow-run \
 *     scripts/conformance.mjs
 *   npm run build && node scripts/conformance.mjs
 *
 * Bun and Deno import `mod.ts`; Node.js, which cannot import TypeScript, imports the build in
 * `dist/`. The script prints one line per check and exits with code 1 when a check fails.
 * Otherwise it ends on its own once every runner is stopped and every database closed. A timer
 * or handle left open keeps the process alive, so callers run it under a time limit.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const deno = globalThis.Deno;
const bun = globalThis.Bun;
const nodeProcess = globalThis.process;
let runtime = "node";
let runtimeVersion = nodeProcess?.versions.node;
if (deno) {
  runtime = "deno";
  runtimeVersion = deno.version.deno;
} else if (bun) {
  runtime = "bun";
  runtimeVersion = bun.version;
}

/**
 * The permissions of the Deno child process that the signal check starts: those that the libSQL
 * driver needs. CI passes these and --allow-run to this script.
 */
const denoPermissions = [
  "--allow-read",
  "--allow-write",
  "--allow-env",
  "--allow-ffi",
  "--allow-sys",
];

const library = new URL(runtime === "node" ? "../dist/mod.js" : "../mod.ts", import.meta.url).href;
const denoConfig = new URL("../deno.json", import.meta.url);
const tasklite = await import(library);
const { defineDatabaseTask, openDatabase, perform, runTasks } = tasklite;

const root = mkdtempSync(join(tmpdir(), "tasklite-conformance-"));
const results = { passed: 0, failed: 0 };

console.log(`tasklite conformance under ${runtime} ${runtimeVersion}, importing ${library}`);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** Creates a logger that keeps every line, to be printed only when a check fails. */
function recordingLogger() {
  const lines = [];
  const record = (level) => (message) => void lines.push(`${level}: ${message}`);
  return {
    lines,
    debug: record("debug"),
    info: record("info"),
    warn: record("warn"),
    error: record("error"),
  };
}

/** Polls `condition` every 10 ms until it returns a truthy value or `timeout` ms pass. */
async function waitFor(condition, { timeout = 5_000, message = "the condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${timeout} ms waiting for ${message}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Reads every row of the `tasks` table for one task name. */
async function rowsOf(database, name) {
  const result = await database.client.execute({
    sql: "SELECT * FROM tasks WHERE name = ? ORDER BY rowid",
    args: [name],
  });
  return result.rows;
}

/** Runs one check, prints its result, and prints the logger's lines when it fails. */
async function check(name, body) {
  const logger = recordingLogger();
  const started = Date.now();
  try {
    await body(logger);
    results.passed++;
    console.log(`ok    ${name} (${Date.now() - started} ms)`);
  } catch (error) {
    results.failed++;
    console.log(
      `FAIL  ${name}\n      ${String(error?.stack ?? error).replaceAll("\n", "\n      ")}`,
    );
    for (const line of logger.lines) console.log(`      log ${line}`);
  }
}

/**
 * Writes a task directory whose modules share `_database.mjs` and insert each run's task name
 * and data into a `runs` table. Returns the directory and the URL of its `_database.mjs`.
 */
function writeTaskDirectory(name, files) {
  const directory = join(root, name);
  mkdirSync(directory);
  // Node.js reads `.js` files as ES modules only inside a package with "type": "module".
  writeFileSync(join(directory, "package.json"), '{ "type": "module" }\n');
  const url = `file:${join(directory, "app.db")}`;
  writeFileSync(
    join(directory, "_database.mjs"),
    `import { openDatabase } from ${JSON.stringify(library)};\n` +
      `export const database = openDatabase(${JSON.stringify(url)});\n`,
  );
  for (const [fileName, source] of Object.entries(files)) {
    writeFileSync(join(directory, fileName), source);
  }
  return { directory, databaseModule: pathToFileURL(join(directory, "_database.mjs")).href };
}

/** Returns the source of a task module that records its runs, in TypeScript when `typed`. */
function recordingTaskSource({ typed = false } = {}) {
  return `import { defineDatabaseTask } from ${JSON.stringify(library)};
import { database } from "./_database.mjs";

export default defineDatabaseTask(database, {
  async process({ name, data }) {
    const text${typed ? ": string" : ""} = JSON.stringify(data);
    await database.client.execute("CREATE TABLE IF NOT EXISTS runs (task TEXT, data TEXT)");
    await database.client.execute({ sql: "INSERT INTO runs VALUES (?, ?)", args: [name, text] });
  },
});
`;
}

/**
 * Starts `command`, calls `onOutput` with all output so far and a function that sends SIGTERM,
 * and resolves with the exit code and output once the process ends. A process still running
 * after `timeout` ms is killed.
 */
function runChild(command, args, { onOutput, timeout = 15_000 }) {
  // Deno's node:child_process reports a child that exited on its own after kill("SIGTERM") as
  // killed by SIGTERM, hiding its exit code, so Deno uses Deno.Command.
  if (deno) return runDenoChild(command, args, { onOutput, timeout });
  return runNodeChild(command, args, { onOutput, timeout });
}

function runNodeChild(command, args, { onOutput, timeout }) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
    let output = "";
    const append = (chunk) => {
      output += chunk;
      onOutput(output, () => child.kill("SIGTERM"));
    };
    child.stdout.setEncoding("utf8").on("data", append);
    child.stderr.setEncoding("utf8").on("data", append);
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output });
    });
  });
}

async function runDenoChild(command, args, { onOutput, timeout }) {
  const child = new deno.Command(command, { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
  let output = "";
  const read = async (stream) => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      output += chunk;
      onOutput(output, () => child.kill("SIGTERM"));
    }
  };
  try {
    const [status] = await Promise.all([child.status, read(child.stdout), read(child.stderr)]);
    return { code: status.signal === null ? status.code : null, signal: status.signal, output };
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

const database = openDatabase(`file:${join(root, "conformance.db")}`);

await check("defineDatabaseTask() validates and names a task", () => {
  const task = defineDatabaseTask(database, { name: "conformance-define", process() {} });
  assert.equal(task.name, "conformance-define");
  assert.throws(
    () => defineDatabaseTask(database, { name: "bad", batchSize: 0, process() {} }),
    { name: "RangeError", message: /"batchSize".*received 0/ },
  );
});

await check("perform() with a delay runs the task after the delay", async (logger) => {
  const runs = [];
  const task = defineDatabaseTask(database, {
    name: "conformance-delay",
    process({ data }) {
      runs.push({ data, at: Date.now() });
    },
  });
  const performedAt = Date.now();
  const id = await perform(task, { n: 1 }, { delay: "300ms" });
  const [row] = await rowsOf(database, "conformance-delay");
  assert.equal(row.id, id);
  assert.equal(Number(row.run_at) - Number(row.created), 300);

  const runner = await runTasks([task], { logger });
  try {
    await waitFor(() => runs.length === 1, { message: "the delayed run" });
  } finally {
    await runner.stop();
  }
  assert.deepEqual(runs[0].data, { n: 1 });
  // Timers may fire a few milliseconds early on some platforms, so allow 20 ms.
  assert.ok(runs[0].at - performedAt >= 280, `ran after ${runs[0].at - performedAt} ms`);
  assert.equal((await rowsOf(database, "conformance-delay")).length, 0);
});

await check("a failed attempt is retried, and the last failure is kept", async (logger) => {
  const attempts = [];
  const flaky = defineDatabaseTask(database, {
    name: "conformance-flaky",
    backoff: "50ms",
    process({ attempt }) {
      attempts.push(attempt);
      if (attempt === 1) throw new Error("first attempt fails");
    },
  });
  const broken = defineDatabaseTask(database, {
    name: "conformance-broken",
    backoff: "50ms",
    maxAttempts: 2,
    process() {
      throw new Error("every attempt fails");
    },
  });
  await perform(flaky, undefined);
  const brokenId = await perform(broken, undefined);

  const runner = await runTasks([flaky, broken], { logger });
  let failedRow;
  try {
    await waitFor(async () => (await rowsOf(database, "conformance-flaky")).length === 0, {
      message: "the retried task to succeed",
    });
    [failedRow] = await waitFor(async () => {
      const rows = await rowsOf(database, "conformance-broken");
      return rows[0]?.state === "failed" ? rows : undefined;
    }, { message: "the broken task to fail" });
  } finally {
    await runner.stop();
  }
  assert.deepEqual(attempts, [1, 2]);
  assert.equal(failedRow.id, brokenId);
  assert.equal(Number(failedRow.attempts), 2);
  assert.match(String(failedRow.failed_error), /every attempt fails/);
});

await check(
  `runTasks(directory) loads ${runtime === "node" ? ".js and .mjs" : ".ts, .js and .mjs"} modules`,
  async (logger) => {
    const files = {
      "welcome.js": recordingTaskSource(),
      "report.mjs": recordingTaskSource(),
    };
    if (runtime !== "node") files["digest.ts"] = recordingTaskSource({ typed: true });
    const { directory, databaseModule } = writeTaskDirectory("tasks", files);
    const names = Object.keys(files).map((file) => file.replace(/\.[^.]+$/, "")).sort();

    const controller = new AbortController();
    const runner = await runTasks(directory, { logger, signal: controller.signal });
    const { database: appDatabase } = await import(databaseModule);
    try {
      assert.deepEqual(runner.tasks, names);
      for (const fileName of Object.keys(files)) {
        const { default: task } = await import(pathToFileURL(join(directory, fileName)).href);
        await perform(task, { file: fileName });
      }
      const runs = await waitFor(async () => {
        const result = await appDatabase.client.execute("SELECT * FROM runs ORDER BY task")
          .catch(() => undefined);
        return result?.rows.length === names.length ? result.rows : undefined;
      }, { message: `${names.length} runs` });
      assert.deepEqual(runs.map((row) => row.task), names);
    } finally {
      // Stopping through the signal option also checks that AbortSignal works in this runtime.
      controller.abort();
      await runner.stopped;
      appDatabase.close();
    }
  },
);

if (runtime === "node") {
  await check("runTasks(directory) explains how to load .ts modules in Node.js", async (logger) => {
    const { directory } = writeTaskDirectory("typescript-tasks", {
      "send.ts": recordingTaskSource({ typed: true }),
    });
    await assert.rejects(runTasks(directory, { logger }), (error) => {
      assert.match(error.message, /send\.ts/);
      assert.match(error.message, /cannot import TypeScript/);
      assert.match(error.message, /Compile the task modules to JavaScript/);
      assert.match(error.message, /tsx/);
      return true;
    });
  });
}

await check("handleSignals stops gracefully on SIGTERM", async () => {
  const url = `file:${join(root, "signals.db")}`;
  const worker = join(root, "signal-worker.mjs");
  writeFileSync(
    worker,
    `import { defineDatabaseTask, openDatabase, perform, runTasks } from ${JSON.stringify(library)};
const database = openDatabase(${JSON.stringify(url)});
const task = defineDatabaseTask(database, {
  name: "conformance-signal",
  async process() {
    console.log("attempt started");
    await new Promise((resolve) => setTimeout(resolve, 200));
  },
});
await perform(task, undefined);
const print = (message) => console.log(message);
await runTasks([task], {
  handleSignals: true,
  logger: { debug: print, info: print, warn: print, error: print },
});
`,
  );
  const args = runtime === "deno"
    ? ["run", ...denoPermissions, "--config", fileURLToPath(denoConfig), worker]
    : [worker];
  const command = deno ? deno.execPath() : nodeProcess.execPath;
  let signalled = false;
  const { code, signal, output } = await runChild(command, args, {
    onOutput(output, terminate) {
      if (!signalled && output.includes("attempt started")) {
        signalled = true;
        terminate();
      }
    },
  });

  assert.ok(signalled, `the worker never started its attempt:\n${output}`);
  assert.equal(code, 0, `exit code ${code}, signal ${signal}, output:\n${output}`);
  assert.match(output, /received SIGTERM, stopping/);
  assert.match(output, /stopped 1 task/);
  const signalDatabase = openDatabase(url);
  try {
    // The attempt that was running at SIGTERM finished during the graceful stop.
    assert.equal((await rowsOf(signalDatabase, "conformance-signal")).length, 0);
  } finally {
    signalDatabase.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Cron
// ---------------------------------------------------------------------------------------------

{
  const { schedule } = tasklite;

  await check("a task with a cron option runs each tick until stop()", async (logger) => {
    const ticks = [];
    const task = defineDatabaseTask(database, {
      name: "conformance-cron",
      cron: "* * * * * *",
      process({ scheduledFor }) {
        ticks.push(scheduledFor);
      },
    });
    const runner = await runTasks([task], { logger });
    try {
      await waitFor(() => ticks.length >= 1, { timeout: 3_000, message: "a cron tick" });
    } finally {
      await runner.stop();
    }
    assert.ok(ticks[0] !== undefined, "the attempt received no scheduledFor");

    // A stopped scheduler enqueues nothing more: wait past the next one-second tick.
    const rowsAtStop = (await rowsOf(database, "conformance-cron")).length;
    await new Promise((resolve) => setTimeout(resolve, 1_200));
    assert.equal((await rowsOf(database, "conformance-cron")).length, rowsAtStop);
  });

  await check("schedule() registers a schedule and its handle stops it", async () => {
    const task = defineDatabaseTask(database, { name: "conformance-schedule", process() {} });
    const handle = await schedule(task, "*/5 * * * * *", { n: 1 });
    try {
      assert.equal(handle.pattern, "*/5 * * * * *");
      assert.equal(handle.name, "conformance-schedule");
      const next = handle.nextRun();
      assert.ok(next instanceof Date && next.getTime() > Date.now() - 1_000, `nextRun() ${next}`);
    } finally {
      await handle.stop();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

database.close();
rmSync(root, { recursive: true, force: true });
console.log(
  `conformance under ${runtime}: ${results.passed} passed, ${results.failed} failed`,
);
if (results.failed > 0) {
  if (deno) deno.exitCode = 1;
  else nodeProcess.exitCode = 1;
}
