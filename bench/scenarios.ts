/** The measurements: each function runs one scenario on an open queue and returns its metrics. */
import { type ChildProcess, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import {
  collectGarbage,
  cpuTime,
  residentSetSize,
  runtimeCommand,
  sleep,
  wallClock,
  workerScript,
} from "./runtime.ts";
import type { Handler, Payload, Queue } from "./systems/types.ts";

export type Metrics = Record<string, number>;

/** What a scenario needs besides the queue: how to start child processes on the same file. */
export interface ScenarioContext {
  system: string;
  path: string;
  params: Record<string, number>;
}

const mebibyte = 1024 * 1024;

/**
 * Counts handler calls and resolves waiters when the count reaches their target, with the time
 * of that call. A waiter fails when the queue reports a background error or time runs out.
 */
class Progress {
  count = 0;
  readonly #waiters: Array<
    { target: number; deadline: number; resolve(time: number): void }
  > = [];

  // The handler checks the time limit itself: a worker loop that never waits for I/O, such as
  // plainjob's or the floor's on a full queue, keeps timers from firing until it runs dry.
  readonly handler: Handler = () => {
    this.count++;
    const now = Date.now();
    for (let index = 0; index < this.#waiters.length; index++) {
      const waiter = this.#waiters[index];
      if (this.count >= waiter.target || now > waiter.deadline) {
        this.#waiters.splice(index--, 1);
        waiter.resolve(wallClock());
      }
    }
  };

  /**
   * Resolves with the time at which the count reached `target`, or with the current time once
   * `limit` ms have passed; rejects on the queue's background error or after `timeout` ms.
   */
  reached(
    target: number,
    queue: Queue,
    timeout: number,
    limit = Infinity,
  ): Promise<number> {
    if (this.count >= target) return Promise.resolve(wallClock());
    return new Promise((resolve, reject) => {
      const begin = Date.now();
      const watchdog = setInterval(() => {
        if (queue.error !== undefined) {
          clearInterval(watchdog);
          reject(queue.error);
        } else if (Date.now() - begin > limit) {
          clearInterval(watchdog);
          resolve(wallClock());
        } else if (Date.now() - begin > timeout) {
          clearInterval(watchdog);
          reject(
            new Error(
              `timed out after ${timeout} ms with ${this.count} of ${target} tasks started`,
            ),
          );
        }
      }, 20);
      this.#waiters.push({
        target,
        deadline: begin + limit,
        resolve: (time) => {
          clearInterval(watchdog);
          resolve(time);
        },
      });
    });
  }
}

function percentile(sorted: number[], fraction: number): number {
  const index = Math.min(
    sorted.length - 1,
    Math.ceil(fraction * sorted.length) - 1,
  );
  return sorted[Math.max(0, index)];
}

function latencyMetrics(values: number[]): Metrics {
  const sorted = [...values].sort((a, b) => a - b);
  return {
    p50: percentile(sorted, 0.5),
    p99: percentile(sorted, 0.99),
    samples: sorted.length,
  };
}

/** Enqueues `tasks` tasks in calls of up to 10,000 with the queue's bulk call. */
async function preload(queue: Queue, tasks: number): Promise<void> {
  for (let start = 0; start < tasks; start += 10_000) {
    const items = Array.from(
      { length: Math.min(10_000, tasks - start) },
      (_, i) => ({
        n: start + i,
      }),
    );
    await (queue.preloadMany ?? queue.enqueueMany).call(queue, items);
  }
}

/**
 * Enqueues one task, starts the worker, waits for the task and stops again. A queue that cannot
 * dequeue fails here with its own error, before a long preload; every queue gets the same
 * warm-up.
 */
async function probe(queue: Queue): Promise<void> {
  const progress = new Progress();
  await queue.enqueue({ n: -1 });
  await queue.start(1, progress.handler);
  await progress.reached(1, queue, 10_000);
  await queue.stop();
}

/** The rate of `done` tasks over the time since `start`, and how many there were. */
function rateSince(start: number, done: number): Metrics {
  return { rate: done / ((wallClock() - start) / 1_000), done };
}

async function performAwaited(
  queue: Queue,
  { tasks, limit }: Record<string, number>,
) {
  const start = wallClock();
  const end = Date.now() + limit * 1_000;
  let done = 0;
  while (done < tasks && Date.now() < end) await queue.enqueue({ n: done++ });
  return rateSince(start, done);
}

async function performConcurrent(
  queue: Queue,
  { tasks, inFlight, limit }: Record<string, number>,
): Promise<Metrics> {
  const end = Date.now() + limit * 1_000;
  let next = 0;
  let done = 0;
  const caller = async () => {
    while (next < tasks && Date.now() < end) {
      await queue.enqueue({ n: next++ });
      done++;
    }
  };
  const start = wallClock();
  await Promise.all(Array.from({ length: inFlight }, caller));
  return rateSince(start, done);
}

