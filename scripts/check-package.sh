#!/usr/bin/env bash
# Packs tasklite with `npm pack`, whose prepack script runs the build, and checks the tarball's
# file list. Then installs the tarball into a new project in a temporary directory, imports it
# there from Node.js and Bun, and type-checks a TypeScript module against its declarations. The
# install fetches tasklite's dependencies from the npm registry, or from npm's cache.
#
# Run with: bash scripts/check-package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repository=$PWD
bin="$repository/node_modules/.bin"

fail() {
  echo "check-package: $*" >&2
  exit 1
}

# npm and JSR publish the same version.
npm_version=$(node -p 'require("./package.json").version')
jsr_version=$(node -p 'require("./deno.json").version')
if [ "$npm_version" != "$jsr_version" ]; then
  fail "package.json has version $npm_version but deno.json has $jsr_version: make them equal"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tasklite-package-XXXXXX")
trap 'rm -rf "$work"' EXIT

# npm pack prints the build's output, then the tarball's file name on its last line.
if ! npm pack --loglevel=warn --pack-destination "$work" >"$work/pack.log"; then
  cat "$work/pack.log"
  fail "npm pack failed"
fi
tarball="$work/$(tail -n 1 "$work/pack.log")"
[ -f "$tarball" ] || fail "npm pack did not write a tarball into $work"

# The tarball contains the build, the manifest and the README, and nothing else.
contents=$(tar -tzf "$tarball" | sort)
for required in package/package.json package/README.md package/dist/mod.js package/dist/mod.d.ts \
  package/dist/cli.js; do
  grep -qx "$required" <<<"$contents" || fail "$required is missing from the tarball"
done
unexpected=$(grep -v -E '^package/(package\.json|README\.md|LICENSE|dist/[^/]+\.(js|d\.ts))$' \
  <<<"$contents" || true)
[ -z "$unexpected" ] || fail "unexpected files in the tarball: $unexpected"
echo "tarball $(basename "$tarball"): $(wc -l <<<"$contents") files"

project="$work/project"
mkdir "$project"
cd "$project"
cat >package.json <<'EOF'
{ "name": "tasklite-package-check", "private": true, "type": "module" }
EOF
npm install --no-audit --no-fund --prefer-offline --loglevel=error "$tarball"

# Imports the installed package, runs one task and stops, under whichever runtime runs it.
cat >smoke.mjs <<'EOF'
import { defineDatabaseTask, openDatabase, perform, runTasks } from "tasklite";

const runtime = globalThis.Bun ? `bun ${Bun.version}` : `node ${process.versions.node}`;
const database = openDatabase(`file:${process.cwd()}/smoke.db`);
const runs = [];
const task = defineDatabaseTask(database, {
  name: "smoke",
  process({ data }) {
    runs.push(data);
  },
});
await perform(task, { n: 1 });
const quiet = () => {};
const runner = await runTasks([task], { logger: { debug: quiet, info: quiet, warn: quiet, error: quiet } });
const deadline = Date.now() + 5_000;
while (runs.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
await runner.stop();
database.close();
if (JSON.stringify(runs) !== '[{"n":1}]') {
  console.error(`The task did not run once with its data under ${runtime}: ${JSON.stringify(runs)}`);
  process.exit(1);
}
console.log(`imported the tarball and ran a task under ${runtime}`);
EOF
node smoke.mjs

# The `tasklite` command from package.json's bin, run through npm's link to it, reads the queue
# that the smoke test left.
status=$(./node_modules/.bin/tasklite status --db "file:$PWD/smoke.db" --json) ||
  fail "the installed tasklite command failed"
[ "$status" != "" ] || fail "the installed tasklite command printed nothing"
./node_modules/.bin/tasklite --help | grep -q "Usage: tasklite" ||
  fail "tasklite --help does not print its usage"
echo "ran the installed tasklite command"
"$bin/bun" smoke.mjs

# The declarations resolve through the "exports" map and keep the data type of a task.
cat >check.ts <<'EOF'
import { defineDatabaseTask, openDatabase, perform, type Task } from "tasklite";

const database = openDatabase("file:check.db");
const task: Task<{ n: number }> = defineDatabaseTask<{ n: number }>(database, {
  name: "typed",
  process({ data }) {
    data.n.toFixed();
  },
});
await perform(task, { n: 1 });
// @ts-expect-error: perform() rejects data of the wrong type.
await perform(task, { n: "one" });
EOF
cat >tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "target": "ES2022",
    "module": "NodeNext",
    "moduleResolution": "NodeNext",
    "lib": ["ES2023", "DOM"],
    "types": [],
    "strict": true,
    "skipLibCheck": true,
    "noEmit": true
  },
  "files": ["check.ts"]
}
EOF
"$bin/tsc" -p tsconfig.json
echo "type-checked an import of the tarball's declarations"
