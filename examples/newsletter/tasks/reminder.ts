import * as v from "valibot";
import { defineDatabaseTask } from "../../../mod.ts";
import { database } from "../database.ts";
import { sendEmail } from "../mail.ts";

/**
 * Reminds a contact who has not confirmed yet. It is performed with a delay, and checks the
 * contact again when it runs: by then they may have confirmed, or their address may have bounced.
 */
export default defineDatabaseTask(database, {
  schema: v.object({
    email: v.pipe(v.string(), v.email()),
    firstName: v.string(),
    lastName: v.string(),
  }),
  batchSize: 20,
  maxAttempts: 3,
  backoff: "50ms",
  async process({ data, signal }) {
    const result = await database.client.execute({
      sql: "SELECT confirmed, bounced FROM contacts WHERE email = ?",
      args: [data.email],
    });
    const contact = result.rows[0];
    if (contact === undefined || contact.confirmed === 1 || contact.bounced !== null) return;
    await sendEmail(
      data,
      "Reminder: confirm your subscription",
      `Hello ${data.firstName},\n\nwe have not heard from you yet. Reply to this email to confirm.`,
      signal,
    );
    await database.client.execute({
      sql: "UPDATE contacts SET reminder_sent = ? WHERE email = ?",
      args: [Date.now(), data.email],
    });
  },
});
