import { describe, expect, test } from "bun:test";
import { type Client, createClient } from "@libsql/client";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import * as v from "valibot";
import {
  type Database,
  defineDatabaseTask,
  listSchedules,
  openDatabase,
  perform,
  runTasks,
  schedule,
  type ScheduleOptions,
  type Task,
  TaskDataError,
  unschedule,
} from "../mod.ts";
import { captureLogger, taskRows, temporaryDatabaseUrl, useResources, waitFor } from "./helpers.ts";
import { dstCases, type DstResult, runDstCase } from "./fixtures/dst-matrix.ts";

const { open: openTracked, start, keep } = useResources();

/** A clock that tests move by hand. */
interface Clock {
  now: number;
}

function clockAt(iso: string): Clock {
  return { now: Date.parse(iso) };
}

function open(clock: Clock, url: string | Client = temporaryDatabaseUrl()): Database {
  return openTracked(url, { now: () => clock.now });
}

async function storedSchedules(database: Database): Promise<Array<Record<string, unknown>>> {
  await database.ready();
  const result = await database.client.execute("SELECT * FROM schedules ORDER BY name");
  return result.rows.map((row) => ({ ...row }));
}

const isoList = (items: Array<{ scheduledFor: Date }>) =>
  items.map((item) => item.scheduledFor.toISOString());

/** A promise with its resolve function, to hold a run until the test releases it. */
function gate(): { promise: Promise<void>; release: () => void } {
  let release!: () => void;
  const promise = new Promise<void>((resolve) => (release = resolve));
  return { promise, release };
}

/**
 * A task that records each run's tick and blocks every run until `release()`, so a test can
 * keep a run `running` and the next one `pending` (with `batchSize: 1`).
 */
function heldTask(database: Database, name = "held") {
  const started: Array<string | undefined> = [];
  let held = gate();
  const task = defineDatabaseTask<string | undefined>(database, {
    name,
    batchSize: 1,
    async process({ scheduledFor }) {
      started.push(scheduledFor?.toISOString());
      await held.promise;
    },
  });
  return {
    task,
    started,
    release() {
      held.release();
      held = gate();
    },
  };
}

/**
 * Registers a minutely schedule of a held task, starts a runner and runs the 08:00 tick, whose
 * run stays `running` until `release()`.
 */
async function firstTickRunning(options?: ScheduleOptions) {
  const clock = clockAt("2026-01-05T07:59:30Z");
  const database = open(clock);
  const held = heldTask(database);
  await schedule(held.task, "* * * * *", undefined, options);
  const logger = captureLogger();
  const runner = await start([held.task], { logger });

  clock.now = Date.parse("2026-01-05T08:00:00Z");
  const first = await runner.scheduler.runOnce();
  await waitFor(() => held.started.length === 1);
  return { ...held, clock, database, logger, runner, first };
}

