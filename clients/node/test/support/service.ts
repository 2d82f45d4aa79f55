/**
 * Test support: a real `embedq serve` (private Redis, one worker, the bundled
 * model) on a free port, a tiny RESP client for that Redis, and the Python
 * reference (the embedq Python client run through `python -c`).
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { EmbedqClient } from "../../src";

/** This package's folder (the one with package.json): `dist/test/support` is three below it. */
export function packageRoot(): string {
  let dir = __dirname;
  while (!existsSync(path.join(dir, "package.json"))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`no package.json above ${__dirname}`);
    dir = parent;
  }
  return dir;
}

/**
 * The embedq repository root when this package sits in one (`clients/node` of a
 * checkout, holding pyproject.toml and protos/), else undefined: the tests also
 * run from a copy of this folder anywhere else.
 */
export function findRepoRoot(): string | undefined {
  const root = path.resolve(packageRoot(), "..", "..");
  const marks = ["pyproject.toml", path.join("protos", "embedq", "v1", "embedq.proto")];
  return marks.every((mark) => existsSync(path.join(root, mark))) ? root : undefined;
}

function repoVenv(file: string): string | undefined {
  const repo = findRepoRoot();
  const candidate = repo === undefined ? undefined : path.join(repo, ".venv", "bin", file);
  return candidate !== undefined && existsSync(candidate) ? candidate : undefined;
}

/**
 * The Python that has embedq installed: env EMBEDQ_PYTHON, else the repository's
 * .venv/bin/python, else `python3` on PATH (a copy outside the repository).
 */
export function pythonExecutable(): string {
  return process.env.EMBEDQ_PYTHON || repoVenv("python") || "python3";
}

function serveCommand(port: number): [string, string[]] {
  const args = ["serve", "--host", "127.0.0.1", "--port", String(port)];
  if (process.env.EMBEDQ_PYTHON) return [process.env.EMBEDQ_PYTHON, ["-m", "embedq.cli", ...args]];
  return [repoVenv("embedq") ?? "embedq", args];
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/**
 * Hermetic child environment: offline model loading, and no EMBEDQ_* settings
 * from the caller's shell (private Redis, default namespace, no auth), except
 * EMBEDQ_PYTHON which only says which Python to use.
 */
export function childEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith("EMBEDQ_") || name === "EMBEDQ_PYTHON") env[name] = value;
  }
  return {
    ...env,
    HF_HUB_OFFLINE: "1",
    TRANSFORMERS_OFFLINE: "1",
    TOKENIZERS_PARALLELISM: "false",
    PYTHONUNBUFFERED: "1",
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const REDIS_LINE = /private redis \([^)]*\) on (redis:\/\/\S+)/;

export class Service {
  private log = "";
  readonly logFile: string;
  private exited: Promise<number | null>;
  private exitCode: number | null | undefined = undefined;

  private constructor(
    readonly proc: ChildProcess,
    readonly port: number,
  ) {
    this.logFile = path.join(mkdtempSync(path.join(tmpdir(), "embedq-node-test-")), "serve.log");
    const collect = (chunk: Buffer) => {
      this.log += chunk.toString("utf8");
    };
    proc.stdout?.on("data", collect);
    proc.stderr?.on("data", collect);
    this.exited = new Promise((resolve) => {
      proc.on("exit", (code, signal) => {
        this.exitCode = code ?? (signal ? -1 : null);
        resolve(this.exitCode);
      });
      proc.on("error", (err) => {
        this.log += `\nspawn error: ${err.message}\n`;
        this.exitCode = -1;
        resolve(-1);
      });
    });
  }

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** What `embedq serve` printed so far. */
  output(): string {
    return this.log;
  }

  tail(lines = 40): string {
    return this.log.split("\n").slice(-lines).join("\n");
  }

  /** The private Redis URL from the serve log line `private redis (...) on redis://...`. */
  redisUrl(): string {
    const match = REDIS_LINE.exec(this.log);
    if (!match) throw new Error(`no "private redis" line in the embedq serve log:\n${this.tail()}`);
    return match[1];
  }

  /** Spawns `embedq serve` and waits until Info reports a live worker. */
  static async start(timeoutMs = 150_000): Promise<Service> {
    const port = await freePort();
    const [command, args] = serveCommand(port);
    const proc = spawn(command, args, { env: childEnv(), stdio: ["ignore", "pipe", "pipe"] });
    const service = new Service(proc, port);
    const onExit = () => {
      if (service.exitCode === undefined) proc.kill("SIGINT");
    };
    process.once("exit", onExit);
    try {
      await service.waitReady(timeoutMs);
      return service;
    } catch (err) {
      await service.stop();
      throw err;
    }
  }

  private async waitReady(timeoutMs: number): Promise<void> {
    const client = new EmbedqClient(this.target, { timeoutMs: 2_000 });
    const deadline = Date.now() + timeoutMs;
    let last = "";
    try {
      while (Date.now() < deadline) {
        if (this.exitCode !== undefined) {
          throw new Error(`embedq serve exited (${this.exitCode}) before it was ready:\n${this.tail()}`);
        }
        try {
          const info = await client.info();
          if (info.models.length > 0 && info.models[0].workersAlive >= 1 && REDIS_LINE.test(this.log)) {
            return;
          }
          last = `workers_alive=${info.models[0]?.workersAlive ?? "no model"}`;
        } catch (err) {
          last = (err as Error).message;
        }
        await sleep(250);
      }
      throw new Error(`embedq serve not ready after ${timeoutMs} ms (${last}):\n${this.tail()}`);
    } finally {
      client.close();
    }
  }

