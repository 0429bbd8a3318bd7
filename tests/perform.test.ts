import { describe, expect, test } from "bun:test";
import * as v from "valibot";
import { defineDatabaseTask, openDatabase, perform, performMany, TaskDataError } from "../mod.ts";
import { taskRows, temporaryDatabaseUrl } from "./helpers.ts";

function setup(now?: () => number) {
  const database = openDatabase(temporaryDatabaseUrl(), now ? { now } : {});
  const task = defineDatabaseTask<unknown>(database, { name: "mail", process() {} });
  const contact = defineDatabaseTask(database, {
    name: "contact",
    schema: v.object({ email: v.pipe(v.string(), v.email()), age: v.optional(v.number()) }),
    process() {},
  });
  return { database, task, contact };
}

describe("perform()", () => {
  test("writes a pending row and resolves to its id", async () => {
    const { database, task } = setup(() => 1_700_000_000_000);
    const id = await perform(task, { to: "ada@example.com" });

    const rows = await taskRows(database);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      id,
      name: "mail",
      data: '{"to":"ada@example.com"}',
      created: 1_700_000_000_000,
      run_at: 1_700_000_000_000,
      state: "pending",
      attempts: 0,
      failed_nr: 0,
      priority: 0,
      locked_by: null,
      locked_until: null,
    });
    database.close();
  });

  test("ids are unique UUIDs that sort by creation time", async () => {
    let time = 1_000;
    const { database, task } = setup(() => time);
    const ids: string[] = [];
    for (let index = 0; index < 50; index++) {
      time += 1;
      ids.push(await perform(task, index));
    }
    expect(new Set(ids).size).toBe(50);
    expect([...ids].sort()).toEqual(ids);
    for (const id of ids) {
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    }
    database.close();
  });

  test("stores undefined as SQL NULL and null as JSON null", async () => {
    const { database, task } = setup();
    await perform(task, undefined);
    await perform(task, null);
    const rows = await taskRows(database);
    expect(rows.map((row) => row.data)).toEqual([null, "null"]);
    database.close();
  });

  test("delay sets run_at in the future", async () => {
    const { database, task } = setup(() => 10_000);
    await perform(task, 1, { delay: "1.5s" });
    await perform(task, 2, { delay: 250 });
    const rows = await taskRows(database);
    expect(rows.map((row) => row.run_at)).toEqual([11_500, 10_250]);
    database.close();
  });

  test("runAt accepts a Date and milliseconds", async () => {
    const { database, task } = setup(() => 10_000);
    await perform(task, 1, { runAt: new Date(50_000) });
    await perform(task, 2, { runAt: 60_000 });
    const rows = await taskRows(database);
    expect(rows.map((row) => row.run_at)).toEqual([50_000, 60_000]);
    database.close();
  });

  test("priority is stored", async () => {
    const { database, task } = setup();
    await perform(task, 1, { priority: 7 });
    await perform(task, 2, { priority: -3 });
    const rows = await taskRows(database);
    expect(rows.map((row) => row.priority)).toEqual([7, -3]);
    database.close();
  });

  test("concurrent performs each get their own committed row", async () => {
    const { database, task } = setup();
    const ids = await Promise.all(Array.from({ length: 200 }, (_, index) => perform(task, index)));
    expect(new Set(ids).size).toBe(200);
    const rows = await taskRows(database);
    expect(rows.map((row) => row.id).sort()).toEqual([...ids].sort());
    expect(rows.map((row) => JSON.parse(row.data as string)).sort((a, b) => a - b)).toEqual(
      Array.from({ length: 200 }, (_, index) => index),
    );
    database.close();
  });

  test("rejects data that fails the schema with every issue, and writes nothing", async () => {
    const { database, contact } = setup();
    // deno-lint-ignore no-explicit-any
    const promise = perform(contact, { email: "not-an-email", age: "old" } as any);
    await expect(promise).rejects.toBeInstanceOf(TaskDataError);
    await expect(promise).rejects.toBeInstanceOf(v.ValiError);
    const error = await promise.catch((error) => error as TaskDataError);
    expect(error.message).toStartWith('Invalid data for task "contact": data.email: Invalid email');
    expect(error.message).toContain('data.age: Invalid type: Expected number but received "old"');
    expect(error.issues).toHaveLength(2);
    expect(error.task).toBe("contact");
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("accepts data that passes the schema", async () => {
    const { database, contact } = setup();
    await perform(contact, { email: "ada@example.com" });
    expect(await taskRows(database)).toHaveLength(1);
    database.close();
  });

  const circular: Record<string, unknown> = { name: "loop" };
  circular.self = circular;
  class Point {
    constructor(readonly x: number) {}
  }

  const badData: Array<[string, unknown, string]> = [
    [
      "undefined inside an object",
      { to: "x", cc: undefined },
      "data.cc is undefined, which JSON drops; omit the property or use null",
    ],
    ["undefined inside an array", [1, undefined], "data[1] is undefined"],
    ["an empty array slot", [1, , 3], "data[1] is an empty array slot"],
    [
      "NaN",
      { count: Number.NaN },
      "data.count is NaN, which JSON stores as null; use a finite number or null",
    ],
    ["Infinity", [Infinity], "data[0] is Infinity"],
    [
      "a BigInt",
      { big: 10n },
      "data.big is a BigInt, which JSON cannot store; convert it to a string or a number",
    ],
    ["a function", { run() {} }, "data.run is a function"],
    ["a symbol", Symbol("s"), "data is a symbol"],
    [
      "a circular structure",
      circular,
      "data.self refers back to one of its parents (a circular structure)",
    ],
    [
      "a Date",
      { when: new Date(0) },
      "data.when is a Date, which JSON turns into a string; pass date.toISOString() or date.getTime()",
    ],
    [
      "a Map",
      { lookup: new Map() },
      "data.lookup is a Map, which JSON cannot store without losing its type",
    ],
    ["a class instance", { at: new Point(1) }, "data.at is a Point"],
    [
      "a key that is not an identifier",
      { "first name": undefined },
      'data["first name"] is undefined',
    ],
    [
      "a problem deep in arrays and objects, after valid siblings",
      { ok: [1, { fine: "x" }], list: [{ a: 1 }, { "b c": [0, 10n] }] },
      'data.list[1]["b c"][1] is a BigInt',
    ],
  ];

  test.each(badData)("rejects %s and writes nothing", async (_, data, message) => {
    const { database, task } = setup();
    const promise = perform(task, data);
    await expect(promise).rejects.toBeInstanceOf(TypeError);
    await expect(promise).rejects.toThrow(`Invalid data for task "mail": ${message}`);
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("rejects data nested more than 1000 levels deep", async () => {
    const { database, task } = setup();
    let deep: unknown = 1;
    for (let level = 0; level < 20_000; level++) deep = [deep];
    await expect(perform(task, deep)).rejects.toThrow("is nested more than 1000 levels deep");
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("accepts repeated references that are not circular", async () => {
    const { database, task } = setup();
    const shared = { a: 1 };
    await perform(task, { first: shared, second: shared });
    expect((await taskRows(database))[0].data).toBe('{"first":{"a":1},"second":{"a":1}}');
    database.close();
  });

  const badOptions: Array<[string, unknown, typeof TypeError, string]> = [
    [
      "a negative delay",
      { delay: -5 },
      RangeError,
      'Invalid perform() option "delay": expected a duration from 0 ms to 100 years',
    ],
    [
      "a delay beyond 100 years",
      { delay: 1e300 },
      RangeError,
      'Invalid perform() option "delay": expected a duration from 0 ms to 100 years (milliseconds or a string such as "500ms", "30s", "5m", "1h" or "2d"), received 1e+300',
    ],
    ["an infinite delay", { delay: Infinity }, RangeError, "from 0 ms to 100 years"],
    ["a delay string beyond 100 years", { delay: "99999999999d" }, RangeError, "to 100 years"],
    [
      "a runAt before 1970",
      { runAt: -1 },
      RangeError,
      'option "runAt": expected a valid Date or a whole number of milliseconds since the epoch, from 1970 to the year 275760 (the last valid Date), received -1',
    ],
    [
      "a runAt beyond the range of Date",
      { runAt: 8.64e15 + 1 },
      RangeError,
      "from 1970 to the year 275760",
    ],
    [
      "a key with a lone surrogate",
      { key: "a\uD800" },
      TypeError,
      'option "key": expected well-formed text, without a lone surrogate',
    ],
    [
      "a key with a NUL character",
      { key: "order\u0000A" },
      TypeError,
      'option "key": expected a string without NUL characters (\\u0000), received "order\\u0000A"',
    ],
    ["a malformed delay", { delay: "10 minutes" }, TypeError, 'received "10 minutes"'],
    [
      "an invalid Date",
      { runAt: new Date("nope") },
      TypeError,
      'Invalid perform() option "runAt": expected a Date or milliseconds since the epoch, received a Date (Invalid Date)',
    ],
    [
      "a runAt string",
      { runAt: "2030-01-01" },
      TypeError,
      'option "runAt": expected a Date or milliseconds since the epoch, received "2030-01-01"',
    ],
    [
      "a fractional priority",
      { priority: 1.5 },
      RangeError,
      'option "priority": expected an integer from -1000000 to 1000000, received 1.5',
    ],
    [
      "both delay and runAt",
      { delay: 5, runAt: 10 },
      TypeError,
      'pass either "delay" or "runAt", not both',
    ],
    ["an unknown option", { dealy: 5 }, TypeError, 'Unknown perform() option "dealy"'],
  ];

  test.each(badOptions)(
    "rejects %s and writes nothing",
    async (_, options, errorClass, message) => {
      const { database, task } = setup();
      // deno-lint-ignore no-explicit-any
      const promise = perform(task, 1, options as any);
      await expect(promise).rejects.toBeInstanceOf(errorClass);
      await expect(promise).rejects.toThrow(message);
      expect(await taskRows(database)).toEqual([]);
      database.close();
    },
  );

  test("rejects a value that is not a task", async () => {
    // deno-lint-ignore no-explicit-any
    await expect(perform({ name: "mail" } as any, 1)).rejects.toThrow(
      "Invalid task for perform(): expected the result of defineDatabaseTask(), received an object",
    );
  });

  test("rejects when the write fails instead of swallowing the error", async () => {
    const { database, task } = setup();
    await database.ready();
    await database.client.execute(
      "CREATE TRIGGER refuse BEFORE INSERT ON tasks BEGIN SELECT raise(ABORT, 'disk says no'); END",
    );
    await expect(perform(task, 1)).rejects.toThrow("disk says no");
    database.close();
  });
});

describe("performMany()", () => {
  test("writes every item in order and resolves to their ids", async () => {
    const { database, task } = setup();
    const ids = await performMany(task, ["a", "b", "c"], { priority: 2, delay: "1m" });
    const rows = await taskRows(database);
    expect(rows.map((row) => row.id)).toEqual(ids);
    expect(rows.map((row) => row.data)).toEqual(['"a"', '"b"', '"c"']);
    expect(new Set(rows.map((row) => row.priority))).toEqual(new Set([2]));
    database.close();
  });

  test("writes 25,000 items in one call", async () => {
    const { database, task } = setup();
    const ids = await performMany(task, Array.from({ length: 25_000 }, (_, index) => ({ index })));
    expect(new Set(ids).size).toBe(25_000);
    const count = await database.client.execute("SELECT count(*) AS n FROM tasks");
    expect(count.rows[0].n).toBe(25_000);
    database.close();
  });

  test("resolves to an empty list for no items", async () => {
    const { database, task } = setup();
    expect(await performMany(task, [])).toEqual([]);
    database.close();
  });

  test("writes nothing when one item fails the schema, and names its index", async () => {
    const { database, contact } = setup();
    const promise = performMany(contact, [
      { email: "ada@example.com" },
      { email: "alan@example.com" },
      { email: "broken" },
    ]);
    await expect(promise).rejects.toThrow(
      'Invalid data for task "contact": items[2].email: Invalid email',
    );
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("writes nothing when one item is not JSON-serialisable", async () => {
    const { database, task } = setup();
    await expect(performMany(task, [{ ok: 1 }, { bad: Number.NaN }])).rejects.toThrow(
      'Invalid data for task "mail": items[1].bad is NaN',
    );
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("rejects an empty slot in items", async () => {
    const { database, task } = setup();
    // deno-lint-ignore no-sparse-arrays
    await expect(performMany(task, [1, , 3])).rejects.toThrow(
      'Invalid data for task "mail": items[1] is an empty array slot',
    );
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });

  test("rejects items that are not an array", async () => {
    const { database, task } = setup();
    // deno-lint-ignore no-explicit-any
    await expect(performMany(task, "abc" as any)).rejects.toThrow(
      'Invalid items for performMany(): expected an array, received "abc"',
    );
    database.close();
  });

  test("names performMany() in an option error and writes nothing", async () => {
    const { database, task } = setup();
    await expect(performMany(task, [1, 2], { delay: -5 })).rejects.toThrow(
      'Invalid performMany() option "delay": expected a duration from 0 ms to 100 years',
    );
    expect(await taskRows(database)).toEqual([]);
    database.close();
  });
});
