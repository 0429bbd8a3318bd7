import { buildDBClient, Runner, SqliteQueue } from "liteque";
import { asyncHandler, type Handler, type Payload, type Queue, type System } from "./types.ts";

class LitequeQueue implements Queue {
  readonly #queue: SqliteQueue<Payload>;
  #runner: Runner<Payload> | undefined;
  #loop: Promise<void> | undefined;
  error: Error | undefined;

  constructor(path: string) {
    // buildDBClient sets WAL and synchronous = NORMAL by default.
    const db = buildDBClient(path, { runMigrations: true });
    this.#queue = new SqliteQueue<Payload>("bench", db, {
      defaultJobArgs: { numRetries: 4 },
      keepFailedJobs: true,
    });
  }

  async enqueue(data: Payload): Promise<void> {
    await this.#queue.enqueue(data);
  }

  async enqueueDelayed(data: Payload, delay: number): Promise<void> {
    await this.#queue.enqueue(data, { delayMs: delay });
  }

  async enqueueMany(items: Payload[]): Promise<void> {
    // liteque has no bulk enqueue.
    for (const item of items) await this.#queue.enqueue(item);
  }

  start(concurrency: number, handler: Handler): Promise<void> {
    const run = asyncHandler(handler);
    this.#runner = new Runner<Payload>(
      this.#queue,
      { run: (job) => run(job.data) },
      { concurrency, pollIntervalMs: 1_000, timeoutSecs: 300 },
    );
    this.#loop = this.#runner.run().catch((error) => {
      this.error = error;
    });
    return Promise.resolve();
  }

  async stop(): Promise<void> {
    this.#runner?.stop();
    await this.#loop;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

export const liteque: System = {
  name: "liteque",
  open(path) {
    return Promise.resolve(new LitequeQueue(path));
  },
};
