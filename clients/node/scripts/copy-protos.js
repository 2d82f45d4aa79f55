#!/usr/bin/env node
/**
 * Copies the repository's public .proto files (../../protos, the single source
 * of truth; not the internal queue format) into this package's protos/ folder, so that the published package and
 * a copy of this folder outside the repository carry the API definition.
 *
 * Run by `npm run build` (and so by `prepare`, before `npm pack` / `npm publish`).
 * Outside the repository there is nothing to copy from: an existing protos/
 * (from an earlier build or the package tarball) is kept as it is.
 */
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const PACKAGE_ROOT = path.resolve(__dirname, "..");
const SOURCE = path.resolve(PACKAGE_ROOT, "..", "..", "protos");
const TARGET = path.join(PACKAGE_ROOT, "protos");
const PUBLIC_FILE = path.join("embedq", "v1", "embedq.proto");

function protoFiles(dir, base = dir) {
  const found = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...protoFiles(full, base));
    else if (entry.name.endsWith(".proto")) found.push(path.relative(base, full));
  }
  return found.sort();
}

if (fs.existsSync(path.join(SOURCE, PUBLIC_FILE))) {
  // A fresh copy each time: a .proto deleted or renamed upstream leaves no stale file here.
  fs.rmSync(TARGET, { recursive: true, force: true });
  // The public API only: embedq/internal/ is the private server-worker format, no client's business.
  const internal = path.join("embedq", "internal") + path.sep;
  const files = protoFiles(SOURCE).filter((file) => !file.startsWith(internal));
  for (const file of files) {
    fs.mkdirSync(path.dirname(path.join(TARGET, file)), { recursive: true });
    fs.copyFileSync(path.join(SOURCE, file), path.join(TARGET, file));
  }
  console.log(`copy-protos: ${files.length} .proto files from ${SOURCE}`);
} else if (fs.existsSync(path.join(TARGET, PUBLIC_FILE))) {
  console.log(`copy-protos: no ${SOURCE}; keeping the package's own protos/`);
} else {
  console.error(`copy-protos: neither ${SOURCE} nor ${TARGET} holds ${PUBLIC_FILE}`);
  process.exit(1);
}
