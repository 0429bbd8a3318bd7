/**
 * Runs the benchmark: installs the other queues on first use, compiles tasklite for Node.js,
 * runs every scenario in fresh processes under Node.js, Bun and Deno, alternating the queues
 * within each repetition, and prints one table per scenario. A full run also writes
 * results.json and the tables of ../BENCHMARKS.md.
 *
 * Usage: npm run bench [-- --quick] [--repetitions N] [--runtimes node,bun,deno]
 *   [--queues tasklite,floor,floor-table,plainjob,liteque,bunqueue] [--scenarios id-prefix,...]
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir, totalmem } from "node:os";
import { dirname, join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { type Variant, variants } from "./catalogue.ts";
import { formatReport, type Machine, type Results, type Run } from "./report.ts";

const benchDirectory = dirname(fileURLToPath(import.meta.url));
const rootDirectory = dirname(benchDirectory);
const binDirectory = join(rootDirectory, "node_modules", ".bin");

type Runtime = "node" | "bun" | "deno";

interface Options {
  quick: boolean;
  repetitions: number;
  runtimes: Runtime[];
  queues: string[];
  scenarios: string[];
}

const allQueues = [
  "tasklite",
  "floor",
  "floor-table",
  "plainjob",
  "liteque",
  "bunqueue",
];

/** The rows that need only the root package's dependencies, and whose failure fails the run. */
const ownQueues = ["tasklite", "floor", "floor-table"];

function parseArguments(args: string[]): Options {
  const options: Options = {
    quick: false,
    repetitions: 2,
    runtimes: ["node", "bun", "deno"],
    queues: allQueues,
    scenarios: [],
  };
  const list = (value: string | undefined, name: string) => {
    if (value === undefined) throw new Error(`Missing value after ${name}`);
    return value.split(",").map((item) => item.trim()).filter(Boolean);
  };
  for (let index = 0; index < args.length; index++) {
    const arg = args[index];
    if (arg === "--quick") options.quick = true;
    else if (arg === "--repetitions") {
      options.repetitions = Number(args[++index]);
      if (!Number.isInteger(options.repetitions) || options.repetitions < 1) {
        throw new Error(
          `Invalid --repetitions ${args[index]}: expected a positive integer`,
        );
      }
    } else if (arg === "--runtimes") {
      options.runtimes = list(args[++index], arg) as Runtime[];
      const unknown = options.runtimes.find((runtime) =>
        !["node", "bun", "deno"].includes(runtime)
      );
      if (unknown) {
        throw new Error(`Unknown runtime ${unknown}: use node, bun or deno`);
      }
    } else if (arg === "--queues") {
      options.queues = list(args[++index], arg);
      const unknown = options.queues.find((queue) => !allQueues.includes(queue));
      if (unknown) {
        throw new Error(
          `Unknown queue ${unknown}: use ${allQueues.join(", ")}`,
        );
      }
    } else if (arg === "--scenarios") {
      options.scenarios = list(args[++index], arg);
    } else {throw new Error(
        `Unknown argument ${arg}: see the usage at the top of bench/main.ts`,
      );}
  }
  if (options.quick && !args.includes("--repetitions")) options.repetitions = 1;
  return options;
}

/** Returns why a queue does not run a scenario on a runtime, or undefined when it does. */
function unsupported(
  queue: string,
  runtime: Runtime,
  variant: Variant,
): string | undefined {
  if (queue === "bunqueue" && runtime !== "bun") {
    return "embedded mode runs only on Bun (package engines: bun >= 1.4.0)";
  }
  if ((queue === "plainjob" || queue === "liteque") && runtime === "deno") {
    return "Deno is not among its documented runtimes (plainjob: better-sqlite3 or bun:sqlite; liteque: Node.js)";
  }
  if (queue === "bunqueue" && variant.multiProcess) {
    return "embedded mode keeps the queue in one process's memory; other processes need its TCP server";
  }
  if (
    queue === "bunqueue" &&
    (variant.id === "memory" || variant.id === "claim-cost-1000000")
  ) {
    return "enqueueing 1,000,000 tasks takes about 100 s at its bulk rate of about 10,000/s here";
  }
  if ((queue === "floor" || queue === "floor-table") && !variant.floor) {
    return "the floor is only SQL statements, with no worker that waits for new tasks";
  }
  return undefined;
}

