/** Turns the runs of a benchmark into markdown tables, one per scenario variant. */
import type { Metric, Variant } from "./catalogue.ts";

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  platform: string;
  versions: Record<string, string>;
  packages: Record<string, string>;
}

export interface Run {
  variant: string;
  runtime: string;
  queue: string;
  repetition?: number;
  metrics?: Record<string, number>;
  error?: string;
  skipped?: string;
}

export interface Results {
  date: string;
  quick: boolean;
  durationSeconds: number;
  machine: Machine;
  runs: Run[];
}

const runtimeOrder = ["node", "bun", "deno"];
const runtimeNames: Record<string, string> = {
  node: "Node.js",
  bun: "Bun",
  deno: "Deno",
};
const queueOrder = [
  "tasklite",
  "floor",
  "floor-table",
  "plainjob",
  "liteque",
  "bunqueue",
];
const queueNames: Record<string, string> = {
  floor: "floor (raw driver)",
  "floor-table": "floor on tasklite's table",
};

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function formatNumber(value: number, digits: number): string {
  return value.toLocaleString("en", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function formatCell(values: number[], metric: Metric): string {
  const middle = formatNumber(median(values), metric.digits);
  if (values.length === 1 || metric.key === "samples") return middle;
  const low = formatNumber(Math.min(...values), metric.digits);
  const high = formatNumber(Math.max(...values), metric.digits);
  return `${middle} (${low}–${high})`;
}

/**
 * The median over repetitions of the ratio between tasklite and the row, taken within each
 * repetition and oriented so that a value above 1 means tasklite did better.
 */
function ratio(
  tasklite: Run[],
  row: Run[],
  metric: Metric,
): number | undefined {
  const ratios: number[] = [];
  for (const run of row) {
    const partner = tasklite.find((other) => other.repetition === run.repetition);
    const mine = partner?.metrics?.[metric.key];
    const theirs = run.metrics?.[metric.key];
    if (
      mine === undefined || theirs === undefined || mine === 0 || theirs === 0
    ) continue;
    ratios.push(metric.better === "higher" ? mine / theirs : theirs / mine);
  }
  return ratios.length > 0 ? median(ratios) : undefined;
}

function formatMachine(results: Results): string {
  const { machine } = results;
  const versions = Object.entries(machine.versions).map(([name, version]) =>
    `${runtimeNames[name]} ${version.replace(/^v/, "").replace(/^deno /, "")}`
  );
  const packages = Object.entries(machine.packages).map(([name, version]) => `${name} ${version}`);
  return [
    `Measured ${results.date.slice(0, 10)}${results.quick ? " (quick run, small sizes)" : ""} ` +
    `in ${
      Math.round(results.durationSeconds / 60)
    } min on ${machine.cpu}, ${machine.cores} cores, ` +
    `${machine.memoryGiB} GiB, ${machine.platform}; ${versions.join(", ")}; ${
      packages.join(", ")
    }.`,
    "",
    "Each cell is the median of the repetitions, with the minimum and maximum in brackets. The " +
    "ratio column compares tasklite with the row within each repetition and gives the median: " +
    "tasklite ÷ row for rates, row ÷ tasklite for times, memory and CPU, so above 1 means " +
    "tasklite did better and 0.80 against the floor means 80 % of the floor. ¹ marks a queue " +
    "that reached the time limit of its run before the last task; its figure is the rate over " +
    "the tasks it finished (the median count is given), or for memory the growth over them.",
  ].join("\n");
}

export function formatReport(results: Results, variants: Variant[]): string {
  const lines = [formatMachine(results)];
  let section = "";
  for (const variant of variants) {
    if (variant.section !== section) {
      section = variant.section;
      lines.push("", `### ${section}`);
    }
    lines.push("", `#### ${variant.title}`, "");
    const headers = [
      "runtime",
      "queue",
      ...variant.metrics.map((metric) => metric.label),
      "ratio",
    ];
    lines.push(
      `| ${headers.join(" | ")} |`,
      `|${headers.map(() => " --- ").join("|")}|`,
    );
    const runs = results.runs.filter((run) => run.variant === variant.id);
    for (const runtime of runtimeOrder) {
      const tasklite = runs.filter((run) => run.runtime === runtime && run.queue === "tasklite");
      for (const queue of queueOrder) {
        const mine = runs.filter((run) => run.runtime === runtime && run.queue === queue);
        if (mine.length === 0) continue;
        const cells = [
          runtimeNames[runtime],
          queueNames[queue] ?? queue,
        ];
        const failure = mine.find((run) => run.error !== undefined || run.skipped !== undefined);
        const measured = mine.filter((run) => run.metrics !== undefined);
        if (measured.length === 0 && failure !== undefined) {
          const text = failure.error !== undefined
            ? `fails: ${failure.error}`
            : `not run: ${failure.skipped}`;
          cells.push(
            text.replaceAll("|", "\\|"),
            ...variant.metrics.slice(1).map(() => ""),
            "",
          );
        } else {
          for (const metric of variant.metrics) {
            cells.push(
              formatCell(
                measured.map((run) => run.metrics![metric.key]),
                metric,
              ),
            );
          }
          const tasks = variant.params.tasks;
          const partial = measured.filter((run) => (run.metrics!.done ?? tasks) < tasks);
          if (partial.length > 0) {
            const done = median(partial.map((run) => run.metrics!.done));
            cells[2] += ` ¹ ${formatNumber(done, 0)} of ${formatNumber(tasks, 0)} tasks`;
          }
          const value = queue === "tasklite"
            ? undefined
            : ratio(tasklite, measured, variant.metrics[0]);
          cells.push(value === undefined ? "" : formatNumber(value, 2));
        }
        lines.push(`| ${cells.join(" | ")} |`);
      }
    }
  }
  return lines.join("\n");
}
