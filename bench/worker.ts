/**
 * One benchmark process. With a "run" role it opens a queue on a new database file, runs one
 * scenario and prints `RESULT <json>`; with a "child" role it runs a worker on another process's
 * file and takes commands (start, stop, exit) on standard input.
 */
import process from "node:process";
import { createInterface } from "node:readline";
import { runScenario } from "./scenarios.ts";
import type { Queue, System } from "./systems/types.ts";

const systems: Record<string, () => Promise<System>> = {
  tasklite: () => import("./systems/tasklite.ts").then((module) => module.tasklite),
  floor: () => import("./systems/floor.ts").then((module) => module.floor),
  "floor-table": () => import("./systems/floor-table.ts").then((module) => module.floorTable),
  plainjob: () => import("./systems/plainjob.ts").then((module) => module.plainjob),
  liteque: () => import("./systems/liteque.ts").then((module) => module.liteque),
  bunqueue: () => import("./systems/bunqueue.ts").then((module) => module.bunqueue),
};

interface RunRole {
  role: "run";
  system: string;
  scenario: string;
  params: Record<string, number>;
  path: string;
}

interface ChildRole {
  role: "child";
  system: string;
  path: string;
  concurrency: number;
  mode: "count" | "echo";
}

function write(line: string): void {
  process.stdout.write(`${line}\n`);
}

function firstLine(error: unknown): string {
  return (error instanceof Error ? `${error.name}: ${error.message}` : String(error)).split(
    "\n",
  )[0];
}

async function openQueue(name: string, path: string): Promise<Queue> {
  const load = systems[name];
  if (load === undefined) {
    throw new Error(`Unknown queue ${JSON.stringify(name)}`);
  }
  return (await load()).open(path);
}

async function run(role: RunRole): Promise<void> {
  let result: Record<string, unknown>;
  try {
    const queue = await openQueue(role.system, role.path);
    const metrics = await runScenario(role.scenario, queue, {
      system: role.system,
      path: role.path,
      params: role.params,
    });
    await queue.close();
    result = { metrics };
  } catch (error) {
    result = { error: firstLine(error) };
  }
  write(`RESULT ${JSON.stringify(result)}`);
  process.exit(0);
}

async function child(role: ChildRole): Promise<void> {
  let queue: Queue;
  try {
    queue = await openQueue(role.system, role.path);
  } catch (error) {
    write(`error ${firstLine(error)}`);
    process.exit(1);
  }
  let count = 0;
  let reported = 0;
  const report = setInterval(() => {
    if (queue.error !== undefined) write(`error ${firstLine(queue.error)}`);
    if (count === reported) return;
    reported = count;
    write(`count ${count}`);
  }, 10);
  const handler = role.mode === "echo" ? () => write("task") : () => void count++;

  const lines = createInterface({ input: process.stdin });
  lines.on("line", async (command) => {
    try {
      if (command === "start") {
        await queue.start(role.concurrency, handler);
        write("started");
      } else if (command === "stop") {
        await queue.stop();
        write(`count ${count}`);
        write("stopped");
      } else if (command === "exit") {
        clearInterval(report);
        await queue.close();
        process.exit(0);
      }
    } catch (error) {
      write(`error ${firstLine(error)}`);
    }
  });
  write("ready");
}

const role = JSON.parse(process.argv.at(-1)!) as RunRole | ChildRole;
if (role.role === "run") await run(role);
else await child(role);
