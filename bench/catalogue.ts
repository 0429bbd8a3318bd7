/** The scenarios of the benchmark, their sizes in full and quick runs, and what they report. */

export type ScenarioName =
  | "perform-awaited"
  | "perform-concurrent"
  | "perform-many"
  | "drain"
  | "drain-processes"
  | "latency-same"
  | "latency-process"
  | "latency-delayed"
  | "claim-cost"
  | "memory"
  | "idle-cpu";

export interface Metric {
  key: string;
  label: string;
  better: "higher" | "lower";
  /** Decimal places in the report. */
  digits: number;
}

export interface Variant {
  /** A unique id, used in results.json. */
  id: string;
  /** The scenario's number and title in the report. */
  section: string;
  /** The variant's title in the report. */
  title: string;
  scenario: ScenarioName;
  params: Record<string, number>;
  /** The metrics in report order; the first one gives the ratio column. */
  metrics: Metric[];
  /** Whether the floor row applies: the floor has no worker that waits for new tasks. */
  floor: boolean;
  /** Whether the scenario needs more than one process on the database file. */
  multiProcess: boolean;
  /** How many times each queue runs it; a run is one fresh process. */
  repetitions: number;
}

const rate: Metric = {
  key: "rate",
  label: "tasks/s",
  better: "higher",
  digits: 0,
};
const p50: Metric = { key: "p50", label: "p50 ms", better: "lower", digits: 2 };
const p99: Metric = { key: "p99", label: "p99 ms", better: "lower", digits: 2 };
const samples: Metric = {
  key: "samples",
  label: "samples",
  better: "higher",
  digits: 0,
};

/** Lists the variants of every scenario, at full size or at the small size of `--quick`. */
export function variants(quick: boolean, repetitions: number): Variant[] {
  const size = (full: number, small: number) => (quick ? small : full);
  // Seconds after which a throughput run stops and reports the rate over what it finished, so a
  // queue that runs hundreds of tasks per second does not hold up the run for minutes.
  const limit = size(6, 5);
  const list: Array<Omit<Variant, "repetitions"> & { repetitions?: number }> = [
    {
      id: "perform-awaited",
      section: "1. Enqueue",
      title: `perform() awaited one at a time, ${size(10_000, 200).toLocaleString("en")} tasks`,
      scenario: "perform-awaited",
      params: { tasks: size(10_000, 200), limit },
      metrics: [rate],
      floor: true,
      multiProcess: false,
    },
    {
      id: "perform-concurrent",
      section: "1. Enqueue",
      title: `100 perform() calls in flight, ${size(50_000, 1_000).toLocaleString("en")} tasks`,
      scenario: "perform-concurrent",
      params: { tasks: size(50_000, 1_000), inFlight: 100, limit },
      metrics: [rate],
      floor: true,
      multiProcess: false,
    },
    {
      id: "perform-many",
      section: "1. Enqueue",
      title: `performMany() in calls of 1,000, ${size(100_000, 500).toLocaleString("en")} tasks`,
      scenario: "perform-many",
      params: { tasks: size(100_000, 2_000), perCall: 1_000, limit },
      metrics: [rate],
      floor: true,
      multiProcess: false,
    },
    ...[1, 10, 100].map((batch) => ({
      id: `drain-batch-${batch}`,
      section: "2. Drain, one process",
      title: `Drain ${size(100_000, 500).toLocaleString("en")} tasks at batch size ${batch}`,
      scenario: "drain" as const,
      params: { tasks: size(100_000, 500), batch, limit },
      metrics: [rate],
      floor: true,
      multiProcess: false,
    })),
    ...[2, 4].map((processes) => ({
      id: `drain-processes-${processes}`,
      section: "3. Drain, several worker processes",
      title: `Drain ${
        size(100_000, 500).toLocaleString("en")
      } tasks with ${processes} worker processes at batch size 100`,
      scenario: "drain-processes" as const,
      params: { tasks: size(100_000, 500), processes, batch: 100, limit },
      metrics: [rate],
      floor: true,
      multiProcess: true,
    })),
    {
      id: "latency-same",
      section: "4. Latency",
      title: "perform() to the start of process(), same process, idle queue",
      scenario: "latency-same",
      params: { samples: size(200, 5), budget: size(4_000, 300) },
      metrics: [p99, p50, samples],
      floor: false,
      multiProcess: false,
    },
    {
      id: "latency-process",
      section: "4. Latency",
      title: "perform() to the start of process(), worker in another process, idle queue",
      scenario: "latency-process",
      params: { samples: size(200, 5), budget: size(4_000, 300) },
      metrics: [p99, p50, samples],
      floor: false,
      multiProcess: true,
    },
    {
      id: "latency-delayed",
      section: "4. Latency",
      title: "Lateness of tasks delayed by 50 ms, one enqueued every 10 ms",
      scenario: "latency-delayed",
      params: {
        samples: size(200, 5),
        delay: 50,
        interval: 10,
        budget: size(4_000, 300),
      },
      metrics: [p99, p50, samples],
      floor: false,
      multiProcess: false,
    },
    ...[1_000, size(1_000_000, 2_000)].map((waiting) => ({
      id: `claim-cost-${waiting}`,
      section: "5. Claim cost",
      title: `Time per task over ${size(500, 50)} tasks at batch size 1, ${
        waiting.toLocaleString("en")
      } tasks waiting`,
      scenario: "claim-cost" as const,
      params: { waiting, claims: size(500, 50) },
      metrics: [{
        key: "perTask",
        label: "µs per task",
        better: "lower" as const,
        digits: 0,
      }],
      floor: true,
      multiProcess: false,
      repetitions: waiting > 1_000 ? 1 : undefined,
    })),
    {
      id: "memory",
      section: "6. Memory",
      title: `RSS after the first ${size(10_000, 200).toLocaleString("en")} and after ${
        size(1_000_000, 2_000).toLocaleString("en")
      } tasks processed at batch size 100`,
      scenario: "memory",
      params: {
        tasks: size(1_000_000, 2_000),
        warmup: size(10_000, 200),
        batch: 100,
        limit: size(60, 10),
      },
      metrics: [
        { key: "growth", label: "growth %", better: "lower", digits: 1 },
        { key: "before", label: "RSS before MiB", better: "lower", digits: 0 },
        { key: "after", label: "RSS after MiB", better: "lower", digits: 0 },
      ],
      floor: true,
      multiProcess: false,
      repetitions: 1,
    },
    {
      id: "idle-cpu",
      section: "7. Idle CPU",
      title: `CPU time of a started worker with an empty queue, over ${size(10, 0.3)} s`,
      scenario: "idle-cpu",
      params: { seconds: size(10, 0.3), settle: size(500, 50) },
      metrics: [{
        key: "cpu",
        label: "% of one core",
        better: "lower",
        digits: 2,
      }],
      floor: false,
      multiProcess: false,
      repetitions: Math.min(repetitions, 2),
    },
  ];
  return list.map((variant) => ({
    ...variant,
    repetitions: variant.repetitions ?? repetitions,
  }));
}