/** Installs the other queues into bench/node_modules from bench/package-lock.json if missing. */
function installPeers(): void {
  const installed = [
    "plainjob",
    "liteque",
    "bunqueue",
    "better-sqlite3/build/Release",
  ].every(
    (path) => existsSync(join(benchDirectory, "node_modules", path)),
  );
  if (installed) return;
  console.error(
    "bench: installing the other queues into bench/node_modules (npm ci)...",
  );
  const started = Date.now();
  const result = spawnSync("npm", ["ci", "--no-audit", "--no-fund"], {
    cwd: benchDirectory,
    stdio: ["ignore", "inherit", "inherit"],
  });
  if (result.status !== 0) {
    throw new Error("npm ci in bench/ failed; see the output above");
  }
  console.error(
    `bench: installed in ${((Date.now() - started) / 1_000).toFixed(0)} s`,
  );
}

/**
 * Compiles mod.ts and the benchmark to JavaScript in bench/.build, for Node.js 20. Types are
 * not checked here (`tsc` in CI checks mod.ts), so a run of tasklite and the floor alone works
 * before the other queues and their type declarations are installed.
 */
function compileForNode(): void {
  const result = spawnSync(join(binDirectory, "tsc"), [
    "-p",
    join(benchDirectory, "tsconfig.json"),
    "--noCheck",
  ], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  if (result.status !== 0) {
    throw new Error("Compiling the benchmark for Node.js failed");
  }
}

function versionOf(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: "utf8" });
  return (result.stdout ?? "").split("\n")[0].trim() || "unknown";
}

function describeMachine(runtimes: Runtime[]): Machine {
  const versions: Record<string, string> = {};
  if (runtimes.includes("node")) {
    versions.node = versionOf("node", ["--version"]);
  }
  if (runtimes.includes("bun")) {
    versions.bun = versionOf(join(binDirectory, "bun"), ["--version"]);
  }
  if (runtimes.includes("deno")) {
    versions.deno = versionOf(join(binDirectory, "deno"), ["--version"]);
  }
  const peers: Record<string, string> = {};
  for (const name of ["plainjob", "liteque", "bunqueue", "better-sqlite3"]) {
    const file = join(benchDirectory, "node_modules", name, "package.json");
    if (existsSync(file)) {
      peers[name] = JSON.parse(readFileSync(file, "utf8")).version;
    }
  }
  const libsql = join(
    rootDirectory,
    "node_modules",
    "@libsql",
    "client",
    "package.json",
  );
  if (existsSync(libsql)) {
    peers["@libsql/client"] = JSON.parse(readFileSync(libsql, "utf8")).version;
  }
  return {
    cpu: cpus()[0]?.model ?? "unknown",
    cores: cpus().length,
    memoryGiB: Math.round(totalmem() / 1024 ** 3),
    platform: `${process.platform} ${process.arch}`,
    versions,
    packages: peers,
  };
}

function commandFor(runtime: Runtime): { command: string; args: string[] } {
  switch (runtime) {
    case "node":
      return {
        command: "node",
        args: [
          "--expose-gc",
          join(benchDirectory, ".build", "bench", "worker.js"),
        ],
      };
    case "bun":
      return {
        command: join(binDirectory, "bun"),
        args: [join(benchDirectory, "worker.ts")],
      };
    case "deno":
      return {
        command: join(binDirectory, "deno"),
        args: [
          "run",
          "--allow-all",
          "--v8-flags=--expose-gc",
          join(benchDirectory, "worker.ts"),
        ],
      };
  }
}

