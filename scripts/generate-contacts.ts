/**
 * Writes examples/newsletter/contacts.csv: 240 made-up contacts, the same on every run.
 *
 * Most addresses are valid. Four are malformed, so the example shows perform() rejecting data
 * that fails the schema, and six use the domain bounce.example, whose mailbox always rejects
 * mail, so the example shows retries ending in `failed`.
 *
 * Run with: bun scripts/generate-contacts.ts
 */
import { writeFileSync } from "node:fs";

const firstNames = [
  "Ada",
  "Alan",
  "Grace",
  "Edsger",
  "Barbara",
  "Donald",
  "Frances",
  "Ken",
  "Radia",
  "Tim",
  "Margaret",
  "Linus",
  "Hedy",
  "Dennis",
  "Katherine",
  "John",
  "Sophie",
  "Yukihiro",
  "Anita",
  "Guido",
  "Mary",
  "Bjarne",
  "Shafi",
  "Niklaus",
  "Leslie",
  "Adele",
  "Whitfield",
  "Fei-Fei",
  "Satoshi",
  "Ingrid",
  "Kwame",
  "Amara",
  "Mateo",
  "Priya",
  "Olusegun",
  "Chen",
  "Aroha",
  "Lars",
  "Zeynep",
  "Diego",
];
const lastNames = [
  "Lovelace",
  "Turing",
  "Hopper",
  "Dijkstra",
  "Liskov",
  "Knuth",
  "Allen",
  "Thompson",
  "Perlman",
  "Berners-Lee",
  "Hamilton",
  "Torvalds",
  "Lamarr",
  "Ritchie",
  "Johnson",
  "McCarthy",
  "Wilson",
  "Matsumoto",
  "Borg",
  "van Rossum",
  "Keller",
  "Stroustrup",
  "Goldwasser",
  "Wirth",
  "Lamport",
  "Goldberg",
  "Diffie",
  "Li",
  "Tanaka",
  "Daubechies",
  "Mensah",
  "Okafor",
  "García",
  "Iyer",
  "Adeyemi",
  "Wei",
  "Ngata",
  "Svensson",
  "Yılmaz",
  "Fernández",
];
const cities = [
  "Lisbon",
  "Nairobi",
  "Osaka",
  "Montréal",
  "Bergen",
  "Valparaíso",
  "Auckland",
  "Kraków",
  "Pune",
  "Austin",
  "Accra",
  "Tallinn",
];

// A small linear congruential generator keeps the file identical on every run.
let seed = 20261204;
function random(): number {
  seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648;
  return seed / 2_147_483_648;
}
const pick = <T>(list: T[]): T => list[Math.floor(random() * list.length)];

function csvField(value: string): string {
  return /[",\n]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value;
}

const malformed = new Map([[17, "grace.hopper@"], [58, "no-at-sign.example.com"], [
  121,
  "two@@example.com",
], [203, ""]]);
const bouncing = new Set([9, 44, 88, 131, 170, 222]);

const lines = ["first_name,last_name,email,city,signed_up,confirmed"];
const used = new Set<string>();
for (let index = 0; index < 240; index++) {
  const first = pick(firstNames);
  const last = pick(lastNames);
  const local = `${first}.${last}`.toLowerCase().normalize("NFD").replace(/[^a-z.]/g, "");
  let email = `${local}@${
    bouncing.has(index) ? "bounce.example" : pick(["example.com", "example.org", "example.net"])
  }`;
  for (let suffix = 2; used.has(email); suffix++) email = email.replace("@", `${suffix}@`);
  used.add(email);
  email = malformed.get(index) ?? email;
  const signedUp = new Date(
    Date.UTC(2026, Math.floor(random() * 11), 1 + Math.floor(random() * 28)),
  );
  const confirmed = random() < 0.4 ? "yes" : "no";
  lines.push(
    [first, last, email, pick(cities), signedUp.toISOString().slice(0, 10), confirmed].map(csvField)
      .join(","),
  );
}

const target = new URL("../examples/newsletter/contacts.csv", import.meta.url);
writeFileSync(target, `${lines.join("\n")}\n`);
console.log(`Wrote ${lines.length - 1} contacts to ${target.pathname}`);
