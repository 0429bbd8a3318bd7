import { type Client, createClient } from "@libsql/client";
import { openDatabase } from "../../mod.ts";
import { asyncHandler, type Handler, type Payload, type Queue, type System } from "./types.ts";

/*
 * The floor on tasklite's own table: the same unavoidable statements as the floor (insert;
 * claim with UPDATE ... RETURNING; delete), run by the raw libSQL client against the `tasks`
 * table and indexes that tasklite creates. Against the plain floor it shows what the table
 * costs; against tasklite it shows what tasklite's own code costs on top of its table.
 */

const insertOne = `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
  VALUES (?, 'bench', ?, ?, ?, 0, 'pending')`;
const claim = `UPDATE tasks
  SET state = 'running', attempts = attempts + 1, locked_until = ?1, locked_by = ?2
  WHERE rowid IN (
    SELECT rowid FROM tasks WHERE name = 'bench' AND state = 'pending'
    ORDER BY priority DESC, run_at, rowid LIMIT ?3)
  RETURNING id, data`;
const deleteOne = "DELETE FROM tasks WHERE id = ?";
const deleteMany = "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))";
const insertMany = `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
  SELECT value ->> 0, 'bench', value ->> 1, ?1, ?1, 0, 'pending' FROM json_each(?2)`;
const lease = 30_000;

/** Text ids that increase, as tasklite's do, so rows of one batch share index pages. */
let sequence = 0;
const prefix = Date.now().toString(36);
const nextId = () => `${prefix}-${(sequence++).toString().padStart(12, "0")}`;

class FloorTableQueue implements Queue {
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

  async migrate(path: string): Promise<void> {
    // tasklite creates its table, indexes and settings; then its connection is closed.
    const database = openDatabase(`file:${path}`);
    await database.ready();
    database.close();
    await this.#client.execute("PRAGMA synchronous = NORMAL");
  }

  async enqueue(data: Payload): Promise<void> {
    const now = Date.now();
    await this.#client.execute({
      sql: insertOne,
      args: [nextId(), JSON.stringify(data), now, now],
    });
  }

  async enqueueDelayed(data: Payload, delay: number): Promise<void> {
    const now = Date.now();
    await this.#client.execute({
      sql: insertOne,
      args: [nextId(), JSON.stringify(data), now, now + delay],
    });
  }

  async enqueueMany(items: Payload[]): Promise<void> {
    const now = Date.now();
    const chunkSize = 10_000;
    const statements = [];
    for (let start = 0; start < items.length; start += chunkSize) {
      const rows = items.slice(start, start + chunkSize).map((item) => [
        nextId(),
        JSON.stringify(item),
      ]);
      statements.push({ sql: insertMany, args: [now, JSON.stringify(rows)] });
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
      const claimed = await this.#client.execute({
        sql: claim,
        args: [Date.now() + lease, "floor", concurrency],
      });
      if (claimed.rows.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        continue;
      }
      await Promise.all(
        claimed.rows.map((row) => run(JSON.parse(row.data as string))),
      );
      const ids = claimed.rows.map((row) => row.id as string);
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

export const floorTable: System = {
  name: "floor on tasklite's table",
  async open(path) {
    const queue = new FloorTableQueue(path);
    await queue.migrate(path);
    return queue;
  },
};