async function performMany(
  queue: Queue,
  { tasks, perCall, limit }: Record<string, number>,
) {
  const calls = Array.from(
    { length: Math.ceil(tasks / perCall) },
    (_, call) => Array.from({ length: perCall }, (_, i) => ({ n: call * perCall + i })),
  );
  const end = Date.now() + limit * 1_000;
  const start = wallClock();
  let done = 0;
  for (const items of calls) {
    if (Date.now() >= end) break;
    await queue.enqueueMany(items);
    done += items.length;
  }
  return rateSince(start, done);
}

async function drain(
  queue: Queue,
  { tasks, batch, limit }: Record<string, number>,
) {
  await probe(queue);
  await preload(queue, tasks);
  const progress = new Progress();
  const start = wallClock();
  await queue.start(batch, progress.handler);
  const end = await progress.reached(tasks, queue, 600_000, limit * 1_000);
  const done = Math.min(progress.count, tasks);
  await queue.stop();
  return { rate: done / ((end - start) / 1_000), done };
}

/** A child process of the same runtime that runs a worker on the same database file. */
class Child {
  readonly process: ChildProcess;
  readonly #listeners = new Set<(words: string[]) => void>();
  count = 0;
  error: Error | undefined;

  constructor(
    context: ScenarioContext,
    concurrency: number,
    mode: "count" | "echo",
  ) {
    const { command, args } = runtimeCommand(workerScript());
    const role = JSON.stringify({
      role: "child",
      system: context.system,
      path: context.path,
      concurrency,
      mode,
    });
    this.process = spawn(command, [...args, role], {
      stdio: ["pipe", "pipe", "inherit"],
    });
    createInterface({ input: this.process.stdout! }).on("line", (line) => {
      const words = line.split(" ");
      if (words[0] === "count") this.count = Number(words[1]);
      if (words[0] === "error") {
        this.error = new Error(`worker process: ${line.slice(6)}`);
      }
      for (const listener of this.#listeners) listener(words);
    });
  }

  send(command: string): void {
    this.process.stdin!.write(`${command}\n`);
  }

  /** Resolves with the time of the next line whose first word is `word`. */
  next(word: string, timeout: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#listeners.delete(listener);
        reject(
          this.error ??
            new Error(`timed out after ${timeout} ms waiting for "${word}"`),
        );
      }, timeout);
      const listener = (words: string[]) => {
        if (words[0] !== word && words[0] !== "error") return;
        const time = wallClock();
        clearTimeout(timer);
        this.#listeners.delete(listener);
        if (words[0] === "error") reject(this.error);
        else resolve(time);
      };
      this.#listeners.add(listener);
    });
  }

  async exit(): Promise<void> {
    if (this.process.exitCode !== null) return;
    await new Promise((resolve) => this.process.once("exit", resolve));
  }
}

async function drainProcesses(
  queue: Queue,
  context: ScenarioContext,
): Promise<Metrics> {
  const { tasks, processes, batch, limit } = context.params;
  await probe(queue);
  await preload(queue, tasks);
  const children = Array.from(
    { length: processes },
    () => new Child(context, batch, "count"),
  );
  try {
    await Promise.all(children.map((child) => child.next("ready", 30_000)));
    const start = wallClock();
    for (const child of children) child.send("start");
    const deadline = Date.now() + limit * 1_000;
    let done = 0;
    let end = start;
    for (;;) {
      const failed = children.find((child) => child.error !== undefined);
      if (failed) throw failed.error;
      done = children.reduce((sum, child) => sum + child.count, 0);
      end = wallClock();
      // A worker loop that never waits for I/O, such as plainjob's on a full queue, reports its
      // count only when the queue runs dry, so the limit applies once counts arrive.
      if (done >= tasks || (Date.now() > deadline && done > 0)) break;
      await sleep(5);
    }
    const stopped = children.map((child) => child.next("stopped", 60_000));
    for (const child of children) child.send("stop");
    await Promise.all(stopped);
    done = Math.min(done, tasks);
    return { rate: done / ((end - start) / 1_000), done };
  } finally {
    for (const child of children) child.send("exit");
    await Promise.all(children.map((child) => child.exit()));
  }
}

/**
 * A random pause of 1 to 30 ms between samples, so each sample meets an idle queue and samples
 * do not fall into step with a worker's polling timer.
 */
const idlePause = () => sleep(1 + Math.random() * 29);

async function latencySame(
  queue: Queue,
  { samples, budget }: Record<string, number>,
) {
  const values: number[] = [];
  let current: ((time: number) => void) | undefined;
  await queue.start(5, () => current?.(wallClock()));
  const end = Date.now() + budget;
  try {
    while (values.length < samples && Date.now() < end) {
      const started = new Promise<number>((resolve) => (current = resolve));
      const sentAt = wallClock();
      await queue.enqueue({ n: values.length });
      values.push(await withTimeout(started, queue, 10_000) - sentAt);
      await idlePause();
    }
  } finally {
    await queue.stop();
  }
  return latencyMetrics(values);
}

