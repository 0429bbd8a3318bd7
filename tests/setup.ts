// Preloaded by `npm test` (bun test --preload). Bun evaluates tests/helpers.ts once for all test
// files, so the cleanup is registered here, where an afterAll hook runs after the last file.
import { afterAll } from "bun:test";
import { removeTemporaryDirectories } from "./helpers.ts";

afterAll(removeTemporaryDirectories);