  /** SIGINT (embedq serve stops its workers and Redis), SIGKILL if it hangs. */
  async stop(graceMs = 30_000): Promise<number | null> {
    if (this.exitCode === undefined) {
      this.proc.kill("SIGINT");
      const timer = setTimeout(() => this.proc.kill("SIGKILL"), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    try {
      writeFileSync(this.logFile, this.log);
    } catch {
      // best effort
    }
    return this.exitCode ?? null;
  }
}

// ---- a tiny RESP (Redis protocol) client -------------------------------------

export type RespValue = string | number | Buffer | null | RespValue[];

/** Runs one command on a Redis URL (redis://host:port/db) and returns its reply. */
export function redisCommand(url: string, ...args: string[]): Promise<RespValue> {
  const parsed = new URL(url);
  const db = Number(parsed.pathname.replace(/^\//, "") || "0");
  const commands = db ? [["SELECT", String(db)], args] : [args];
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(parsed.port || 6379), parsed.hostname || "127.0.0.1");
    let buffer = Buffer.alloc(0);
    const replies: RespValue[] = [];
    socket.setTimeout(5_000, () => socket.destroy(new Error("redis: timed out")));
    socket.on("error", reject);
    socket.on("connect", () => {
      socket.write(Buffer.concat(commands.map(encodeCommand)));
    });
    socket.on("data", (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      try {
        for (;;) {
          const parsedReply = parseReply(buffer, 0);
          if (!parsedReply) break;
          replies.push(parsedReply.value);
          buffer = buffer.subarray(parsedReply.end);
          if (replies.length === commands.length) {
            socket.end();
            resolve(replies[replies.length - 1]);
            return;
          }
        }
      } catch (err) {
        socket.destroy();
        reject(err);
      }
    });
  });
}

function encodeCommand(args: string[]): Buffer {
  const parts = [`*${args.length}\r\n`];
  for (const arg of args) parts.push(`$${Buffer.byteLength(arg, "utf8")}\r\n${arg}\r\n`);
  return Buffer.from(parts.join(""), "utf8");
}

function parseReply(buf: Buffer, start: number): { value: RespValue; end: number } | null {
  const lineEnd = buf.indexOf("\r\n", start);
  if (lineEnd < 0) return null;
  const type = String.fromCharCode(buf[start]);
  const line = buf.toString("utf8", start + 1, lineEnd);
  switch (type) {
    case "+":
      return { value: line, end: lineEnd + 2 };
    case "-":
      throw new Error(`redis error: ${line}`);
    case ":":
      return { value: Number(line), end: lineEnd + 2 };
    case "$": {
      const length = Number(line);
      if (length < 0) return { value: null, end: lineEnd + 2 };
      const dataEnd = lineEnd + 2 + length;
      if (buf.length < dataEnd + 2) return null;
      return { value: Buffer.from(buf.subarray(lineEnd + 2, dataEnd)), end: dataEnd + 2 };
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return { value: null, end: lineEnd + 2 };
      const items: RespValue[] = [];
      let at = lineEnd + 2;
      for (let i = 0; i < count; i++) {
        const item = parseReply(buf, at);
        if (!item) return null;
        items.push(item.value);
        at = item.end;
      }
      return { value: items, end: at };
    }
    default:
      throw new Error(`redis: unexpected reply type ${JSON.stringify(type)}`);
  }
}

// ---- the Python reference --------------------------------------------------------

const PYTHON_REFERENCE = `
import json, sys
from embedq.client import Client
from embedq.keys import Keys, text_sha256, variant_fingerprint

job = json.load(sys.stdin)
out = {"vectors": [], "keys": [], "sha256": [], "packed": []}
with Client(job["target"], timeout=120) as client:
    for text in job["encode"]:
        vector = client.encode([text])
        out["vectors"].append([float(x) for x in vector[0]])
    for texts, options in job.get("packed", []):
        rows = client.encode(texts, **options)
        out["packed"].append({"hex": rows.tobytes().hex(), "dtype": str(rows.dtype), "shape": list(rows.shape)})
for fingerprint, normalize, truncate, text in job["keys"]:
    variant = variant_fingerprint(fingerprint, normalize=normalize, truncate=truncate)
    out["keys"].append(Keys(job["namespace"]).cache(variant, text_sha256(text)))
    out["sha256"].append(text_sha256(text))
json.dump(out, sys.stdout)
`;

export interface PythonJob {
  target: string;
  namespace: string;
  /** Texts the Python client encodes, one request each, in order. */
  encode: string[];
  /** [fingerprint, normalize, truncate, text]: cache keys by embedq.keys. */
  keys: [string, boolean, boolean, string][];
  /** [texts, Python encode() keyword options]: one request each; the packed bytes come back. */
  packed?: [string[], Record<string, unknown>][];
}

export interface PythonAnswer {
  vectors: number[][];
  keys: string[];
  sha256: string[];
  /** Per `packed` job: the numpy array's bytes (hex), dtype name and shape. */
  packed: { hex: string; dtype: string; shape: number[] }[];
}

/** Runs the embedq Python client / key functions in a `python -c` child. */
export function pythonReference(job: PythonJob): Promise<PythonAnswer> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      pythonExecutable(),
      ["-c", PYTHON_REFERENCE],
      { timeout: 120_000, maxBuffer: 64 * 1024 * 1024, env: childEnv() },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`python reference failed: ${err.message}\n${stderr}`));
        else resolve(JSON.parse(stdout) as PythonAnswer);
      },
    );
    child.stdin?.end(JSON.stringify(job));
  });
}
