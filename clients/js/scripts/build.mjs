// The build: node scripts/build.mjs [all|dist|test|static|check-static]
//   all           dist and test
//   dist          tsc: dist/*.js and *.d.ts, the package as published
//   test          esbuild: src/ and test/ transpiled into build/ for `node --test`,
//                 and the bindings test page bundle (React, TanStack Query, SWR)
//   static        esbuild: ../../relay/dev/static/pgrelay-client.js, the browser bundle that
//                 `pgrelay dev` serves to its demo page and the browser tests load
//                 (committed, so `make run` needs no npm)
//   check-static  fail when that committed bundle is not what src/ builds
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync, rmSync } from "node:fs";
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
const STATIC = "../../relay/dev/static/pgrelay-client.js";
const staticBundle = {
  absWorkingDir: root,
  entryPoints: ["src/browser.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  legalComments: "none",
  banner: {
    js: "// @pgrelay/client browser bundle (core, tabs, invalidate), built from clients/js/src by `make js-bundle`. Do not edit.",
  },
  logLevel: "warning",
};
if (what === "static") await build({ ...staticBundle, outfile: STATIC });
if (what === "check-static") {
  const out = await build({ ...staticBundle, outfile: STATIC, write: false });
  const committed = readFileSync(join(root, STATIC));
  if (Buffer.compare(Buffer.from(out.outputFiles[0].contents), committed) !== 0) {
    console.error(
      "relay/dev/static/pgrelay-client.js is not what clients/js/src builds: run `make js-bundle` and commit it",
    );
    process.exit(1);
  }
}
