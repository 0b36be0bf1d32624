/** The package as shipped: the core's size budget, no dependencies, the type tests compile. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const root = join(import.meta.dirname, "../../..");
/** At most 5 KB (5,120 bytes) min+gzip for the core. */
const CORE_BUDGET_BYTES = 5 * 1024;

async function minGzip(entry: string): Promise<number> {
  const out = await build({
    entryPoints: [join(root, entry)],
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2022",
    write: false,
    external: ["react", "@tanstack/react-query", "swr"],
    logLevel: "silent",
  });
  return gzipSync(out.outputFiles[0]!.contents, { level: 9 }).length;
}

test("the core (dist/index.js, every export) is at most 5 KB min+gzip", async (t) => {
  assert.ok(existsSync(join(root, "dist/index.js")), "build first: npm run build");
  const size = await minGzip("dist/index.js");
  t.diagnostic(`core: ${size} bytes min+gzip (budget ${CORE_BUDGET_BYTES})`);
  for (const entry of ["tabs", "invalidate", "react", "tanstack-query", "swr"])
    t.diagnostic(`${entry}: ${await minGzip(`dist/${entry}.js`)} bytes with the core it imports`);
  assert.ok(size <= CORE_BUDGET_BYTES, `${size} > ${CORE_BUDGET_BYTES}`);
});

test("the core imports nothing; the bindings import only their peer dependencies", () => {
  const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as {
    dependencies?: object;
  };
  assert.equal(pkg.dependencies, undefined, "zero runtime dependencies");
  const imports = (f: string) =>
    [...readFileSync(join(root, "dist", f), "utf8").matchAll(/from\s+"([^"]+)"/g)].map((m) => m[1]);
  for (const f of [
    "index.js",
    "client.js",
    "machine.js",
    "protocol.js",
    "storage.js",
    "closecodes.js",
  ])
    assert.ok(
      imports(f).every((i) => i!.startsWith("./")),
      `${f}: ${imports(f)}`,
    );
  assert.deepEqual(
    new Set(
      ["react.js", "tanstack-query.js", "swr.js"]
        .flatMap(imports)
        .filter((i) => !i!.startsWith("./")),
    ),
    new Set(["react", "@tanstack/react-query", "swr"]),
  );
  assert.ok(existsSync(join(root, "dist/index.d.ts")), "type declarations");
});

test("type tests of the frame types compile (every @ts-expect-error is an error)", () => {
  const tsc = join(root, "node_modules/.bin/tsc");
  try {
    execFileSync(tsc, ["--noEmit", "-p", "tsconfig.json"], { cwd: root, stdio: "pipe" });
  } catch (e) {
    assert.fail(String((e as { stdout?: Buffer }).stdout ?? e));
  }
});
