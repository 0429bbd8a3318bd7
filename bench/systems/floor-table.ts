import { openDatabase } from "../../mod.ts";
import { FloorQueue, type FloorStatements, lease } from "./floor.ts";
import type { System } from "./types.ts";

/*
 * The floor on tasklite's own table: the same unavoidable statements as the floor (insert;
 * claim with UPDATE ... RETURNING; delete), run by the raw libSQL client against the `tasks`
 * table and indexes that tasklite creates. Against the plain floor it shows what the table
 * costs; against tasklite it shows what tasklite's own code costs on top of its table.
 */

/** Text ids that increase, as tasklite's do, so rows of one batch share index pages. */
let sequence = 0;
const prefix = Date.now().toString(36);
const nextId = () => `${prefix}-${(sequence++).toString().padStart(12, "0")}`;

const statements: FloorStatements = {
  async migrate(client, path) {
    // tasklite creates its table, indexes and settings; then its connection is closed.
    const database = openDatabase(`file:${path}`);
    await database.ready();
    database.close();
    await client.execute("PRAGMA synchronous = NORMAL");
  },
  insertOne: (data, runAt) => ({
    sql: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
      VALUES (?, 'bench', ?, ?, ?, 0, 'pending')`,
    args: [nextId(), JSON.stringify(data), Date.now(), runAt],
  }),
  insertMany(items, now) {
    const chunkSize = 10_000;
    const statements = [];
    for (let start = 0; start < items.length; start += chunkSize) {
      const rows = items.slice(start, start + chunkSize).map((item) => [
        nextId(),
        JSON.stringify(item),
      ]);
      statements.push({
        sql: `INSERT INTO tasks (id, name, data, created, run_at, priority, state)
          SELECT value ->> 0, 'bench', value ->> 1, ?1, ?1, 0, 'pending' FROM json_each(?2)`,
        args: [now, JSON.stringify(rows)],
      });
    }
    return statements;
  },
  claim: (now, limit) => ({
    sql: `UPDATE tasks
      SET state = 'running', attempts = attempts + 1, locked_until = ?1, locked_by = ?2
      WHERE rowid IN (
        SELECT rowid FROM tasks WHERE name = 'bench' AND state = 'pending'
        ORDER BY priority DESC, run_at, rowid LIMIT ?3)
      RETURNING id, data`,
    args: [now + lease, "floor", limit],
  }),
  data: (row) => JSON.parse(row.data as string),
  id: (row) => row.id as string,
  deleteOne: "DELETE FROM tasks WHERE id = ?",
  deleteMany: "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
};

export const floorTable: System = {
  name: "floor on tasklite's table",
  async open(path) {
    const queue = new FloorQueue(path, statements);
    await queue.migrate(path);
    return queue;
  },
};
