import {
  better,
  bun,
  type Connection,
  defineQueue,
  defineWorker,
  type Queue as PlainQueue,
} from "plainjob";
import {
  asyncHandler,
  type Handler,
  type Payload,
  type Queue,
  silentLogger,
  type System,
} from "./types.ts";

/** Opens the SQLite driver that plainjob supports on this runtime. */
async function connect(path: string): Promise<Connection> {
  // Variable specifiers keep TypeScript from resolving modules that one runtime lacks.
  if ("Bun" in globalThis) {
    const bunSqlite = "bun:sqlite";
    const { Database } = await import(bunSqlite);
    return bun(new Database(path, { strict: true }));
  }
  const betterSqlite = "better-sqlite3";
  const { default: Database } = await import(betterSqlite);
  return better(new Database(path));
}

class PlainjobQueue implements Queue {
  readonly #queue: PlainQueue;
  #worker: ReturnType<typeof defineWorker> | undefined;
  #loop: Promise<void> | undefined;
  error: Error | undefined;

  constructor(connection: Connection) {
    // defineQueue sets WAL, synchronous = 1 (NORMAL) and a 5 s busy timeout itself.
    this.#queue = defineQueue({ connection, logger: silentLogger });
  }

  enqueue(data: Payload): Promise<void> {
    this.#queue.add("bench", data);
    return Promise.resolve();
  }

  enqueueDelayed(data: Payload, delay: number): Promise<void> {
    this.#queue.add("bench", data, { delay });
    return Promise.resolve();
  }

  enqueueMany(items: Payload[]): Promise<void> {
    this.#queue.addMany("bench", items);
    return Promise.resolve();
  }

  start(_concurrency: number, handler: Handler): Promise<void> {
    // plainjob's worker runs one job at a time and has no concurrency or batch option.
    const run = asyncHandler(handler);
    this.#worker = defineWorker(
      "bench",
      (job) => run(JSON.parse(job.data)),
      {
        queue: this.#queue,
        logger: silentLogger,
      },
    );
    this.#loop = this.#worker.start().catch((error) => {
      this.error = error;
    });
    return Promise.resolve();
  }

  async stop(): Promise<void> {
    await this.#worker?.stop();
    await this.#loop;
  }

  close(): Promise<void> {
    this.#queue.close();
    return Promise.resolve();
  }
}

export const plainjob: System = {
  name: "plainjob",
  async open(path) {
    return new PlainjobQueue(await connect(path));
  },
};
