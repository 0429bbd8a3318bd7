/** The data of every benchmark task: a sequence number and, for latency runs, the send time. */
export interface Payload {
  n: number;
  /** Milliseconds since the epoch with sub-millisecond precision, from `wallClock()`. */
  sentAt?: number;
  /** The delay the task was enqueued with, in milliseconds. */
  delay?: number;
}

/** Called at the start of each task's handler. */
export type Handler = (data: Payload) => void;

/**
 * One queue library driven through its public API. Every method that writes resolves once the
 * write is committed to the database file.
 */
export interface Queue {
  /** Enqueues one task. */
  enqueue(data: Payload): Promise<void>;
  /** Enqueues one task that becomes due after `delay` milliseconds. */
  enqueueDelayed(data: Payload, delay: number): Promise<void>;
  /** Enqueues many tasks with the library's bulk call. */
  enqueueMany(items: Payload[]): Promise<void>;
  /**
   * Fills the queue before a drain, unmeasured. Defaults to `enqueueMany`; a library may use a
   * faster path that commits a moment later.
   */
  preloadMany?(items: Payload[]): Promise<void>;
  /** Starts processing, with up to `concurrency` tasks claimed and running at a time. */
  start(concurrency: number, handler: Handler): Promise<void>;
  /** Stops processing and resolves once every finished task's result is written. */
  stop(): Promise<void>;
  /** Closes the database. */
  close(): Promise<void>;
  /** An error the library raised in the background, such as a failing claim. */
  readonly error: Error | undefined;
}

/** A queue library as the benchmark knows it. */
export interface System {
  /** The name in the report's tables. */
  readonly name: string;
  /** Opens a queue on a database file at `path`, creating its schema. */
  open(path: string): Promise<Queue>;
}

/** A logger that drops every line, so no library pays for printing. */
export const silentLogger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
};

/**
 * Wraps a handler in an async function, the way applications write task handlers, so that every
 * queue awaits one promise per task.
 */
export function asyncHandler(
  handler: Handler,
): (data: Payload) => Promise<void> {
  // deno-lint-ignore require-await
  return async (data) => handler(data);
}
