import { type Client, createClient } from "@libsql/client";
import { asyncHandler, type Handler, type Payload, type Queue, type System } from "./types.ts";

/**
 * The floor: the libSQL client running only the statements that any queue on this driver
 * needs, on the smallest table that can hold a queue. A queue that adds nothing costs this much.
 */
export const floorSchema = [
  "CREATE TABLE IF NOT EXISTS floor_tasks (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, run_at INTEGER NOT NULL)",
  "CREATE INDEX IF NOT EXISTS floor_tasks_run_at ON floor_tasks (run_at)",
];

const insertOne = "INSERT INTO floor_tasks (payload, run_at) VALUES (?, ?)";
// The claim moves each taken row's run_at past the lease, so no other claim takes it meanwhile.
const claim = `UPDATE floor_tasks SET run_at = ?1
  WHERE id IN (SELECT id FROM floor_tasks WHERE run_at <= ?2 ORDER BY run_at LIMIT ?3)
  RETURNING id, payload`;
const deleteOne = "DELETE FROM floor_tasks WHERE id = ?";
const deleteMany = "DELETE FROM floor_tasks WHERE id IN (SELECT value FROM json_each(?))";
const lease = 30_000;

/** One multi-row INSERT for up to `rows` rows: a VALUES list of that length. */
function insertValues(rows: number): string {
  return `INSERT INTO floor_tasks (payload, run_at) VALUES ${"(?, ?), ".repeat(rows - 1)}(?, ?)`;
}

class FloorQueue implements Queue {
  readonly #client: Client;
  #running = false;
  #loop: Promise<void> | undefined;
  error: Error | undefined;

  constructor(path: string) {
    this.#client = createClient({
      url: `file:${path}`,
      timeout: 5_000,
      concurrency: 1,
    });
  }

  async migrate(): Promise<void> {
    await this.#client.execute("PRAGMA journal_mode = WAL");
    await this.#client.execute("PRAGMA synchronous = NORMAL");
    await this.#client.batch(floorSchema, "write");
  }

  async enqueue(data: Payload): Promise<void> {
    await this.#client.execute({
      sql: insertOne,
      args: [JSON.stringify(data), Date.now()],
    });
  }

  async enqueueDelayed(data: Payload, delay: number): Promise<void> {
    await this.#client.execute({
      sql: insertOne,
      args: [JSON.stringify(data), Date.now() + delay],
    });
  }

  async enqueueMany(items: Payload[]): Promise<void> {
    const now = Date.now();
    // 10,000 rows use 20,000 parameters, below SQLite's default limit of 32,766.
    const chunkSize = 10_000;
    const statements = [];
    for (let start = 0; start < items.length; start += chunkSize) {
      const chunk = items.slice(start, start + chunkSize);
      statements.push({
        sql: insertValues(chunk.length),
        args: chunk.flatMap((item) => [JSON.stringify(item), now]),
      });
    }
    if (statements.length === 1) await this.#client.execute(statements[0]);
    else await this.#client.batch(statements, "write");
  }

  start(concurrency: number, handler: Handler): Promise<void> {
    this.#running = true;
    this.#loop = this.#drain(concurrency, handler).catch((error) => {
      this.error = error;
    });
    return Promise.resolve();
  }

  async #drain(concurrency: number, handler: Handler): Promise<void> {
    const run = asyncHandler(handler);
    while (this.#running) {
      const now = Date.now();
      const claimed = await this.#client.execute({
        sql: claim,
        args: [now + lease, now, concurrency],
      });
      if (claimed.rows.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        continue;
      }
      await Promise.all(
        claimed.rows.map((row) => run(JSON.parse(row.payload as string))),
      );
      const ids = claimed.rows.map((row) => row.id as number);
      if (ids.length === 1) {
        await this.#client.execute({ sql: deleteOne, args: ids });
      } else {await this.#client.execute({
          sql: deleteMany,
          args: [JSON.stringify(ids)],
        });}
    }
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#loop;
  }

  close(): Promise<void> {
    this.#client.close();
    return Promise.resolve();
  }
}

export const floor: System = {
  name: "floor (raw @libsql/client)",
  async open(path) {
    const queue = new FloorQueue(path);
    await queue.migrate();
    return queue;
  },
};