describe("schedule()", () => {
  test("stores the schedule and returns a handle", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask<{ format: string }>(database, {
      name: "report",
      process() {},
    });

    const handle = await schedule(report, "0 9 * * 1-5", { format: "pdf" }, {
      name: "weekday-report",
      timezone: "Europe/Berlin",
    });

    expect(handle.name).toBe("weekday-report");
    expect(handle.task).toBe("report");
    expect(handle.pattern).toBe("0 9 * * 1-5");
    expect(handle.timezone).toBe("Europe/Berlin");
    // Monday 5 January 2026, 09:00 CET is 08:00 UTC.
    expect(handle.nextRun()?.toISOString()).toBe("2026-01-05T08:00:00.000Z");
    expect(await listSchedules(database)).toEqual([{
      name: "weekday-report",
      task: "report",
      pattern: "0 9 * * 1-5",
      timezone: "Europe/Berlin",
      data: { format: "pdf" },
      catchUp: "none",
      overlap: true,
      lastFiredAt: null,
      nextFireAt: new Date("2026-01-05T08:00:00Z"),
      fromDefinition: false,
    }]);
  });

  test("nextRun() steps through the pattern in its time zone", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    const handle = await schedule(report, "0 9 * * 1-5", undefined, {
      timezone: "America/New_York",
    });

    // 09:00 EST is 14:00 UTC; Friday 9 January is followed by Monday 12 January.
    expect(handle.nextRun()?.toISOString()).toBe("2026-01-05T14:00:00.000Z");
    expect(handle.nextRun(new Date("2026-01-05T14:00:00Z"))?.toISOString()).toBe(
      "2026-01-06T14:00:00.000Z",
    );
    expect(handle.nextRun(Date.parse("2026-01-09T14:00:00Z"))?.toISOString()).toBe(
      "2026-01-12T14:00:00.000Z",
    );
    // 9 March is after the spring-forward change: 09:00 EDT is 13:00 UTC.
    expect(handle.nextRun(Date.parse("2026-03-08T12:00:00Z"))?.toISOString()).toBe(
      "2026-03-09T13:00:00.000Z",
    );
  });

  test("defaults the name to the task's name and the time zone to UTC", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const report = defineDatabaseTask(database, { name: "report", process() {} });

    const handle = await schedule(report, "0 3 * * *");

    expect(handle.name).toBe("report");
    expect(handle.timezone).toBe("UTC");
    expect(handle.nextRun()?.toISOString()).toBe("2026-01-06T03:00:00.000Z");
    const [stored] = await storedSchedules(database);
    expect(stored).toMatchObject({ name: "report", task: "report", timezone: "UTC", data: null });
  });

  test("registering the same schedule again changes nothing", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await schedule(report, "0 3 * * *", { format: "pdf" }, { catchUp: "all", maxCatchUp: 5 });
    const before = await storedSchedules(database);

    clock.now += 3_600_000;
    await schedule(report, "0 3 * * *", { format: "pdf" }, { catchUp: "all", maxCatchUp: 5 });

    const after = await storedSchedules(database);
    expect(after).toEqual(before);
    expect(after[0].revision).toBe(1);
    expect(after[0].updated).toBe(Date.parse("2026-01-05T07:30:00Z"));
  });

  test("a changed pattern replaces the schedule and deletes its pending run", async () => {
    const { clock, database, task, started, release, runner } = await firstTickRunning();
    clock.now = Date.parse("2026-01-05T08:01:00Z");
    const [pending] = await runner.scheduler.runOnce();
    expect((await taskRows(database)).map((row) => [row.id, row.state])).toContainEqual([
      pending.id,
      "pending",
    ]);

    await schedule(task, "*/5 * * * *");

    // The running run stays; the pending one of the old pattern is gone.
    const rows = await taskRows(database);
    expect(rows.map((row) => row.state)).toEqual(["running"]);
    expect(rows[0].scheduled_for).toBe(Date.parse("2026-01-05T08:00:00Z"));
    const [stored] = await storedSchedules(database);
    expect(stored).toMatchObject({ pattern: "*/5 * * * *", revision: 2 });

    // Ticks of the new pattern count from the replacement at 08:01, so 08:05 is next.
    clock.now = Date.parse("2026-01-05T08:04:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);
    clock.now = Date.parse("2026-01-05T08:05:00Z");
    expect(isoList(await runner.scheduler.runOnce())).toEqual(["2026-01-05T08:05:00.000Z"]);
    release();
    await waitFor(() => started.length === 2);
    expect(started).toEqual(["2026-01-05T08:00:00.000Z", "2026-01-05T08:05:00.000Z"]);
    release();
  });

  test("changed data replaces the stored schedule", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const report = defineDatabaseTask<{ format: string }>(database, {
      name: "report",
      process() {},
    });
    await schedule(report, "0 3 * * *", { format: "pdf" });

    await schedule(report, "0 3 * * *", { format: "csv" });

    const [stored] = await storedSchedules(database);
    expect(stored).toMatchObject({ data: '{"format":"csv"}', revision: 2 });
  });

  test("handle stop() pauses enqueueing in this process", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    const handle = await schedule(report, "0 * * * *");
    const runner = await start([report]);

    handle.stop();
    clock.now = Date.parse("2026-01-05T08:00:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);
    expect(await listSchedules(database)).toHaveLength(1);

    await schedule(report, "0 * * * *");
    clock.now = Date.parse("2026-01-05T09:00:00Z");
    expect(isoList(await runner.scheduler.runOnce())).toEqual(["2026-01-05T09:00:00.000Z"]);
  });
});

describe("unschedule()", () => {
  test("removes the schedule and its pending run, and keeps the running one", async () => {
    const { clock, database, started, release, runner } = await firstTickRunning({
      name: "minutely",
    });
    clock.now = Date.parse("2026-01-05T08:01:00Z");
    await runner.scheduler.runOnce();

    expect(await unschedule(database, "minutely")).toBe(true);

    expect((await taskRows(database)).map((row) => row.state)).toEqual(["running"]);
    expect(await listSchedules(database)).toEqual([]);
    clock.now = Date.parse("2026-01-05T08:02:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);
    release();
    await waitFor(async () => (await taskRows(database)).length === 0);
    expect(started).toEqual(["2026-01-05T08:00:00.000Z"]);
  });

  test("returns false for a name that is not stored", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    expect(await unschedule(database, "missing")).toBe(false);
  });

  test("rejects a name that is not a string", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    // deno-lint-ignore no-explicit-any
    await expect(unschedule(database, 42 as any)).rejects.toThrow(
      "Invalid schedule name for unschedule(): expected a string, received 42",
    );
  });
});

