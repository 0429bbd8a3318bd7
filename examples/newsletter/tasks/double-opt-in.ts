import * as v from "valibot";
import { defineDatabaseTask } from "../../../mod.ts";
import { database } from "../database.ts";
import { sendEmail } from "../mail.ts";

/** Asks a new contact to confirm their address. The task's name, "double-opt-in", is this file's. */
export default defineDatabaseTask(database, {
  schema: v.object({
    email: v.pipe(v.string(), v.email()),
    firstName: v.pipe(v.string(), v.nonEmpty()),
    lastName: v.string(),
  }),
  batchSize: 20,
  maxAttempts: 3,
  backoff: "50ms",
  timeout: "10s",
  async process({ data, signal }) {
    await sendEmail(
      data,
      "Please confirm your subscription",
      `Hello ${data.firstName},\n\nplease confirm that you want our newsletter by replying to this email.`,
      signal,
    );
  },
  async success({ data }) {
    await database.client.execute({
      sql: "UPDATE contacts SET double_opt_in_sent = ? WHERE email = ?",
      args: [Date.now(), data.email],
    });
  },
  async failed({ data }) {
    await database.client.execute({
      sql: "UPDATE contacts SET bounced = ? WHERE email = ?",
      args: [Date.now(), data.email],
    });
  },
});
