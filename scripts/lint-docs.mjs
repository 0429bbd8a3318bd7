/**
 * Runs `deno doc --lint mod.ts`, which reports exported symbols without documentation, missing
 * types and references to types that mod.ts does not export. Fails on every diagnostic but one
 * kind: a reference to a type that mod.ts imports from a dependency, such as the libSQL `Client`
 * or valibot's schema types. Deno 2.9 reports those as private types, although they are public
 * in their own packages (https://github.com/denoland/deno/issues/27364).
 *
 * Run with: node scripts/lint-docs.mjs (with node_modules/.bin on PATH, or deno installed)
 */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";

const entry = "mod.ts";
const source = readFileSync(new URL(`../${entry}`, import.meta.url), "utf8");

/** Collects the names that `source` imports from packages, by name or through a namespace. */
function dependencyTypeNames(source) {
  const names = new Set();
  const fromPackage = (specifier) => !specifier.startsWith(".") && !specifier.startsWith("node:");

  for (const [, list, specifier] of source.matchAll(/^import\s*\{([^}]*)\}\s*from\s*"([^"]+)"/gm)) {
    if (!fromPackage(specifier)) continue;
    for (const item of list.split(",")) {
      // "type Client", "Client as LibsqlClient": the local name is the last word.
      const name = item.trim().split(/\s+/).at(-1);
      if (name) names.add(name);
    }
  }
  for (
    const [, namespace, specifier] of source.matchAll(
      /^import\s*\*\s*as\s+(\w+)\s+from\s*"([^"]+)"/gm,
    )
  ) {
    if (!fromPackage(specifier)) continue;
    for (const [, name] of source.matchAll(new RegExp(`\\b${namespace}\\.(\\w+)`, "g"))) {
      names.add(name);
    }
  }
  return names;
}

const dependencyTypes = dependencyTypeNames(source);
const result = spawnSync("deno", ["doc", "--lint", entry], {
  cwd: new URL("..", import.meta.url),
  encoding: "utf8",
  env: { ...process.env, NO_COLOR: "1" },
});
if (result.error) {
  console.error(`Cannot run deno: ${result.error.message}. Run npm install first.`);
  process.exit(1);
}
const output = `${result.stdout}${result.stderr}`;

// Each diagnostic starts with a line such as "error[missing-jsdoc]: ...".
const diagnostics = output.split(/^(?=error\[)/m).filter((block) => block.startsWith("error["));
const ignored = new Set();
const reported = diagnostics.filter((block) => {
  const type = /^error\[private-type-ref\]:.*references private type '([^']+)'/.exec(block)?.[1];
  if (type === undefined || !dependencyTypes.has(type)) return true;
  ignored.add(type);
  return false;
});

if (ignored.size > 0) {
  console.log(
    `deno doc --lint ${entry}: ignored references to dependency types: ${[...ignored].join(", ")}`,
  );
}
if (reported.length > 0) {
  console.log(reported.join("").trimEnd());
  console.log(`deno doc --lint ${entry}: ${reported.length} problems`);
  process.exit(1);
}
if (result.status !== 0 && diagnostics.length === 0) {
  // deno failed before it could lint, for example on a syntax error.
  console.log(output.trimEnd());
  process.exit(1);
}
console.log(`deno doc --lint ${entry}: no problems`);
