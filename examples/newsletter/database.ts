import { openDatabase } from "../../mod.ts";

/** The example's database file, beside this module, shared by the app and its tasks. */
export const database = openDatabase(new URL("./newsletter.db", import.meta.url).href);

/** The folder that the tasks write their emails to, as .eml files. */
export const outbox = new URL("./outbox/", import.meta.url);

/** Creates the application's own table, next to tasklite's `tasks` table. */
export async function createContactsTable(): Promise<void> {
  await database.client.execute(`CREATE TABLE IF NOT EXISTS contacts (
    email TEXT PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    city TEXT NOT NULL,
    confirmed INTEGER NOT NULL,
    double_opt_in_sent INTEGER,
    reminder_sent INTEGER,
    bounced INTEGER
  )`);
}