describe("scheduler", () => {
  test("enqueues a due tick once and passes it as scheduledFor", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const seen: Array<{ data: unknown; scheduledFor: Date | undefined; id: string }> = [];
    const report = defineDatabaseTask<{ format: string }>(database, {
      name: "report",
      process({ data, scheduledFor, id }) {
        seen.push({ data, scheduledFor, id });
      },
    });
    await schedule(report, "0 8 * * *", { format: "pdf" });
    const runner = await start([report]);

    clock.now = Date.parse("2026-01-05T08:00:00Z") - 1;
    expect(await runner.scheduler.runOnce()).toEqual([]);
    clock.now += 1;
    const occurrences = await runner.scheduler.runOnce();
    expect(occurrences).toEqual([{
      schedule: "report",
      task: "report",
      id: expect.any(String),
      scheduledFor: new Date("2026-01-05T08:00:00Z"),
    }]);
    expect(await runner.scheduler.runOnce()).toEqual([]);

    await waitFor(() => seen.length === 1);
    expect(seen[0]).toEqual({
      data: { format: "pdf" },
      scheduledFor: new Date("2026-01-05T08:00:00Z"),
      id: occurrences[0].id,
    });
    const [info] = await listSchedules(database);
    expect(info.lastFiredAt).toEqual(new Date("2026-01-05T08:00:00Z"));
    expect(info.nextFireAt).toEqual(new Date("2026-01-06T08:00:00Z"));
  });

  test("stores the run's key as the schedule name and the tick", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const { task, release } = heldTask(database);
    await schedule(task, "0 8 * * *", undefined, { name: "morning" });
    const runner = await start([task]);
    clock.now = Date.parse("2026-01-05T08:00:00Z");
    await runner.scheduler.runOnce();

    const [row] = await taskRows(database);
    expect(row).toMatchObject({
      name: "held",
      key: "morning@2026-01-05T08:00:00.000Z",
      schedule: "morning",
      scheduled_for: Date.parse("2026-01-05T08:00:00Z"),
      run_at: Date.parse("2026-01-05T08:00:00Z"),
    });
    release();
  });

  test("a run enqueued by perform() has no scheduledFor", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const seen: Array<Date | undefined> = [new Date(0)];
    const task = defineDatabaseTask(database, {
      name: "plain",
      process({ scheduledFor }) {
        seen[0] = scheduledFor;
      },
    });
    await perform(task, null);
    await start([task]);
    await waitFor(() => seen[0] === undefined);
  });

  test("a retried run keeps its scheduledFor", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const attempts: Array<[number, string | undefined]> = [];
    const task = defineDatabaseTask(database, {
      name: "flaky",
      backoff: 0,
      process({ attempt, scheduledFor }) {
        attempts.push([attempt, scheduledFor?.toISOString()]);
        if (attempt === 1) throw new Error("first attempt fails");
      },
    });
    await schedule(task, "0 8 * * *");
    const runner = await start([task]);
    clock.now = Date.parse("2026-01-05T08:00:00Z");
    await runner.scheduler.runOnce();

    await waitFor(() => attempts.length === 2);
    expect(attempts).toEqual([
      [1, "2026-01-05T08:00:00.000Z"],
      [2, "2026-01-05T08:00:00.000Z"],
    ]);
  });

  test("enqueues by timer a schedule stored after start", async () => {
    const database = openDatabase(temporaryDatabaseUrl());
    keep(database);
    const runs: Array<{ scheduledFor: number; startedAt: number }> = [];
    const task = defineDatabaseTask(database, {
      name: "every-second",
      process({ scheduledFor }) {
        runs.push({ scheduledFor: scheduledFor!.getTime(), startedAt: Date.now() });
      },
    });
    await start([task]);
    await schedule(task, "* * * * * *");

    await waitFor(() => runs.length >= 2, { timeout: 4_000 });
    expect(runs[0].scheduledFor % 1_000).toBe(0);
    expect(runs[1].scheduledFor - runs[0].scheduledFor).toBe(1_000);
    // A run starts at or after its tick, not before.
    expect(runs[0].startedAt).toBeGreaterThanOrEqual(runs[0].scheduledFor);
    expect(runs[0].startedAt - runs[0].scheduledFor).toBeLessThan(1_000);
  });

  test("stop() of the runner stops the scheduler", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await schedule(report, "0 8 * * *");
    const runner = await start([report]);
    await runner.stop();

    clock.now = Date.parse("2026-01-05T08:00:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);
    expect(await taskRows(database)).toEqual([]);
  });

  test("an unparsable stored schedule is skipped and logged once", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await schedule(report, "0 8 * * *", undefined, { name: "broken" });
    await schedule(report, "0 8 * * *", undefined, { name: "working" });
    await database.client.execute(
      "UPDATE schedules SET pattern = '99 * * * *' WHERE name = 'broken'",
    );
    const logger = captureLogger();
    const runner = await start([report], { logger });

    clock.now = Date.parse("2026-01-05T08:00:00Z");
    const occurrences = await runner.scheduler.runOnce();
    await runner.scheduler.runOnce();

    expect(occurrences.map((occurrence) => occurrence.schedule)).toEqual(["working"]);
    const errors = logger.messages("error");
    expect(errors).toHaveLength(1);
    expect(errors[0]).toStartWith(
      'Schedule "broken" is not enqueued because it cannot be parsed here: Invalid cron pattern "99 * * * *"',
    );
  });

  test("runOnce() rejects a time that is not a date or a number", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    const runner = await start([report]);
    // deno-lint-ignore no-explicit-any
    await expect(runner.scheduler.runOnce("soon" as any)).rejects.toThrow(
      'Invalid time for Scheduler.runOnce(): expected a valid Date or milliseconds since the epoch, received "soon"',
    );
  });
});

