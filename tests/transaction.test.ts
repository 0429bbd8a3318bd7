import { describe, expect, test } from "bun:test";
import {
  type Database,
  defineDatabaseTask,
  openDatabase,
  perform,
  performDetailed,
  performMany,
} from "../mod.ts";
import type { Transaction } from "@libsql/client";
import { taskRows, useResources, waitFor } from "./helpers.ts";

const sleep = (milliseconds: number) => new Promise((resolve) => setTimeout(resolve, milliseconds));

const { open, start } = useResources();

async function openWithContacts(): Promise<Database> {
  const database = open();
  await database.ready();
  await database.client.execute("CREATE TABLE contacts (email TEXT PRIMARY KEY)");
  return database;
}

async function contacts(database: Database): Promise<string[]> {
  const result = await database.client.execute("SELECT email FROM contacts");
  return result.rows.map((row) => row.email as string);
}

describe("perform() with a transaction", () => {
  test("a rolled-back transaction leaves neither the row nor the task", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    const transaction = await database.client.transaction("write");
    await transaction.execute({
      sql: "INSERT INTO contacts VALUES (?)",
      args: ["ada@example.com"],
    });
    const id = await perform(task, { email: "ada@example.com" }, { transaction });
    await transaction.rollback();

    expect(id).toBeString();
    expect(await contacts(database)).toEqual([]);
    expect(await taskRows(database)).toEqual([]);
  });

  test("a committed task runs, and the runner is woken by the commit", async () => {
    const database = await openWithContacts();
    const seen: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "welcome",
      // Only the commit can wake the runner in time: it never polls during the test.
      pollInterval: "1h",
      process({ data }) {
        seen.push(data);
      },
    });
    await start([task]);

    const transaction = await database.client.transaction("write");
    await transaction.execute({
      sql: "INSERT INTO contacts VALUES (?)",
      args: ["ada@example.com"],
    });
    await perform(task, "ada@example.com", { transaction });
    await sleep(50);
    expect(seen).toEqual([]);
    await transaction.commit();

    await waitFor(() => seen.length === 1);
    expect(seen).toEqual(["ada@example.com"]);
    expect(await contacts(database)).toEqual(["ada@example.com"]);
  });

  test("a rolled-back task never runs", async () => {
    const database = await openWithContacts();
    const seen: unknown[] = [];
    const task = defineDatabaseTask(database, {
      name: "welcome",
      pollInterval: 20,
      process({ data }) {
        seen.push(data);
      },
    });
    await start([task]);

    const transaction = await database.client.transaction("write");
    await perform(task, "rolled back", { transaction });
    await transaction.rollback();
    await perform(task, "committed");

    await waitFor(() => seen.length === 1);
    await sleep(60);
    expect(seen).toEqual(["committed"]);
  });

  test("close() without commit rolls the task back", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    const transaction = await database.client.transaction("write");
    await perform(task, 1, { transaction });
    transaction.close();

    expect(await taskRows(database)).toEqual([]);
  });

  test("a key is checked inside the transaction", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    const transaction = await database.client.transaction("write");
    const first = await performDetailed(task, 1, { key: "k", transaction });
    const second = await performDetailed(task, 2, { key: "k", transaction });
    await transaction.commit();

    expect(first.status).toBe("created");
    expect(second).toEqual({ id: first.id, status: "duplicate" });
    expect(await taskRows(database)).toHaveLength(1);
  });

  test("performMany() inserts inside the transaction", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    const rolledBack = await database.client.transaction("write");
    await performMany(task, [1, 2, 3], { transaction: rolledBack });
    await rolledBack.rollback();
    expect(await taskRows(database)).toEqual([]);

    const committed = await database.client.transaction("write");
    const ids = await performMany(task, [1, 2, 3], { transaction: committed });
    await committed.commit();
    expect((await taskRows(database)).map((row) => row.id)).toEqual(ids);
  });

  test("rejects a closed transaction and writes nothing", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });
    const transaction = await database.client.transaction("write");
    await transaction.commit();

    await expect(perform(task, 1, { transaction })).rejects.toThrow(
      'Invalid perform() option "transaction": the transaction is already committed, rolled back or closed; pass an open one',
    );
    expect(await taskRows(database)).toEqual([]);
  });

  test("rejects another database file and writes nothing", async () => {
    const database = await openWithContacts();
    const other = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });
    const otherFile = String(
      (await other.client.execute("SELECT file FROM pragma_database_list WHERE name = 'main'"))
        .rows[0].file,
    );

    for (
      const enqueue of [
        (transaction: Transaction) => perform(task, 1, { transaction }),
        (transaction: Transaction) => performMany(task, [1, 2], { transaction }),
      ]
    ) {
      const transaction = await other.client.transaction("write");
      await expect(enqueue(transaction)).rejects.toThrow(
        `option "transaction": it is on the database file ${JSON.stringify(otherFile)}, but ` +
          `the task's database is`,
      );
      await transaction.commit();
    }
    expect(await taskRows(database)).toEqual([]);
    expect(await taskRows(other)).toEqual([]);

    // A transaction on the task's own database is accepted, and checked once.
    const own = await database.client.transaction("write");
    await perform(task, 1, { transaction: own });
    await performMany(task, [2, 3], { transaction: own });
    await own.commit();
    expect(await taskRows(database)).toHaveLength(3);
  });

  test("rejects another database before ready() and in memory", async () => {
    const ready = await openWithContacts();
    const notReady = open();
    const task = defineDatabaseTask(notReady, { name: "welcome", process() {} });
    const transaction = await ready.client.transaction("write");
    await expect(perform(task, 1, { transaction })).rejects.toThrow(
      'Invalid perform() option "transaction": it is on the database file',
    );
    transaction.close();
    expect(await taskRows(ready)).toEqual([]);

    const memory = openDatabase(":memory:");
    const otherMemory = openDatabase(":memory:");
    try {
      await memory.ready();
      await otherMemory.ready();
      const inMemory = defineDatabaseTask(memory, { name: "welcome", process() {} });
      const other = await otherMemory.client.transaction("write");
      await expect(perform(inMemory, 1, { transaction: other })).rejects.toThrow(
        'option "transaction": it is on another in-memory database than the task\'s',
      );
      other.close();
      // A second Database on the same client, as drizzle's $client gives, adds its own mark.
      const again = openDatabase(memory.client);
      await again.ready();
      const own = await memory.client.transaction("write");
      await perform(inMemory, 1, { transaction: own });
      await own.commit();
      expect(await taskRows(memory)).toHaveLength(1);
      expect(await taskRows(otherMemory)).toEqual([]);
    } finally {
      memory.close();
      otherMemory.close();
    }
  });

  test("rejects a value that is not a transaction", async () => {
    const database = await openWithContacts();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    // deno-lint-ignore no-explicit-any
    await expect(perform(task, 1, { transaction: database.client as any })).rejects.toThrow(
      'Invalid perform() option "transaction": expected an open @libsql/client Transaction',
    );
  });

  test("before the schema exists, says to call ready() first", async () => {
    const database = open();
    const task = defineDatabaseTask(database, { name: "welcome", process() {} });

    const transaction = await database.client.transaction("write");
    await expect(perform(task, 1, { transaction })).rejects.toThrow(
      "Call `await database.ready()` before opening the transaction",
    );
    await transaction.rollback();
    await database.ready();
    expect(await taskRows(database)).toEqual([]);
  });
});
