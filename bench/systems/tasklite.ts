import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  performMany,
  type Runner,
  runTasks,
  type Task,
} from "../../mod.ts";
import {
  asyncHandler,
  type Handler,
  type Payload,
  type Queue,
  silentLogger,
  type System,
} from "./types.ts";

class TaskliteQueue implements Queue {
  readonly #database: Database;
  readonly #task: Task<Payload>;
  #runner: Runner | undefined;
  readonly error = undefined;

  constructor(path: string) {
    this.#database = openDatabase(`file:${path}`);
    this.#task = defineDatabaseTask<Payload>(this.#database, {
      name: "bench",
      async process() {},
    });
  }

  async ready(): Promise<void> {
    await this.#database.ready();
  }

  async enqueue(data: Payload): Promise<void> {
    await perform(this.#task, data);
  }

  async enqueueDelayed(data: Payload, delay: number): Promise<void> {
    await perform(this.#task, data, { delay });
  }

  async enqueueMany(items: Payload[]): Promise<void> {
    await performMany(this.#task, items);
  }

  async start(concurrency: number, handler: Handler): Promise<void> {
    const run = asyncHandler(handler);
    // A second definition with the same name: the batch size is part of the definition.
    const task = defineDatabaseTask<Payload>(this.#database, {
      name: "bench",
      batchSize: concurrency,
      process: ({ data }) => run(data),
    });
    this.#runner = await runTasks([task], { logger: silentLogger });
  }

  async stop(): Promise<void> {
    await this.#runner?.stop();
  }

  close(): Promise<void> {
    this.#database.close();
    return Promise.resolve();
  }
}

export const tasklite: System = {
  name: "tasklite",
  async open(path) {
    const queue = new TaskliteQueue(path);
    await queue.ready();
    return queue;
  },
};