describe("catch-up after a 3-hour downtime", () => {
  /**
   * Runs an hourly schedule at 08:00, stops the runner until 11:10 (missing 09:00, 10:00 and
   * 11:00), starts it again and runs one pass.
   */
  async function afterDowntime(options: ScheduleOptions, restartAt = "2026-01-05T11:10:00Z") {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const runs: string[] = [];
    const task = defineDatabaseTask(database, {
      name: "hourly",
      process({ scheduledFor }) {
        runs.push(scheduledFor!.toISOString());
      },
    });
    await schedule(task, "0 * * * *", undefined, options);
    const first = await start([task]);
    clock.now = Date.parse("2026-01-05T08:00:00Z");
    expect(isoList(await first.scheduler.runOnce())).toEqual(["2026-01-05T08:00:00.000Z"]);
    await waitFor(() => runs.length === 1);
    await first.stop();

    clock.now = Date.parse(restartAt);
    const logger = captureLogger();
    const second = await start([task], { logger });
    await second.scheduler.runOnce();
    return { clock, database, runs, logger, runner: second };
  }

  test('"none" skips the missed ticks and waits for the next', async () => {
    const { clock, database, runs, logger, runner } = await afterDowntime({});

    expect(await taskRows(database)).toEqual([]);
    expect(runs).toEqual(["2026-01-05T08:00:00.000Z"]);
    const [info] = await listSchedules(database);
    expect(info.lastFiredAt).toEqual(new Date("2026-01-05T11:00:00Z"));
    expect(logger.messages("info")).toContain(
      'Schedule "hourly": skipped 2 or more missed ticks since 2026-01-05T08:00:00.000Z ' +
        'because catchUp is "none"; enqueued 0 ticks',
    );

    clock.now = Date.parse("2026-01-05T12:00:00Z");
    expect(isoList(await runner.scheduler.runOnce())).toEqual(["2026-01-05T12:00:00.000Z"]);
  });

  test('"none" still enqueues a tick that is less than a minute late', async () => {
    const { runs } = await afterDowntime({}, "2026-01-05T09:00:30Z");
    await waitFor(() => runs.length === 2);
    expect(runs).toEqual(["2026-01-05T08:00:00.000Z", "2026-01-05T09:00:00.000Z"]);
  });

  test('"latest" enqueues the most recent missed tick once', async () => {
    const { runs, runner, logger } = await afterDowntime({ catchUp: "latest" });

    await waitFor(() => runs.length === 2);
    expect(runs).toEqual(["2026-01-05T08:00:00.000Z", "2026-01-05T11:00:00.000Z"]);
    expect(await runner.scheduler.runOnce()).toEqual([]);
    expect(logger.messages("info")).toContain(
      'Schedule "hourly": skipped 1 or more missed ticks since 2026-01-05T08:00:00.000Z ' +
        'because catchUp is "latest"; enqueued 1 tick',
    );
  });

  test('"all" enqueues every missed tick', async () => {
    const { runs, runner } = await afterDowntime({ catchUp: "all" });

    await waitFor(() => runs.length === 4);
    expect(runs).toEqual([
      "2026-01-05T08:00:00.000Z",
      "2026-01-05T09:00:00.000Z",
      "2026-01-05T10:00:00.000Z",
      "2026-01-05T11:00:00.000Z",
    ]);
    expect(await runner.scheduler.runOnce()).toEqual([]);
  });

  test('"all" enqueues at most maxCatchUp ticks, the most recent ones', async () => {
    const { runs, logger } = await afterDowntime({ catchUp: "all", maxCatchUp: 2 });

    await waitFor(() => runs.length === 3);
    expect(runs).toEqual([
      "2026-01-05T08:00:00.000Z",
      "2026-01-05T10:00:00.000Z",
      "2026-01-05T11:00:00.000Z",
    ]);
    expect(logger.messages("info")).toContain(
      'Schedule "hourly": skipped 1 or more missed ticks since 2026-01-05T08:00:00.000Z ' +
        "because maxCatchUp is 2; enqueued 2 ticks",
    );
  });

  test("a month of per-second downtime enqueues only maxCatchUp ticks", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const { task, release } = heldTask(database);
    await schedule(task, "* * * * * *", undefined, { catchUp: "all", maxCatchUp: 3 });

    clock.now = Date.parse("2026-02-05T07:30:00.500Z");
    await start([task]);

    const rows = await taskRows(database);
    expect(rows.map((row) => new Date(row.scheduled_for as number).toISOString())).toEqual([
      "2026-02-05T07:29:58.000Z",
      "2026-02-05T07:29:59.000Z",
      "2026-02-05T07:30:00.000Z",
    ]);
    release();
    release();
    release();
  });

  test("a schedule replaced during the downtime catches up only from the replacement", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const runs: string[] = [];
    const report = defineDatabaseTask(database, {
      name: "report",
      process({ scheduledFor }) {
        runs.push(scheduledFor!.toISOString());
      },
    });
    await schedule(report, "0 * * * *", undefined, { catchUp: "all" });
    clock.now = Date.parse("2026-01-05T09:30:00Z");
    await schedule(report, "30 * * * *", undefined, { catchUp: "all" });

    // runTasks resolves after the first pass of its scheduler, which caught up.
    clock.now = Date.parse("2026-01-05T11:45:00Z");
    const runner = await start([report]);
    expect(await runner.scheduler.runOnce()).toEqual([]);
    await waitFor(() => runs.length === 2);
    expect(runs).toEqual(["2026-01-05T10:30:00.000Z", "2026-01-05T11:30:00.000Z"]);
  });
});

