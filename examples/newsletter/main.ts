/**
 * The newsletter example: imports contacts from a CSV file, asks each new contact to confirm
 * their address, reminds those who have not confirmed a second later, and prints a summary.
 *
 * Run it with `npm run example`. Running it again sends nothing new, because every contact
 * already got their email; delete examples/newsletter/newsletter.db to start over.
 */
import { readFile } from "node:fs/promises";
import { perform, runTasks, stats, TaskDataError } from "../../mod.ts";
import { createContactsTable, database, outbox } from "./database.ts";
import doubleOptIn from "./tasks/double-opt-in.ts";
import reminder from "./tasks/reminder.ts";

const startedAt = performance.now();

/** Splits one CSV line into fields, honouring double quotes. */
function parseCsvLine(line: string): string[] {
  const fields: string[] = [];
  let field = "";
  let quoted = false;
  for (let index = 0; index < line.length; index++) {
    const char = line[index];
    if (quoted && char === '"' && line[index + 1] === '"') {
      field += '"';
      index++;
    } else if (char === '"') {
      quoted = !quoted;
    } else if (char === "," && !quoted) {
      fields.push(field);
      field = "";
    } else {
      field += char;
    }
  }
  fields.push(field);
  return fields;
}

// 1. Import the contacts. Re-importing keeps what earlier runs recorded about each contact.
await createContactsTable();
const csv = await readFile(new URL("./contacts.csv", import.meta.url), "utf8");
const [header, ...lines] = csv.trim().split("\n");
const columns = parseCsvLine(header);
const contacts = lines.map((line) => {
  const values = parseCsvLine(line);
  return Object.fromEntries(columns.map((column, index) => [column, values[index]]));
});
await database.client.batch(
  contacts.map((contact) => ({
    sql:
      `INSERT INTO contacts (email, first_name, last_name, city, confirmed) VALUES (?, ?, ?, ?, ?)
          ON CONFLICT (email) DO NOTHING`,
    args: [
      contact.email,
      contact.first_name,
      contact.last_name,
      contact.city,
      contact.confirmed === "yes" ? 1 : 0,
    ],
  })),
  "write",
);
console.log(`Imported ${contacts.length} contacts from contacts.csv`);

// 2. Perform a double opt-in for every contact that has not had one, and a reminder a second later.
const pending = await database.client.execute(
  "SELECT email, first_name, last_name FROM contacts WHERE double_opt_in_sent IS NULL AND bounced IS NULL",
);
let performed = 0;
const rejected: string[] = [];
for (const row of pending.rows) {
  const contact = {
    email: row.email as string,
    firstName: row.first_name as string,
    lastName: row.last_name as string,
  };
  try {
    // The key makes a second run skip a contact whose tasks from an earlier run still wait.
    const key = `contact ${contact.email}`;
    await perform(doubleOptIn, contact, { key });
    await perform(reminder, contact, { delay: "1s", key });
    performed++;
  } catch (error) {
    if (!(error instanceof TaskDataError)) throw error;
    rejected.push(error.message);
  }
}
console.log(
  `Performed ${performed} double opt-ins and reminders; rejected ${rejected.length} contacts:`,
);
for (const message of rejected) console.log(`  ${message}`);

// 3. Run the task directory until no task waits or runs: not the delayed reminders, not the
// retries of bounced addresses. Retries and failures are logged as they happen.
const runner = await runTasks(new URL("./tasks", import.meta.url).pathname, {
  logger: {
    debug() {},
    info() {},
    warn: (message) => console.warn(message),
    error: (message) => console.error(message),
  },
});
for (;;) {
  const { totals } = await stats(database);
  if (totals.scheduled + totals.pending + totals.running === 0) break;
  await new Promise((resolve) => setTimeout(resolve, 50));
}
await runner.stop();

// 4. Summarise what this run did.
const summary = await database.client.execute(`SELECT
  count(double_opt_in_sent) AS sent,
  count(reminder_sent) AS reminded,
  count(bounced) AS bounced,
  count(*) AS total
  FROM contacts`);
const failed = await database.client.execute(
  "SELECT name, count(*) AS n FROM tasks WHERE state = 'failed' GROUP BY name",
);
const { sent, reminded, bounced, total } = summary.rows[0];
console.log(`
Contacts:        ${total}
Opt-ins sent:    ${sent} (all runs)
Reminders sent:  ${reminded} (all runs)
Failed tasks:    ${
  failed.rows.map((row) => `${row.n} ${row.name}`).join(", ") || "none"
} (${bounced} addresses bounced)
Rejected:        ${rejected.length} (invalid addresses, this run)
Outbox:          ${outbox.pathname}
Time:            ${((performance.now() - startedAt) / 1000).toFixed(2)} s`);

database.close();
