// The build: node scripts/build.mjs [all|dist|test|static]
//   dist    tsc: dist/*.js and *.d.ts, the package as published
//   test    esbuild: src/ and test/ transpiled into build/ for `node --test`,
//           and the bindings test page bundle (React, TanStack Query, SWR)
//   static  esbuild: ../../relay/static/pgrelay-client.js, the browser bundle that
//           `pgrelay dev` serves to its demo page (committed, so `make run` needs no npm)
import { execFileSync } from "node:child_process";
import { readdirSync, rmSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const what = process.argv[2] ?? "all";

function files(dir) {
  return readdirSync(join(root, dir), { recursive: true })
    .filter((f) => /\.tsx?$/.test(f) && !f.endsWith(".d.ts"))
    .map((f) => join(dir, f));
}

if (what === "all" || what === "dist") {
  rmSync(join(root, "dist"), { recursive: true, force: true });
  execFileSync(join(root, "node_modules/.bin/tsc"), ["-p", "tsconfig.build.json"], {
    cwd: root,
    stdio: "inherit",
  });
}
if (what === "all" || what === "test") {
  rmSync(join(root, "build"), { recursive: true, force: true });
  await build({
    absWorkingDir: root,
    entryPoints: [...files("src"), ...files("test")],
    outdir: "build",
    outbase: ".",
    format: "esm",
    platform: "node",
    target: "node20",
    jsx: "automatic",
    logLevel: "warning",
  });
  await build({
    absWorkingDir: root,
    entryPoints: ["test/browser/bindings-page.tsx"],
    outfile: "build/browser/bindings-page.js",
    bundle: true,
    format: "iife",
    target: "es2022",
    jsx: "automatic",
    define: { "process.env.NODE_ENV": '"production"' },
    logLevel: "warning",
  });
}
if (what === "all" || what === "static") {
  await build({
    absWorkingDir: root,
    entryPoints: ["src/browser.ts"],
    outfile: "../../relay/static/pgrelay-client.js",
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2022",
    legalComments: "none",
    banner: {
      js: "// @pgrelay/client browser bundle (core + tabs + invalidate); built from clients/js/src by `npm run build`. Do not edit.",
    },
    logLevel: "warning",
  });
}
