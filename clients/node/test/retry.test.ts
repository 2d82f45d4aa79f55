/**
 * Retries: the policy's arithmetic (offline), and the retry loop against a
 * real gRPC server that refuses on purpose. That server is a stand-in: it
 * implements only embedq.v1.Embedder/Info and answers RESOURCE_EXHAUSTED with
 * a `retry-after-ms` hint a given number of times, so that honouring the
 * hint can be timed exactly. The real embedq server is in service.test.ts
 * (and tests/test_client.py runs the retries against real processes).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import {
  DEFAULT_RETRY_POLICY,
  EmbedqClient,
  EmbedqError,
  MIN_ATTEMPT_MS,
  NO_RETRY,
  retryAfterMs,
  retryPauseMs,
} from "../src";
import { embedderClient } from "../src/proto";
import { backoffMs, isRetryable, toRetryPolicy } from "../src/retry";

const md = (value?: string): grpc.Metadata => {
  const m = new grpc.Metadata();
  if (value !== undefined) m.set("retry-after-ms", value);
  return m;
};
const unavailable = (hint?: string) => ({ code: 14, details: "no worker alive", metadata: md(hint) });

describe("retry policy", () => {
  test("the documented default and its schedule", () => {
    assert.deepEqual(
      { ...DEFAULT_RETRY_POLICY, codes: [...DEFAULT_RETRY_POLICY.codes] },
      { maxAttempts: 5, initialBackoffMs: 200, multiplier: 2, maxBackoffMs: 5000, jitter: 0.2, codes: [14, 8] },
    );
    const mid = [2, 3, 4, 5, 6, 7, 8].map((n) => backoffMs(DEFAULT_RETRY_POLICY, n, () => 0.5));
    assert.deepEqual(mid, [200, 400, 800, 1600, 3200, 5000, 5000]);
    assert.ok(Math.abs(backoffMs(DEFAULT_RETRY_POLICY, 3, () => 0) - 320) < 1e-9);
    assert.ok(Math.abs(backoffMs(DEFAULT_RETRY_POLICY, 3, () => 1) - 480) < 1e-9);
  });

  test("retry-after-ms parsing", () => {
    assert.equal(retryAfterMs(md("250")), 250);
    assert.equal(retryAfterMs(md(" 40 ")), 40);
    assert.equal(retryAfterMs(md("0")), 0);
    for (const bad of ["-5", "1.5", "soon", "", String(10 ** 12)]) assert.equal(retryAfterMs(md(bad)), undefined, bad);
    assert.equal(retryAfterMs(md()), undefined);
    assert.equal(retryAfterMs(undefined), undefined);
    assert.equal(new EmbedqError(8, "full", md("1500")).retryAfterMs, 1500);
  });

  test("pauses honour the hint, the deadline and maxAttempts", () => {
    const p = DEFAULT_RETRY_POLICY;
    const half = () => 0.5;
    assert.equal(retryPauseMs(p, 2, unavailable(), undefined, half), 200);
    assert.equal(retryPauseMs(p, 2, unavailable("3000"), undefined, () => 0), 3000);
    assert.ok(Math.abs((retryPauseMs(p, 2, unavailable("3000"), undefined, half) ?? 0) - 3300) < 1e-6);
    assert.equal(retryPauseMs(p, 2, unavailable("3000"), 2000, half), undefined); // past the deadline
    assert.equal(retryPauseMs(p, 4, unavailable(), 500, half), undefined);
    assert.ok(Math.abs((retryPauseMs(p, 4, unavailable(), 1000, half) ?? 0) - 800) < 1e-6);
    assert.equal(retryPauseMs(p, 4, unavailable(), 800 + MIN_ATTEMPT_MS / 2, half), undefined); // too close
    assert.notEqual(retryPauseMs(p, 5, unavailable(), undefined, half), undefined);
    assert.equal(retryPauseMs(p, 6, unavailable(), undefined, half), undefined);
    assert.equal(retryPauseMs(NO_RETRY, 2, unavailable(), undefined, half), undefined);
    for (const code of [3, 4, 5, 16]) assert.equal(retryPauseMs(p, 2, { code, details: "x" }, undefined), undefined);
    assert.equal(isRetryable({ code: 8, details: "Received message larger than max (9 vs. 4)" }), false);
    assert.equal(isRetryable({ code: 8, details: "queue is full" }), true);
    assert.equal(new EmbedqError(14, "x").retryable, true);
    assert.equal(new EmbedqError(3, "x").retryable, false);
  });

  test("the retry option", () => {
    assert.equal(toRetryPolicy(false).maxAttempts, 1);
    assert.equal(toRetryPolicy(true), DEFAULT_RETRY_POLICY);
    assert.equal(toRetryPolicy({ maxAttempts: 9 }).initialBackoffMs, 200);
    assert.throws(() => toRetryPolicy({ maxAttempts: 0 }), RangeError);
    assert.throws(() => toRetryPolicy({ jitter: 2 }), RangeError);
    assert.throws(() => toRetryPolicy({ multiplier: 0.5 }), RangeError);
    const client = new EmbedqClient("127.0.0.1:1", { retry: false });
    assert.equal(client.retry.maxAttempts, 1);
    client.close();
  });
});

describe("retry loop", () => {
  let server: grpc.Server;
  let target = "";
  let refusals = 0;
  let calls: number[] = [];
  let hint: string | undefined = "300";

  before(async () => {
    const Embedder = embedderClient();
    server = new grpc.Server();
    server.addService(Embedder.service, {
      Info: (_call: unknown, callback: grpc.sendUnaryData<unknown>) => {
        calls.push(Date.now());
        if (refusals > 0) {
          refusals--;
          callback({ code: grpc.status.RESOURCE_EXHAUSTED, details: "queue is full", metadata: md(hint) });
        } else {
          callback(null, { models: [], defaultModel: "m", limits: {}, version: "stand-in" });
        }
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) =>
        err ? reject(err) : resolve(p),
      ),
    );
    target = `127.0.0.1:${port}`;
  });
  after(() => server.forceShutdown());

  test("RESOURCE_EXHAUSTED is retried after the server's retry-after-ms", async () => {
    const client = new EmbedqClient(target, { retry: { initialBackoffMs: 1, jitter: 0 } });
    try {
      refusals = 2;
      calls = [];
      hint = "300";
      const info = await client.info();
      assert.equal(info.version, "stand-in");
      assert.equal(calls.length, 3);
      assert.ok(calls[1] - calls[0] >= 290 && calls[2] - calls[1] >= 290, `gaps: ${calls}`);
    } finally {
      client.close();
    }
  });

  test("retry: false fails at once; a hint past the deadline fails at once", async () => {
    const off = new EmbedqClient(target, { retry: false });
    const on = new EmbedqClient(target, { timeoutMs: 1000 });
    try {
      refusals = 1;
      calls = [];
      await assert.rejects(off.info(), (err: unknown) => {
        assert.ok(err instanceof EmbedqError);
        assert.equal(err.code, 8);
        assert.equal(err.attempts, 1);
        assert.equal(err.retryAfterMs, 300);
        return true;
      });
      refusals = 1;
      hint = "5000";
      const started = Date.now();
      await assert.rejects(on.info(), { code: 8, attempts: 1 });
      assert.ok(Date.now() - started < 2500, "waited for a hint that ends past the deadline");
    } finally {
      hint = "300";
      refusals = 0;
      off.close();
      on.close();
    }
  });

  test("UNAVAILABLE (nothing listening) is retried until the deadline, never past it", async () => {
    const off = new EmbedqClient("127.0.0.1:1", { retry: false, timeoutMs: 5000 });
    const on = new EmbedqClient("127.0.0.1:1", { timeoutMs: 1000, retry: { initialBackoffMs: 50, maxAttempts: 100 } });
    try {
      let started = Date.now();
      await assert.rejects(off.info(), { code: 14, attempts: 1 });
      assert.ok(Date.now() - started < 3000); // at once, not after the 5 s deadline
      started = Date.now();
      await assert.rejects(on.info(), (err: unknown) => {
        assert.ok(err instanceof EmbedqError && (err.code === 14 || err.code === 4), String(err));
        assert.ok(err.attempts > 1, `attempts ${err.attempts}`);
        return true;
      });
      assert.ok(Date.now() - started < 1000 + 1000, `took ${Date.now() - started} ms`); // a busy machine's slack
    } finally {
      off.close();
      on.close();
    }
  });
});