describe("overlap", () => {
  test("false skips a tick while the previous run is running", async () => {
    const { clock, database, started, release, runner, logger, first } = await firstTickRunning({
      overlap: false,
    });
    expect(first).toHaveLength(1);
    clock.now = Date.parse("2026-01-05T08:01:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);
    expect(logger.messages("info")).toContain(
      'Schedule "held": skipped the tick at 2026-01-05T08:01:00.000Z because its previous run ' +
        "is still waiting or running (overlap is off)",
    );

    release();
    await waitFor(async () => (await taskRows(database)).length === 0);
    clock.now = Date.parse("2026-01-05T08:02:00Z");
    expect(isoList(await runner.scheduler.runOnce())).toEqual(["2026-01-05T08:02:00.000Z"]);
    await waitFor(() => started.length === 2);
    expect(started).toEqual(["2026-01-05T08:00:00.000Z", "2026-01-05T08:02:00.000Z"]);
    release();
  });

  test("false skips a tick while the previous run is pending", async () => {
    const clock = clockAt("2026-01-05T07:59:30Z");
    const database = open(clock);
    const { task, started, release } = heldTask(database);
    await schedule(task, "* * * * *", undefined, { overlap: false });
    const runner = await start([task]);
    // A performed run takes the only slot, so the schedule's run stays pending.
    await perform(task, "blocker");
    await waitFor(() => started.length === 1);

    clock.now = Date.parse("2026-01-05T08:00:00Z");
    expect(await runner.scheduler.runOnce()).toHaveLength(1);
    clock.now = Date.parse("2026-01-05T08:01:00Z");
    expect(await runner.scheduler.runOnce()).toEqual([]);

    const rows = await taskRows(database);
    expect(rows.map((row) => [row.state, row.scheduled_for])).toEqual([
      ["running", null],
      ["pending", Date.parse("2026-01-05T08:00:00Z")],
    ]);
    release();
    await waitFor(() => started.length === 2);
    release();
  });

  test("true, the default, enqueues while the previous run is running", async () => {
    const { clock, started, release, runner } = await firstTickRunning();
    clock.now = Date.parse("2026-01-05T08:01:00Z");
    expect(isoList(await runner.scheduler.runOnce())).toEqual(["2026-01-05T08:01:00.000Z"]);
    release();
    await waitFor(() => started.length === 2);
    release();
  });

  test('false with catchUp "all" enqueues only the most recent missed tick', async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const report = defineDatabaseTask(database, { name: "report", process() {} });
    await schedule(report, "0 * * * *", undefined, { catchUp: "all", overlap: false });
    clock.now = Date.parse("2026-01-05T11:10:00Z");
    const runner = await start([report]);

    await runner.scheduler.runOnce();
    const [info] = await listSchedules(database);
    expect(info.lastFiredAt).toEqual(new Date("2026-01-05T11:00:00Z"));
  });
});

