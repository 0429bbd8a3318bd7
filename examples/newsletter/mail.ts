import { mkdir, writeFile } from "node:fs/promises";
import { outbox } from "./database.ts";

/** A contact as the tasks receive it. */
export interface Contact {
  email: string;
  firstName: string;
  lastName: string;
}

/**
 * Writes an email to the outbox as an .eml file. Addresses at bounce.example stand for
 * mailboxes that reject mail: sending to them throws, as an SMTP client would.
 */
export async function sendEmail(
  to: Contact,
  subject: string,
  body: string,
  signal: AbortSignal,
): Promise<string> {
  if (to.email.endsWith("@bounce.example")) {
    throw new Error(`550 mailbox unavailable: ${to.email}`);
  }
  signal.throwIfAborted();
  await mkdir(outbox, { recursive: true });
  const file = new URL(`${subject.toLowerCase().replace(/[^a-z]+/g, "-")}-${to.email}.eml`, outbox);
  const message = [
    "From: Newsletter <newsletter@example.com>",
    `To: ${to.firstName} ${to.lastName} <${to.email}>`,
    `Subject: ${subject}`,
    "Content-Type: text/plain; charset=utf-8",
    "",
    body,
    "",
  ].join("\r\n");
  await writeFile(file, message, { signal });
  return file.pathname;
}
