import { type Client, createClient, type InStatement, type Row } from "@libsql/client";
import { asyncHandler, type Handler, type Payload, type Queue, type System } from "./types.ts";

/**
 * The floor: the libSQL client running only the statements that any queue on this driver
 * needs, on the smallest table that can hold a queue. A queue that adds nothing costs this much.
 */
export const floorSchema = [
  "CREATE TABLE IF NOT EXISTS floor_tasks (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, run_at INTEGER NOT NULL)",
  "CREATE INDEX IF NOT EXISTS floor_tasks_run_at ON floor_tasks (run_at)",
];

/** How long a claim keeps other claims off a row, in milliseconds. */
export const lease = 30_000;

/** The statements of a raw queue on one table: what a floor row runs. */
export interface FloorStatements {
  /** Creates the table and sets the connection up. */
  migrate(client: Client, path: string): Promise<void>;
  insertOne(data: Payload, runAt: number): InStatement;
  /** One or more statements that insert `items`, due now, in one transaction. */
  insertMany(items: Payload[], now: number): InStatement[];
  /** Claims up to `limit` due rows and returns each row's id and data. */
  claim(now: number, limit: number): InStatement;
  /** The data of a row that `claim` returned. */
  data(row: Row): Payload;
  /** The id of a row that `claim` returned. */
  id(row: Row): number | string;
  deleteOne: string;
  /** Deletes the rows whose ids are in the JSON array of its one argument. */
  deleteMany: string;
}

/** A queue of raw statements: claim, run the handlers, delete, repeat. */
export class FloorQueue implements Queue {
  readonly #client: Client;
  readonly #statements: FloorStatements;
  #running = false;
  #loop: Promise<void> | undefined;
  error: Error | undefined;

  constructor(path: string, statements: FloorStatements) {
    this.#client = createClient({
      url: `file:${path}`,
      timeout: 5_000,
      concurrency: 1,
    });
    this.#statements = statements;
  }

  migrate(path: string): Promise<void> {
    return this.#statements.migrate(this.#client, path);
  }

  async enqueue(data: Payload): Promise<void> {
    await this.#client.execute(this.#statements.insertOne(data, Date.now()));
  }

  async enqueueDelayed(data: Payload, delay: number): Promise<void> {
    await this.#client.execute(
      this.#statements.insertOne(data, Date.now() + delay),
    );
  }

  async enqueueMany(items: Payload[]): Promise<void> {
    const statements = this.#statements.insertMany(items, Date.now());
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
    const statements = this.#statements;
    while (this.#running) {
      const claimed = await this.#client.execute(
        statements.claim(Date.now(), concurrency),
      );
      if (claimed.rows.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        continue;
      }
      await Promise.all(claimed.rows.map((row) => run(statements.data(row))));
      const ids = claimed.rows.map((row) => statements.id(row));
      if (ids.length === 1) {
        await this.#client.execute({ sql: statements.deleteOne, args: ids });
      } else {
        await this.#client.execute({
          sql: statements.deleteMany,
          args: [JSON.stringify(ids)],
        });
      }
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

/** One multi-row INSERT for up to `rows` rows: a VALUES list of that length. */
function insertValues(rows: number): string {
  return `INSERT INTO floor_tasks (payload, run_at) VALUES ${"(?, ?), ".repeat(rows - 1)}(?, ?)`;
}

const floorStatements: FloorStatements = {
  async migrate(client) {
    await client.execute("PRAGMA journal_mode = WAL");
    await client.execute("PRAGMA synchronous = NORMAL");
    await client.batch(floorSchema, "write");
  },
  insertOne: (data, runAt) => ({
    sql: "INSERT INTO floor_tasks (payload, run_at) VALUES (?, ?)",
    args: [JSON.stringify(data), runAt],
  }),
  insertMany(items, now) {
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
    return statements;
  },
  // The claim moves each taken row's run_at past the lease, so no other claim takes it meanwhile.
  claim: (now, limit) => ({
    sql: `UPDATE floor_tasks SET run_at = ?1
      WHERE id IN (SELECT id FROM floor_tasks WHERE run_at <= ?2 ORDER BY run_at LIMIT ?3)
      RETURNING id, payload`,
    args: [now + lease, now, limit],
  }),
  data: (row) => JSON.parse(row.payload as string),
  id: (row) => row.id as number,
  deleteOne: "DELETE FROM floor_tasks WHERE id = ?",
  deleteMany: "DELETE FROM floor_tasks WHERE id IN (SELECT value FROM json_each(?))",
};

export const floor: System = {
  name: "floor (raw @libsql/client)",
  async open(path) {
    const queue = new FloorQueue(path, floorStatements);
    await queue.migrate(path);
    return queue;
  },
};