/** A libSQL client whose write batches wait while the test holds them. */
function holdableClient(url: string) {
  const client = createClient({ url, timeout: 5_000 });
  let held: { promise: Promise<void>; release: () => void } | undefined;
  let waiting = 0;
  const proxy = new Proxy(client, {
    get(target, key) {
      if (key === "batch") {
        return async (...args: Parameters<Client["batch"]>) => {
          if (held !== undefined) {
            waiting++;
            await held.promise;
          }
          return target.batch(...args);
        };
      }
      const value = Reflect.get(target, key, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return {
    client: proxy,
    hold() {
      held = gate();
    },
    release() {
      held?.release();
      held = undefined;
    },
    get waiting() {
      return waiting;
    },
    close() {
      client.close();
    },
  };
}

describe("exactly once", () => {
  test("two schedulers on one database file enqueue a tick once", async () => {
    const url = temporaryDatabaseUrl();
    const clock = clockAt("2026-01-05T07:30:00Z");
    const first = open(clock, url);
    const second = open(clock, url);
    const tasks = [first, second].map((database) =>
      defineDatabaseTask(database, { name: "report", process() {} })
    );
    await schedule(tasks[0], "0 8 * * *");
    const [one, two] = await Promise.all(tasks.map((task) => start([task])));

    clock.now = Date.parse("2026-01-05T08:00:00Z");
    const passes = await Promise.all([one.scheduler.runOnce(), two.scheduler.runOnce()]);

    expect(passes.flat()).toHaveLength(1);
  });

  test("a late scheduler does not enqueue a finished tick again", async () => {
    const url = temporaryDatabaseUrl();
    const clock = clockAt("2026-01-05T07:30:00Z");
    const fast = open(clock, url);
    const holdable = holdableClient(url);
    const slow = open(clock, holdable.client);
    const runs: string[] = [];
    const define = (database: Database) =>
      defineDatabaseTask(database, {
        name: "report",
        process({ scheduledFor }) {
          runs.push(scheduledFor!.toISOString());
        },
      });
    const fastTask = define(fast);
    const slowTask = define(slow);
    await schedule(fastTask, "0 8 * * *");
    const fastRunner = await start([fastTask]);
    const slowRunner = await start([slowTask]);

    try {
      // The slow scheduler reads the schedule, then waits before its write.
      clock.now = Date.parse("2026-01-05T08:00:00Z");
      holdable.hold();
      const slowPass = slowRunner.scheduler.runOnce();
      await waitFor(() => holdable.waiting > 0);

      // Meanwhile the fast scheduler enqueues the tick, and its run ends and deletes the row,
      // so the key of the tick no longer blocks a second insert.
      expect(await fastRunner.scheduler.runOnce()).toHaveLength(1);
      await waitFor(async () => runs.length === 1 && (await taskRows(fast)).length === 0);

      holdable.release();
      expect(await slowPass).toEqual([]);
      expect(await taskRows(fast)).toEqual([]);
      expect(runs).toEqual(["2026-01-05T08:00:00.000Z"]);
    } finally {
      holdable.release();
      await slowRunner.stop({ timeout: 100 });
      holdable.close();
    }
  });

  test("a replaced schedule is not fired with the old definition", async () => {
    const url = temporaryDatabaseUrl();
    const clock = clockAt("2026-01-05T07:30:00Z");
    const other = open(clock, url);
    const holdable = holdableClient(url);
    const slow = open(clock, holdable.client);
    const otherTask = defineDatabaseTask(other, { name: "report", process() {} });
    const slowTask = defineDatabaseTask(slow, { name: "report", process() {} });
    await schedule(otherTask, "0 8 * * *");
    const slowRunner = await start([slowTask]);

    try {
      clock.now = Date.parse("2026-01-05T08:00:00Z");
      holdable.hold();
      const slowPass = slowRunner.scheduler.runOnce();
      await waitFor(() => holdable.waiting > 0);
      await schedule(otherTask, "0 9 * * *");

      holdable.release();
      expect(await slowPass).toEqual([]);
      expect(await taskRows(other)).toEqual([]);
      const [info] = await listSchedules(other);
      expect(info).toMatchObject({ pattern: "0 9 * * *", lastFiredAt: null });
    } finally {
      holdable.release();
      await slowRunner.stop({ timeout: 100 });
      holdable.close();
    }
  });

  test(
    "three processes running the scheduler for 10 seconds enqueue each tick once",
    async () => {
      const url = temporaryDatabaseUrl();
      const setup = openDatabase(url);
      keep(setup);
      await setup.ready();
      await setup.client.execute("CREATE TABLE runs (scheduled_for INTEGER, pid INTEGER)");

      const worker = fileURLToPath(new URL("./fixtures/cron-worker.ts", import.meta.url));
      const outputs = await Promise.all(
        [1, 2, 3].map(() => runProcess(process.execPath, [worker, url, "10000"])),
      );

      const reports = outputs.map((output) => {
        expect(output.code).toBe(0);
        return JSON.parse(output.stdout.trim().split("\n").at(-1)!) as {
          enqueued: number;
          handledElsewhere: number;
          errors: string[];
        };
      });
      expect(reports.flatMap((report) => report.errors)).toEqual([]);

      // Every tick is either a recorded run or a row that no runner started before the stop.
      const runs = await setup.client.execute("SELECT scheduled_for AS tick FROM runs");
      const rows = await setup.client.execute(
        "SELECT scheduled_for AS tick FROM tasks WHERE schedule IS NOT NULL",
      );
      const ticks = [...runs.rows, ...rows.rows].map((row) => row.tick as number);
      const counts = new Map<number, number>();
      for (const tick of ticks) counts.set(tick, (counts.get(tick) ?? 0) + 1);
      const duplicates = [...counts].filter(([, count]) => count > 1);
      expect(duplicates).toEqual([]);

      // The ticks are consecutive seconds: none was skipped while a scheduler ran.
      const sorted = [...counts.keys()].sort((a, b) => a - b);
      expect(sorted.length).toBeGreaterThanOrEqual(8);
      const gaps = sorted.flatMap((tick, index) =>
        index > 0 && tick - sorted[index - 1] !== 1_000
          ? [`${new Date(sorted[index - 1]).toISOString()} -> ${new Date(tick).toISOString()}`]
          : []
      );
      expect(gaps).toEqual([]);
      const enqueued = reports.reduce((sum, report) => sum + report.enqueued, 0);
      expect(enqueued).toBe(sorted.length);
      // The processes competed for ticks: some found a tick already handled.
      expect(reports.reduce((sum, report) => sum + report.handledElsewhere, 0)).toBeGreaterThan(0);
      // Three registrations of the same cron stored one schedule, once.
      const stored = await storedSchedules(setup);
      expect(stored.map((row) => [row.name, row.revision])).toEqual([["every-second", 1]]);
    },
    30_000,
  );
});

/** Runs a process to its end and collects its output. */
function runProcess(
  command: string,
  args: string[],
  env: Record<string, string | undefined> = process.env,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

describe("daylight saving", () => {
  test.each(dstCases.map((entry) => [entry.label, entry] as const))(
    "%s",
    async (_label, entry) => {
      const result = await runDstCase(entry);
      expect(result.stepped).toEqual(entry.expected);
      expect(result.caughtUp).toEqual(entry.expected);
    },
  );

  test("the process time zone does not change the ticks", async () => {
    const script = fileURLToPath(new URL("./fixtures/dst-matrix.ts", import.meta.url));
    const zones = ["Asia/Tokyo", "America/Los_Angeles", "Europe/Berlin"];
    const outputs = await Promise.all(
      zones.map((zone) => runProcess(process.execPath, [script], { ...process.env, TZ: zone })),
    );

    for (const [index, output] of outputs.entries()) {
      expect({ zone: zones[index], code: output.code, stderr: output.stderr }).toEqual({
        zone: zones[index],
        code: 0,
        stderr: "",
      });
      const results = JSON.parse(output.stdout) as DstResult[];
      expect(results).toEqual(
        dstCases.map((entry) => ({
          label: entry.label,
          stepped: entry.expected,
          caughtUp: entry.expected,
        })),
      );
    }
  }, 30_000);
});

describe("cron option of a task", () => {
  test("runTasks stores the schedule and enqueues its ticks with its data", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const seen: Array<[unknown, string | undefined]> = [];
    const task = defineDatabaseTask<{ format: string }>(database, {
      name: "report",
      cron: { pattern: "0 9 * * *", timezone: "Europe/Berlin", data: { format: "pdf" } },
      process({ data, scheduledFor }) {
        seen.push([data, scheduledFor?.toISOString()]);
      },
    });
    expect(await listSchedules(database)).toEqual([]);

    const logger = captureLogger();
    const runner = await start([task], { logger });

    const [info] = await listSchedules(database);
    expect(info).toMatchObject({
      name: "report",
      pattern: "0 9 * * *",
      timezone: "Europe/Berlin",
      data: { format: "pdf" },
      fromDefinition: true,
    });
    expect(logger.messages("info")).toContain(
      'tasklite: stored schedule "report" of task "report": "0 9 * * *" in Europe/Berlin',
    );
    clock.now = Date.parse("2026-01-05T08:00:00Z");
    await runner.scheduler.runOnce();
    await waitFor(() => seen.length === 1);
    expect(seen).toEqual([[{ format: "pdf" }, "2026-01-05T08:00:00.000Z"]]);
  });

  test("a pattern string is named after the task and read in UTC", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const task = defineDatabaseTask(database, {
      name: "cleanup",
      cron: "0 3 * * *",
      process() {},
    });
    await start([task]);

    const [info] = await listSchedules(database);
    expect(info).toMatchObject({ name: "cleanup", task: "cleanup", timezone: "UTC" });
    expect(info.nextFireAt).toEqual(new Date("2026-01-06T03:00:00Z"));
  });

  test("starting again with the same cron changes nothing", async () => {
    const clock = clockAt("2026-01-05T07:30:00Z");
    const database = open(clock);
    const task = defineDatabaseTask(database, { name: "cleanup", cron: "0 3 * * *", process() {} });
    const first = await start([task]);
    await first.stop();
    const before = await storedSchedules(database);

    clock.now += 60_000;
    const logger = captureLogger();
    await start([task], { logger });

    expect(await storedSchedules(database)).toEqual(before);
    expect(logger.messages("info").filter((line) => line.includes("schedule"))).toEqual([]);
  });

  test("a changed cron replaces the stored schedule", async () => {
    const url = temporaryDatabaseUrl();
    const database = open(clockAt("2026-01-05T07:30:00Z"), url);
    const before = defineDatabaseTask(database, {
      name: "cleanup",
      cron: "0 3 * * *",
      process() {},
    });
    await (await start([before])).stop();

    const after = defineDatabaseTask(database, {
      name: "cleanup",
      cron: "0 4 * * *",
      process() {},
    });
    const logger = captureLogger();
    await start([after], { logger });

    const [stored] = await storedSchedules(database);
    expect(stored).toMatchObject({ pattern: "0 4 * * *", revision: 2 });
    expect(logger.messages("info")).toContain(
      'tasklite: replaced schedule "cleanup" of task "cleanup": "0 4 * * *" in UTC',
    );
  });

  test("a cron that a task no longer defines is removed at the next start", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const withCron = defineDatabaseTask(database, {
      name: "cleanup",
      cron: { pattern: "0 3 * * *", name: "nightly-cleanup" },
      process() {},
    });
    await (await start([withCron])).stop();
    await schedule(withCron, "0 12 * * *", undefined, { name: "noon-cleanup" });

    const withoutCron = defineDatabaseTask(database, { name: "cleanup", process() {} });
    const logger = captureLogger();
    await start([withoutCron], { logger });

    // The schedule() call stays: only schedules from the cron option follow the definition.
    expect((await listSchedules(database)).map((info) => info.name)).toEqual(["noon-cleanup"]);
    expect(logger.messages("info")).toContain(
      'tasklite: removed schedule "nightly-cleanup": task "cleanup" no longer defines it',
    );
  });

  test("runTasks rejects cron data failing the schema", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const task = defineDatabaseTask(database, {
      name: "report",
      schema: v.object({ format: v.picklist(["pdf", "csv"]) }),
      cron: { pattern: "0 3 * * *", data: { format: "doc" } },
      process() {},
    });

    const started = runTasks([task], { logger: captureLogger() });
    await expect(started).rejects.toBeInstanceOf(TaskDataError);
    await expect(started).rejects.toThrow('Invalid data for task "report": cron.data.format');
    expect(await storedSchedules(database)).toEqual([]);
  });

  test.each([
    [
      "61 * * * *",
      RangeError,
      'Invalid cron pattern "61 * * * *" for schedule "report": Invalid value for minute: 61',
    ],
    [
      { pattern: "0 3 * * *", timezone: "Mars/Olympus" },
      RangeError,
      'Invalid time zone "Mars/Olympus" for schedule "report"',
    ],
    [{ timezone: "UTC" }, TypeError, 'Missing cron of task "report" option "pattern"'],
    [
      { pattern: "0 3 * * *", catchup: "all" },
      TypeError,
      'Unknown cron of task "report" option "catchup": check its spelling',
    ],
    [
      { pattern: "0 3 * * *", catchUp: "all", maxCatchUp: 0 },
      RangeError,
      'Invalid cron of task "report" option "maxCatchUp": expected an integer from 1 to 10000, received 0',
    ],
    [
      42,
      TypeError,
      'Invalid task option "cron": expected a cron pattern such as "0 3 * * *" or an object with a "pattern", received 42',
    ],
  ])("defineDatabaseTask() rejects the cron option %p", (cron, errorClass, message) => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const define = () =>
      // deno-lint-ignore no-explicit-any
      defineDatabaseTask(database, { name: "report", cron: cron as any, process() {} });
    expect(define).toThrow(errorClass);
    expect(define).toThrow(message);
  });
});