async function latencyProcess(
  queue: Queue,
  context: ScenarioContext,
): Promise<Metrics> {
  const { samples, budget } = context.params;
  const child = new Child(context, 5, "echo");
  const values: number[] = [];
  try {
    await child.next("ready", 30_000);
    child.send("start");
    await child.next("started", 30_000);
    const end = Date.now() + budget;
    while (values.length < samples && Date.now() < end) {
      const started = child.next("task", 10_000);
      const sentAt = wallClock();
      await queue.enqueue({ n: values.length });
      values.push(await started - sentAt);
      await idlePause();
    }
    const stopped = child.next("stopped", 60_000);
    child.send("stop");
    await stopped;
  } finally {
    child.send("exit");
    await child.exit();
  }
  return latencyMetrics(values);
}

async function latencyDelayed(
  queue: Queue,
  params: Record<string, number>,
): Promise<Metrics> {
  const { samples, delay, interval, budget } = params;
  const values: number[] = [];
  let received = 0;
  await queue.start(5, (data: Payload) => {
    received++;
    values.push(wallClock() - (data.sentAt! + data.delay!));
  });
  const end = Date.now() + budget;
  let sent = 0;
  try {
    while (sent < samples && Date.now() < end) {
      const sentAt = wallClock();
      await queue.enqueueDelayed({ n: sent, sentAt, delay }, delay);
      sent++;
      await sleep(interval);
    }
    await withTimeout(
      (async () => {
        while (received < sent) await sleep(5);
      })(),
      queue,
      10_000,
    );
  } finally {
    await queue.stop();
  }
  return latencyMetrics(values);
}

/** Resolves as `promise` does, or rejects on the queue's background error or after `timeout`. */
function withTimeout<T>(
  promise: Promise<T>,
  queue: Queue,
  timeout: number,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + timeout;
    const watchdog = setInterval(() => {
      if (queue.error !== undefined) reject(queue.error);
      else if (Date.now() > deadline) {
        reject(new Error(`timed out after ${timeout} ms`));
      } else return;
      clearInterval(watchdog);
    }, 20);
    promise.then(
      (value) => {
        clearInterval(watchdog);
        resolve(value);
      },
      (error) => {
        clearInterval(watchdog);
        reject(error);
      },
    );
  });
}

async function claimCost(
  queue: Queue,
  { waiting, claims }: Record<string, number>,
) {
  await probe(queue);
  await preload(queue, waiting);
  const progress = new Progress();
  await queue.start(1, progress.handler);
  const first = await progress.reached(1, queue, 60_000);
  const last = await progress.reached(claims + 1, queue, 600_000);
  await queue.stop();
  return { perTask: ((last - first) / claims) * 1_000 };
}

async function memory(
  queue: Queue,
  { tasks, warmup, batch, limit }: Record<string, number>,
) {
  await probe(queue);
  await preload(queue, tasks);
  const progress = new Progress();
  const start = wallClock();
  await queue.start(batch, progress.handler);
  await progress.reached(warmup, queue, 600_000);
  collectGarbage();
  const before = residentSetSize();
  await progress.reached(
    tasks,
    queue,
    1_800_000,
    limit * 1_000 - (wallClock() - start),
  );
  const done = Math.min(progress.count, tasks);
  await queue.stop();
  collectGarbage();
  const after = residentSetSize();
  return {
    growth: (after / before - 1) * 100,
    before: before / mebibyte,
    after: after / mebibyte,
    done,
  };
}

async function idleCpu(
  queue: Queue,
  { seconds, settle }: Record<string, number>,
) {
  await queue.start(5, () => {});
  await sleep(settle);
  const start = cpuTime();
  const startTime = wallClock();
  await sleep(seconds * 1_000);
  const used = cpuTime() - start;
  const elapsed = wallClock() - startTime;
  await queue.stop();
  if (queue.error !== undefined) throw queue.error;
  return { cpu: (used / 1_000 / elapsed) * 100 };
}

/** Runs one scenario and returns its metrics. */
export function runScenario(
  scenario: string,
  queue: Queue,
  context: ScenarioContext,
): Promise<Metrics> {
  const params = context.params;
  switch (scenario) {
    case "perform-awaited":
      return performAwaited(queue, params);
    case "perform-concurrent":
      return performConcurrent(queue, params);
    case "perform-many":
      return performMany(queue, params);
    case "drain":
      return drain(queue, params);
    case "drain-processes":
      return drainProcesses(queue, context);
    case "latency-same":
      return latencySame(queue, params);
    case "latency-process":
      return latencyProcess(queue, context);
    case "latency-delayed":
      return latencyDelayed(queue, params);
    case "claim-cost":
      return claimCost(queue, params);
    case "memory":
      return memory(queue, params);
    case "idle-cpu":
      return idleCpu(queue, params);
  }
  throw new Error(`Unknown scenario ${JSON.stringify(scenario)}`);
}