/** Runs one measurement in a fresh process on a new database file. */
function measure(
  runtime: Runtime,
  queue: string,
  variant: Variant,
  timeout: number,
) {
  const directory = mkdtempSync(join(tmpdir(), "tasklite-bench-"));
  const role = {
    role: "run",
    system: queue,
    scenario: variant.scenario,
    params: variant.params,
    path: join(directory, "bench.db"),
  };
  const { command, args } = commandFor(runtime);
  return new Promise<{ metrics?: Record<string, number>; error?: string }>(
    (resolve) => {
      const child = spawn(command, [...args, JSON.stringify(role)], {
        cwd: rootDirectory,
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (chunk) => (stdout += chunk));
      child.stderr.on("data", (chunk) => (stderr += chunk));
      const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
      child.on("exit", (code, signal) => {
        clearTimeout(timer);
        rmSync(directory, { recursive: true, force: true });
        const line = stdout.split("\n").find((text) => text.startsWith("RESULT "));
        if (line !== undefined) {
          return resolve(JSON.parse(line.slice("RESULT ".length)));
        }
        const reason = signal === "SIGKILL"
          ? `killed after the ${timeout / 1_000} s limit`
          : `exited with ${signal ?? code} without a result`;
        const detail = stderr.trim().split("\n").filter(Boolean).at(-1);
        resolve({ error: `${reason}${detail ? `: ${detail}` : ""}` });
      });
    },
  );
}

async function main(): Promise<void> {
  const options = parseArguments(process.argv.slice(2));
  const started = Date.now();
  if (options.queues.some((queue) => !ownQueues.includes(queue))) {
    installPeers();
  }
  if (options.runtimes.includes("node")) compileForNode();

  const machine = describeMachine(options.runtimes);
  const selected = variants(options.quick, options.repetitions).filter((
    variant,
  ) =>
    options.scenarios.length === 0 ||
    options.scenarios.some((prefix) => variant.id.startsWith(prefix))
  );
  const runs: Run[] = [];
  const timeout = options.quick ? 60_000 : 1_800_000;
  let harnessFailed = false;

  for (const variant of selected) {
    for (const runtime of options.runtimes) {
      const queues = options.queues.filter((queue) => {
        const reason = unsupported(queue, runtime, variant);
        if (reason !== undefined) {
          runs.push({ variant: variant.id, runtime, queue, skipped: reason });
        }
        return reason === undefined;
      });
      const failed = new Set<string>();
      for (let repetition = 0; repetition < variant.repetitions; repetition++) {
        // Rotate the order each repetition, so every queue runs before and after tasklite.
        const order = queues.map((_, index) => queues[(index + repetition) % queues.length]);
        for (const queue of order) {
          if (failed.has(queue)) continue;
          const runStarted = Date.now();
          const result = await measure(runtime, queue, variant, timeout);
          runs.push({
            variant: variant.id,
            runtime,
            queue,
            repetition,
            ...result,
          });
          const summary = result.error ?? JSON.stringify(result.metrics);
          const seconds = ((Date.now() - runStarted) / 1_000).toFixed(1);
          console.error(
            `${variant.id} ${runtime} ${queue} #${repetition + 1} (${seconds} s): ${summary}`,
          );
          if (result.error !== undefined) {
            // A queue that failed once fails the same way again, so only its first error is reported.
            failed.add(queue);
            if (ownQueues.includes(queue)) harnessFailed = true;
          }
        }
      }
    }
  }

  const results: Results = {
    date: new Date().toISOString(),
    quick: options.quick,
    durationSeconds: Math.round((Date.now() - started) / 1_000),
    machine,
    runs,
  };
  const report = formatReport(results, selected);
  console.log(report);
  if (!options.quick && options.scenarios.length === 0) {
    writeFileSync(
      join(benchDirectory, "results.json"),
      `${JSON.stringify(results, null, 2)}\n`,
    );
    updateBenchmarksFile(report);
  }
  console.error(`bench: done in ${results.durationSeconds} s`);
  if (harnessFailed) {
    console.error("bench: a tasklite or floor run failed; see its error above");
    process.exit(1);
  }
}

/** Replaces the generated part of BENCHMARKS.md, between its two marker comments. */
function updateBenchmarksFile(report: string): void {
  const file = join(rootDirectory, "BENCHMARKS.md");
  const begin = "<!-- results:begin -->";
  const end = "<!-- results:end -->";
  const text = existsSync(file) ? readFileSync(file, "utf8") : `${begin}\n${end}\n`;
  const start = text.indexOf(begin);
  const stop = text.indexOf(end);
  if (start < 0 || stop < start) {
    console.error(
      `bench: BENCHMARKS.md lacks the ${begin} and ${end} markers; not updated`,
    );
    return;
  }
  writeFileSync(
    file,
    `${text.slice(0, start + begin.length)}\n${report}\n${text.slice(stop)}`,
  );
  // The tables are written unpadded; deno fmt aligns them, as `deno fmt --check` in CI expects.
  const formatted = spawnSync(join(binDirectory, "deno"), ["fmt", "--quiet", file], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  if (formatted.status !== 0) {
    console.error("bench: deno fmt BENCHMARKS.md failed; run `npx deno fmt BENCHMARKS.md`");
  }
}

await main();