describe("bad input", () => {
  const cases: Array<[string, unknown, unknown, unknown, ErrorConstructor, string]> = [
    [
      "an invalid pattern",
      "61 * * * *",
      undefined,
      { name: "nightly" },
      RangeError,
      'Invalid cron pattern "61 * * * *" for schedule "nightly": Invalid value for minute: 61. ' +
      'A pattern has five fields, "minute hour day-of-month month day-of-week"',
    ],
    [
      "a pattern with three fields",
      "* * *",
      undefined,
      undefined,
      TypeError,
      'Invalid cron pattern "* * *" for schedule "report": invalid configuration format',
    ],
    [
      "a date instead of a pattern",
      "2026-01-01T00:00:00",
      undefined,
      undefined,
      TypeError,
      "a date and time runs once, so enqueue it with perform(task, data, { runAt }) instead",
    ],
    [
      "a pattern that is not a string",
      5,
      undefined,
      undefined,
      TypeError,
      'Invalid cron pattern for schedule "report": expected a string such as "0 3 * * *", received 5',
    ],
    [
      "a pattern with no future tick",
      "0 0 30 2 *",
      undefined,
      undefined,
      RangeError,
      'Cron pattern "0 0 30 2 *" for schedule "report" has no tick after 2026-01-05T07:30:00.000Z',
    ],
    [
      "an unknown time zone",
      "0 3 * * *",
      undefined,
      { timezone: "Mars/Olympus" },
      RangeError,
      'Invalid time zone "Mars/Olympus" for schedule "report": expected an IANA time zone name',
    ],
    [
      "maxCatchUp of 0",
      "0 3 * * *",
      undefined,
      { catchUp: "all", maxCatchUp: 0 },
      RangeError,
      'Invalid schedule "report" option "maxCatchUp": expected an integer from 1 to 10000, received 0',
    ],
    [
      "a negative maxCatchUp",
      "0 3 * * *",
      undefined,
      { catchUp: "all", maxCatchUp: -5 },
      RangeError,
      'Invalid schedule "report" option "maxCatchUp": expected an integer from 1 to 10000, received -5',
    ],
    [
      "maxCatchUp without catchUp all",
      "0 3 * * *",
      undefined,
      { maxCatchUp: 5 },
      TypeError,
      'Invalid schedule "report" options: "maxCatchUp" only applies with catchUp "all", received catchUp "none"',
    ],
    [
      "an unknown catchUp",
      "0 3 * * *",
      undefined,
      { catchUp: "sometimes" },
      TypeError,
      'Invalid schedule "report" option "catchUp": expected "none", "latest" or "all", received "sometimes"',
    ],
    [
      "an empty name",
      "0 3 * * *",
      undefined,
      { name: "" },
      TypeError,
      'Invalid schedule "report" option "name": expected a name of 1 to 200 characters',
    ],
    [
      "an unknown option",
      "0 3 * * *",
      undefined,
      { timeZone: "UTC" },
      TypeError,
      'Unknown schedule "report" option "timeZone": check its spelling',
    ],
    [
      "data that JSON cannot store",
      "0 3 * * *",
      { when: new Date(0) },
      undefined,
      TypeError,
      'Invalid data for task "report": data.when is a Date',
    ],
  ];

  test.each(cases)(
    "schedule() rejects %s and stores nothing",
    async (_label, pattern, data, options, errorClass, message) => {
      const database = open(clockAt("2026-01-05T07:30:00Z"));
      const task = defineDatabaseTask(database, { name: "report", process() {} });
      // deno-lint-ignore no-explicit-any
      const attempt = schedule(task as Task<any>, pattern as string, data, options as any);
      await expect(attempt).rejects.toBeInstanceOf(errorClass);
      await expect(attempt).rejects.toThrow(message);
      expect(await storedSchedules(database)).toEqual([]);
    },
  );

  test("schedule() rejects data that fails the task's schema and stores nothing", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const task = defineDatabaseTask(database, {
      name: "report",
      schema: v.object({ format: v.picklist(["pdf", "csv"]) }),
      process() {},
    });
    // deno-lint-ignore no-explicit-any
    const attempt = schedule(task, "0 3 * * *", { format: "doc" } as any);
    await expect(attempt).rejects.toBeInstanceOf(TaskDataError);
    await expect(attempt).rejects.toThrow('Invalid data for task "report": data.format');
    expect(await storedSchedules(database)).toEqual([]);
  });

  test("schedule() rejects a task without a name and stores nothing", async () => {
    const database = open(clockAt("2026-01-05T07:30:00Z"));
    const nameless = { database } as unknown as Task<unknown>;
    const attempt = schedule(nameless, "0 3 * * *");
    await expect(attempt).rejects.toBeInstanceOf(TypeError);
    await expect(attempt).rejects.toThrow(
      "Invalid task for schedule(): expected the result of defineDatabaseTask(), received an object",
    );
    expect(await storedSchedules(database)).toEqual([]);
  });
});

describe("schema", () => {
  test("adds the schedules table and columns to a database of the first release", async () => {
    const url = temporaryDatabaseUrl();
    const client = createClient({ url });
    await client.batch([
      `CREATE TABLE tasks (id TEXT PRIMARY KEY, name TEXT NOT NULL, data TEXT,
        created INTEGER NOT NULL, failed_last INTEGER, failed_nr INTEGER NOT NULL DEFAULT 0,
        failed_error TEXT, run_at INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
        locked_until INTEGER, locked_by TEXT, priority INTEGER NOT NULL DEFAULT 0, key TEXT)`,
      "INSERT INTO tasks (id, name, created) VALUES ('a', 'mail', 1000)",
      "PRAGMA user_version = 1",
    ]);
    client.close();

    const database = open(clockAt("2026-01-05T07:30:00Z"), url);
    const task = defineDatabaseTask(database, { name: "mail", process() {} });
    await schedule(task, "0 3 * * *");

    const rows = await taskRows(database);
    expect(rows).toEqual([expect.objectContaining({ id: "a", schedule: null })]);
    expect(await listSchedules(database)).toHaveLength(1);
  });
});
